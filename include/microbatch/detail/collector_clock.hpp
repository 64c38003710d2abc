// microbatch::detail::collector_clock: when the collector thread next has to look, and how to wake it.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>

#include "../clock.hpp"
#include "../options.hpp"

namespace microbatch::detail {

/// `start + delay`, or `time_point::max()` where that would overflow (a delay of "never").
inline std::chrono::steady_clock::time_point saturating_add(std::chrono::steady_clock::time_point start,
                                                            std::chrono::nanoseconds delay) noexcept {
  return delay >= std::chrono::steady_clock::time_point::max() - start ? std::chrono::steady_clock::time_point::max()
                                                                       : start + delay;
}

/// Where a batcher on a `WorkerPool` has its clock's rounds run: the pool's clock thread.
class round_scheduler {
public:
  using time_point = std::chrono::steady_clock::time_point;
  virtual void run_round_now() noexcept = 0;
  virtual void run_round_at(time_point when) noexcept = 0;

protected:
  ~round_scheduler() = default;
};

/// The batcher's sense of time, owned by its collector thread. The collector publishes a plan (the
/// time it will next look: the forming batch's due time, the earliest deadline) and sleeps until then.
/// Anyone who needs it sooner lowers the plan (`wake_by`) and wakes it; only the thread that actually
/// lowers the plan pays for the wake-up, so a job that joins a batch whose timer is already armed costs
/// nothing here. Also carries the requests the collector serves (flush, shutdown), read at the start
/// of every round; a wake-up that arrives during a round makes the next sleep return at once, so none
/// is lost.
///
/// Time comes from `Options::clock` if set (a `manual_clock` wakes the collector whenever it moves),
/// else from `std::chrono::steady_clock` with real timeouts.
///
/// On a `WorkerPool` (`run_on`), there is no collector thread: a wake-up asks the pool's clock thread
/// for a round (now, or by a time), and after a round `rest` tells the pool (or the manual clock) when
/// the next one is due, where a collector would `sleep`.
///
/// Threads: `plan`, `begin_round`, `sleep` and `rest` on the collector (or the pool's clock thread)
/// only; everything else from any thread.
class collector_clock final : public clock_sleeper {
public:
  using time_point = std::chrono::steady_clock::time_point;

  explicit collector_clock(microbatch::clock* source) : source_(source) {
    if (source_ != nullptr) source_->subscribe(*this);
  }
  ~collector_clock() {
    if (source_ != nullptr) source_->unsubscribe(*this);
  }
  collector_clock(const collector_clock&) = delete;
  collector_clock& operator=(const collector_clock&) = delete;

  [[nodiscard]] time_point now() const noexcept {
    return source_ != nullptr ? source_->now() : std::chrono::steady_clock::now();
  }

  /// The batcher is on a pool: its rounds run where `scheduler` says. Before any job arrives.
  void run_on(round_scheduler* scheduler) noexcept { scheduler_ = scheduler; }

  /// True for `std::chrono::steady_clock` (no `Options::clock`). Thread-safe.
  [[nodiscard]] bool real_time() const noexcept { return source_ == nullptr; }

  /// Makes sure the collector looks again no later than `when`: lowers the plan and wakes the collector
  /// if `when` is sooner than it. Thread-safe; lock-free unless it wakes.
  void wake_by(time_point when) noexcept {
    const auto wanted = when.time_since_epoch().count();
    auto planned = planned_.load(std::memory_order_seq_cst);
    while (wanted < planned) {
      if (planned_.compare_exchange_weak(planned, wanted, std::memory_order_seq_cst)) {
        if (scheduler_ != nullptr && source_ == nullptr) {
          scheduler_->run_round_at(when);
        } else {
          wake();
        }
        return;
      }
    }
  }

  /// Wakes the collector now. Thread-safe.
  void wake() noexcept override {
    {
      std::lock_guard lock(mutex_);
      woken_ = true;
    }
    notify();
  }

