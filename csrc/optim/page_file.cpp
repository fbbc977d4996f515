// The page pool's CPU backend: explicit paging through a file, with the disk I/O on a thread of
// its own. A resident range is anonymous memory holding the current state; a cold range is a
// private mapping of the file, whose content is the state. So a state tensor reads correctly at
// every moment and its address never changes, and pages move by large pread / pwrite calls
// (O_DIRECT where the file system allows it: no page cache, no copy), never a page fault at a time,
// on I/O threads of their own: a load or store is cut into pieces of at most kPieceBytes, served by
// kThreadsPerQueue threads per direction, so several requests are in flight on the device and loads
// overlap stores (the pool never loads a page while its store is in flight):
//   load:  map anonymous memory over the range (MAP_FIXED) and read the file into it;
//   store: write the range to the file, then map the file back over it (freeing the memory).
// Without a budget (shared) the arenas are shared mappings of the file instead: the page cache is
// the state's memory, and the kernel writes it to the file under memory pressure.
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <thread>

#include "optim/page_pool.h"

namespace peftx {
namespace optim {
namespace {

std::string errno_text(int e) { return std::string(std::strerror(e)); }

constexpr int64_t kPieceBytes = int64_t(1) << 20;
constexpr int kThreadsPerQueue = 3;

class FileBackend final : public PageBackend {
 public:
  FileBackend(const std::string& dir, bool shared) : dir_(dir), shared_(shared) {
    TORCH_CHECK(!dir.empty(), "page pool: the page directory must be a non-empty path");
    std::string name = dir + "/peftx-pages-XXXXXX";
    fd_ = mkostemp(name.data(), O_CLOEXEC);
    TORCH_CHECK(fd_ >= 0, "page pool: cannot create a page file in '", dir, "': ", errno_text(errno),
                " (page_dir must be an existing, writable directory)");
    // Unlinked at once: the file lives exactly as long as the mappings and the descriptors.
    unlink(name.c_str());
    path_ = name;
    // No read-ahead beyond what the pool asks for (buffered reads of a range still go in one).
    posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
    if (!shared_) direct_fd_ = open(("/proc/self/fd/" + std::to_string(fd_)).c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  }

  ~FileBackend() override {
    {
      const std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& queue_threads : threads_)
      for (std::thread& t : queue_threads)
        if (t.joinable()) t.join();
    if (direct_fd_ >= 0) close(direct_fd_);
    close(fd_);
  }

  void* map_arena(int64_t offset, int64_t bytes) override {
    void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, shared_ ? MAP_SHARED : MAP_PRIVATE,
                   fd_, offset);
    TORCH_CHECK(p != MAP_FAILED, "page pool: cannot map ", bytes, " bytes of '", path_, "': ", errno_text(errno));
    return p;
  }
  void unmap_arena(void* base, int64_t bytes) override {
    drain();
    munmap(base, static_cast<size_t>(bytes));
  }

  void reserve(int64_t offset, void*, int64_t bytes) override {
    const int r = posix_fallocate(fd_, offset, bytes);
    TORCH_CHECK(r == 0, "page pool: cannot reserve ", bytes, " bytes for optimizer state in '", dir_, "': ",
                errno_text(r),
                r == ENOSPC || r == EFBIG || r == EDQUOT ? " (the page directory is full or over its file size limit)"
                                                         : "");
    const std::lock_guard<std::mutex> lock(mu_);
    file_end_ = std::max(file_end_, offset + bytes);
  }

  void discard(int64_t offset, void* p, int64_t bytes) override {
    drain();  // no I/O may be in flight on the range
    // Freed bytes read back as zeros (a hole, mapped from the file) and give their disk blocks back.
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes) == 0) {
      if (!shared_) map_file(offset, p, bytes);
    } else {
      std::memset(p, 0, static_cast<size_t>(bytes));
    }
  }

  int64_t load(int64_t offset, void* p, int64_t bytes, bool async) override {
    return submit(Job{0, true, offset, p, bytes}, async);
  }
  int64_t store(int64_t offset, void* p, int64_t bytes, bool async) override {
    return submit(Job{0, false, offset, p, bytes}, async);
  }
  void drop(int64_t offset, void* p, int64_t bytes) override {
    bytes = within_file(offset, bytes);
    if (bytes <= 0) return;
    map_file(offset, p, bytes);
    posix_fadvise(fd_, offset, bytes, POSIX_FADV_DONTNEED);
  }

