// Small pieces the engine and both backends share: the block hash, fault injection, poisoned ranges,
// and the blocking syscall used by the thread backend.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>

#include <time.h>
#include <unistd.h>

#include "swapper.h"

namespace ratel::swapper {

// ---- XXH64 ------------------------------------------------------------------------------------------

namespace {
constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
// memcpy keeps unaligned loads legal; compilers turn it into a plain load.
inline uint64_t load64(const unsigned char* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline uint32_t load32(const unsigned char* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint64_t round64(uint64_t acc, uint64_t in) { return rotl(acc + in * P2, 31) * P1; }
inline uint64_t merge64(uint64_t acc, uint64_t v) { return (acc ^ round64(0, v)) * P1 + P4; }
}  // namespace

uint64_t hash64(const void* data, size_t len, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char* end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
    const unsigned char* limit = end - 32;
    do {
      v1 = round64(v1, load64(p));
      v2 = round64(v2, load64(p + 8));
      v3 = round64(v3, load64(p + 16));
      v4 = round64(v4, load64(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge64(h, v1);
    h = merge64(h, v2);
    h = merge64(h, v3);
    h = merge64(h, v4);
  } else {
    h = seed + P5;
  }
  h += len;
  for (; p + 8 <= end; p += 8) h = rotl(h ^ round64(0, load64(p)), 27) * P1 + P4;
  if (p + 4 <= end) {
    h = rotl(h ^ (uint64_t(load32(p)) * P1), 23) * P2 + P3;
    p += 4;
  }
  for (; p < end; ++p) h = rotl(h ^ (uint64_t(*p) * P5), 11) * P1;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

// ---- fault injection ----------------------------------------------------------------------------

FaultInjector& FaultInjector::instance() {
  static FaultInjector injector;
  return injector;
}

void FaultInjector::arm(FaultOp op, int err, uint64_t after, uint64_t count, bool partial,
                        int64_t delay_ns) {
  std::lock_guard<std::mutex> lock(mutex_);
  op_ = op;
  err_ = err;
  skip_ = after;
  count_ = count;
  partial_ = partial;
  delay_ns_ = delay_ns;
  armed_.store(count > 0, std::memory_order_release);
}

void FaultInjector::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  count_ = 0;
  armed_.store(false, std::memory_order_release);
}

Fault FaultInjector::check(FaultOp op, uint64_t len) {
  Fault f;
  if (!armed_.load(std::memory_order_acquire)) return f;
  std::lock_guard<std::mutex> lock(mutex_);
  if (count_ == 0 || op != op_) return f;
  if (skip_ > 0) {
    --skip_;
    return f;
  }
  if (--count_ == 0) armed_.store(false, std::memory_order_release);
  f.fire = true;
  f.fail = err_ >= 0;
  f.err = err_ > 0 ? err_ : 0;
  // A partial transfer keeps the remainder aligned so that a resumed O_DIRECT transfer stays legal.
  f.short_len = (err_ == 0 && partial_) ? round_down(len / 2, kAlignment) : 0;
  f.delay_ns = delay_ns_;
  return f;
}

// ---- poisoned ranges --------------------------------------------------------------------------------

void PoisonSet::add(uint64_t begin, uint64_t end) {
  if (begin >= end) return;
  std::lock_guard<std::mutex> lock(mutex_);
  // Merge with every range that touches [begin, end).
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin() && std::prev(it)->second >= begin) --it;
  while (it != ranges_.end() && it->first <= end) {
    begin = std::min(begin, it->first);
    end = std::max(end, it->second);
    it = ranges_.erase(it);
  }
  ranges_[begin] = end;
  nonempty_.store(true, std::memory_order_release);
}

void PoisonSet::remove(uint64_t begin, uint64_t end) {
  if (begin >= end || !nonempty_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin()) --it;
  while (it != ranges_.end() && it->first < end) {
    uint64_t b = it->first, e = it->second;
    if (e <= begin) {
      ++it;
      continue;
    }
    it = ranges_.erase(it);
    if (b < begin) ranges_[b] = begin;
    if (e > end) ranges_[end] = e;
  }
  nonempty_.store(!ranges_.empty(), std::memory_order_release);
}

bool PoisonSet::overlaps(uint64_t begin, uint64_t end) {
  if (!nonempty_.load(std::memory_order_acquire)) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin() && std::prev(it)->second > begin) return true;
  return it != ranges_.end() && it->first < end;
}

// ---- syscalls ---------------------------------------------------------------------------------------

Fault next_fault(OpKind op, const Segment& seg) {
  return FaultInjector::instance().check(op == OpKind::Read ? FaultOp::Read : FaultOp::Write,
                                         seg.len - seg.done);
}

bool apply_fault(const Fault& f, int64_t* out, uint64_t* len) {
  if (!f.fire || !f.fail) return false;
  if (f.err != 0 || f.short_len == 0) {
    *out = f.err != 0 ? -int64_t(f.err) : 0;
    return true;
  }
  *len = std::min(*len, f.short_len);  // a real, shorter transfer happens
  return false;
}

int64_t sync_io(OpKind op, const Segment& seg) {
  uint64_t len = seg.len - seg.done;
  Fault f = next_fault(op, seg);
  if (f.fire && f.delay_ns > 0) {
    timespec ts{time_t(f.delay_ns / 1000000000), long(f.delay_ns % 1000000000)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
  }
  int64_t faked;
  if (apply_fault(f, &faked, &len)) return faked;
  for (;;) {
    ssize_t n = op == OpKind::Read ? ::pread(seg.fd, seg.buf + seg.done, len, off_t(seg.offset + seg.done))
                                   : ::pwrite(seg.fd, seg.buf + seg.done, len, off_t(seg.offset + seg.done));
    if (n >= 0) return n;
    if (errno != EINTR) return -int64_t(errno);
  }
}

}  // namespace ratel::swapper
