// A pool of optimizer-state pages with a resident budget, in plain C++ (no op: the paged optimizers
// call it between fused steps). State buffers are handed out as real tensors whose deleter returns
// their bytes to the pool; the pool's memory lives as long as any of its tensors or the pool itself.
//
//   CPU:  explicit paging through a file in a directory the caller names (page_file.cpp; the file
//         is unlinked as soon as it is created, so it never outlives the process). Disk space is
//         reserved (posix_fallocate) when a buffer is allocated, so a full disk is an error at
//         allocation, not in the middle of a step.
//   CUDA: cudaMallocManaged arenas, never larger than the device's free memory when created
//         (page_pool_cuda.cpp).
//
// Residency is tracked per pool page (page_bytes, a multiple of the OS page). Each page is cold
// (in the backing store only), loading (an asynchronous load in flight), resident, or storing (an
// asynchronous store in flight); all but cold count in the budget.
//   acquire(tensors):  the pages under the tensors become resident before their update, evicting
//                      the least recently used pages beyond the budget;
//   prefetch(tensors): best effort, starts loading the cold pages that fit without waiting (never
//                      evicts what the last acquire brought in, nor a page with I/O in flight);
//   release(tensors):  the update is done: starts storing the pages (they stay counted until the
//                      store completes and the page is evicted), except pages the last prefetch
//                      also covers (they stay resident for that update).
// Writes to state tensors must happen between acquire and release (the optimizers' steps and
// load_state_dict do); reads are correct at any time. A budget of 0 means no budget: the pool
// never moves pages (on the CPU the kernel pages a shared file mapping by itself).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace peftx {
namespace optim {

// Where the pool's memory lives and how pages move. Offsets are in the backing store; ranges are
// page aligned. load / store return a job id to wait for (0: already done).
class PageBackend {
 public:
  virtual ~PageBackend() = default;
  virtual void* map_arena(int64_t offset, int64_t bytes) = 0;  // zero-filled
  virtual void unmap_arena(void* base, int64_t bytes) = 0;
  virtual void reserve(int64_t offset, void* p, int64_t bytes) = 0;  // backs a new allocation
  virtual void discard(int64_t offset, void* p, int64_t bytes) = 0;  // a freed range: zero, unbacked
  virtual int64_t load(int64_t offset, void* p, int64_t bytes, bool async) = 0;   // make resident
  virtual int64_t store(int64_t offset, void* p, int64_t bytes, bool async) = 0;  // write back, free memory
  virtual void drop(int64_t offset, void* p, int64_t bytes) = 0;  // free memory of an unmodified range
  virtual void wait(int64_t job) = 0;  // throws the job's error
  virtual bool done(int64_t job) = 0;  // whether wait(job) would return at once
  // Bytes the device could still take (CUDA); -1 when not a concern (CPU).
  virtual int64_t device_free_bytes() = 0;
  virtual at::Device device() const = 0;
  virtual std::string location() const = 0;
  virtual int fd() const { return -1; }
};

// shared: no budget; the arenas are shared mappings the kernel pages by itself.
std::unique_ptr<PageBackend> make_file_backend(const std::string& dir, bool shared);
// Defined in page_pool_cuda.cpp (CUDA builds only).
std::unique_ptr<PageBackend> make_managed_backend(int device);

class PoolCore : public std::enable_shared_from_this<PoolCore> {
 public:
  PoolCore(std::unique_ptr<PageBackend> backend, int64_t budget_bytes, int64_t page_bytes);
  ~PoolCore();

  at::Tensor alloc(int64_t nbytes);
  void acquire(const std::vector<at::Tensor>& views);
  void prefetch(const std::vector<at::Tensor>& views);
  void release(const std::vector<at::Tensor>& views);
  void trim();         // store or drop every page: nothing resident
  void reset_stats();  // zero the counters, peak = current
  std::map<std::string, int64_t> stats();
  // [address, bytes, offset in the backing store] of each arena.
  std::vector<std::vector<int64_t>> arenas();
  const PageBackend& backend() const { return *backend_; }

 private:
  enum State : char { kCold = 0, kLoading, kResident, kStoring };
  struct Arena {
    uint8_t* base;
    int64_t bytes;
    int64_t offset;      // in the backing store
    int64_t first_page;  // global index of its first pool page
    std::map<int64_t, int64_t> free;  // arena-relative offset -> length
  };
  struct Run {
    size_t arena;
    int64_t first, count;  // arena-relative page indices
  };

  void free_range(uint8_t* p, int64_t bytes);
  size_t arena_of(const void* p, int64_t bytes) const;
  std::vector<int64_t> pages_of(const std::vector<at::Tensor>& views) const;  // sorted, unique
  std::vector<Run> runs(const std::vector<int64_t>& sorted_pages) const;
  // Calls fn(offset in the store, address, bytes, pages of the run) for each run of `pages`.
  template <typename Fn>
  void for_runs(std::vector<int64_t> pages, Fn&& fn);
  void settle(const std::vector<int64_t>& pages);  // wait for in-flight jobs on these pages
  void touch(const std::vector<int64_t>& pages);   // mark hot, most recently used
  void evict(std::vector<int64_t> pages);
  int64_t ensure_room(const std::vector<int64_t>& wanted, int64_t need, bool prefetching);

  std::mutex mu_;
  std::unique_ptr<PageBackend> backend_;
  const int64_t page_bytes_;
  const int64_t budget_pages_;  // 0: no budget
  std::vector<Arena> arenas_;
  int64_t next_offset_ = 0;
  int64_t pages_ = 0;
  std::vector<char> state_;        // per page
  std::vector<int64_t> job_;       // per page: the load / store in flight
  std::vector<int64_t> last_use_;  // per page: tick of the last acquire / prefetch (hot pages)
  std::set<std::pair<int64_t, int64_t>> lru_;  // (tick, page) of hot pages
  int64_t tick_ = 0, acquire_tick_ = 0;
  int64_t hot_pages_ = 0, peak_hot_pages_ = 0;
  int64_t allocated_bytes_ = 0;
  int64_t stored_bytes_ = 0, loaded_bytes_ = 0;
};

}  // namespace optim
}  // namespace peftx
