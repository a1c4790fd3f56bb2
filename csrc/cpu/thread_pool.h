// A persistent pool of std::threads for the CPU kernels (no OpenMP: its runtime clashes
// with torch's libgomp and hangs in a forked child).
//
// The caller's thread takes part in every job, so a pool of T threads starts T - 1
// workers. Workers spin briefly after a job (a dispatch then costs well under a
// microsecond) and then sleep on a condition variable so an idle process uses no CPU.
// Tasks are claimed dynamically, so a worker that is slow to wake never holds up a job:
// the caller simply takes the remaining tasks itself. A child process after fork() gets
// a fresh pool on its first call (the parent's workers do not exist in the child).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace bitswitch {
namespace cpu {

// One task of a job: fn(ctx, task, thread) with task in [0, n_tasks) and thread in
// [0, num_threads()) (0 is the caller). Each thread index runs one task at a time,
// so per-thread scratch indexed by `thread` is safe.
using TaskFn = void (*)(void* ctx, int64_t task, int thread);

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return n_threads_; }

  // Runs every task and returns when all have finished. Callers on other threads
  // queue; a call from inside a task runs inline on that thread.
  void run(int64_t n_tasks, TaskFn fn, void* ctx);

  // f(task, thread) for every task.
  template <class F>
  void parallel_for(int64_t n_tasks, F&& f) {
    using Fn = std::remove_reference_t<F>;
    run(n_tasks, [](void* c, int64_t t, int th) { (*static_cast<Fn*>(c))(t, th); },
        const_cast<void*>(static_cast<const void*>(&f)));
  }

  // Largest number of tasks one job may have.
  static constexpr int64_t kMaxTasks = (int64_t(1) << 24) - 1;

 private:
  void worker_loop(int thread);
  // Claims and runs tasks of the published job until none is left.
  void drain(int thread);

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex submit_mu_;  // one job at a time

  // The published job. `claim_` packs (generation:16 | n_tasks:24 | next task:24) so a
  // compare-and-swap claims a task of exactly the job whose fields were read.
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};

  std::mutex sleep_mu_;
  std::condition_variable wake_;
  int sleepers_ = 0;  // guarded by sleep_mu_
};

// The process-wide pool: created on first use with num_threads_setting() threads and
// replaced after fork() or set_num_threads(). Holders keep a replaced pool alive.
std::shared_ptr<ThreadPool> pool();
// Threads the pool has (or will have): set_num_threads() if called, else
// BITSWITCH_NUM_THREADS, else the CPUs this process may run on.
int num_threads_setting();
void set_num_threads(int n);

}  // namespace cpu
}  // namespace bitswitch
