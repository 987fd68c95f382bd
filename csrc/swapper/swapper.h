// Native NVMe swapper: asynchronous reads and writes between host buffers and (striped) swap files.
//
// Layers, bottom up:
//   Backend  - moves Segments (one contiguous syscall-sized piece of I/O) to and from a file descriptor:
//              ThreadBackend (a pool of pread/pwrite workers) or UringBackend (io_uring, raw syscalls).
//   Engine   - owns the files, splits a Request into Chunks on the block grid of the logical file, maps each
//              chunk onto its stripe, and runs the per-chunk steps that do not depend on the backend
//              (bounce copies, checksums, poisoning after failed writes, error capture).
//   Request  - what Python holds: completes when its last chunk completes; waiting never needs the GIL.
//
// Nothing here links against torch: buffers arrive as raw addresses that Python keeps alive.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <sys/uio.h>

namespace ratel::swapper {

// O_DIRECT needs the file offset, length and buffer address aligned to the device's logical block size.
// 4096 satisfies both 512-byte-emulated and 4Kn drives, so we never have to ask the device.
constexpr uint64_t kAlignment = 4096;

// An OS-level failure outside any request (opening a file): becomes Python's OSError with errno and path.
struct OsError : std::runtime_error {
  OsError(int err, std::string path, const std::string& what)
      : std::runtime_error(what), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

inline uint64_t round_down(uint64_t x, uint64_t a) { return x - x % a; }
inline uint64_t round_up(uint64_t x, uint64_t a) { return round_down(x + a - 1, a); }

enum class OpKind : uint8_t { Read = 0, Write = 1 };

// XXH64 (the public xxHash 64-bit algorithm): fast enough (> 10 GB/s a core) that checksumming every
// block costs far less than the SSD transfer it protects.
uint64_t hash64(const void* data, size_t len, uint64_t seed = 0);

// ---- fault injection (tests only) ---------------------------------------------------------------
//
// Process-wide, because the point is to make "the kernel" misbehave for whichever engine runs next.
enum class FaultOp : int { Read = 0, Write = 1, Open = 2, UringEnter = 3 };

struct Fault {
  bool fire = false;
  bool fail = false;       // fake a failure or short transfer; false: only the delay applies
  int err = 0;             // errno to fake; 0 means "short transfer" instead
  uint64_t short_len = 0;  // bytes the faked short transfer moves (0 = end of file / no progress)
  int64_t delay_ns = 0;    // stall the syscall first (keeps a request in flight for a test)
};

class FaultInjector {
 public:
  static FaultInjector& instance();
  // The (after+1)-th matching syscall from now, and the count-1 after it, are delayed by delay_ns and
  // then fail with errno 'err' (err < 0: do not fail, only delay; err == 0: short transfer).
  void arm(FaultOp op, int err, uint64_t after, uint64_t count, bool partial, int64_t delay_ns);
  void clear();
  // Called in front of every read/write/open syscall; cheap (one relaxed load) when nothing is armed.
  Fault check(FaultOp op, uint64_t len);

 private:
  std::atomic<bool> armed_{false};
  std::mutex mutex_;
  FaultOp op_ = FaultOp::Read;
  int err_ = 0;
  uint64_t skip_ = 0;
  uint64_t count_ = 0;
  bool partial_ = false;
  int64_t delay_ns_ = 0;
};

// ---- files ----------------------------------------------------------------------------------------

// Byte ranges of a logical file whose last write failed: reading them must fail rather than return
// whatever half-written data the disk holds. Almost always empty, so the fast path is one atomic load.
class PoisonSet {
 public:
  void add(uint64_t begin, uint64_t end);
  void remove(uint64_t begin, uint64_t end);
  bool overlaps(uint64_t begin, uint64_t end);

 private:
  std::atomic<bool> nonempty_{false};
  std::mutex mutex_;
  std::map<uint64_t, uint64_t> ranges_;  // begin -> end, disjoint
};

struct FilePart {
  std::string path;
  int direct_fd = -1;    // O_DIRECT descriptor, -1 when direct I/O is off or the file system refused it
  int buffered_fd = -1;  // always open: serves unaligned heads/tails and file systems without O_DIRECT
};

struct SwapFile {
  std::string name;
  uint64_t nbytes = 0;
  uint64_t stripe = 0;  // bytes of one stripe unit; logical unit i lives in parts[i % parts.size()]
  uint64_t block = 0;   // chunk grid and checksum unit
  std::vector<FilePart> parts;
  PoisonSet poison;
  // Per block of the logical file, when checksums are on; 'hash_valid' is 0 when the block was never
  // written whole by this engine (then a read cannot be verified).
  std::unique_ptr<std::atomic<uint64_t>[]> hashes;
  std::unique_ptr<std::atomic<uint8_t>[]> hash_valid;
  uint64_t nblocks = 0;
  std::atomic<bool> closed{false};

