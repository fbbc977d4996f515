// The page pool's bookkeeping (allocation, residency, LRU eviction) and its CPU backend: explicit
// paging through a file. See page_pool.h.
#include "optim/page_pool.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

namespace peftx {
namespace optim {
namespace {

// New arenas are at least this large (more when one buffer needs more), so many small LoRA
// buffers share a mapping.
constexpr int64_t kArenaBytes = int64_t(64) << 20;

int64_t os_page() {
  static const int64_t p = sysconf(_SC_PAGESIZE);
  return p;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string errno_text(int e) { return std::string(std::strerror(e)); }

// Explicit paging through a file. A resident range is anonymous memory holding the current state;
// an evicted range is a private mapping of the file, whose content is the state (so the tensors
// read correctly at every moment, resident or not, and their addresses never change). Pages move
// by large pread / pwrite calls, never one page fault at a time:
//   make_resident: map anonymous memory over the range (MAP_FIXED), pread the file into it, drop
//                  the file's cached copy;
//   evict:         pwrite the range to the file, wait for it to reach the disk, map the file back
//                  over the range (MAP_FIXED) and drop the cached copy;
//   writeback:     after an update: pwrite the range, map the file back over it and start writing
//                  to disk (the page cache now holds the state; eviction waits and drops it);
//   prefetch:      asynchronous read-ahead of the file range into the page cache.
// Without a budget (shared = true) the arenas are shared mappings of the file instead: the page
// cache is the state's memory, and the kernel writes it to the file under memory pressure.
class FileBackend final : public PageBackend {
 public:
  FileBackend(const std::string& dir, bool shared, int64_t page_bytes)
      : dir_(dir), shared_(shared), page_bytes_(page_bytes) {
    TORCH_CHECK(!dir.empty(), "page pool: the page directory must be a non-empty path");
    std::string name = dir + "/peftx-pages-XXXXXX";
    fd_ = mkostemp(name.data(), O_CLOEXEC);
    TORCH_CHECK(fd_ >= 0, "page pool: cannot create a page file in '", dir, "': ", errno_text(errno),
                " (page_dir must be an existing, writable directory)");
    // Unlinked at once: the file lives exactly as long as the mapping and the descriptor.
    unlink(name.c_str());
    path_ = name;
    // No read-ahead beyond what the pool asks for (a read of a range still reads it in one go), so
    // the page cache holds no more of the file than the budget.
    posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
  }
  ~FileBackend() override { close(fd_); }

  void* map_arena(int64_t offset, int64_t bytes) override {
    void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, shared_ ? MAP_SHARED : MAP_PRIVATE,
                   fd_, offset);
    TORCH_CHECK(p != MAP_FAILED, "page pool: cannot map ", bytes, " bytes of '", path_, "': ", errno_text(errno));
    return p;
  }
  void unmap_arena(void* base, int64_t bytes) override { munmap(base, static_cast<size_t>(bytes)); }

  void reserve(int64_t offset, void*, int64_t bytes) override {
    const int r = posix_fallocate(fd_, offset, bytes);
    TORCH_CHECK(r == 0, "page pool: cannot reserve ", bytes, " bytes for optimizer state in '", dir_, "': ",
                errno_text(r),
                r == ENOSPC || r == EFBIG || r == EDQUOT ? " (the page directory is full or over its file size limit)"
                                                         : "");
    file_end_ = std::max(file_end_, offset + bytes);
  }

  void discard(int64_t offset, void* p, int64_t bytes) override {
    // Freed bytes read back as zeros (a hole, mapped from the file) and give their disk blocks back.
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes) == 0) {
      if (!shared_) map_file(offset, p, bytes);
    } else {
      std::memset(p, 0, static_cast<size_t>(bytes));
    }
  }

