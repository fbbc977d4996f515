// The page pool as a torch custom class, torch.classes.peftx.PagePool (Python: peftx.optim.paged):
//   PagePool(str location, int resident_bytes, int page_bytes, str device)
//     location: the page directory (CPU); ignored for CUDA. resident_bytes 0: no budget.
//   alloc(int nbytes) -> Tensor            zeroed uint8 buffer on the pool's device
//   acquire(Tensor[]) / prefetch(Tensor[]) / release(Tensor[]) / trim() / reset_stats()
//   stats() -> Dict[str, int];  arenas() -> [[address, bytes, file offset]];  path() -> str;  fd() -> int
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>

#include "optim/page_pool.h"

namespace peftx {
namespace optim {
namespace {

class PagePool : public torch::CustomClassHolder {
 public:
  PagePool(const std::string& location, int64_t resident_bytes, int64_t page_bytes, const std::string& device) {
    const at::Device dev(device);
    std::unique_ptr<PageBackend> backend;
    if (dev.is_cpu()) {
      backend = make_file_backend(location, /*shared=*/resident_bytes == 0);
    } else if (dev.is_cuda()) {
#ifdef PEFTX_WITH_CUDA
      backend = make_managed_backend(dev.has_index() ? dev.index() : 0);
#else
      TORCH_CHECK(false, "page pool: this peftx build has no CUDA support; paged CUDA state needs a CUDA build");
#endif
    } else {
      TORCH_CHECK(false, "page pool: device must be cpu or cuda, got ", device);
    }
    core_ = std::make_shared<PoolCore>(std::move(backend), resident_bytes, page_bytes);
  }

  at::Tensor alloc(int64_t nbytes) { return core_->alloc(nbytes); }
  void acquire(const std::vector<at::Tensor>& views) { core_->acquire(views); }
  void prefetch(const std::vector<at::Tensor>& views) { core_->prefetch(views); }
  void release(const std::vector<at::Tensor>& views) { core_->release(views); }
  void trim() { core_->trim(); }
  void reset_stats() { core_->reset_stats(); }
  c10::Dict<std::string, int64_t> stats() {
    c10::Dict<std::string, int64_t> d;
    for (const auto& [k, v] : core_->stats()) d.insert(k, v);
    return d;
  }
  std::vector<std::vector<int64_t>> arenas() { return core_->arenas(); }
  std::string path() { return core_->backend().location(); }
  int64_t fd() { return core_->backend().fd(); }

 private:
  std::shared_ptr<PoolCore> core_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(peftx, m) {
  m.class_<PagePool>("PagePool")
      .def(torch::init<std::string, int64_t, int64_t, std::string>())
      .def("alloc", &PagePool::alloc)
      .def("acquire", &PagePool::acquire)
      .def("prefetch", &PagePool::prefetch)
      .def("release", &PagePool::release)
      .def("trim", &PagePool::trim)
      .def("reset_stats", &PagePool::reset_stats)
      .def("stats", &PagePool::stats)
      .def("arenas", &PagePool::arenas)
      .def("path", &PagePool::path)
      .def("fd", &PagePool::fd);
}

}  // namespace optim
}  // namespace peftx
