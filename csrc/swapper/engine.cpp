// Engine: files, request splitting and the per-chunk steps shared by every backend.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fcntl.h>
#include <unistd.h>

#include "swapper.h"

namespace ratel::swapper {

// ---- Request ------------------------------------------------------------------------------------------

bool Request::wait(double timeout_s) {
  if (done()) return true;
  std::unique_lock<std::mutex> lock(mutex);
  auto finished_now = [this] { return finished.load(std::memory_order_acquire); };
  if (timeout_s < 0) {
    cv.wait(lock, finished_now);
    return true;
  }
  return cv.wait_for(lock, std::chrono::duration<double>(timeout_s), finished_now);
}

// ---- SwapFile -----------------------------------------------------------------------------------------

void SwapFile::close_fds() {
  closed.store(true);
  for (FilePart& p : parts) {
    if (p.direct_fd >= 0) ::close(p.direct_fd);
    if (p.buffered_fd >= 0) ::close(p.buffered_fd);
    p.direct_fd = p.buffered_fd = -1;
  }
}

SwapFile::~SwapFile() { close_fds(); }

// ---- BouncePool ---------------------------------------------------------------------------------------

BouncePool::~BouncePool() {
  for (char* b : free_) std::free(b);
}

char* BouncePool::get() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      char* b = free_.back();
      free_.pop_back();
      return b;
    }
  }
  void* p = nullptr;
  if (posix_memalign(&p, kAlignment, size_) != 0) return nullptr;
  return static_cast<char*>(p);
}

void BouncePool::put(char* buf) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.size() < keep_) {
      free_.push_back(buf);
      return;
    }
  }
  std::free(buf);
}

// ---- Engine -------------------------------------------------------------------------------------------

Engine::Engine(const EngineConfig& config)
    : config_(config), bounce_(config.block_size, size_t(config.queue_depth)) {
  if (config_.block_size == 0 || config_.block_size % kAlignment != 0)
    throw std::invalid_argument("block_size must be a positive multiple of " + std::to_string(kAlignment));
  if (config_.queue_depth < 1 || config_.queue_depth > 4096)
    throw std::invalid_argument("queue_depth must be between 1 and 4096");
  if (config_.backend == "threads")
    backend_ = make_thread_backend(*this, config_.queue_depth);
  else if (config_.backend == "uring")
    backend_ = make_uring_backend(*this, config_.queue_depth);
  else
    throw std::invalid_argument("unknown backend '" + config_.backend + "' (expected 'threads' or 'uring')");
}

Engine::~Engine() {
  try {
    close();
  } catch (...) {
    // A destructor must not throw; close() only throws on programming errors.
  }
}

const char* Engine::backend_name() const { return config_.backend.c_str(); }

namespace {
int open_fd(const std::string& path, int flags) {
  Fault f = FaultInjector::instance().check(FaultOp::Open, 0);
  if (f.fire && f.fail) {
    errno = f.err != 0 ? f.err : EIO;
    return -1;
  }
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  return fd;
}
}  // namespace