  void make_resident(int64_t offset, void* p, int64_t bytes) override {
    bytes = within_file(offset, bytes);  // the last pool page may reach past every allocation
    if (bytes <= 0) return;
    void* q = mmap(p, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                   -1, 0);
    TORCH_CHECK(q == p, "page pool: cannot map memory for optimizer state: ", errno_text(errno));
    for (int64_t done = 0; done < bytes;) {
      const ssize_t r = pread(fd_, static_cast<uint8_t*>(p) + done, static_cast<size_t>(bytes - done), offset + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        const int e = r < 0 ? errno : EIO;
        map_file(offset, p, bytes);  // leave the range showing the file, as before
        TORCH_CHECK(false, "page pool: cannot read optimizer state back from '", dir_, "': ", errno_text(e));
      }
      done += r;
    }
    posix_fadvise(fd_, offset, bytes, POSIX_FADV_DONTNEED);
  }

  void prefetch(int64_t offset, void*, int64_t bytes) override {
    bytes = within_file(offset, bytes);
    // Page by page: the page cache then holds no folio larger than a pool page, so evicting any
    // set of pages drops them (a folio straddling the evicted range would stay).
    for (int64_t done = 0; done < bytes; done += page_bytes_)
      posix_fadvise(fd_, offset + done, std::min(page_bytes_, bytes - done), POSIX_FADV_WILLNEED);
  }

  void writeback(int64_t offset, void* p, int64_t bytes) override {
    bytes = within_file(offset, bytes);
    if (bytes <= 0) return;
    write_range(offset, p, bytes);
    map_file(offset, p, bytes);
    const int r = sync_file_range(fd_, offset, bytes, SYNC_FILE_RANGE_WRITE);
    TORCH_CHECK(r == 0, "page pool: cannot write optimizer state to '", dir_, "': ", errno_text(errno));
  }

