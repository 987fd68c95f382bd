// io_uring backend, on raw syscalls (no liburing to find or link at build time).
//
// One thread owns the ring, so the SQ and CQ need no locks: it moves chunks from the submit queue into
// the ring (at most queue_depth chunks at once), reaps completions, resumes partial transfers and
// finishes chunks. Submitters wake it through an eventfd watched by an IORING_OP_POLL_ADD in the same
// ring, so one blocking io_uring_enter waits for "I/O done" and "new work" alike: nothing spins.
//
// Only kernel >= 5.1 operations are used (NOP, READV, WRITEV, POLL_ADD). Containers often forbid
// io_uring through seccomp (EPERM/ENOSYS) or sysctl kernel.io_uring_disabled; uring_available() tries a
// real round trip so that the Python side can fall back to threads.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "swapper.h"

#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#define RATEL_HAVE_URING 1
#else
#define RATEL_HAVE_URING 0
#endif

namespace ratel::swapper {

#if RATEL_HAVE_URING

// The io_uring syscalls share these numbers on every architecture; old libc headers may lack them.
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef IORING_FEAT_SINGLE_MMAP  // headers older than 5.4
#define IORING_FEAT_SINGLE_MMAP (1U << 0)
#endif

namespace {

template <typename T>
T load_acquire(const T* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
template <typename T>
void store_release(T* p, T v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// The rings, mapped from the kernel; RAII so that every failure path unmaps and closes.
class Ring {
 public:
  explicit Ring(unsigned entries) {
    io_uring_params p;
    std::memset(&p, 0, sizeof p);
    fd_ = int(syscall(__NR_io_uring_setup, entries, &p));
    if (fd_ < 0) throw OsError(errno, "", std::string("io_uring_setup: ") + std::strerror(errno));
    sq_entries_ = p.sq_entries;
    sq_size_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_size_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) sq_size_ = cq_size_ = std::max(sq_size_, cq_size_);
    sq_ptr_ = map(sq_size_, IORING_OFF_SQ_RING);
    cq_ptr_ = single ? sq_ptr_ : map(cq_size_, IORING_OFF_CQ_RING);
    sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
    sqes_ = static_cast<io_uring_sqe*>(map(sqes_size_, IORING_OFF_SQES));
    auto* sq = static_cast<char*>(sq_ptr_);
    auto* cq = static_cast<char*>(cq_ptr_);
    sq_head_ = reinterpret_cast<unsigned*>(sq + p.sq_off.head);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
    cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
    tail_ = *sq_tail_;
  }

  ~Ring() { release(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  unsigned sq_entries() const { return sq_entries_; }
  int fd() const { return fd_; }

  // A zeroed SQE, or nullptr when the submission ring is full (the caller sizes the ring so it never is).
  io_uring_sqe* next_sqe() {
    if (tail_ - load_acquire(sq_head_) >= sq_entries_) return nullptr;
    unsigned idx = tail_ & sq_mask_;
    io_uring_sqe* sqe = &sqes_[idx];
    std::memset(sqe, 0, sizeof *sqe);
    sq_array_[idx] = idx;
    ++tail_;
    ++unsubmitted_;
    return sqe;
  }

  // Publishes queued SQEs and waits for at least 'wait_nr' completions. Returns SQEs consumed or -errno.
  int enter(unsigned wait_nr) {
    store_release(sq_tail_, tail_);
    int ret = int(syscall(__NR_io_uring_enter, fd_, unsubmitted_, wait_nr,
                          wait_nr ? IORING_ENTER_GETEVENTS : 0, nullptr, 0));
    if (ret < 0) return -errno;
    unsubmitted_ -= unsigned(ret);
    return ret;
  }

  unsigned unsubmitted() const { return unsubmitted_; }

  // Takes back SQEs that the kernel refused, so that the caller can fail them instead of losing them.
  void unqueue(unsigned n) {
    tail_ -= n;
    unsubmitted_ -= n;
    store_release(sq_tail_, tail_);
  }

  template <typename F>
  unsigned reap(F&& on_cqe) {
    unsigned head = *cq_head_, n = 0;
    for (;;) {
      if (head == load_acquire(cq_tail_)) break;
      io_uring_cqe cqe = cqes_[head & cq_mask_];
      store_release(cq_head_, ++head);  // free the slot before the handler queues more work
      on_cqe(cqe.user_data, cqe.res);
      ++n;
    }
    return n;
  }

 private:
  void* map(size_t size, off_t what) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, what);
    if (p == MAP_FAILED) {
      int err = errno;
      release();
      throw OsError(err, "", std::string("io_uring mmap: ") + std::strerror(err));
    }
    return p;
  }

  void release() {
    if (sqes_) munmap(sqes_, sqes_size_);
    if (cq_ptr_ && cq_ptr_ != sq_ptr_) munmap(cq_ptr_, cq_size_);
    if (sq_ptr_) munmap(sq_ptr_, sq_size_);
    if (fd_ >= 0) ::close(fd_);
    sqes_ = nullptr;
    sq_ptr_ = cq_ptr_ = nullptr;
    fd_ = -1;
  }

  int fd_ = -1;
  void* sq_ptr_ = nullptr;
  void* cq_ptr_ = nullptr;
  io_uring_sqe* sqes_ = nullptr;
  size_t sq_size_ = 0, cq_size_ = 0, sqes_size_ = 0;
  unsigned *sq_head_ = nullptr, *sq_tail_ = nullptr, *sq_array_ = nullptr;
  unsigned *cq_head_ = nullptr, *cq_tail_ = nullptr;
  unsigned sq_mask_ = 0, cq_mask_ = 0, sq_entries_ = 0;
  io_uring_cqe* cqes_ = nullptr;
  unsigned tail_ = 0;         // our copy of the SQ tail, published by enter()
  unsigned unsubmitted_ = 0;  // queued SQEs the kernel has not consumed yet
};

// user_data is a Segment pointer (8-byte aligned), so its low bits are free for tags.
constexpr uint64_t kWakeTag = 1;     // the eventfd poll
constexpr uint64_t kDelayedBit = 2;  // a Segment stalled by fault injection (IORING_OP_TIMEOUT)

unsigned ring_entries(int queue_depth) {
  unsigned want = unsigned(queue_depth) * 3 + 1;  // up to 3 segments per chunk, plus the wake-up poll
  unsigned n = 1;
  while (n < want) n <<= 1;
  return n;
}

class UringBackend final : public Backend {
 public:
  UringBackend(Engine& engine, int queue_depth)
      : engine_(engine), queue_depth_(queue_depth), ring_(ring_entries(queue_depth)) {
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) throw OsError(errno, "", std::string("eventfd: ") + std::strerror(errno));
    thread_ = std::thread([this] { run(); });
  }

  ~UringBackend() override {
    shutdown();
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  const char* name() const override { return "uring"; }

  void submit(Chunk* const* chunks, size_t n) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      incoming_.insert(incoming_.end(), chunks, chunks + n);
    }
    wake();
  }

  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    wake();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void wake() {
    uint64_t one = 1;
    // EAGAIN means the counter is already non-zero: the ring thread will wake anyway.
    while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }

