// microbatch::detail::counters: the batcher's life-long figures, counted without a lock, read as Stats.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "../options.hpp"
#include "histogram.hpp"

namespace microbatch::detail {

/// Why a job failed, for the counters in `Stats`.
enum class failure { other, expired, cancelled };

/// What `Batcher::stats()` reports, counted as it happens. Every thread of the batcher counts here
/// (submitters their refusals, whoever dispatches a batch its trigger, whoever ends a job its end,
/// workers what they processed); any thread reads a `snapshot`. Nothing here blocks or allocates.
///
/// The one invariant the snapshot keeps, `jobs_completed + jobs_failed <= jobs_submitted`, rests on
/// order: a job ends after it was counted as accepted (the batch forming part counts arrivals), the
/// ends are counted with release and read first with acquire, and the arrivals are read after them.
///
/// Every member is thread-safe and lock-free (`snapshot` reads each counter once; the figures of one
/// snapshot are not taken at a single instant).
class counters {
public:
  counters() = default;
  counters(const counters&) = delete;
  counters& operator=(const counters&) = delete;

  void completed(std::uint64_t jobs = 1) noexcept { jobs_completed_.fetch_add(jobs, std::memory_order_release); }

  void failed(failure cause) noexcept {
    if (cause == failure::expired) jobs_expired_.fetch_add(1, std::memory_order_relaxed);
    if (cause == failure::cancelled) jobs_cancelled_.fetch_add(1, std::memory_order_relaxed);
    jobs_failed_.fetch_add(1, std::memory_order_release);
  }

  /// Where admission counts the submits it refused (`queue_full`).
  std::atomic<std::uint64_t>& rejected() noexcept { return jobs_rejected_; }

  void dispatched(Trigger why) noexcept {
    switch (why) {
    case Trigger::size:
      batches_full_.fetch_add(1, std::memory_order_relaxed);
      break;
    case Trigger::weight:
      batches_weight_.fetch_add(1, std::memory_order_relaxed);
      break;
    case Trigger::delay:
      batches_timed_out_.fetch_add(1, std::memory_order_relaxed);
      break;
    case Trigger::flush:
    case Trigger::shutdown:
      batches_flushed_.fetch_add(1, std::memory_order_relaxed);
      break;
    case Trigger::idle:
      batches_idle_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
  }

  /// A batch that reached the processor.
  void processed(const BatchInfo& info) noexcept {
    processor_calls_.fetch_add(1, std::memory_order_relaxed);
    jobs_processed_.fetch_add(info.size, std::memory_order_relaxed);
    std::size_t largest = batch_size_max_.load(std::memory_order_relaxed);
    while (info.size > largest &&
           !batch_size_max_.compare_exchange_weak(largest, info.size, std::memory_order_relaxed)) {
    }
    queue_wait_.record(info.queue_wait);
    processing_time_.record(info.processing_time);
    // The histogram counts non-negative integers; durations are only its usual unit.
    batch_size_.record(std::chrono::nanoseconds(static_cast<std::int64_t>(info.size)));
  }

  void uncorrelated(std::uint64_t results) noexcept {
    uncorrelated_results_.fetch_add(results, std::memory_order_relaxed);
  }
  void coalesced(std::uint64_t jobs) noexcept { jobs_coalesced_.fetch_add(jobs, std::memory_order_relaxed); }
  void observer_threw() noexcept { observer_errors_.fetch_add(1, std::memory_order_relaxed); }
  void callback_threw() noexcept { callback_errors_.fetch_add(1, std::memory_order_relaxed); }

  /// The figures now. `arrivals` reads the count of accepted jobs; it is called after the ends are
  /// read, so that no job is counted as ended but not as accepted.
  template <class Arrivals> [[nodiscard]] Stats snapshot(Arrivals arrivals) const {
    Stats s;
    s.jobs_completed = jobs_completed_.load(std::memory_order_acquire);
    s.jobs_failed = jobs_failed_.load(std::memory_order_acquire);
    s.jobs_expired = jobs_expired_.load(std::memory_order_relaxed);
    s.jobs_cancelled = jobs_cancelled_.load(std::memory_order_relaxed);
    s.jobs_rejected = jobs_rejected_.load(std::memory_order_relaxed);
    s.jobs_submitted = std::max<std::uint64_t>(arrivals(), s.jobs_completed + s.jobs_failed);
    s.pending_jobs = s.jobs_submitted - s.jobs_completed - s.jobs_failed;
    s.batches_full = batches_full_.load(std::memory_order_relaxed);
    s.batches_timed_out = batches_timed_out_.load(std::memory_order_relaxed);
    s.batches_flushed = batches_flushed_.load(std::memory_order_relaxed);
    s.batches_idle = batches_idle_.load(std::memory_order_relaxed);
    s.batches_weight = batches_weight_.load(std::memory_order_relaxed);
    s.batches = s.batches_full + s.batches_timed_out + s.batches_flushed + s.batches_idle + s.batches_weight;
    s.jobs_coalesced = jobs_coalesced_.load(std::memory_order_relaxed);
    s.observer_errors = observer_errors_.load(std::memory_order_relaxed);
    const auto calls = processor_calls_.load(std::memory_order_relaxed);
    s.batch_size_mean = calls == 0 ? 0.0 : double(jobs_processed_.load(std::memory_order_relaxed)) / double(calls);
    s.batch_size_max = batch_size_max_.load(std::memory_order_relaxed);
    s.batches_processed = calls;
    s.jobs_processed = jobs_processed_.load(std::memory_order_relaxed);
    const Percentiles sizes = batch_size_.percentiles();
    s.batch_size_p50 = static_cast<std::size_t>(sizes.p50.count());
    s.batch_size_p99 = static_cast<std::size_t>(sizes.p99.count());
    s.queue_wait = queue_wait_.percentiles();
    s.processing_time = processing_time_.percentiles();
    s.uncorrelated_results = uncorrelated_results_.load(std::memory_order_relaxed);
    s.callback_errors = callback_errors_.load(std::memory_order_relaxed);
    return s;
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  // Its own cache line, away from whatever the owner puts before it: ends are counted for every job.
  alignas(64) std::atomic<std::uint64_t> jobs_completed_{0};
  std::atomic<std::uint64_t> jobs_failed_{0};
  std::atomic<std::uint64_t> jobs_expired_{0};
  std::atomic<std::uint64_t> jobs_cancelled_{0};
  std::atomic<std::uint64_t> jobs_rejected_{0};
  std::atomic<std::uint64_t> batches_full_{0};
  std::atomic<std::uint64_t> batches_timed_out_{0};
  std::atomic<std::uint64_t> batches_flushed_{0};
  std::atomic<std::uint64_t> batches_idle_{0};
  std::atomic<std::uint64_t> batches_weight_{0};
  std::atomic<std::uint64_t> jobs_coalesced_{0};
  std::atomic<std::uint64_t> observer_errors_{0};
  std::atomic<std::uint64_t> processor_calls_{0};
  std::atomic<std::uint64_t> jobs_processed_{0};
  std::atomic<std::size_t> batch_size_max_{0};
  histogram queue_wait_;
  histogram processing_time_;
  histogram batch_size_; // jobs per processor call, recorded as nanoseconds
  std::atomic<std::uint64_t> uncorrelated_results_{0};
  std::atomic<std::uint64_t> callback_errors_{0};
};

} // namespace microbatch::detail
