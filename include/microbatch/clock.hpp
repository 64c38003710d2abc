// microbatch: injectable time, so that tests of delays and deadlines advance time by hand.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace microbatch {

namespace detail {
/// Something that sleeps on a clock: a batcher's collector thread. `wake` must be callable from any
/// thread and must not call back into the clock.
class clock_sleeper {
public:
  virtual void wake() noexcept = 0;

protected:
  ~clock_sleeper() = default;
};
} // namespace detail

/// A time source for a `Batcher` (`Options::clock`). Without one, a batcher uses
/// `std::chrono::steady_clock` and sleeps with real timeouts. With one, its collector never sleeps on a
/// real timeout: it sleeps until the clock says time moved (`detail::clock_sleeper::wake`), then looks
/// at `now()` again. Time points are `steady_clock::time_point`s so that deadlines passed to
/// `submit` mean the same thing with either.
class clock {
public:
  using time_point = std::chrono::steady_clock::time_point;

  virtual ~clock() = default;

  /// The current time; never decreases. Thread-safe.
  [[nodiscard]] virtual time_point now() const noexcept = 0;

  /// Batcher hooks. `subscribe` registers a collector that must be woken whenever `now()` moves, until
  /// `unsubscribe` returns. `sleeping` says the collector is about to sleep until `wake_at`
  /// (`time_point::max()` = no timer armed). All thread-safe.
  virtual void subscribe(detail::clock_sleeper& sleeper) = 0;
  virtual void unsubscribe(detail::clock_sleeper& sleeper) noexcept = 0;
  virtual void sleeping(detail::clock_sleeper& sleeper, time_point wake_at) noexcept = 0;
};

/// A clock that moves only when told to, for deterministic tests of delays and deadlines.
///
///     microbatch::manual_clock clock;
///     microbatch::Batcher b(process, microbatch::Options{.max_batch_delay = 5ms, .clock = &clock});
///     auto f = b.submit(job);
///     clock.await_timers(1);        // the collector has taken the job and armed its 5 ms timer
///     clock.advance(5ms);           // the batch is dispatched now, without any real waiting
///
/// Starts at `time_point{} + 1h` (so that `now() - delay` never underflows). Must outlive the
/// batchers that use it. All members are thread-safe.
class manual_clock final : public clock {
public:
  manual_clock() = default;
  manual_clock(const manual_clock&) = delete;
  manual_clock& operator=(const manual_clock&) = delete;

  [[nodiscard]] time_point now() const noexcept override {
    return time_point{std::chrono::nanoseconds{now_ns_.load(std::memory_order_acquire)}};
  }

  /// Moves time forward by `step` (>= 0) and wakes every subscribed batcher. Thread-safe.
  void advance(std::chrono::nanoseconds step) {
    if (step.count() < 0) throw std::invalid_argument("manual_clock::advance: step must be >= 0");
    std::lock_guard lock(mutex_);
    now_ns_.fetch_add(step.count(), std::memory_order_acq_rel);
    ++generation_;
    for (auto& entry : sleepers_)
      entry.sleeper->wake();
  }

  /// Blocks until at least `count` subscribed batchers have, since the last `advance`, gone to sleep
  /// with a timer armed (a batch delay or a job deadline). Then their next step depends only on
  /// `advance` (or on new jobs). Thread-safe.
  void await_timers(std::size_t count = 1) {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] {
      std::size_t armed = 0;
      for (const auto& entry : sleepers_)
        if (entry.generation == generation_ && entry.wake_at != time_point::max()) ++armed;
      return armed >= count;
    });
  }

  /// The earliest timer armed by a sleeping batcher, or `time_point::max()`. Thread-safe.
  [[nodiscard]] time_point next_timer() const {
    std::lock_guard lock(mutex_);
    time_point earliest = time_point::max();
    for (const auto& entry : sleepers_)
      if (entry.generation == generation_ && entry.wake_at < earliest) earliest = entry.wake_at;
    return earliest;
  }

  void subscribe(detail::clock_sleeper& sleeper) override {
    std::lock_guard lock(mutex_);
    sleepers_.push_back({&sleeper, time_point::max(), generation_ - 1});
  }

  void unsubscribe(detail::clock_sleeper& sleeper) noexcept override {
    std::lock_guard lock(mutex_);
    std::erase_if(sleepers_, [&](const sleeper_entry& e) { return e.sleeper == &sleeper; });
  }

  void sleeping(detail::clock_sleeper& sleeper, time_point wake_at) noexcept override {
    {
      std::lock_guard lock(mutex_);
      for (auto& entry : sleepers_) {
        if (entry.sleeper == &sleeper) {
          entry.wake_at = wake_at;
          entry.generation = generation_;
        }
      }
    }
    changed_.notify_all();
  }

  // ---- implementation details follow ----
private:
  struct sleeper_entry {
    detail::clock_sleeper* sleeper;
    time_point wake_at;
    std::uint64_t generation; // generation_ when the sleeper last went to sleep
  };

  std::atomic<std::int64_t> now_ns_{std::chrono::nanoseconds(std::chrono::hours(1)).count()};
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<sleeper_entry> sleepers_; // guarded by mutex_
  std::uint64_t generation_ = 1;        // guarded by mutex_; counts advance() calls
};

} // namespace microbatch
