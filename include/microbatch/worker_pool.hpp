// microbatch::WorkerPool: threads that many batchers share, and the one clock that serves them all.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/prctl.h>
#endif

namespace microbatch {

class WorkerPool;

namespace detail {
/// What a pool knows of a batcher on it (of any `Job`, `Result` and `Processor`): it can run one of
/// the batcher's ready batches, and run one round of the batcher's clock (its collector round). The
/// pool calls `run_one_batch` on its worker threads and `clock_round` on its clock thread, never while
/// holding a lock of its own. The members below the functions are the pool's bookkeeping.
class pool_client {
public:
  using time_point = std::chrono::steady_clock::time_point;

  /// (a pool worker) Takes one ready batch, if there is one and the batcher's cap allows, and runs it.
  virtual void run_one_batch() noexcept = 0;
  /// (the pool's clock thread) One round of the batcher's clock; it schedules the next one itself.
  virtual void clock_round() noexcept = 0;
  /// (the pool's clock thread) After `WorkerPool::retire`: no pool thread is inside the client or
  /// will be again; its owner may free it now.
  virtual void destroy() noexcept {}

  pool_client(const pool_client&) = delete;
  pool_client& operator=(const pool_client&) = delete;

protected:
  pool_client() = default;
  ~pool_client() = default;

private:
  friend class microbatch::WorkerPool;
  bool in_ring_ = false;                 // guarded by the pool's ring mutex
  std::size_t visits_ = 0;               // guarded by the pool's ring mutex: workers inside run_one_batch
  bool detached_ = false;                // guarded by the pool's ring mutex: gone, ignore it
  bool detached_clock_ = false;          // guarded by the pool's clock mutex: the same, for the clock
  time_point timer_ = time_point::max(); // guarded by the pool's clock mutex: its earliest heap entry
  bool in_round_ = false;                // guarded by the pool's clock mutex
};
} // namespace detail

/// A fixed set of threads that runs the batches of every batcher built with `Options::workers` set to
/// it, plus one clock thread that serves the delays, deadlines, flushes, sweeps and shutdowns of all of
/// them. A batcher on a pool starts no thread of its own, so thousands of batchers (or a
/// `KeyedBatcher`'s keys) cost `threads() + 1` threads in all.
///
/// Behaviour
/// - A batcher whose batch is ready (and that is below its own `max_concurrent_batches`) enters the
///   pool's ring of ready batchers, once. A worker that comes free takes the batcher at the front, runs
///   one of its batches, and the batcher goes to the back of the ring if it has more: the pool is fair
///   round-robin over batchers, so a batcher with a thousand queued batches delays another batcher's
///   ready batch by at most one batch per pool thread.
/// - No hand-off under load: the thread whose job fills a batch publishes it; a sleeping worker is
///   woken only when the ring holds more batchers than there are awake workers to take them; a worker
///   that finishes a batch takes the next ready one, of any batcher, without sleeping.
/// - Callbacks and coroutines of a batch are resumed on the pool worker that ended it; jobs that
///   expire, or that `Shutdown::cancel` ends, on the clock thread. Keep that code short.
///
/// Ownership and shutdown: each batcher on the pool holds it (`std::shared_ptr`), so the pool lives
/// until the last of them is destroyed. A batcher's `shutdown` waits for its own batches only; other
/// batchers on the pool go on. The destructor stops and joins the threads (no batcher is left by then).
///
/// Threads: every member is thread-safe. The members below the separator are for batchers.
class WorkerPool {
public:
  using time_point = std::chrono::steady_clock::time_point;

  /// Starts `threads` worker threads and one clock thread. Throws `std::invalid_argument` if `threads`
  /// is 0, and `std::system_error` if a thread cannot be started.
  explicit WorkerPool(std::size_t threads) {
    if (threads == 0) throw std::invalid_argument("microbatch::WorkerPool: threads must be at least 1");
    searching_ = threads;
    try {
      workers_.reserve(threads);
      for (std::size_t i = 0; i < threads; ++i)
        workers_.emplace_back([this] { work(); });
      clock_thread_ = std::thread([this] { keep_time(); });
    } catch (...) {
      stop();
      throw;
    }
  }

  /// Stops and joins the threads. Every batcher on the pool is gone by then (each holds the pool).
  ~WorkerPool() { stop(); }

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  /// The number of worker threads (the clock thread not counted). Thread-safe.
  [[nodiscard]] std::size_t threads() const noexcept { return workers_.size(); }

  // ---------------------------------------------------------------------------------------------
  // For batchers (not a user's API): how a batcher on the pool reaches it.