  void arm_wake() {
    io_uring_sqe* sqe = ring_.next_sqe();
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = wake_fd_;
    sqe->poll_events = POLLIN;  // the low 16 bits; also right for kernels reading poll32_events
    sqe->user_data = kWakeTag;
    queued_.push_back(nullptr);
    wake_armed_ = true;
  }

  void run() {
    arm_wake();
    std::deque<Chunk*> backlog;
    for (;;) {
      bool stop;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        backlog.insert(backlog.end(), incoming_.begin(), incoming_.end());
        incoming_.clear();
        stop = stopping_;
      }
      while (active_ < queue_depth_ && !backlog.empty()) {
        Chunk* c = backlog.front();
        backlog.pop_front();
        start(*c);
      }
      if (stop && active_ == 0 && backlog.empty()) return;

      Fault f = FaultInjector::instance().check(FaultOp::UringEnter, 0);
      int ret = f.fire && f.fail ? -(f.err != 0 ? f.err : EIO) : ring_.enter(1);
      if (ret >= 0) {
        queued_.erase(queued_.begin(), queued_.begin() + ret);
      } else if (ret == -EINTR || ret == -EAGAIN || ret == -EBUSY) {
        // Transient (signal, or the kernel wants completions reaped first): reap, then retry.
        if (ret != -EINTR && ring_.reap([this](uint64_t tag, int res) { on_cqe(tag, res); }) == 0) {
          timespec pause{0, 100000};
          nanosleep(&pause, nullptr);
        }
      } else {
        degrade(-ret);
      }
      ring_.reap([this](uint64_t tag, int res) { on_cqe(tag, res); });
      if (degraded_) {
        run_degraded(backlog);
        return;
      }
      if (!wake_armed_) arm_wake();
    }
  }