  void evict(int64_t offset, void* p, int64_t bytes, bool dirty) override {
    bytes = within_file(offset, bytes);
    if (bytes <= 0) return;
    if (dirty) {
      write_range(offset, p, bytes);
      map_file(offset, p, bytes);
    }
    // Written (here or by writeback) and on disk before the page cache copy is dropped.
    const int r = sync_file_range(fd_, offset, bytes,
                                  SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    TORCH_CHECK(r == 0, "page pool: cannot write optimizer state to '", dir_, "': ", errno_text(errno));
    posix_fadvise(fd_, offset, bytes, POSIX_FADV_DONTNEED);
  }

  int64_t device_free_bytes() override { return -1; }
  at::Device device() const override { return at::Device(at::kCPU); }
  std::string location() const override { return path_; }
  int fd() const override { return fd_; }

 private:
  int64_t within_file(int64_t offset, int64_t bytes) const { return std::min(bytes, file_end_ - offset); }

  // Page by page, for the same reason as prefetch.
  void write_range(int64_t offset, const void* p, int64_t bytes) {
    for (int64_t done = 0; done < bytes;) {
      const int64_t page_end = (done / page_bytes_ + 1) * page_bytes_;
      const ssize_t r = pwrite(fd_, static_cast<const uint8_t*>(p) + done,
                               static_cast<size_t>(std::min(bytes, page_end) - done), offset + done);
      if (r < 0 && errno == EINTR) continue;
      // The range is still resident and intact: failing here loses nothing.
      TORCH_CHECK(r > 0, "page pool: cannot write optimizer state to '", dir_, "': ", errno_text(r < 0 ? errno : EIO));
      done += r;
    }
  }

  void map_file(int64_t offset, void* p, int64_t bytes) {
    void* q = mmap(p, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd_, offset);
    TORCH_CHECK(q == p, "page pool: cannot map '", path_, "': ", errno_text(errno));
  }

  std::string dir_, path_;
  bool shared_;
  int64_t page_bytes_;
  int fd_ = -1;
  int64_t file_end_ = 0;
};

}  // namespace

std::unique_ptr<PageBackend> make_file_backend(const std::string& dir, bool shared, int64_t page_bytes) {
  return std::make_unique<FileBackend>(dir, shared, page_bytes);
}

PoolCore::PoolCore(std::unique_ptr<PageBackend> backend, int64_t budget_bytes, int64_t page_bytes)
    : backend_(std::move(backend)),
      page_bytes_(page_bytes),
      budget_pages_(budget_bytes > 0 ? budget_bytes / page_bytes : 0) {
  TORCH_CHECK(page_bytes >= os_page() && page_bytes % os_page() == 0, "page pool: page_bytes must be a multiple of ",
              os_page(), " bytes, got ", page_bytes);
  TORCH_CHECK(budget_bytes >= 0, "page pool: resident_bytes must be >= 0 (0: no budget), got ", budget_bytes);
  TORCH_CHECK(budget_bytes == 0 || budget_pages_ >= 2, "page pool: resident_bytes (", budget_bytes,
              ") must hold at least two pages of ", page_bytes, " bytes");
}

PoolCore::~PoolCore() {
  for (const Arena& a : arenas_) backend_->unmap_arena(a.base, a.bytes);
}

at::Tensor PoolCore::alloc(int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "page pool: alloc needs a positive size, got ", nbytes);
  const int64_t size = round_up(nbytes, os_page());
  uint8_t* p = nullptr;
  {
    const std::lock_guard<std::mutex> lock(mu_);
    size_t ai = arenas_.size();
    int64_t rel = 0;
    for (size_t i = 0; i < arenas_.size() && ai == arenas_.size(); ++i)
      for (const auto& [off, len] : arenas_[i].free)
        if (len >= size) {
          ai = i;
          rel = off;
          break;
        }
    if (ai == arenas_.size()) {
      const int64_t bytes = round_up(std::max(kArenaBytes, size), page_bytes_);
      Arena a{static_cast<uint8_t*>(backend_->map_arena(next_offset_, bytes)), bytes, next_offset_, pages_, {}};
      a.free[0] = bytes;
      arenas_.push_back(std::move(a));
      next_offset_ += bytes;
      pages_ += bytes / page_bytes_;
      last_use_.resize(static_cast<size_t>(pages_), -1);
      populated_.resize(static_cast<size_t>(pages_), 0);
      rel = 0;
    }
    Arena& a = arenas_[ai];
    const int64_t len = a.free[rel];
    a.free.erase(rel);
    if (len > size) a.free[rel + size] = len - size;
    try {
      backend_->reserve(a.offset + rel, a.base + rel, size);
    } catch (...) {
      a.free.erase(rel + size);
      a.free[rel] = len;
      throw;
    }
    allocated_bytes_ += size;
    p = a.base + rel;
  }
  std::shared_ptr<PoolCore> self = shared_from_this();
  return at::from_blob(
      p, {nbytes}, [self, size](void* ptr) { self->free_range(static_cast<uint8_t*>(ptr), size); },
      at::TensorOptions().dtype(at::kByte).device(backend_->device()));
}

void PoolCore::free_range(uint8_t* p, int64_t bytes) {
  const std::lock_guard<std::mutex> lock(mu_);
  const size_t ai = arena_of(p, bytes);
  Arena& a = arenas_[ai];
  int64_t rel = p - a.base, len = bytes;
  try {
    backend_->discard(a.offset + rel, p, len);
  } catch (const std::exception& e) {
    TORCH_WARN("page pool: could not release freed optimizer state: ", e.what());
  }
  auto next = a.free.find(rel + len);
  if (next != a.free.end()) {
    len += next->second;
    a.free.erase(next);
  }
  auto prev = a.free.lower_bound(rel);
  if (prev != a.free.begin()) {
    --prev;
    if (prev->first + prev->second == rel) {
      rel = prev->first;
      len += prev->second;
      a.free.erase(prev);
    }
  }
  a.free[rel] = len;
  allocated_bytes_ -= bytes;
}

size_t PoolCore::arena_of(const void* p, int64_t bytes) const {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < arenas_.size(); ++i)
    if (b >= arenas_[i].base && b + bytes <= arenas_[i].base + arenas_[i].bytes) return i;
  TORCH_CHECK(false, "page pool: a tensor is not a buffer of this page pool");
}