  /// `client` has a ready batch and room under its cap: it enters the ring (if not in it) and a sleeping
  /// worker is woken if no awake one will take it. Thread-safe.
  void batch_ready(detail::pool_client& client) noexcept {
    bool wake = false;
    {
      std::lock_guard lock(ring_mutex_);
      if (client.detached_ || client.in_ring_) return;
      client.in_ring_ = true;
      ring_.push_back(&client);
      if (sleeping_ != 0 && ring_.size() > searching_) {
        --sleeping_;
        ++searching_;
        ++wake_tokens_;
        idle_.store(sleeping_, std::memory_order_seq_cst);
        wake = true;
      }
    }
    if (wake) worker_wake_.notify_one();
  }

  /// Workers asleep now, with nothing to do. Lock-free.
  [[nodiscard]] std::size_t idle_threads() const noexcept { return idle_.load(std::memory_order_seq_cst); }

  /// Runs `client.clock_round()` on the clock thread no later than `when` (real time). Thread-safe.
  void schedule_round(detail::pool_client& client, time_point when) noexcept {
    bool wake = false;
    {
      std::lock_guard lock(clock_mutex_);
      if (client.detached_clock_ || when >= client.timer_) return;
      client.timer_ = when;
      wake = timers_.empty() || when < timers_.front().when;
      timers_.push_back({when, &client});
      std::push_heap(timers_.begin(), timers_.end(), later);
    }
    if (wake) clock_wake_.notify_one();
  }

  /// Runs `client.clock_round()` on the clock thread as soon as it can. Thread-safe.
  void schedule_round_now(detail::pool_client& client) noexcept { schedule_round(client, time_point::min()); }

  /// `client` leaves the pool: out of the ring and the timers; returns once no pool thread is inside
  /// it. Call it when nothing can schedule it any more (its shutdown is over). Never on a pool thread
  /// inside `client`. Thread-safe.
  void detach(detail::pool_client& client) {
    {
      std::unique_lock lock(ring_mutex_);
      client.detached_ = true;
      if (client.in_ring_) {
        ring_.erase(std::find(ring_.begin(), ring_.end(), &client));
        client.in_ring_ = false;
      }
      left_.wait(lock, [&] { return client.visits_ == 0; });
    }
    std::unique_lock lock(clock_mutex_);
    client.detached_clock_ = true;
    std::erase_if(timers_, [&](const timer& each) { return each.client == &client; });
    std::make_heap(timers_.begin(), timers_.end(), later);
    left_clock_.wait(lock, [&] { return !client.in_round_; });
  }

  /// `client` leaves the pool as `detach` says, without waiting: once no pool thread is inside it, the
  /// clock thread calls `client.destroy()`. May be called on a pool thread, also inside `client`.
  /// Thread-safe.
  void retire(detail::pool_client& client) noexcept {
    {
      std::lock_guard lock(ring_mutex_);
      client.detached_ = true;
      if (client.in_ring_) {
        ring_.erase(std::find(ring_.begin(), ring_.end(), &client));
        client.in_ring_ = false;
      }
    }
    {
      std::lock_guard lock(clock_mutex_);
      client.detached_clock_ = true;
      std::erase_if(timers_, [&](const timer& each) { return each.client == &client; });
      std::make_heap(timers_.begin(), timers_.end(), later);
      retiring_.push_back(&client);
      clock_wake_.notify_one();
    }
  }

  /// The pool whose thread (worker or clock) this is, if any. Thread-safe.
  [[nodiscard]] static const WorkerPool* of_thread() noexcept { return this_thread_pool(); }

  /// True on this pool's clock thread. Thread-safe.
  [[nodiscard]] bool on_clock_thread() const noexcept { return std::this_thread::get_id() == clock_thread_.get_id(); }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  struct timer {
    time_point when;
    detail::pool_client* client;
  };
  static bool later(const timer& a, const timer& b) noexcept { return a.when > b.when; }

  static const WorkerPool*& this_thread_pool() noexcept {
    thread_local const WorkerPool* pool = nullptr;
    return pool;
  }