  void wait(int64_t job) override {
    if (job == 0) return;
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return done_.count(job) != 0; });
    const int err = done_[job].first;
    const bool read = done_[job].second;
    done_.erase(job);
    lock.unlock();
    fail_if(err, read);
  }

  bool done(int64_t job) override {
    const std::lock_guard<std::mutex> lock(mu_);
    return job == 0 || done_.count(job) != 0;
  }

  int64_t device_free_bytes() override { return -1; }
  at::Device device() const override { return at::Device(at::kCPU); }
  std::string location() const override { return path_; }
  int fd() const override { return fd_; }

 private:
  struct Job {
    int64_t id;
    bool read;
    int64_t offset;
    void* p;
    int64_t bytes;
  };

  int64_t within_file(int64_t offset, int64_t bytes) {
    const std::lock_guard<std::mutex> lock(mu_);
    return std::min(bytes, file_end_ - offset);  // the last pool page may reach past every allocation
  }

  void fail_if(int err, bool read) const {
    TORCH_CHECK(err == 0, "page pool: cannot ", read ? "read optimizer state back from '" : "write optimizer state to '",
                dir_, "': ", errno_text(err));
  }

  int64_t submit(Job job, bool async) {
    job.bytes = within_file(job.offset, job.bytes);
    if (job.bytes <= 0) return 0;
    if (!async) {
      fail_if(run(job), job.read);
      return 0;
    }
    {
      const std::lock_guard<std::mutex> lock(mu_);
      job.id = ++last_id_;
      const int q = job.read ? 0 : 1;
      int pieces = 0;
      for (int64_t done = 0; done < job.bytes; done += kPieceBytes, ++pieces)
        queues_[q].push_back(Job{job.id, job.read, job.offset + done, static_cast<uint8_t*>(job.p) + done,
                                 std::min(kPieceBytes, job.bytes - done)});
      pending_[job.id] = {pieces, 0};
      for (std::thread& t : threads_[q])
        if (!t.joinable()) t = std::thread([this, q] { worker(q); });
    }
    work_cv_.notify_all();
    return job.id;
  }

  void worker(int q) {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return stop_ || !queues_[q].empty(); });
        if (queues_[q].empty()) return;
        job = queues_[q].front();
        queues_[q].pop_front();
        ++running_;
      }
      const int err = run(job);
      {
        const std::lock_guard<std::mutex> lock(mu_);
        auto& [left, first_err] = pending_[job.id];
        if (first_err == 0) first_err = err;
        if (--left == 0) {
          done_[job.id] = {first_err, job.read};
          pending_.erase(job.id);
        }
        --running_;
      }
      done_cv_.notify_all();
    }
  }

  void drain() {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return queues_[0].empty() && queues_[1].empty() && running_ == 0; });
  }

  // Returns 0 or an errno. A failed load leaves the range mapped from the file (as it was); a
  // failed store leaves it resident and intact.
  int run(const Job& j) {
    uint8_t* p = static_cast<uint8_t*>(j.p);
    if (j.read) {
      // Fresh anonymous memory (allocated up front, not a fault at a time) for the read to land in.
      constexpr int kAnon = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_POPULATE;
      if (mmap(p, static_cast<size_t>(j.bytes), PROT_READ | PROT_WRITE, kAnon, -1, 0) != p) return errno;
      const int err = transfer(j, true);
      if (err != 0) remap(j.offset, p, j.bytes);
      return err;
    }
    const int err = transfer(j, false);
    return err != 0 ? err : remap(j.offset, p, j.bytes);
  }

  int transfer(const Job& j, bool read) {
    int fd = direct_fd_ >= 0 ? direct_fd_ : fd_;
    uint8_t* p = static_cast<uint8_t*>(j.p);
    for (int64_t done = 0; done < j.bytes;) {
      const size_t n = static_cast<size_t>(j.bytes - done);
      const ssize_t r = read ? pread(fd, p + done, n, j.offset + done) : pwrite(fd, p + done, n, j.offset + done);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && errno == EINVAL && fd == direct_fd_) {  // the file system refuses this direct I/O
        fd = fd_;
        continue;
      }
      if (r <= 0) return r < 0 ? errno : EIO;
      done += r;
    }
    if (fd == fd_) {  // buffered: make it durable, then keep no copy in the page cache
      if (!read &&
          sync_file_range(fd_, j.offset, j.bytes,
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0)
        return errno;
      posix_fadvise(fd_, j.offset, j.bytes, POSIX_FADV_DONTNEED);
    }
    return 0;
  }

  int remap(int64_t offset, void* p, int64_t bytes) {
    void* q = mmap(p, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd_, offset);
    return q == p ? 0 : errno;
  }
  void map_file(int64_t offset, void* p, int64_t bytes) {
    const int err = remap(offset, p, bytes);
    TORCH_CHECK(err == 0, "page pool: cannot map '", path_, "': ", errno_text(err));
  }

  std::string dir_, path_;
  bool shared_;
  int fd_ = -1, direct_fd_ = -1;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Job> queues_[2];  // pieces of loads, of stores
  std::map<int64_t, std::pair<int, int>> pending_;  // job -> (pieces left, first errno)
  std::map<int64_t, std::pair<int, bool>> done_;  // job -> (errno, was a read)
  std::thread threads_[2][kThreadsPerQueue];
  int64_t last_id_ = 0, file_end_ = 0;
  int running_ = 0;
  bool stop_ = false;
};

}  // namespace

std::unique_ptr<PageBackend> make_file_backend(const std::string& dir, bool shared) {
  return std::make_unique<FileBackend>(dir, shared);
}

}  // namespace optim
}  // namespace peftx