std::shared_ptr<SwapFile> Engine::open_file(const std::string& name, const std::vector<std::string>& paths,
                                            uint64_t nbytes, uint64_t stripe, bool direct) {
  if (paths.empty()) throw std::invalid_argument("a swap file needs at least one part");
  if (stripe == 0 || stripe % config_.block_size != 0)
    throw std::invalid_argument("stripe size must be a positive multiple of the block size");
  auto f = std::make_shared<SwapFile>();
  f->name = name;
  f->nbytes = nbytes;
  f->stripe = stripe;
  f->block = config_.block_size;
  for (const std::string& path : paths) {
    FilePart part;
    part.path = path;
    if (direct) {
      part.direct_fd = open_fd(path, O_RDWR | O_DIRECT);
      // EINVAL is how Linux says "this file system has no O_DIRECT" (tmpfs before 6.6, ramfs, some FUSE):
      // fall back to buffered I/O, which Python reports with a warning. Any other error is real.
      if (part.direct_fd < 0 && errno != EINVAL) {
        int err = errno;
        f->parts.push_back(part);  // so that close_fds() releases what is already open
        throw OsError(err, path, "cannot open swap file " + path + ": " + std::strerror(err));
      }
    }
    part.buffered_fd = open_fd(path, O_RDWR);
    if (part.buffered_fd < 0) {
      int err = errno;
      f->parts.push_back(part);
      throw OsError(err, path, "cannot open swap file " + path + ": " + std::strerror(err));
    }
    f->parts.push_back(part);
  }
  f->nblocks = (nbytes + config_.block_size - 1) / config_.block_size;
  if (config_.checksum) {
    f->hashes.reset(new std::atomic<uint64_t>[f->nblocks]);
    f->hash_valid.reset(new std::atomic<uint8_t>[f->nblocks]);
    for (uint64_t i = 0; i < f->nblocks; ++i) {
      f->hashes[i].store(0, std::memory_order_relaxed);
      f->hash_valid[i].store(0, std::memory_order_relaxed);
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw std::runtime_error("the swapper is closed");
  files_.push_back(f);
  return f;
}

std::shared_ptr<Request> Engine::submit(OpKind op, const std::shared_ptr<SwapFile>& file, uint64_t offset,
                                        char* addr, uint64_t nbytes) {
  if (!file) throw std::invalid_argument("no file");
  if (offset > file->nbytes || nbytes > file->nbytes - offset)
    throw std::out_of_range("request [" + std::to_string(offset) + ", " + std::to_string(offset + nbytes) +
                            ") is outside swap file '" + file->name + "' of " + std::to_string(file->nbytes) +
                            " bytes");
  auto r = std::make_shared<Request>();
  r->op = op;
  r->file = file;
  r->offset = offset;
  r->nbytes = nbytes;
  if (nbytes == 0) {
    r->finished.store(true);
    return r;
  }

  // Chunks follow the block grid of the logical file, so that a block written whole can be checksummed
  // and verified whole, and (stripe being a multiple of the block) a chunk never spans two stripe units.
  const uint64_t block = file->block, stripe = file->stripe, nparts = file->parts.size();
  const uint64_t end = offset + nbytes;
  r->chunks.resize((end - 1) / block - offset / block + 1);
  uint64_t pos = offset;
  for (Chunk& c : r->chunks) {
    uint64_t blk = pos / block;
    uint64_t block_end = std::min((blk + 1) * block, file->nbytes);
    uint64_t chunk_end = std::min(end, block_end);
    uint64_t unit = pos / stripe;
    c.request = r.get();
    c.file = file.get();
    c.part = int(unit % nparts);
    c.logical = pos;
    c.physical = (unit / nparts) * stripe + pos % stripe;
    c.user = addr + (pos - offset);
    c.len = chunk_end - pos;
    c.whole_block = pos == blk * block && chunk_end == block_end;

    const FilePart& part = file->parts[c.part];
    auto add = [&](uint64_t b, uint64_t e, bool direct) {
      Segment& s = c.segs[c.nsegs];
      s.chunk = &c;
      s.direct = direct;
      s.fd = direct ? part.direct_fd : part.buffered_fd;
      s.offset = b;
      s.len = e - b;
      s.buf = c.user + (b - c.physical);
      if (direct) c.direct_seg = c.nsegs;
      ++c.nsegs;
    };
    uint64_t phys_end = c.physical + c.len;
    uint64_t a = round_up(c.physical, kAlignment), z = round_down(phys_end, kAlignment);
    if (part.direct_fd >= 0 && a < z) {
      if (c.physical < a) add(c.physical, a, false);
      add(a, z, true);
      if (z < phys_end) add(z, phys_end, false);
    } else {
      add(c.physical, phys_end, false);
    }
    pos = chunk_end;
  }
  r->remaining.store(r->chunks.size());

  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw std::runtime_error("the swapper is closed");
    r->id = next_id_++;
    inflight_.emplace(r->id, r);
  }
  stats_.requests.fetch_add(1, std::memory_order_relaxed);
  stats_.chunks.fetch_add(r->chunks.size(), std::memory_order_relaxed);
  std::vector<Chunk*> ptrs;
  ptrs.reserve(r->chunks.size());
  for (Chunk& c : r->chunks) ptrs.push_back(&c);
  backend_->submit(ptrs.data(), ptrs.size());
  return r;
}

size_t Engine::inflight() {
  std::lock_guard<std::mutex> lock(mutex_);
  return inflight_.size();
}

void Engine::drain() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_cv_.wait(lock, [this] { return inflight_.empty(); });
}

void Engine::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = true;
  }
  drain();
  if (backend_) backend_->shutdown();
  backend_.reset();
  std::vector<std::weak_ptr<SwapFile>> files;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    files.swap(files_);
  }
  for (auto& w : files)
    if (auto f = w.lock()) f->close_fds();
}

// ---- chunk steps -------------------------------------------------------------------------------------

void Engine::fail_chunk(Chunk& c, int err, uint64_t offset, std::string detail) {
  if (c.err != 0) return;  // keep the first cause
  c.err = err;
  c.err_offset = offset;
  c.err_detail = std::move(detail);
}

bool Engine::prepare(Chunk& c) {
  SwapFile& f = *c.file;
  const OpKind op = c.request->op;
  if (f.closed.load()) {
    fail_chunk(c, EBADF, c.physical, "the swap file was closed");
    return false;
  }
  if (op == OpKind::Read && f.poison.overlaps(c.logical, c.logical + c.len)) {
    fail_chunk(c, EIO, c.physical, "an earlier write to this range failed, so its contents are unknown");
    return false;
  }
  if (op == OpKind::Write && config_.checksum) {
    uint64_t blk = c.logical / f.block;
    // Invalid until this write lands whole: a reader racing with it, or a partial write, must not be
    // checked against the block's previous contents.
    f.hash_valid[blk].store(0, std::memory_order_release);
    if (c.whole_block) c.hash = hash64(c.user, c.len);
  }
  if (c.direct_seg >= 0) {
    Segment& s = c.segs[c.direct_seg];
    if (reinterpret_cast<uintptr_t>(s.buf) % kAlignment != 0) {
      c.bounce = bounce_.get();
      if (c.bounce == nullptr) {
        fail_chunk(c, ENOMEM, c.physical, "no memory for an aligned bounce buffer");
        return false;
      }
      if (op == OpKind::Write) std::memcpy(c.bounce, s.buf, s.len);
      s.buf = c.bounce;
      stats_.bounce_bytes.fetch_add(s.len, std::memory_order_relaxed);
    }
  }
  return true;
}

