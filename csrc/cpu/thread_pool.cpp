#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <thread>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BITSWITCH_PAUSE() _mm_pause()
#else
#define BITSWITCH_PAUSE() std::this_thread::yield()
#endif

namespace bitswitch {
namespace cpu {
namespace {

// How long an idle worker keeps spinning before it sleeps. Long enough to cover the
// gap between consecutive ops of one layer (so a model's calls never pay a wake-up),
// short enough that an idle process goes quiet at once.
constexpr auto kSpinTime = std::chrono::microseconds(200);

thread_local int tl_inside_task = 0;

constexpr int kGenShift = 48, kCountShift = 24;
constexpr uint64_t kField = (uint64_t(1) << 24) - 1;

uint64_t pack(uint64_t gen, uint64_t n, uint64_t next) {
  return (gen << kGenShift) | (n << kCountShift) | next;
}
uint64_t gen_of(uint64_t v) { return v >> kGenShift; }
uint64_t count_of(uint64_t v) { return (v >> kCountShift) & kField; }
uint64_t next_of(uint64_t v) { return v & kField; }

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
  workers_.reserve(n_threads_ - 1);
  for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t] { worker_loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(sleep_mu_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::drain(int thread) {
  ++tl_inside_task;
  for (;;) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    if (next_of(v) >= count_of(v)) break;
    TaskFn fn = fn_.load(std::memory_order_relaxed);
    void* ctx = ctx_.load(std::memory_order_relaxed);
    if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
    fn(ctx, int64_t(next_of(v)), thread);
    done_.fetch_add(1, std::memory_order_release);
  }
  --tl_inside_task;
}

void ThreadPool::run(int64_t n_tasks, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  if (n_threads_ == 1 || n_tasks == 1 || tl_inside_task > 0 || n_tasks > kMaxTasks) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
    return;
  }
  std::lock_guard<std::mutex> submit(submit_mu_);
  fn_.store(fn, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  uint64_t gen = (gen_of(claim_.load(std::memory_order_relaxed)) + 1) & 0xFFFF;
  claim_.store(pack(gen, uint64_t(n_tasks), 0), std::memory_order_release);
  {
    std::lock_guard<std::mutex> lk(sleep_mu_);
    if (sleepers_ > 0) wake_.notify_all();
  }
  drain(0);
  // Tasks claimed by workers may still be running.
  for (int spins = 0; done_.load(std::memory_order_acquire) < n_tasks; ++spins) {
    if (spins < 4096)
      BITSWITCH_PAUSE();
    else
      std::this_thread::yield();
  }
}

void ThreadPool::worker_loop(int thread) {
  uint64_t seen = gen_of(claim_.load(std::memory_order_acquire));
  auto fresh = [&] { return gen_of(claim_.load(std::memory_order_acquire)) != seen; };
  for (;;) {
    auto deadline = std::chrono::steady_clock::now() + kSpinTime;
    int spins = 0;
    while (!fresh() && !stop_.load(std::memory_order_relaxed)) {
      BITSWITCH_PAUSE();
      if (++spins % 256 == 0 && std::chrono::steady_clock::now() > deadline) {
        std::unique_lock<std::mutex> lk(sleep_mu_);
        ++sleepers_;
        wake_.wait(lk, [&] { return fresh() || stop_.load(); });
        --sleepers_;
        break;
      }
    }
    if (stop_.load()) return;
    seen = gen_of(claim_.load(std::memory_order_acquire));
    drain(thread);
  }
}

namespace {

std::mutex g_pool_mu;
std::shared_ptr<ThreadPool> g_pool;
pid_t g_pool_pid = 0;
// Set in a forked child (pthread_atfork), so pool() needs no getpid() syscall per call.
std::atomic<bool> g_forked{false};
std::once_flag g_atfork_once;
int g_requested_threads = 0;  // 0: not set by set_num_threads()

int default_threads() {
  if (const char* env = std::getenv("BITSWITCH_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;  // the CPUs this process may run on (taskset, cgroups)
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

}  // namespace

int num_threads_setting() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_requested_threads > 0 ? g_requested_threads : default_threads();
}

// Detaches the current pool. A pool inherited through fork() has no running workers and
// joining them would hang, so it is deliberately leaked. Caller holds g_pool_mu.
std::shared_ptr<ThreadPool> detach_pool_locked() {
  std::shared_ptr<ThreadPool> old = std::move(g_pool);
  g_pool.reset();
  if (old && g_pool_pid != getpid()) {
    new std::shared_ptr<ThreadPool>(std::move(old));
    old.reset();
  }
  return old;
}

std::shared_ptr<ThreadPool> pool() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); }); });
  std::shared_ptr<ThreadPool> old;  // released after the lock
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_forked.exchange(false) && g_pool) old = detach_pool_locked();
  if (!g_pool) {
    const pid_t pid = getpid();
    g_pool = std::make_shared<ThreadPool>(g_requested_threads > 0 ? g_requested_threads
                                                                  : default_threads());
    g_pool_pid = pid;
  }
  return g_pool;
}

void set_num_threads(int n) {
  std::shared_ptr<ThreadPool> old;
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    g_requested_threads = n > 0 ? n : 0;
    old = detach_pool_locked();
  }
  // `old` is joined here, or later by the last caller still holding it.
}

}  // namespace cpu
}  // namespace bitswitch