std::vector<int64_t> PoolCore::pages_of(const std::vector<at::Tensor>& views) const {
  std::vector<int64_t> pages;
  for (const at::Tensor& t : views) {
    TORCH_CHECK(t.is_contiguous(), "page pool: tensors passed to the pool must be contiguous");
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    if (bytes == 0) continue;
    const Arena& a = arenas_[arena_of(t.const_data_ptr(), bytes)];
    const int64_t rel = static_cast<const uint8_t*>(t.const_data_ptr()) - a.base;
    for (int64_t pg = rel / page_bytes_; pg <= (rel + bytes - 1) / page_bytes_; ++pg) pages.push_back(a.first_page + pg);
  }
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  return pages;
}

std::vector<PoolCore::Run> PoolCore::runs(std::vector<int64_t> pages) const {
  std::sort(pages.begin(), pages.end());
  std::vector<Run> out;
  size_t ai = 0;
  for (int64_t pg : pages) {
    while (pg >= arenas_[ai].first_page + arenas_[ai].bytes / page_bytes_) ++ai;
    const int64_t local = pg - arenas_[ai].first_page;
    if (!out.empty() && out.back().arena == ai && out.back().first + out.back().count == local)
      ++out.back().count;
    else
      out.push_back(Run{ai, local, 1});
  }
  return out;
}

void PoolCore::evict_pages(std::vector<int64_t> pages) {
  // Pages an acquire mapped hold the state and are written back; pages only read ahead are dropped.
  std::vector<int64_t> dirty, clean;
  for (int64_t pg : pages) (populated_[pg] ? dirty : clean).push_back(pg);
  for (const auto* set : {&dirty, &clean}) {
    for (const Run& r : runs(*set)) {
      const Arena& a = arenas_[r.arena];
      const int64_t rel = r.first * page_bytes_, bytes = r.count * page_bytes_;
      backend_->evict(a.offset + rel, a.base + rel, bytes, set == &dirty);
      if (set == &dirty) {
        evicted_bytes_ += bytes;
        ++evictions_;
      }
    }
  }
  for (int64_t pg : pages) {
    lru_.erase({last_use_[pg], pg});
    last_use_[pg] = -1;
    populated_[pg] = 0;
    --hot_pages_;
  }
}

// Evicts least recently used hot pages outside `wanted` (and older than the last acquire when
// `keep_recent`) until `need` more pages fit in the budget and, on a device, in its free memory.
// Returns how many of the `need` pages fit.
int64_t PoolCore::ensure_room(const std::vector<int64_t>& wanted, int64_t need, bool keep_recent) {
  std::vector<int64_t> victims;
  int64_t over = budget_pages_ > 0 ? hot_pages_ + need - budget_pages_ : 0;
  const int64_t free_bytes = backend_->device_free_bytes();
  if (free_bytes >= 0) over = std::max(over, (need * page_bytes_ - free_bytes + page_bytes_ - 1) / page_bytes_);
  for (auto it = lru_.begin(); over > 0 && it != lru_.end(); ++it) {
    if (keep_recent && it->first >= acquire_tick_) break;
    if (std::binary_search(wanted.begin(), wanted.end(), it->second)) continue;
    victims.push_back(it->second);
    --over;
  }
  evict_pages(std::move(victims));
  return need - std::max<int64_t>(over, 0);
}

void PoolCore::make_hot(const std::vector<int64_t>& pages, bool wait) {
  std::vector<int64_t> cold, unmapped;
  ++tick_;
  for (int64_t pg : pages) {
    if (last_use_[pg] < 0) {
      cold.push_back(pg);
      ++hot_pages_;
    } else {
      lru_.erase({last_use_[pg], pg});
    }
    if (wait && !populated_[pg]) unmapped.push_back(pg);
    last_use_[pg] = tick_;
    lru_.insert({tick_, pg});
  }
  peak_hot_pages_ = std::max(peak_hot_pages_, hot_pages_);
  resident_bytes_made_ += static_cast<int64_t>(cold.size()) * page_bytes_;
  // acquire: map every page not yet mapped (cold, or only read ahead by a prefetch), so the update
  // takes no page faults; prefetch: start reading the cold pages.
  for (const Run& r : runs(wait ? unmapped : cold)) {
    const Arena& a = arenas_[r.arena];
    const int64_t rel = r.first * page_bytes_, bytes = r.count * page_bytes_;
    if (wait)
      backend_->make_resident(a.offset + rel, a.base + rel, bytes);
    else
      backend_->prefetch(a.offset + rel, a.base + rel, bytes);
  }
  if (wait)
    for (int64_t pg : unmapped) populated_[pg] = 1;
}

