// The page pool's CUDA backend: arenas of managed memory (cudaMallocManaged), each no larger than the
// device's free memory when it is created. Hot pages are advised to and prefetched to the device on
// the current stream before their update; evicted pages are advised back to the host and prefetched
// there. CUDA 13 takes a cudaMemLocation in cudaMemPrefetchAsync / cudaMemAdvise (12.2+: the _v2
// entry points); older toolkits take a device ordinal.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>

#include "optim/page_pool.h"

namespace peftx {
namespace optim {
namespace {

class ManagedBackend final : public PageBackend {
 public:
  explicit ManagedBackend(int device) : device_(device) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    int managed = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&managed, cudaDevAttrConcurrentManagedAccess, device_));
    TORCH_CHECK(managed == 1, "page pool: cuda:", device_,
                " cannot page managed memory (no concurrent managed access on this system)");
  }

  void* map_arena(int64_t, int64_t bytes) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    const int64_t free = device_free_bytes();
    TORCH_CHECK(bytes <= free, "page pool: ", bytes, " bytes of managed memory would exceed the ", free,
                " bytes free on cuda:", device_);
    void* p = nullptr;
    C10_CUDA_CHECK(cudaMallocManaged(&p, static_cast<size_t>(bytes), cudaMemAttachGlobal));
    // New state starts cold on the host, zeroed there (no kernel can be using it yet).
    advise(p, bytes, /*on_device=*/false);
    std::memset(p, 0, static_cast<size_t>(bytes));
    return p;
  }
  void unmap_arena(void* base, int64_t) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    // Kernels queued on these pages must finish before the memory goes away.
    cudaDeviceSynchronize();
    cudaFree(base);
  }
  void reserve(int64_t, void*, int64_t) override {}
  void discard(int64_t, void* p, int64_t bytes) override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    C10_CUDA_CHECK(cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), stream()));
  }
  // Stream-ordered: the update kernels on the current stream run after the migration; nothing to
  // wait for on the host.
  int64_t load(int64_t, void* p, int64_t bytes, bool) override {
    move(p, bytes, /*on_device=*/true);
    return 0;
  }
  int64_t store(int64_t, void* p, int64_t bytes, bool) override {
    move(p, bytes, /*on_device=*/false);
    return 0;
  }
  void drop(int64_t, void* p, int64_t bytes) override { move(p, bytes, /*on_device=*/false); }
  void wait(int64_t) override {}
  bool done(int64_t) override { return true; }

  int64_t device_free_bytes() override {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    size_t free = 0, total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return static_cast<int64_t>(free);
  }
  at::Device device() const override { return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_)); }
  std::string location() const override { return "cuda:" + std::to_string(device_) + " managed memory"; }

 private:
  cudaStream_t stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }

  void advise(void* p, int64_t bytes, bool on_device) {
#if CUDART_VERSION >= 12020
    cudaMemLocation loc{};
    loc.type = on_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
    loc.id = on_device ? device_ : 0;
#if CUDART_VERSION >= 13000
    C10_CUDA_CHECK(cudaMemAdvise(p, static_cast<size_t>(bytes), cudaMemAdviseSetPreferredLocation, loc));
#else
    C10_CUDA_CHECK(cudaMemAdvise_v2(p, static_cast<size_t>(bytes), cudaMemAdviseSetPreferredLocation, loc));
#endif
#else
    C10_CUDA_CHECK(cudaMemAdvise(p, static_cast<size_t>(bytes), cudaMemAdviseSetPreferredLocation,
                                 on_device ? device_ : cudaCpuDeviceId));
#endif
  }

  void move(void* p, int64_t bytes, bool on_device) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    advise(p, bytes, on_device);
#if CUDART_VERSION >= 12020
    cudaMemLocation loc{};
    loc.type = on_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
    loc.id = on_device ? device_ : 0;
#if CUDART_VERSION >= 13000
    C10_CUDA_CHECK(cudaMemPrefetchAsync(p, static_cast<size_t>(bytes), loc, 0, stream()));
#else
    C10_CUDA_CHECK(cudaMemPrefetchAsync_v2(p, static_cast<size_t>(bytes), loc, 0, stream()));
#endif
#else
    C10_CUDA_CHECK(cudaMemPrefetchAsync(p, static_cast<size_t>(bytes), on_device ? device_ : cudaCpuDeviceId, stream()));
#endif
  }

  int device_;
};

}  // namespace

std::unique_ptr<PageBackend> make_managed_backend(int device) { return std::make_unique<ManagedBackend>(device); }

}  // namespace optim
}  // namespace peftx
