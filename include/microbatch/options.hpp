// microbatch: options, statistics and shutdown modes.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace microbatch {

class clock;      // clock.hpp
class WorkerPool; // worker_pool.hpp

/// What `submit` does when `Options::max_pending_jobs` jobs are already pending.
enum class Overflow {
  block,  ///< wait until a job completes (or shutdown begins, or the caller's stop_token fires)
  reject, ///< throw `queue_full` at once
};

/// How `shutdown` treats jobs that are queued but not yet handed to the processor.
enum class Shutdown {
  drain,  ///< dispatch them and wait for their results (what `shutdown()` does)
  cancel, ///< fail them with `batcher_closed`; batches already in the processor still finish
};

/// Why a batch was dispatched (`BatchInfo::trigger`).
enum class Trigger {
  size,     ///< it reached max_batch_size
  delay,    ///< max_batch_delay passed since its first job arrived
  flush,    ///< flush()
  shutdown, ///< shutdown() dispatched what was queued
  idle,     ///< dispatch_when_idle: a processor slot was free
  weight,   ///< max_batch_weight: it reached the limit, or the next job would have taken it over
};

/// What `Options::on_batch` is told about one batch that reached the processor.
struct BatchInfo {
  Trigger trigger;                          ///< why the batch was dispatched
  std::size_t size;                         ///< jobs handed to the processor
  std::size_t weight;                       ///< their total weight (= size without weights)
  std::size_t failed;                       ///< jobs of the batch that ended with an error
  std::chrono::nanoseconds queue_wait;      ///< oldest job: from submit to the processor call
  std::chrono::nanoseconds processing_time; ///< the processor call
};

/// Percentiles of a duration over a batcher's life (`Stats::queue_wait`, `Stats::processing_time`),
/// from a fixed-size histogram: p50 and p99 within about 3% of the true value, `max` and `sum` exact.
/// All zero before the first batch. One duration per batch that reached the processor
/// (`Stats::batches_processed` of them).
struct Percentiles {
  std::chrono::nanoseconds p50{0};
  std::chrono::nanoseconds p99{0};
  std::chrono::nanoseconds max{0};
  std::chrono::nanoseconds sum{0}; ///< of every duration recorded (a Prometheus summary's _sum)
};

/// What a batch does with jobs whose correlation ID equals an earlier job's in the same batch.
enum class DuplicateIds {
  reject,   ///< the later job fails with `duplicate_id` and never reaches the processor
  coalesce, ///< the processor sees the ID once (the first job); every such job ends with a copy of its
            ///< result, or with its error
};

/// How a `Batcher` forms and runs batches. An aggregate: use designated initialisers,
/// e.g. `Options{.max_batch_size = 100, .max_batch_delay = std::chrono::milliseconds(2)}`.
/// The constructor checks the preconditions and throws `std::invalid_argument` naming the field.
struct Options {
  /// Dispatch a batch as soon as it holds this many jobs. Default 64: large enough that the
  /// per-batch cost (one query, one RPC) is amortised ~64-fold, small enough for a SQL `IN`/`ANY`
  /// list or an RPC payload. 0 = no size limit (only the delay, flush or shutdown dispatch).
  std::size_t max_batch_size = 64;

  /// Dispatch a batch this long after its first job arrived, full or not. Default 1 ms: about one
  /// round trip to a database or service in the same data centre, so batching costs a lightly
  /// loaded caller at most about one extra round trip. 0 = no timer. Precondition: >= 0.
  std::chrono::nanoseconds max_batch_delay{std::chrono::milliseconds(1)};

  /// How many batches the processor may work on at once, each on its own batcher-owned thread.
  /// Default 1: the processor is never called concurrently. Precondition: >= 1.
  std::size_t max_concurrent_batches = 1;

  /// Bound on jobs submitted and not yet completed (queued, in a batch, or in the processor).
  /// 0 = unbounded. Precondition: 0, or >= max_batch_size (else a batch could never fill).
  std::size_t max_pending_jobs = 0;

  /// What `submit` does at `max_pending_jobs`.
  Overflow overflow = Overflow::block;

  /// The time source for delays, deadlines and arrival times. nullptr (default) =
  /// `std::chrono::steady_clock`. Tests pass a `manual_clock` to drive time by hand. Not owned:
  /// it must outlive the batcher.
  microbatch::clock* clock = nullptr;

  /// When true, jobs never wait for size or delay while a processor slot (of `max_concurrent_batches`)
  /// is free: whenever a worker is idle and jobs are waiting, they are dispatched at once as one batch
  /// (up to `max_batch_size`). While every slot is busy, jobs accumulate, and the next slot to come free
  /// takes them all at once (group commit). Size, delay, flush and shutdown still apply. So a lightly
  /// loaded batcher adds no latency, and batches grow only under load. A blocking `execute_job` that
  /// finds a slot free runs that batch on its own thread (it would only wait otherwise) when the batch
  /// holds only blocking callers' jobs: no hand-off to a worker and back, so the processor and
  /// `on_batch` may then run on that caller's thread; slots still bound how many batches run at once.
  /// Default false.
  bool dispatch_when_idle = false;