  // io_uring_enter failed for good (the probe passed, so e.g. a seccomp change or ENOMEM under us). Spinning
  // on it would burn a core and failing every request would be needless: the ring thread finishes the work
  // with blocking syscalls instead (queue depth 1), and says so once.
  void degrade(int err) {
    degraded_ = true;
    engine_.note_degraded();
    std::fprintf(stderr, "ratel swapper: io_uring_enter failed (%s); continuing with blocking I/O\n",
                 std::strerror(err));
    unsigned n = ring_.unsubmitted();
    ring_.unqueue(n);
    std::vector<Segment*> refused(queued_.end() - n, queued_.end());
    queued_.erase(queued_.end() - n, queued_.end());
    for (Segment* s : refused) {
      if (s == nullptr) {
        wake_armed_ = false;
      } else {
        s->fault = Fault();
        issue(*s);  // now synchronous
      }
    }
  }

  void run_degraded(std::deque<Chunk*>& backlog) {
    for (;;) {
      ring_.reap([this](uint64_t tag, int res) { on_cqe(tag, res); });  // what the kernel still held
      bool stop;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        backlog.insert(backlog.end(), incoming_.begin(), incoming_.end());
        incoming_.clear();
        stop = stopping_;
      }
      while (!backlog.empty()) {
        Chunk* c = backlog.front();
        backlog.pop_front();
        start(*c);
      }
      if (stop && active_ == 0) return;
      // The ring fd polls readable when completions are due; the timeout covers kernels where it does not.
      pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {ring_.fd(), POLLIN, 0}};
      ::poll(fds, 2, active_ > 0 ? 10 : -1);
      uint64_t count;
      while (::read(wake_fd_, &count, sizeof count) < 0 && errno == EINTR) {
      }
    }
  }

  void on_cqe(uint64_t tag, int res) {
    if (tag == kWakeTag) {
      uint64_t count;
      while (::read(wake_fd_, &count, sizeof count) < 0 && errno == EINTR) {
      }
      wake_armed_ = false;
      return;
    }
    if (tag & kDelayedBit) {  // a test's stall is over: now the syscall (or its faked result)
      Segment& s = *reinterpret_cast<Segment*>(tag & ~kDelayedBit);
      Fault f = s.fault;
      s.fault = Fault();
      issue_after_fault(s, f);
      return;
    }
    on_result(*reinterpret_cast<Segment*>(tag), res);
  }

  void start(Chunk& c) {
    ++active_;
    if (!engine_.prepare(c)) {
      finish(c);
      return;
    }
    // NOTE: the chunk can only finish once its last segment is issued, so reading c.segs is safe
    // until the final issue() call; after it, c may be gone.
    const int n = c.nsegs;
    c.segs_left = n;
    for (int i = 0; i < n; ++i) issue(c.segs[i]);
  }

  void issue(Segment& s) {
    Chunk& c = *s.chunk;
    if (c.err != 0) {  // an earlier segment of this chunk failed: skip the I/O, the chunk is lost anyway
      segment_done(s);
      return;
    }
    if (degraded_) {
      on_result(s, sync_io(c.request->op, s));
      return;
    }
    Fault f = next_fault(c.request->op, s);
    if (f.fire && f.delay_ns > 0) {
      // A test stalls this syscall: park the segment on an IORING_OP_TIMEOUT rather than sleeping, so
      // the rest of the ring keeps moving (as one stalled worker would in the thread backend).
      s.fault = f;
      s.timeout[0] = f.delay_ns / 1000000000;
      s.timeout[1] = f.delay_ns % 1000000000;
      io_uring_sqe* sqe = ring_.next_sqe();
      if (sqe != nullptr) {
        sqe->opcode = IORING_OP_TIMEOUT;
        sqe->addr = reinterpret_cast<uint64_t>(s.timeout);
        sqe->len = 1;
        sqe->user_data = reinterpret_cast<uint64_t>(&s) | kDelayedBit;
        queued_.push_back(&s);
        return;
      }
    }
    issue_after_fault(s, f);
  }

  void issue_after_fault(Segment& s, const Fault& f) {
    const OpKind op = s.chunk->request->op;
    uint64_t len = s.len - s.done;
    int64_t faked;
    if (apply_fault(f, &faked, &len)) {
      on_result(s, faked);
      return;
    }
    s.iov.iov_base = s.buf + s.done;
    s.iov.iov_len = len;
    io_uring_sqe* sqe = ring_.next_sqe();
    if (sqe == nullptr) {  // cannot happen with ring_entries(); do the I/O inline rather than lose it
      ssize_t n = op == OpKind::Read ? ::pread(s.fd, s.iov.iov_base, len, off_t(s.offset + s.done))
                                     : ::pwrite(s.fd, s.iov.iov_base, len, off_t(s.offset + s.done));
      on_result(s, n >= 0 ? int64_t(n) : -int64_t(errno));
      return;
    }
    sqe->opcode = op == OpKind::Read ? IORING_OP_READV : IORING_OP_WRITEV;
    sqe->fd = s.fd;
    sqe->off = s.offset + s.done;
    sqe->addr = reinterpret_cast<uint64_t>(&s.iov);
    sqe->len = 1;
    sqe->user_data = reinterpret_cast<uint64_t>(&s);
    queued_.push_back(&s);
  }

  void on_result(Segment& s, int64_t res) {
    SegStatus st = engine_.segment_result(*s.chunk, s, res);
    if (st == SegStatus::Again)
      issue(s);
    else
      segment_done(s);
  }

  void segment_done(Segment& s) {
    Chunk& c = *s.chunk;
    if (--c.segs_left == 0) finish(c);
  }

  void finish(Chunk& c) {
    --active_;
    engine_.finish(c);  // may free the chunk
  }

  Engine& engine_;
  const int queue_depth_;
  Ring ring_;
  int wake_fd_ = -1;
  std::mutex mutex_;
  std::vector<Chunk*> incoming_;  // guarded by mutex_
  bool stopping_ = false;         // guarded by mutex_
  // Owned by the ring thread:
  int active_ = 0;                // chunks started and not finished
  bool wake_armed_ = false;
  bool degraded_ = false;         // io_uring_enter broke: blocking syscalls from now on
  std::deque<Segment*> queued_;   // SQEs not yet consumed by the kernel, in ring order (nullptr: wake poll)
  std::thread thread_;
};

}  // namespace

std::unique_ptr<Backend> make_uring_backend(Engine& engine, int queue_depth) {
  return std::make_unique<UringBackend>(engine, queue_depth);
}

bool uring_available(std::string* why) {
  try {
    Ring ring(4);
    io_uring_sqe* sqe = ring.next_sqe();
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = 42;
    int ret;
    do {
      ret = ring.enter(1);
    } while (ret == -EINTR);
    if (ret < 0) {
      if (why) *why = std::string("io_uring_enter: ") + std::strerror(-ret);
      return false;
    }
    int res = -1;
    uint64_t tag = 0;
    ring.reap([&](uint64_t t, int r) { tag = t, res = r; });
    if (tag != 42 || res != 0) {
      if (why) *why = "io_uring NOP did not complete as expected";
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    if (why) *why = e.what();
    return false;
  }
}

#else  // no <linux/io_uring.h> at build time

std::unique_ptr<Backend> make_uring_backend(Engine&, int) {
  throw std::runtime_error("ratel._swapper was built without <linux/io_uring.h>");
}

bool uring_available(std::string* why) {
  if (why) *why = "built without <linux/io_uring.h>";
  return false;
}

#endif

}  // namespace ratel::swapper