void PoolCore::acquire(const std::vector<at::Tensor>& views) {
  const std::lock_guard<std::mutex> lock(mu_);
  const std::vector<int64_t> pages = pages_of(views);
  TORCH_CHECK(budget_pages_ == 0 || static_cast<int64_t>(pages.size()) <= budget_pages_, "page pool: acquire of ",
              pages.size(), " pages (", pages.size() * page_bytes_, " bytes) exceeds the resident budget of ",
              budget_pages_, " pages");
  int64_t cold = 0;
  for (int64_t pg : pages) cold += last_use_[pg] < 0;
  ensure_room(pages, cold, /*keep_recent=*/false);
  make_hot(pages, /*wait=*/true);
  acquire_tick_ = tick_;
}

void PoolCore::prefetch(const std::vector<at::Tensor>& views) {
  const std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> pages = pages_of(views), cold;
  for (int64_t pg : pages)
    if (last_use_[pg] < 0) cold.push_back(pg);
  // Best effort: never evicts what the last acquire brought in; prefetches what then fits.
  const int64_t fit = ensure_room(pages, static_cast<int64_t>(cold.size()), /*keep_recent=*/true);
  cold.resize(static_cast<size_t>(std::max<int64_t>(fit, 0)));
  make_hot(cold, /*wait=*/false);
}

void PoolCore::release(const std::vector<at::Tensor>& views) {
  const std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> written;
  for (int64_t pg : pages_of(views))
    if (populated_[pg]) written.push_back(pg);
  for (const Run& r : runs(written)) {
    const Arena& a = arenas_[r.arena];
    const int64_t rel = r.first * page_bytes_, bytes = r.count * page_bytes_;
    backend_->writeback(a.offset + rel, a.base + rel, bytes);
    evicted_bytes_ += bytes;
  }
  // Still hot (counted in the budget) until evicted, but no longer mapped: a later acquire reads
  // them back (from the page cache while they are there).
  for (int64_t pg : written) populated_[pg] = 0;
}

void PoolCore::trim() {
  const std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> hot;
  for (int64_t pg = 0; pg < pages_; ++pg)
    if (last_use_[pg] >= 0) hot.push_back(pg);
  evict_pages(std::move(hot));
  // Anything read outside acquire (torch.save of the state) sits in the page cache: drop it too.
  for (const Arena& a : arenas_) backend_->evict(a.offset, a.base, a.bytes, /*dirty=*/false);
}

void PoolCore::reset_stats() {
  const std::lock_guard<std::mutex> lock(mu_);
  peak_hot_pages_ = hot_pages_;
  evicted_bytes_ = resident_bytes_made_ = evictions_ = 0;
}

std::map<std::string, int64_t> PoolCore::stats() {
  const std::lock_guard<std::mutex> lock(mu_);
  int64_t capacity = 0;
  for (const Arena& a : arenas_) capacity += a.bytes;
  return {{"page_bytes", page_bytes_},
          {"budget_bytes", budget_pages_ * page_bytes_},
          {"capacity_bytes", capacity},
          {"allocated_bytes", allocated_bytes_},
          {"hot_bytes", hot_pages_ * page_bytes_},
          {"peak_hot_bytes", peak_hot_pages_ * page_bytes_},
          {"evicted_bytes", evicted_bytes_},
          {"loaded_bytes", resident_bytes_made_},
          {"evictions", evictions_}};
}

std::vector<std::vector<int64_t>> PoolCore::arenas() {
  const std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::vector<int64_t>> out;
  for (const Arena& a : arenas_)
    out.push_back({static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.base)), a.bytes, a.offset});
  return out;
}

}  // namespace optim
}  // namespace peftx