  ~SwapFile();
  void close_fds();
};

// ---- requests -------------------------------------------------------------------------------------

struct Chunk;

// One syscall-shaped piece of a chunk: the aligned middle goes O_DIRECT, an unaligned head or tail
// goes through the page cache (which does sub-page read-modify-write safely under the page lock).
struct Segment {
  Chunk* chunk = nullptr;
  int fd = -1;
  bool direct = false;
  uint64_t offset = 0;  // physical offset in the part file
  char* buf = nullptr;
  uint64_t len = 0;
  uint64_t done = 0;    // bytes already transferred (partial transfers are resumed)
  struct iovec iov{};   // io_uring READV/WRITEV needs it in stable memory
  Fault fault;          // io_uring: an injected fault waiting for its delay to pass
  int64_t timeout[2]{}; // io_uring: the delay as struct __kernel_timespec
};

struct Request;

struct Chunk {
  Request* request = nullptr;
  SwapFile* file = nullptr;
  int part = 0;
  uint64_t logical = 0;   // offset in the logical file
  uint64_t physical = 0;  // offset in parts[part]
  char* user = nullptr;   // caller's buffer for this chunk
  uint64_t len = 0;
  bool whole_block = false;  // covers a whole checksum block
  Segment segs[3];
  int nsegs = 0;
  int segs_left = 0;      // io_uring: segments still in the kernel
  int direct_seg = -1;    // index of the O_DIRECT segment, if any
  char* bounce = nullptr; // aligned copy of the direct segment when the caller's address is not aligned
  uint64_t hash = 0;
  // First failure of this chunk.
  int err = 0;
  uint64_t err_offset = 0;
  std::string err_detail;
};

struct RequestError {
  int err = 0;
  std::string detail;
  std::string path;
  uint64_t physical = 0;
  uint64_t logical = 0;
};

class Engine;

struct Request {
  uint64_t id = 0;
  OpKind op = OpKind::Read;
  std::shared_ptr<SwapFile> file;  // the file outlives every request on it
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  std::vector<Chunk> chunks;
  std::atomic<size_t> remaining{0};
  std::atomic<bool> finished{false};
  std::mutex mutex;
  std::condition_variable cv;
  RequestError error;  // guarded by mutex until 'finished'

  bool done() const { return finished.load(std::memory_order_acquire); }
  // Blocks (no spinning) until done or until 'timeout_s' passes (< 0: forever). Returns done().
  bool wait(double timeout_s);
};

// ---- backends -------------------------------------------------------------------------------------

enum class SegStatus { Done, Again, Failed };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual void submit(Chunk* const* chunks, size_t n) = 0;
  // Finishes everything submitted, then stops the backend's threads.
  virtual void shutdown() = 0;
};

std::unique_ptr<Backend> make_thread_backend(Engine& engine, int queue_depth);
std::unique_ptr<Backend> make_uring_backend(Engine& engine, int queue_depth);
// Whether io_uring works here (kernel support, not blocked by seccomp); 'why' says why not.
bool uring_available(std::string* why);

// Executes one segment as a blocking syscall, fault injection included. Returns bytes moved or -errno.
int64_t sync_io(OpKind op, const Segment& seg);
// The injected fault (if any) for the next syscall of 'seg'.
Fault next_fault(OpKind op, const Segment& seg);
// After its delay, a fault either fakes the syscall's result (returns true, sets *out) or lets a real
// syscall of *len bytes happen (returns false; *len is shortened for a partial transfer).
bool apply_fault(const Fault& f, int64_t* out, uint64_t* len);

// ---- engine -----------------------------------------------------------------------------------------

struct EngineConfig {
  std::string backend = "threads";  // "threads" or "uring"
  uint64_t block_size = 1 << 20;
  int queue_depth = 32;
  bool checksum = false;
};

struct EngineStats {
  std::atomic<uint64_t> requests{0}, chunks{0}, bytes_read{0}, bytes_written{0};
  std::atomic<uint64_t> direct_bytes{0}, buffered_bytes{0}, bounce_bytes{0};
  std::atomic<uint64_t> resumed_partial{0}, failed_requests{0}, checksum_verified{0};
  std::atomic<uint64_t> backend_degraded{0};  // 1 once io_uring_enter failed and the ring went synchronous
};

// Aligned scratch buffers of one block each, reused so that bounce copies do not mmap/munmap per chunk.
class BouncePool {
 public:
  explicit BouncePool(uint64_t size, size_t keep) : size_(size), keep_(keep) {}
  ~BouncePool();
  char* get();  // nullptr when out of memory
  void put(char* buf);

 private:
  uint64_t size_;
  size_t keep_;
  std::mutex mutex_;
  std::vector<char*> free_;
};

class Engine {
 public:
  explicit Engine(const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const EngineConfig& config() const { return config_; }
  const char* backend_name() const;

  // Opens already-created part files. 'direct' asks for O_DIRECT; a part whose file system refuses it
  // (EINVAL) is opened buffered and reported through direct_parts().
  std::shared_ptr<SwapFile> open_file(const std::string& name, const std::vector<std::string>& paths,
                                      uint64_t nbytes, uint64_t stripe, bool direct);
  std::shared_ptr<Request> submit(OpKind op, const std::shared_ptr<SwapFile>& file, uint64_t offset,
                                   char* addr, uint64_t nbytes);
  void drain();  // waits until no request is in flight
  void close();  // drain, stop the backend, close every file; idempotent
  const EngineStats& stats() const { return stats_; }
  size_t inflight();

  // Backend-independent chunk steps, called by the backends on their own threads.
  bool prepare(Chunk& c);                                  // false: the chunk already failed
  SegStatus segment_result(Chunk& c, Segment& s, int64_t res);
  void finish(Chunk& c);                                   // chunk done (ok or failed)
  void note_degraded() { stats_.backend_degraded.store(1); }

 private:
  void fail_chunk(Chunk& c, int err, uint64_t offset, std::string detail);
  void complete_request(Request* r);

  EngineConfig config_;
  EngineStats stats_;
  BouncePool bounce_;
  std::unique_ptr<Backend> backend_;
  std::mutex mutex_;
  std::condition_variable idle_cv_;
  std::unordered_map<uint64_t, std::shared_ptr<Request>> inflight_;
  std::vector<std::weak_ptr<SwapFile>> files_;
  uint64_t next_id_ = 1;
  bool closed_ = false;
};

}  // namespace ratel::swapper
