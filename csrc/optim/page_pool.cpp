// The page pool's bookkeeping (allocation, residency, LRU eviction) and its CPU backend: pages of a
// file-backed shared mapping. See page_pool.h.
#include "optim/page_pool.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and we fall back
#endif

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

class FileBackend final : public PageBackend {
 public:
  explicit FileBackend(const std::string& dir) : dir_(dir) {
    TORCH_CHECK(!dir.empty(), "page pool: the page directory must be a non-empty path");
    std::string name = dir + "/peftx-pages-XXXXXX";
    fd_ = mkostemp(name.data(), O_CLOEXEC);
    TORCH_CHECK(fd_ >= 0, "page pool: cannot create a page file in '", dir, "': ", errno_text(errno),
                " (page_dir must be an existing, writable directory)");
    // Unlinked at once: the file lives exactly as long as the mapping and the descriptor.
    unlink(name.c_str());
    path_ = name;
  }
  ~FileBackend() override { close(fd_); }

  void* map_arena(int64_t offset, int64_t bytes) override {
    void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd_, offset);
    TORCH_CHECK(p != MAP_FAILED, "page pool: cannot map ", bytes, " bytes of '", path_, "': ", errno_text(errno));
    // No fault-time read-ahead: the pool reads exactly the pages it makes resident (so the page
    // cache holds no more of the file than the budget), in large requests (make_resident).
    madvise(p, static_cast<size_t>(bytes), MADV_RANDOM);
    return p;
  }
  void unmap_arena(void* base, int64_t bytes) override { munmap(base, static_cast<size_t>(bytes)); }

  void reserve(int64_t offset, void*, int64_t bytes) override {
    const int r = posix_fallocate(fd_, offset, bytes);
    if (r == 0) file_end_ = std::max(file_end_, offset + bytes);
    TORCH_CHECK(r == 0, "page pool: cannot reserve ", bytes, " bytes for optimizer state in '", dir_, "': ",
                errno_text(r),
                r == ENOSPC || r == EFBIG || r == EDQUOT ? " (the page directory is full or over its file size limit)"
                                                         : "");
  }

  void discard(int64_t offset, void* p, int64_t bytes) override {
    // Freed bytes read back as zeros and give their disk blocks back.
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes) != 0) std::memset(p, 0, bytes);
  }

  void make_resident(int64_t offset, void* p, int64_t bytes) override {
    // The last pool page may reach past the end of the file (past every allocation): never touch it.
    bytes = std::min(bytes, file_end_ - offset);
    if (bytes <= 0) return;
    posix_fadvise(fd_, offset, bytes, POSIX_FADV_WILLNEED);  // one read of the whole range
    if (madvise(p, static_cast<size_t>(bytes), MADV_POPULATE_WRITE) == 0) return;
    const int e = errno;
    // EINVAL: a pre-5.14 kernel without MADV_POPULATE_WRITE; the pages fault in on use.
    TORCH_CHECK(e == EINVAL, "page pool: cannot read optimizer state back from '", path_, "': ", errno_text(e));
  }

  void prefetch(int64_t offset, void*, int64_t bytes) override {
    posix_fadvise(fd_, offset, bytes, POSIX_FADV_WILLNEED);  // asynchronous read-ahead
  }

  void writeback(int64_t offset, void*, int64_t bytes) override {
    const int r = sync_file_range(fd_, offset, bytes, SYNC_FILE_RANGE_WRITE);
    TORCH_CHECK(r == 0, "page pool: cannot write optimizer state to '", dir_, "': ", errno_text(errno));
  }

  void evict(int64_t offset, void* p, int64_t bytes) override {
    const int r = sync_file_range(fd_, offset, bytes,
                                  SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    TORCH_CHECK(r == 0, "page pool: cannot write optimizer state to '", dir_, "': ", errno_text(errno));
    // Written back: drop the pages from this process and from the page cache.
    madvise(p, static_cast<size_t>(bytes), MADV_DONTNEED);
    posix_fadvise(fd_, offset, bytes, POSIX_FADV_DONTNEED);
  }

  int64_t device_free_bytes() override { return -1; }
  at::Device device() const override { return at::Device(at::kCPU); }
  std::string location() const override { return path_; }
  int fd() const override { return fd_; }

 private:
  std::string dir_, path_;
  int fd_ = -1;
  int64_t file_end_ = 0;
};

}  // namespace

std::unique_ptr<PageBackend> make_file_backend(const std::string& dir) { return std::make_unique<FileBackend>(dir); }

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
  for (const Run& r : runs(std::move(pages))) {
    const Arena& a = arenas_[r.arena];
    const int64_t rel = r.first * page_bytes_, bytes = r.count * page_bytes_;
    backend_->evict(a.offset + rel, a.base + rel, bytes);
    for (int64_t k = 0; k < r.count; ++k) {
      const int64_t pg = a.first_page + r.first + k;
      lru_.erase({last_use_[pg], pg});
      last_use_[pg] = -1;
      --hot_pages_;
    }
    evicted_bytes_ += bytes;
    ++evictions_;
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
  std::vector<int64_t> cold;
  ++tick_;
  for (int64_t pg : pages) {
    if (last_use_[pg] < 0) {
      cold.push_back(pg);
      ++hot_pages_;
    } else {
      lru_.erase({last_use_[pg], pg});
    }
    last_use_[pg] = tick_;
    lru_.insert({tick_, pg});
  }
  peak_hot_pages_ = std::max(peak_hot_pages_, hot_pages_);
  for (const Run& r : runs(cold)) {
    const Arena& a = arenas_[r.arena];
    const int64_t rel = r.first * page_bytes_, bytes = r.count * page_bytes_;
    if (wait)
      backend_->make_resident(a.offset + rel, a.base + rel, bytes);
    else
      backend_->prefetch(a.offset + rel, a.base + rel, bytes);
    resident_bytes_made_ += bytes;
  }
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
  for (const Run& r : runs(pages_of(views))) {
    const Arena& a = arenas_[r.arena];
    const int64_t rel = r.first * page_bytes_;
    backend_->writeback(a.offset + rel, a.base + rel, r.count * page_bytes_);
  }
}

void PoolCore::trim() {
  const std::lock_guard<std::mutex> lock(mu_);
  for (const Arena& a : arenas_) backend_->evict(a.offset, a.base, a.bytes);
  for (auto& t : last_use_) t = -1;
  lru_.clear();
  hot_pages_ = 0;
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
