// A pool of optimizer-state pages with a resident budget, in plain C++ (no op: the paged optimizers
// call it between fused steps). State buffers are handed out as real tensors whose deleter returns
// their bytes to the pool; the pool's memory lives as long as any of its tensors or the pool itself.
//
//   CPU:  explicit paging through a file in a directory the caller names (unlinked as soon as it is
//         created, so it never outlives the process): resident pages are anonymous memory, evicted
//         pages a private mapping of the file, so a tensor reads correctly whether resident or not
//         and never moves; pages move by large pread / pwrite calls (page_pool.cpp). Disk space is
//         reserved (posix_fallocate) when a buffer is allocated, so a full disk is an error at
//         allocation, not in the middle of a step.
//   CUDA: cudaMallocManaged arenas, never larger than the device's free memory at the time.
//
// Residency is tracked per pool page (page_bytes, a multiple of the OS page). acquire() makes the
// pages under some tensors hot before their update (CPU: read from the file; CUDA: prefetched to the
// device), evicting the least recently used hot pages beyond the budget (CPU: written to the file,
// dropped from memory and page cache; CUDA: advised to and prefetched to the host). prefetch()
// starts bringing in the next pages asynchronously (CPU: read-ahead into the page cache, counted in
// the budget); release() ends an update (CPU: the pages are written to the file, the disk write
// overlapping what follows; they stay counted in the budget until evicted). Writes to state tensors must happen between
// acquire and the next eviction (the optimizers' steps and load_state_dict do); reads are correct at
// any time. A budget of 0 means no budget (nothing is evicted by the pool).
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

// Where the pool's memory lives and how pages move. Offsets are in the backing store (CPU: the
// file; CUDA: arena-relative bookkeeping only); every range is page aligned.
class PageBackend {
 public:
  virtual ~PageBackend() = default;
  virtual void* map_arena(int64_t offset, int64_t bytes) = 0;  // zero-filled on first touch
  virtual void unmap_arena(void* base, int64_t bytes) = 0;
  virtual void reserve(int64_t offset, void* p, int64_t bytes) = 0;  // backs a new allocation
  virtual void discard(int64_t offset, void* p, int64_t bytes) = 0;  // a freed range: zero, unbacked
  virtual void make_resident(int64_t offset, void* p, int64_t bytes) = 0;
  virtual void prefetch(int64_t offset, void* p, int64_t bytes) = 0;
  virtual void writeback(int64_t offset, void* p, int64_t bytes) = 0;  // after an update of a resident range
  // dirty: the range was made resident and may hold updates that must reach the backing store.
  virtual void evict(int64_t offset, void* p, int64_t bytes, bool dirty) = 0;
  // Bytes the device could still take (CUDA); -1 when not a concern (CPU).
  virtual int64_t device_free_bytes() = 0;
  virtual at::Device device() const = 0;
  virtual std::string location() const = 0;
  virtual int fd() const { return -1; }
};

// shared: no budget; the arenas are shared mappings the kernel pages by itself.
std::unique_ptr<PageBackend> make_file_backend(const std::string& dir, bool shared, int64_t page_bytes);
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
  void trim();         // write back and drop every page of the pool
  void reset_stats();  // zero the counters, peak = current
  std::map<std::string, int64_t> stats();
  // Byte ranges [address, length) of the pool's arenas, and where each begins in the backing store.
  std::vector<std::vector<int64_t>> arenas();
  const PageBackend& backend() const { return *backend_; }

 private:
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
  std::vector<Run> runs(std::vector<int64_t> pages) const;
  void make_hot(const std::vector<int64_t>& pages, bool wait);
  void evict_pages(std::vector<int64_t> pages);
  int64_t ensure_room(const std::vector<int64_t>& wanted, int64_t need, bool keep_recent);

  std::mutex mu_;
  std::unique_ptr<PageBackend> backend_;
  const int64_t page_bytes_;
  const int64_t budget_pages_;  // 0: no budget
  std::vector<Arena> arenas_;
  int64_t next_offset_ = 0;
  int64_t pages_ = 0;
  std::vector<int64_t> last_use_;  // per page: tick of the last acquire / prefetch, -1 when cold
  std::vector<char> populated_;    // per page: mapped by an acquire since it was last evicted
  std::set<std::pair<int64_t, int64_t>> lru_;  // (tick, page) of hot pages
  int64_t tick_ = 0, acquire_tick_ = 0;
  int64_t hot_pages_ = 0, peak_hot_pages_ = 0;
  int64_t allocated_bytes_ = 0;
  int64_t evicted_bytes_ = 0, resident_bytes_made_ = 0, evictions_ = 0;
};

}  // namespace optim
}  // namespace peftx