  /// Bound on a batch's total weight, for a Processor with a member `std::size_t weight(const Job&)
  /// const` (e.g. bytes, rows, tokens): a batch whose weight reaches it is dispatched at once, and a job
  /// that would take the forming batch over it closes that batch first and starts the next one
  /// (`Trigger::weight`, `Stats::batches_weight`). A job heavier than the limit on its own is refused
  /// with `oversized_job`. `weight` is called once per job, on the submitting thread; it must be
  /// thread-safe. 0 (default) = no limit. Nonzero with a Processor without `weight`: the constructor
  /// throws `std::invalid_argument`. `max_pending_jobs` still counts jobs.
  std::size_t max_batch_weight = 0;

  /// Jobs of one batch with equal IDs: `reject` (default) fails the later ones with `duplicate_id`;
  /// `coalesce` hands the first to the processor and gives the others a copy of its outcome (counted in
  /// `Stats::jobs_coalesced`). `coalesce` needs ID extractors and a copy-constructible Result (else the
  /// constructor throws `std::invalid_argument`).
  DuplicateIds duplicate_ids = DuplicateIds::reject;

  /// Called exactly once per batch that reached the processor, after every job of that batch has
  /// ended, on the thread that ran it (a worker, or a caller: see `dispatch_when_idle`), with why it formed and how
  /// long it waited and ran (measured with the batcher's clock). An exception escaping it is caught and counted in
  /// `Stats::observer_errors`. Empty (default): nothing is called.
  std::function<void(const BatchInfo&)> on_batch{};

  /// The threads that run this batcher's batches and its clock. nullptr (default): the batcher starts
  /// its own, one collector thread and `max_concurrent_batches` workers. A `WorkerPool`: the batcher
  /// starts no thread; the pool's workers run its batches (at most `max_concurrent_batches` of them at
  /// once) and the pool's clock thread serves its delays, deadlines, flushes and shutdown. The batcher
  /// holds the pool until it is destroyed. Cannot be changed by `reconfigure`.
  std::shared_ptr<WorkerPool> workers{};
};

/// A snapshot of a batcher's counters, all since construction. Taken without stopping the batcher:
/// counters are read one by one, so they may disagree by the jobs in flight at that instant, but
/// `jobs_completed + jobs_failed <= jobs_submitted` always holds.
struct Stats {
  std::uint64_t jobs_submitted = 0;       ///< accepted by submit / execute_job
  std::uint64_t jobs_completed = 0;       ///< ended with a result
  std::uint64_t jobs_failed = 0;          ///< ended with an error (any cause, including the three below)
  std::uint64_t batches = 0;              ///< batches dispatched (every trigger below; see the README)
  std::uint64_t batches_full = 0;         ///< ... because they reached max_batch_size
  std::uint64_t batches_timed_out = 0;    ///< ... because max_batch_delay passed
  std::uint64_t batches_flushed = 0;      ///< ... by flush() or shutdown()
  std::uint64_t uncorrelated_results = 0; ///< results that matched no job of their batch (dropped)
  std::uint64_t pending_jobs = 0;         ///< submitted and not yet completed, now
  std::uint64_t jobs_expired = 0;         ///< failed with deadline_exceeded
  std::uint64_t jobs_cancelled = 0;       ///< failed with cancelled
  std::uint64_t jobs_rejected = 0;        ///< submits that threw queue_full (never accepted)
  std::uint64_t callback_errors = 0;      ///< exceptions that escaped submit's on_complete (contained)
  std::uint64_t batches_idle = 0;         ///< batches dispatched because a processor slot was idle
  std::uint64_t batches_weight = 0;       ///< batches dispatched by max_batch_weight
  std::uint64_t jobs_coalesced = 0;       ///< jobs that shared an equal-ID job's slot (DuplicateIds::coalesce)
  std::uint64_t observer_errors = 0;      ///< exceptions that escaped Options::on_batch (contained)
  double batch_size_mean = 0;             ///< jobs per processor call, over the batcher's life
  std::size_t batch_size_max = 0;         ///< the largest batch handed to the processor
  std::uint64_t batches_processed = 0;    ///< processor calls (a batch whose jobs all ended first makes none)
  std::uint64_t jobs_processed = 0;       ///< jobs handed to the processor, over all its calls
  std::size_t batch_size_p50 = 0;         ///< median jobs per processor call (within about 3%)
  std::size_t batch_size_p99 = 0;         ///< 99th percentile of jobs per processor call (within about 3%)
  Percentiles queue_wait{};               ///< per batch: its oldest job's wait from submit to processor
  Percentiles processing_time{};          ///< per batch: the processor call
};

} // namespace microbatch
