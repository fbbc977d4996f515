// The page pool's bookkeeping: allocation, per-page residency states, LRU eviction within the
// budget. The backends (page_file.cpp, page_pool_cuda.cpp) move the bytes. See page_pool.h.
#include "optim/page_pool.h"

#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
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

}  // namespace

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
      state_.resize(static_cast<size_t>(pages_), kCold);
      job_.resize(static_cast<size_t>(pages_), 0);
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

std::vector<PoolCore::Run> PoolCore::runs(const std::vector<int64_t>& pages) const {
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

template <typename Fn>
void PoolCore::for_runs(std::vector<int64_t> pages, Fn&& fn) {
  std::sort(pages.begin(), pages.end());
  for (const Run& r : runs(pages)) {
    const Arena& a = arenas_[r.arena];
    const int64_t rel = r.first * page_bytes_;
    fn(a.offset + rel, a.base + rel, r.count * page_bytes_, a.first_page + r.first, r.count);
  }
}

// Waits for the loads and stores in flight on `pages`: a finished load leaves the page resident, a
// finished store cold. A failed store leaves the page resident (its data intact in memory).
void PoolCore::settle(const std::vector<int64_t>& pages) {
  std::vector<int64_t> jobs;
  for (int64_t pg : pages)
    if (state_[pg] == kLoading || state_[pg] == kStoring) jobs.push_back(job_[pg]);
  std::sort(jobs.begin(), jobs.end());
  jobs.erase(std::unique(jobs.begin(), jobs.end()), jobs.end());
  std::exception_ptr error;
  for (int64_t job : jobs) {
    try {
      backend_->wait(job);
    } catch (...) {
      if (!error) error = std::current_exception();
      for (int64_t pg = 0; pg < pages_; ++pg)
        if (job_[pg] == job && state_[pg] != kCold) {
          if (state_[pg] == kStoring) state_[pg] = kResident;
          if (state_[pg] == kLoading) {  // the backend left it mapped from the store
            state_[pg] = kCold;
            lru_.erase({last_use_[pg], pg});
            last_use_[pg] = -1;
            --hot_pages_;
          }
          job_[pg] = 0;
        }
      continue;
    }
    for (int64_t pg = 0; pg < pages_; ++pg)
      if (job_[pg] == job) {
        if (state_[pg] == kLoading) state_[pg] = kResident;
        if (state_[pg] == kStoring) {
          state_[pg] = kCold;
          lru_.erase({last_use_[pg], pg});
          last_use_[pg] = -1;
          --hot_pages_;
        }
        job_[pg] = 0;
      }
  }
  if (error) std::rethrow_exception(error);
}

void PoolCore::touch(const std::vector<int64_t>& pages) {
  ++tick_;
  for (int64_t pg : pages) {
    if (last_use_[pg] >= 0) lru_.erase({last_use_[pg], pg});
    last_use_[pg] = tick_;
    lru_.insert({tick_, pg});
  }
}

void PoolCore::evict(std::vector<int64_t> pages) {
  settle(pages);
  std::vector<int64_t> resident;
  for (int64_t pg : pages)
    if (state_[pg] == kResident) resident.push_back(pg);
  for_runs(resident, [&](int64_t off, uint8_t* p, int64_t bytes, int64_t, int64_t) {
    backend_->store(off, p, bytes, /*async=*/false);
    stored_bytes_ += bytes;
  });
  for (int64_t pg : resident) {
    state_[pg] = kCold;
    lru_.erase({last_use_[pg], pg});
    last_use_[pg] = -1;
    --hot_pages_;
  }
}

// Evicts least recently used hot pages outside `wanted` until `need` more pages fit in the budget
// and, on a device, in its free memory. With `prefetching`, never waits: skips pages the last
// acquire or anything after it touched and pages with a load or store still in flight. Returns how
// many of the `need` pages fit.
int64_t PoolCore::ensure_room(const std::vector<int64_t>& wanted, int64_t need, bool prefetching) {
  std::vector<int64_t> victims;
  int64_t over = budget_pages_ > 0 ? hot_pages_ + need - budget_pages_ : 0;
  const int64_t free_bytes = backend_->device_free_bytes();
  if (free_bytes >= 0) over = std::max(over, (need * page_bytes_ - free_bytes + page_bytes_ - 1) / page_bytes_);
  for (auto it = lru_.begin(); over > 0 && it != lru_.end(); ++it) {
    if (prefetching && it->first >= acquire_tick_) break;
    if (std::binary_search(wanted.begin(), wanted.end(), it->second)) continue;
    if (prefetching && state_[it->second] != kResident && !backend_->done(job_[it->second])) continue;
    victims.push_back(it->second);
    --over;
  }
  evict(std::move(victims));
  return need - std::max<int64_t>(over, 0);
}

void PoolCore::acquire(const std::vector<at::Tensor>& views) {
  const std::lock_guard<std::mutex> lock(mu_);
  const std::vector<int64_t> pages = pages_of(views);
  TORCH_CHECK(budget_pages_ == 0 || static_cast<int64_t>(pages.size()) <= budget_pages_, "page pool: acquire of ",
              pages.size(), " pages (", pages.size() * page_bytes_, " bytes) exceeds the resident budget of ",
              budget_pages_, " pages");
  settle(pages);  // loads done; stores done (those pages are cold again and load below)
  std::vector<int64_t> cold;
  for (int64_t pg : pages)
    if (state_[pg] == kCold) cold.push_back(pg);
  ensure_room(pages, static_cast<int64_t>(cold.size()), /*prefetching=*/false);
  for_runs(cold, [&](int64_t off, uint8_t* p, int64_t bytes, int64_t first, int64_t count) {
    backend_->load(off, p, bytes, /*async=*/false);
    loaded_bytes_ += bytes;
    for (int64_t pg = first; pg < first + count; ++pg) state_[pg] = kResident;
  });
  hot_pages_ += static_cast<int64_t>(cold.size());
  peak_hot_pages_ = std::max(peak_hot_pages_, hot_pages_);
  touch(pages);
  acquire_tick_ = tick_;
}

void PoolCore::prefetch(const std::vector<at::Tensor>& views) {
  const std::lock_guard<std::mutex> lock(mu_);
  const std::vector<int64_t> pages = pages_of(views);
  // Cold pages in the order of `views` (the nearest tensors first), so what fits is what is
  // needed soonest.
  std::vector<int64_t> cold;
  for (const at::Tensor& t : views)
    for (int64_t pg : pages_of({t}))
      if (state_[pg] == kCold && std::find(cold.begin(), cold.end(), pg) == cold.end()) cold.push_back(pg);
  const int64_t fit = ensure_room(pages, static_cast<int64_t>(cold.size()), /*prefetching=*/true);
  cold.resize(static_cast<size_t>(std::max<int64_t>(fit, 0)));
  for_runs(cold, [&](int64_t off, uint8_t* p, int64_t bytes, int64_t first, int64_t count) {
    const int64_t job = backend_->load(off, p, bytes, /*async=*/true);
    loaded_bytes_ += bytes;
    for (int64_t pg = first; pg < first + count; ++pg) {
      state_[pg] = job != 0 ? kLoading : kResident;
      job_[pg] = job;
    }
  });
  hot_pages_ += static_cast<int64_t>(cold.size());
  peak_hot_pages_ = std::max(peak_hot_pages_, hot_pages_);
  // Every hot page of the next tensors is marked, also those already resident (a page shared with
  // the tensors being updated now): release leaves marked pages resident for their next update.
  std::vector<int64_t> hot;
  for (int64_t pg : pages)
    if (state_[pg] != kCold) hot.push_back(pg);
  touch(hot);
}

void PoolCore::release(const std::vector<at::Tensor>& views) {
  const std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> resident;
  for (int64_t pg : pages_of(views))  // not the pages a prefetch since the last acquire marked
    if (state_[pg] == kResident && last_use_[pg] <= acquire_tick_) resident.push_back(pg);
  for_runs(resident, [&](int64_t off, uint8_t* p, int64_t bytes, int64_t first, int64_t count) {
    const int64_t job = backend_->store(off, p, bytes, /*async=*/true);
    stored_bytes_ += bytes;
    for (int64_t pg = first; pg < first + count; ++pg) {
      state_[pg] = job != 0 ? kStoring : kCold;
      job_[pg] = job;
      if (job == 0) {  // stored synchronously: cold now
        lru_.erase({last_use_[pg], pg});
        last_use_[pg] = -1;
        --hot_pages_;
      }
    }
  });
}

void PoolCore::trim() {
  const std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> hot;
  for (int64_t pg = 0; pg < pages_; ++pg)
    if (state_[pg] != kCold) hot.push_back(pg);
  evict(std::move(hot));
  // Whatever was read outside acquire (torch.save of the state) is dropped too.
  for (const Arena& a : arenas_) backend_->drop(a.offset, a.base, a.bytes);
}

void PoolCore::reset_stats() {
  const std::lock_guard<std::mutex> lock(mu_);
  peak_hot_pages_ = hot_pages_;
  stored_bytes_ = loaded_bytes_ = 0;
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
          {"stored_bytes", stored_bytes_},
          {"loaded_bytes", loaded_bytes_}};
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
