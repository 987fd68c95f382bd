// Thread backend: queue_depth workers, each running one chunk at a time with blocking pread/pwrite.
// Works everywhere (no io_uring, no libaio), and spreads checksum and bounce-copy work over many cores.
#include <deque>
#include <thread>

#include "swapper.h"

namespace ratel::swapper {
namespace {

class ThreadBackend final : public Backend {
 public:
  ThreadBackend(Engine& engine, int workers) : engine_(engine) {
    threads_.reserve(size_t(workers));
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { run(); });
  }

  ~ThreadBackend() override { shutdown(); }

  const char* name() const override { return "threads"; }

  void submit(Chunk* const* chunks, size_t n) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.insert(queue_.end(), chunks, chunks + n);
    }
    if (n == 1)
      cv_.notify_one();
    else
      cv_.notify_all();
  }

  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }

 private:
  void run() {
    for (;;) {
      Chunk* c;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        // Idle workers sleep on the condition variable: no polling, no core burnt.
        cv_.wait(lock, [this] { return !queue_.empty() || stopping_; });
        if (queue_.empty()) return;  // stopping, and everything submitted has been taken
        c = queue_.front();
        queue_.pop_front();
      }
      process(*c);
    }
  }

  void process(Chunk& c) {
    if (engine_.prepare(c)) {
      const OpKind op = c.request->op;
      for (int i = 0; i < c.nsegs; ++i) {
        Segment& s = c.segs[i];
        SegStatus st;
        do {
          st = engine_.segment_result(c, s, sync_io(op, s));
        } while (st == SegStatus::Again);
        if (st == SegStatus::Failed) break;  // the rest of this chunk is moot once one piece failed
      }
    }
    engine_.finish(c);  // may free the chunk: do not touch it afterwards
  }

  Engine& engine_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Chunk*> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace

std::unique_ptr<Backend> make_thread_backend(Engine& engine, int queue_depth) {
  return std::make_unique<ThreadBackend>(engine, queue_depth);
}

}  // namespace ratel::swapper