SegStatus Engine::segment_result(Chunk& c, Segment& s, int64_t res) {
  const OpKind op = c.request->op;
  if (res < 0) {
    int err = int(-res);
    if (err == EINTR || err == EAGAIN) return SegStatus::Again;
    fail_chunk(c, err, s.offset + s.done, "");
    return SegStatus::Failed;
  }
  if (res == 0) {
    // A regular file returns 0 only at its end (read) or when it cannot take more (write): retrying would
    // spin forever, and returning the buffer as-is would hand back stale bytes.
    if (op == OpKind::Read)
      fail_chunk(c, ENODATA, s.offset + s.done,
                 "short read: end of file after " + std::to_string(s.done) + " of " + std::to_string(s.len) +
                     " bytes");
    else
      fail_chunk(c, EIO, s.offset + s.done, "short write: the file system accepted no more bytes");
    return SegStatus::Failed;
  }
  s.done += uint64_t(res);
  if (s.done < s.len) {
    stats_.resumed_partial.fetch_add(1, std::memory_order_relaxed);
    // O_DIRECT cannot resume from an unaligned point; the page cache can, and is coherent with it.
    if (s.direct && s.done % kAlignment != 0) {
      s.direct = false;
      s.fd = c.file->parts[c.part].buffered_fd;
    }
    return SegStatus::Again;
  }
  return SegStatus::Done;
}

void Engine::finish(Chunk& c) {
  SwapFile& f = *c.file;
  Request& r = *c.request;
  const OpKind op = r.op;
  const uint64_t blk = c.logical / f.block;
  if (c.err == 0) {
    if (op == OpKind::Read) {
      if (c.bounce) {
        const Segment& s = c.segs[c.direct_seg];
        std::memcpy(c.user + (s.offset - c.physical), c.bounce, s.len);
      }
      if (config_.checksum && c.whole_block && f.hash_valid[blk].load(std::memory_order_acquire)) {
        uint64_t h = hash64(c.user, c.len);
        if (h != f.hashes[blk].load(std::memory_order_relaxed)) {
          char detail[160];
          std::snprintf(detail, sizeof detail,
                        "checksum mismatch in block %llu (read %016llx, written %016llx)",
                        static_cast<unsigned long long>(blk), static_cast<unsigned long long>(h),
                        static_cast<unsigned long long>(f.hashes[blk].load()));
          fail_chunk(c, EIO, c.physical, detail);
        } else {
          stats_.checksum_verified.fetch_add(1, std::memory_order_relaxed);
        }
      }
    } else {
      if (config_.checksum && c.whole_block) {
        f.hashes[blk].store(c.hash, std::memory_order_relaxed);
        f.hash_valid[blk].store(1, std::memory_order_release);
      }
      f.poison.remove(c.logical, c.logical + c.len);
    }
  } else if (op == OpKind::Write) {
    f.poison.add(c.logical, c.logical + c.len);
  }
  if (c.bounce) {
    bounce_.put(c.bounce);
    c.bounce = nullptr;
  }
  if (c.err == 0) {
    (op == OpKind::Read ? stats_.bytes_read : stats_.bytes_written).fetch_add(c.len, std::memory_order_relaxed);
    for (int i = 0; i < c.nsegs; ++i)
      (i == c.direct_seg && c.segs[i].direct ? stats_.direct_bytes : stats_.buffered_bytes)
          .fetch_add(c.segs[i].len, std::memory_order_relaxed);
  } else {
    // Report the failure at the lowest offset, so that the message does not depend on thread timing.
    std::lock_guard<std::mutex> lock(r.mutex);
    uint64_t logical = c.logical + (c.err_offset - c.physical);
    if (r.error.err == 0 || logical < r.error.logical) {
      r.error.err = c.err;
      r.error.detail = c.err_detail;
      r.error.path = f.parts[c.part].path;
      r.error.physical = c.err_offset;
      r.error.logical = logical;
    }
  }
  // NOTE: after the last chunk's decrement the request (and this chunk) may be freed at any moment.
  if (r.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) complete_request(&r);
}

void Engine::complete_request(Request* r) {
  {
    std::lock_guard<std::mutex> lock(r->mutex);
    r->finished.store(true, std::memory_order_release);
    if (r->error.err != 0) stats_.failed_requests.fetch_add(1, std::memory_order_relaxed);
  }
  r->cv.notify_all();
  std::shared_ptr<Request> last_ref;  // released outside the engine lock
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = inflight_.find(r->id);
  if (it != inflight_.end()) {
    last_ref = std::move(it->second);
    inflight_.erase(it);
  }
  if (inflight_.empty()) idle_cv_.notify_all();
}

}  // namespace ratel::swapper