  void work() {
    this_thread_pool() = this;
    std::unique_lock lock(ring_mutex_);
    for (;;) {
      if (!ring_.empty()) {
        detail::pool_client* client = ring_.front();
        ring_.pop_front();
        client->in_ring_ = false;
        ++client->visits_;
        --searching_;
        lock.unlock();
        client->run_one_batch(); // puts the client back in the ring if it has more
        lock.lock();
        ++searching_;
        if (--client->visits_ == 0 && client->detached_) { // (the client's last touch by this thread)
          left_.notify_all();
          lock.unlock();
          {
            std::lock_guard clock_lock(clock_mutex_); // a retiring client may wait for this visit
            clock_wake_.notify_one();
          }
          lock.lock();
        }
        continue;
      }
      if (stopping_.load(std::memory_order_relaxed)) return;
      --searching_;
      ++sleeping_;
      idle_.store(sleeping_, std::memory_order_seq_cst);
      worker_wake_.wait(lock, [&] { return wake_tokens_ != 0 || stopping_.load(std::memory_order_relaxed); });
      if (wake_tokens_ != 0) {
        --wake_tokens_; // batch_ready counted this thread awake already
      } else {
        --sleeping_;
        ++searching_;
        idle_.store(sleeping_, std::memory_order_seq_cst);
      }
    }
  }

  void keep_time() {
    this_thread_pool() = this;
#if defined(__linux__)
    // Timer slack (50 us by default) would be added to every batch delay; 1 ns makes timers exact.
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
#endif
    std::unique_lock lock(clock_mutex_);
    for (;;) {
      if (stopping_.load(std::memory_order_relaxed)) return;
      if (!retiring_.empty() && free_retired(lock)) continue;
      // Entries that a later, earlier one replaced (or that were served) are dropped when they surface.
      while (!timers_.empty() && timers_.front().when != timers_.front().client->timer_) {
        std::pop_heap(timers_.begin(), timers_.end(), later);
        timers_.pop_back();
      }
      if (timers_.empty()) {
        clock_wake_.wait(lock);
        continue;
      }
      const time_point when = timers_.front().when;
      if (when != time_point::min() && when > std::chrono::steady_clock::now()) {
        clock_wake_.wait_until(lock, when);
        continue;
      }
      detail::pool_client* client = timers_.front().client;
      std::pop_heap(timers_.begin(), timers_.end(), later);
      timers_.pop_back();
      client->timer_ = time_point::max();
      client->in_round_ = true;
      lock.unlock();
      client->clock_round();
      lock.lock();
      client->in_round_ = false;
      if (client->detached_clock_) left_clock_.notify_all();
    }
  }

  /// (clock thread, clock_mutex_ held) Destroys the retired clients that no worker is inside (no
  /// round is either: this is the clock thread). True if it destroyed any (the lock was released).
  bool free_retired(std::unique_lock<std::mutex>& lock) {
    std::vector<detail::pool_client*> unused;
    {
      std::lock_guard ring_lock(ring_mutex_); // lock order: clock_mutex_, then ring_mutex_
      std::erase_if(retiring_, [&](detail::pool_client* client) {
        if (client->visits_ != 0) return false;
        unused.push_back(client);
        return true;
      });
    }
    if (unused.empty()) return false;
    lock.unlock();
    for (detail::pool_client* client : unused)
      client->destroy();
    lock.lock();
    return true;
  }

  void stop() noexcept {
    stopping_.store(true, std::memory_order_relaxed);
    { std::lock_guard lock(ring_mutex_); } // a worker is either before its check or waiting
    { std::lock_guard lock(clock_mutex_); }
    worker_wake_.notify_all();
    clock_wake_.notify_all();
    for (auto& worker : workers_)
      if (worker.joinable()) worker.join();
    if (clock_thread_.joinable()) clock_thread_.join();
  }

  // The ring of batchers with a ready batch, and where workers sleep.
  std::mutex ring_mutex_;
  std::condition_variable worker_wake_;
  std::condition_variable left_;                 // a detached client's last visit ended
  std::deque<detail::pool_client*> ring_;        // guarded by ring_mutex_
  std::size_t searching_ = 0;                    // guarded by ring_mutex_: workers awake and not in a batch
  std::size_t sleeping_ = 0;                     // guarded by ring_mutex_: workers asleep, not yet woken
  std::size_t wake_tokens_ = 0;                  // guarded by ring_mutex_: wake-ups not yet taken
  std::atomic<bool> stopping_{false};            // set once, then both mutexes are passed through
  alignas(64) std::atomic<std::size_t> idle_{0}; // sleeping_, for lock-free readers

  // The one clock: a heap of (due time, batcher), earliest first, entries replaced lazily.
  std::mutex clock_mutex_;
  std::condition_variable clock_wake_;
  std::condition_variable left_clock_;         // a detached client's round ended
  std::vector<timer> timers_;                  // guarded by clock_mutex_
  std::vector<detail::pool_client*> retiring_; // guarded by clock_mutex_: retired, not yet destroyed

  std::vector<std::thread> workers_;
  std::thread clock_thread_;
};

} // namespace microbatch