  /// Asks the collector to shut down as `how` says (a cancel overrides a drain in progress), and wakes
  /// it. Thread-safe.
  void request_shutdown(Shutdown how) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (!shutdown_ || how == Shutdown::cancel) shutdown_ = how;
      woken_ = true;
    }
    notify();
  }

  /// Asks the collector to dispatch the forming batch; returns a ticket for `await_flush`, or 0 if the
  /// collector has exited (nothing left to flush). Thread-safe.
  std::uint64_t request_flush() noexcept {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mutex_);
      if (exited_) return 0;
      ticket = ++flush_requested_;
      woken_ = true;
    }
    notify();
    return ticket;
  }

  /// Waits until the collector has served flush `ticket` (or exited). Thread-safe; never on the
  /// collector itself.
  void await_flush(std::uint64_t ticket) {
    std::unique_lock lock(mutex_);
    flushed_cv_.wait(lock, [&] { return flush_served_ >= ticket; });
  }

  /// What the collector found at the start of a round.
  struct round {
    std::optional<Shutdown> shutdown; // requested shutdown, if any
    std::uint64_t flush_ticket = 0;   // the newest flush request; serve it with `flushed`
  };

  /// (collector) Starts a round: clears the wake-up and returns the requests.
  round begin_round() noexcept {
    std::lock_guard lock(mutex_);
    woken_ = false;
    return {shutdown_, flush_requested_};
  }

  /// (collector) Flush requests up to `ticket` are served; `exiting`: every request is, now and later.
  void flushed(std::uint64_t ticket, bool exiting = false) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (exiting) {
        exited_ = true;
        ticket = flush_requested_;
      }
      if (ticket <= flush_served_) return;
      flush_served_ = ticket;
    }
    flushed_cv_.notify_all();
  }

  /// (collector) Publishes when it will look next (`time_point::max()`: only when woken). Call it
  /// before the last look at the inbox, which is sequentially consistent with submitters' pushes.
  void plan(time_point wake_at) noexcept {
    planned_.store(wake_at.time_since_epoch().count(), std::memory_order_seq_cst);
  }

  /// (collector) Lowers the plan to `when` if that is sooner, without a wake-up (the collector is
  /// about to sleep by it).
  void lower_plan(time_point when) noexcept {
    const auto wanted = when.time_since_epoch().count();
    auto planned = planned_.load(std::memory_order_seq_cst);
    while (wanted < planned && !planned_.compare_exchange_weak(planned, wanted, std::memory_order_seq_cst)) {
    }
  }

  /// (collector) The plan as it stands (others may have lowered it).
  [[nodiscard]] time_point planned() const noexcept {
    return time_point{time_point::duration{planned_.load(std::memory_order_seq_cst)}};
  }

  /// (collector) Sleeps until the planned time or a wake-up, whichever is first.
  void sleep() {
    const time_point wake_at{time_point::duration{planned_.load(std::memory_order_seq_cst)}};
    if (source_ != nullptr) source_->sleeping(*this, wake_at);
    std::unique_lock lock(mutex_);
    auto woken = [&] { return woken_; };
    if (source_ != nullptr || wake_at == time_point::max()) {
      woken_cv_.wait(lock, woken);
    } else {
      woken_cv_.wait_until(lock, wake_at, woken);
    }
  }

  /// (the pool's clock thread, after a round that planned) Where a collector would sleep: has the
  /// next round run by the plan (real time), or tells the manual clock what is armed.
  void rest() noexcept {
    const time_point wake_at = planned();
    if (source_ != nullptr) {
      source_->sleeping(*this, wake_at);
    } else if (wake_at != time_point::max()) {
      scheduler_->run_round_at(wake_at);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  void notify() noexcept {
    if (scheduler_ != nullptr) {
      scheduler_->run_round_now();
    } else {
      woken_cv_.notify_one();
    }
  }

  microbatch::clock* const source_;
  round_scheduler* scheduler_ = nullptr; // set before any job, then only read
  alignas(64) std::atomic<time_point::rep> planned_{time_point::max().time_since_epoch().count()};
  std::mutex mutex_;
  std::condition_variable woken_cv_;
  std::condition_variable flushed_cv_;
  bool woken_ = false;                // guarded by mutex_
  std::optional<Shutdown> shutdown_;  // guarded by mutex_
  std::uint64_t flush_requested_ = 0; // guarded by mutex_
  std::uint64_t flush_served_ = 0;    // guarded by mutex_
  bool exited_ = false;               // guarded by mutex_
};

} // namespace microbatch::detail
