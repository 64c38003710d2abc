// microbatch::Batcher: groups single jobs from many threads into batches for one processor call.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include "clock.hpp"
#include "detail/batch_queue.hpp"
#include "detail/correlation.hpp"
#include "detail/inbox.hpp"
#include "detail/job_node.hpp"
#include "detail/slot_pool.hpp"
#include "errors.hpp"
#include "options.hpp"
#include "outcome.hpp"

namespace microbatch {

/// Collects jobs submitted one at a time by any number of threads into batches, hands each batch to
/// `Processor` in one call, and gives every caller the result that belongs to its job.
///
/// Behaviour
/// - A batch is dispatched when it holds `max_batch_size` jobs, when `max_batch_delay` has passed since
///   its first job arrived, or on `flush()` / `shutdown()`.
/// - Threads: one collector thread forms and times batches; `max_concurrent_batches` worker threads
///   call the processor, each with one batch at a time. With the default of 1 the processor is never
///   called concurrently. A slow processor never delays the forming and timing of the next batches;
///   formed batches wait in a queue for a free worker (where deadlines are still enforced).
/// - The processor is called as `processor(std::span<Job>)` and returns `std::vector<Result>`. It may
///   read, modify or move from the jobs; they are destroyed after it returns.
/// - Correlation: with ID extractors, a result answers the job of its batch with the same ID; without,
///   result i answers job i of the span.
///
/// Ownership: `submit` and `execute_job` take the job by value; from then on the batcher owns it until
/// it is handed to the processor. Results are moved, never copied, to the caller.
///
/// Every accepted job ends exactly once, with its result or with one of these errors:
///  1. the processor's exception: the processor threw; every job of that batch gets the same exception;
///  2. `no_result`: no result carried the job's ID (positional: the result vector was too short);
///  3. `duplicate_id`: an earlier job of the same batch has the same ID; this one never reached the
///     processor;
///  4. the ID extractor's exception, when reading the job's ID threw; only that job fails;
///  5. `deadline_exceeded`: its deadline passed before it was handed to the processor;
///  6. `cancelled`: the caller's stop_token fired first (`execute_job(job, stop)` only);
///  7. `batcher_closed`: `shutdown(Shutdown::cancel)` found it still queued.
/// Results that answer no job (unknown ID, a second answer, surplus positional results) are dropped
/// and counted in `Stats::uncorrelated_results`.
///
/// Shutdown: `shutdown()` (also run by the destructor) stops accepting jobs, dispatches what is queued,
/// waits until every batch has been processed and joins the threads. When it returns, every accepted
/// job has ended. Futures outlive the batcher.
///
/// Limitations: do not call `execute_job` from inside the processor with `max_concurrent_batches == 1`
/// (its batch could only run on the thread that is waiting for it); do not destroy the batcher from
/// inside the processor. `shutdown` called from inside the processor begins the shutdown and returns
/// without waiting (a thread cannot join itself).
template <class Job, class Result, class Processor> class Batcher {
public:
  using job_type = Job;
  using result_type = Result;
  using time_point = std::chrono::steady_clock::time_point;

  /// Correlation mode: `job_id(const Job&)` and `result_id(const Result&)` (anything `std::invoke`
  /// accepts: lambdas, function pointers, member pointers such as `&Job::id`) return the IDs that
  /// match a result to its job; compared after `std::decay`, hashed with `std::hash`. Starts the
  /// batcher's threads. Throws `std::invalid_argument` naming the field for invalid options.
  template <class JobId, class ResultId>
  Batcher(Processor processor, JobId job_id, ResultId result_id, Options options = {})
      : processor_(std::move(processor)), options_(checked(options)) {
    using correlation = detail::keyed_correlation<Job, Result, JobId, ResultId>;
    make_runner_ = [job_id = std::move(job_id), result_id = std::move(result_id),
                    this]() -> std::unique_ptr<runner_base> {
      return std::make_unique<runner<correlation>>(*this, correlation(job_id, result_id));
    };
    start();
  }

  /// Positional mode: result i of the processor's vector answers job i of its span.
  explicit Batcher(Processor processor, Options options = {})
      : processor_(std::move(processor)), options_(checked(options)) {
    make_runner_ = [this]() -> std::unique_ptr<runner_base> {
      return std::make_unique<runner<detail::positional_correlation>>(*this, detail::positional_correlation{});
    };
    start();
  }

  /// `shutdown()`: waits until every accepted job has ended.
  ~Batcher() { shutdown(Shutdown::drain); }

  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  /// Queues `job`; the future receives its result or its error (never thrown here: the errors 1-5
  /// above arrive through the future). Throws `batcher_closed` after shutdown began, `queue_full` at
  /// `max_pending_jobs` with `Overflow::reject`; with `Overflow::block` waits for room (on a batcher
  /// thread, e.g. in a callback, it does not wait: it goes beyond the bound, as only that thread could
  /// make room). Allocates one block for the job's node and its promise's shared state. Thread-safe.
  [[nodiscard]] std::future<Result> submit(Job job) { return submit(std::move(job), time_point::max()); }

  /// As `submit(job)`, and the job fails with `deadline_exceeded` if `deadline` passes before it is
  /// handed to the processor (checked on the collector's timer while it waits, and again when a worker
  /// takes its batch). A deadline already past throws `deadline_exceeded` (the job is not accepted).
  /// Thread-safe.
  [[nodiscard]] std::future<Result> submit(Job job, time_point deadline) {
    throw_if_closed();
    if (deadline != time_point::max() && deadline <= now())
      throw deadline_exceeded("microbatch::Batcher::submit: the deadline passed before the job was submitted");
    auto* submitted = detail::promise_node<Job, Result>::create(std::move(job));
    submitted->deadline = deadline;
    std::future<Result> future = submitted->promise.get_future();
    try {
      reserve_pending_slot(std::stop_token{});
      enqueue(submitted); // the batcher owns it from here
    } catch (...) {
      submitted->discard();
      throw;
    }
    return future;
  }

  /// Submits `job` and waits for its end: returns its result or throws its error (or what `submit`
  /// throws). The job's node lives in this call's frame: no allocation by the batcher. Thread-safe.
  Result execute_job(Job job) {
    throw_if_closed();
    detail::waiting_node<Job, Result> waiting(std::move(job));
    reserve_pending_slot(std::stop_token{});
    enqueue(&waiting);
    waiting.done.wait();
    return waiting.take();
  }

  /// As `execute_job(job)`, and returns promptly with `cancelled` when `stop` is requested before the
  /// job ended: a job still queued leaves the queue; one already in the processor runs on and its result
  /// is discarded. A wait for room (`Overflow::block`) also ends with `cancelled`. If stop was requested
  /// before the call, throws `cancelled` at once (the job is not accepted). Allocates one node (shared by
  /// the caller and the batcher). Thread-safe.
  Result execute_job(Job job, std::stop_token stop) {
    throw_if_closed();
    if (stop.stop_requested())
      throw cancelled("microbatch::Batcher::execute_job: stop was requested before the job was submitted");
    auto* shared = new detail::shared_waiting_node<Job, Result>(std::move(job));
    try {
      reserve_pending_slot(stop);
      enqueue(shared);
    } catch (...) {
      delete shared; // never published: no one else holds it
      throw;
    }
    {
      std::stop_callback on_stop(stop, [this, shared] { cancel_job(shared); });
      shared->done.wait();
    } // returns only after a concurrently running cancel_job has returned
    struct drop_reference {
      detail::shared_waiting_node<Job, Result>* node;
      ~drop_reference() { node->release(); } // after the result was moved out or the error rethrown
    } on_exit{shared};
    if (shared->error) std::rethrow_exception(shared->error);
    return std::move(*shared->value);
  }

  /// Queues `job`; `on_complete(Outcome<Result>&&)` is called exactly once, with its result or its
  /// error, on a batcher thread (a worker; the collector for jobs ended by `Shutdown::cancel`). It must
  /// not block for long: it holds up the rest of its batch. An exception escaping it is caught and
  /// counted in `Stats::callback_errors`. Throws like `submit(job)` (then `on_complete` is never
  /// called). No allocation per job once warm, for callables up to 48 bytes (larger ones are moved to
  /// the heap). Thread-safe.
  template <class F>
  requires std::invocable < std::decay_t<F>
  &, Outcome<Result>&& > void submit(Job job, F&& on_complete) {
    throw_if_closed();
    const auto lease = callback_slots_.acquire();
    detail::callback_node<Job, Result>* node = nullptr;
    try {
      node = ::new (lease.memory) detail::callback_node<Job, Result>(std::move(job), std::forward<F>(on_complete),
                                                                     callback_home_, lease.memory, lease.pooled);
    } catch (...) {
      callback_slots_.release(lease);
      throw;
    }
    try {
      reserve_pending_slot(std::stop_token{});
      enqueue(node);
    } catch (...) {
      node->discard();
      throw;
    }
  }

  /// The awaitable of `async_execute_job`. Holds the job's node, so it must be awaited where it was
  /// made: `co_await batcher.async_execute_job(job)`.
  class job_awaiter {
  public:
    job_awaiter(const job_awaiter&) = delete;
    job_awaiter& operator=(const job_awaiter&) = delete;

    [[nodiscard]] bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> waiting) {
      node_.waiting = waiting;
      try {
        owner_.throw_if_closed();
        owner_.reserve_pending_slot(std::stop_token{});
        owner_.enqueue(&node_); // from here a batcher thread may resume the coroutine at any moment
      } catch (...) {
        node_.error = std::current_exception();
        return false; // not accepted: resume at once; await_resume rethrows
      }
      return true;
    }
    Result await_resume() {
      if (node_.error) std::rethrow_exception(node_.error);
      return std::move(*node_.value);
    }

  private:
    friend class Batcher;
    job_awaiter(Batcher& owner, Job&& job) : owner_(owner), node_(std::move(job)) {}
    Batcher& owner_;
    detail::coroutine_node<Job, Result> node_;
  };

  /// For coroutines: `Result r = co_await batcher.async_execute_job(job);` suspends until the job ends,
  /// then yields its result or throws its error (or what `submit` throws). The coroutine resumes on a
  /// batcher thread (the worker that finished the batch; the collector if the job was ended by
  /// `Shutdown::cancel`), so keep what runs there short, or hop to your own executor. The job's node
  /// lives in the coroutine frame: no allocation per job. With `Overflow::block` at `max_pending_jobs`,
  /// the awaiting thread blocks until there is room. Thread-safe.
  [[nodiscard]] job_awaiter async_execute_job(Job job) { return job_awaiter(*this, std::move(job)); }

  /// Dispatches the batch being formed now, if it has jobs, including every job submitted before this
  /// call began. Returns once the batch is queued for a worker (not processed). No effect after
  /// shutdown. Thread-safe (from the collector thread it only requests the flush).
  void flush() {
    std::unique_lock lock(collector_mutex_);
    if (collector_exited_) return;
    const std::uint64_t ticket = ++flush_requested_;
    wake_requested_ = true;
    collector_wake_.notify_one();
    // On the collector thread itself (a coroutine or callback resumed by Shutdown::cancel), waiting
    // would never end: the request is served when the collector gets back to its loop.
    if (detail_collector_of_thread() == this) return;
    flush_done_cv_.wait(lock, [&] { return flush_done_ >= ticket; });
  }

  /// `shutdown(Shutdown::drain)`. Idempotent. Thread-safe.
  void shutdown() { shutdown(Shutdown::drain); }

  /// Stops accepting jobs (later submits throw `batcher_closed`; blocked submits are released with
  /// it), then ends the queued jobs as `how` says, waits until every batch in the processor returned,
  /// and joins the threads. When it returns every accepted job has ended. Idempotent; concurrent calls
  /// all return after the first has finished. Called from a batcher thread (inside the processor), it
  /// only begins the shutdown. Thread-safe.
  void shutdown(Shutdown how) {
    if (detail_current_batcher() == this) {
      begin_shutdown(how);
      return;
    }
    std::lock_guard lock(shutdown_mutex_);
    if (joined_) return;
    begin_shutdown(how);
    collector_.join();
    for (auto& worker : workers_)
      worker.join();
    if (options_.clock != nullptr) options_.clock->unsubscribe(collector_sleeper_);
    joined_ = true;
  }

  /// A snapshot of the counters. Never blocks. Thread-safe.
  [[nodiscard]] Stats stats() const {
    Stats s;
    // Ended counters first: a job is counted as accepted before it can end, so this order keeps
    // completed + failed <= submitted.
    s.jobs_completed = jobs_completed_.load(std::memory_order_acquire);
    s.jobs_failed = jobs_failed_.load(std::memory_order_acquire);
    s.jobs_expired = jobs_expired_.load(std::memory_order_relaxed);
    s.jobs_cancelled = jobs_cancelled_.load(std::memory_order_relaxed);
    s.jobs_rejected = jobs_rejected_.load(std::memory_order_relaxed);
    s.jobs_submitted = std::max(jobs_accepted_.load(std::memory_order_acquire), s.jobs_completed + s.jobs_failed);
    s.pending_jobs = s.jobs_submitted - s.jobs_completed - s.jobs_failed;
    s.batches_full = batches_full_.load(std::memory_order_relaxed);
    s.batches_timed_out = batches_timed_out_.load(std::memory_order_relaxed);
    s.batches_flushed = batches_flushed_.load(std::memory_order_relaxed);
    s.batches = s.batches_full + s.batches_timed_out + s.batches_flushed;
    s.uncorrelated_results = uncorrelated_results_.load(std::memory_order_relaxed);
    s.callback_errors = callback_errors_.load(std::memory_order_relaxed);
    return s;
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  using node_type = detail::job_node<Job, Result>;
  using batch = detail::job_list<node_type>;
  enum class failure { other, expired, cancelled };
  static constexpr std::uint64_t never = std::numeric_limits<std::uint64_t>::max();

  /// Runs one batch end to end on a worker thread; one per worker, so its buffers need no lock. The
  /// ID extractors' types are erased here, once per batch (one virtual call), never per job.
  struct runner_base {
    virtual ~runner_base() = default;
    virtual void run(batch& jobs_to_run) = 0;
  };
  template <class Correlation> class runner;

  struct collector_sleeper final : detail::clock_sleeper {
    Batcher* owner = nullptr;
    void wake() noexcept override { owner->wake_collector(); }
  };

  static Options checked(Options options) {
    if (options.max_concurrent_batches == 0)
      throw std::invalid_argument("microbatch::Options::max_concurrent_batches must be at least 1");
    if (options.max_batch_delay.count() < 0)
      throw std::invalid_argument("microbatch::Options::max_batch_delay must not be negative");
    if (options.max_pending_jobs != 0 && options.max_batch_size > options.max_pending_jobs)
      throw std::invalid_argument("microbatch::Options::max_batch_size (" + std::to_string(options.max_batch_size) +
                                  ") exceeds max_pending_jobs (" + std::to_string(options.max_pending_jobs) +
                                  "): a batch could never fill");
    return options;
  }

  static const void*& detail_current_batcher() noexcept {
    thread_local const void* current = nullptr; // the batcher whose thread this is, if any
    return current;
  }
  static const void*& detail_collector_of_thread() noexcept {
    thread_local const void* collector_of = nullptr; // the batcher whose collector this thread is
    return collector_of;
  }

  [[nodiscard]] time_point now() const noexcept {
    return options_.clock != nullptr ? options_.clock->now() : std::chrono::steady_clock::now();
  }

  void start() {
    collector_sleeper_.owner = this;
    callback_home_.owner = this;
    if (options_.clock != nullptr) options_.clock->subscribe(collector_sleeper_);
    try {
      collector_ = std::jthread([this] { collect(); });
      workers_.reserve(options_.max_concurrent_batches);
      for (std::size_t i = 0; i < options_.max_concurrent_batches; ++i)
        workers_.emplace_back([this, worker_runner = make_runner_()] { work(*worker_runner); });
    } catch (...) {
      begin_shutdown(Shutdown::drain);
      if (collector_.joinable()) collector_.join();
      for (auto& worker : workers_)
        worker.join();
      if (options_.clock != nullptr) options_.clock->unsubscribe(collector_sleeper_);
      throw;
    }
  }

  // ---- submission side (any thread) ----

  void throw_if_closed() const {
    if (closing_.load(std::memory_order_acquire))
      throw batcher_closed("microbatch::Batcher: the batcher is shut down; no new jobs are accepted");
  }

  /// Takes one of the max_pending_jobs slots, waiting or throwing as Options::overflow says.
  void reserve_pending_slot(const std::stop_token& stop) {
    if (options_.max_pending_jobs == 0) return;
    if (try_take_slot()) return;
    if (options_.overflow == Overflow::block && detail_current_batcher() == this) {
      // A callback, resumed coroutine or processor submitting again: waiting here could only end when
      // this very thread finishes its batch. Take the slot beyond the bound instead.
      pending_.fetch_add(1, std::memory_order_seq_cst);
      return;
    }
    if (options_.overflow == Overflow::reject) {
      jobs_rejected_.fetch_add(1, std::memory_order_relaxed);
      throw queue_full("microbatch::Batcher::submit: max_pending_jobs (" + std::to_string(options_.max_pending_jobs) +
                       ") jobs are pending");
    }
    std::unique_lock lock(backpressure_mutex_);
    blocked_submitters_.fetch_add(1, std::memory_order_seq_cst);
    struct unblock {
      std::atomic<std::size_t>& count;
      ~unblock() { count.fetch_sub(1, std::memory_order_relaxed); }
    } unblock_on_exit{blocked_submitters_};
    for (;;) {
      if (closing_.load(std::memory_order_acquire))
        throw batcher_closed("microbatch::Batcher::submit: shutdown began while waiting for room (max_pending_jobs)");
      if (try_take_slot()) return;
      const bool woken = room_available_.wait(lock, stop, [&] {
        return closing_.load(std::memory_order_acquire) ||
               pending_.load(std::memory_order_seq_cst) < options_.max_pending_jobs;
      });
      if (!woken)
        throw cancelled(
            "microbatch::Batcher::execute_job: stop was requested while waiting for room (max_pending_jobs)");
    }
  }

  bool try_take_slot() noexcept {
    std::size_t pending = pending_.load(std::memory_order_relaxed);
    while (pending < options_.max_pending_jobs) {
      if (pending_.compare_exchange_weak(pending, pending + 1, std::memory_order_seq_cst)) return true;
    }
    return false;
  }

  void release_pending_slot() noexcept {
    if (options_.max_pending_jobs == 0) return;
    pending_.fetch_sub(1, std::memory_order_seq_cst);
    if (blocked_submitters_.load(std::memory_order_seq_cst) != 0) {
      { std::lock_guard lock(backpressure_mutex_); } // a blocked submitter is either before its check or waiting
      room_available_.notify_all();
    }
  }

  /// Hands `job` to the collector (ownership passes on success) or throws batcher_closed. Wakes the
  /// collector only when this job starts a batch, fills it, or has a deadline sooner than its timer.
  void enqueue(node_type* job) {
    const time_point deadline = job->deadline; // after the push, the node may already be gone
    const auto pushed = inbox_.push(job, [this](node_type* first) { first->arrival = now(); });
    if (pushed == detail::inbox<node_type>::push_result::closed) {
      release_pending_slot();
      throw batcher_closed("microbatch::Batcher: the batcher is shut down; no new jobs are accepted");
    }
    const std::uint64_t accepted = jobs_accepted_.fetch_add(1, std::memory_order_seq_cst) + 1;
    const bool count_reached = accepted >= wake_at_accepted_.load(std::memory_order_seq_cst) &&
                               wake_at_accepted_.exchange(never, std::memory_order_seq_cst) != never;
    const bool deadline_sooner = deadline != time_point::max() &&
                                 deadline.time_since_epoch().count() < planned_wake_.load(std::memory_order_seq_cst);
    if (count_reached || deadline_sooner) wake_collector();
  }

  void wake_collector() noexcept {
    {
      std::lock_guard lock(collector_mutex_);
      wake_requested_ = true;
    }
    collector_wake_.notify_one();
  }

  void begin_shutdown(Shutdown how) {
    closing_.store(true, std::memory_order_release);
    {
      std::lock_guard lock(collector_mutex_);
      if (!shutdown_requested_ || how == Shutdown::cancel) shutdown_requested_ = how;
      wake_requested_ = true;
    }
    collector_wake_.notify_one();
    { std::lock_guard lock(backpressure_mutex_); }
    room_available_.notify_all();
  }

  // ---- the one place where a job ends ----

  void end_job(node_type* job, Result&& value) noexcept {
    if (!job->try_claim()) return job->abandon();
    jobs_completed_.fetch_add(1, std::memory_order_release);
    release_pending_slot();
    job->finish(std::move(value));
  }

  void end_job(node_type* job, std::exception_ptr error, failure cause = failure::other) noexcept {
    if (!job->try_claim()) return job->abandon();
    count_failure(cause);
    release_pending_slot();
    job->finish(std::move(error));
  }

  /// The caller's stop callback (any thread). The batcher keeps its hold on the node (it may be queued
  /// or in the processor) and drops it when it next meets the node.
  void cancel_job(detail::shared_waiting_node<Job, Result>* job) noexcept {
    if (!job->try_claim()) return;
    count_failure(failure::cancelled);
    release_pending_slot();
    job->deliver(detail::make_error<cancelled>(
        [] { return "microbatch::Batcher::execute_job: stop was requested before the job completed"; }));
    // Have the collector drop the job from the queue now rather than when its batch is dispatched.
    sweep_requested_.store(true, std::memory_order_release);
    wake_collector();
  }

  void count_failure(failure cause) noexcept {
    if (cause == failure::expired) jobs_expired_.fetch_add(1, std::memory_order_relaxed);
    if (cause == failure::cancelled) jobs_cancelled_.fetch_add(1, std::memory_order_relaxed);
    jobs_failed_.fetch_add(1, std::memory_order_release);
  }

  static std::exception_ptr expired_error() noexcept {
    return detail::make_error<deadline_exceeded>(
        [] { return "microbatch::Batcher: the job's deadline passed before it was handed to the processor"; });
  }

  // ---- collector thread ----

  static time_point saturating_add(time_point start, std::chrono::nanoseconds delay) noexcept {
    return delay >= time_point::max() - start ? time_point::max() : start + delay;
  }

  void collect() {
    detail_current_batcher() = this;
    detail_collector_of_thread() = this;
#if defined(__linux__)
    // Timer slack (50 us by default) would be added to every batch delay; 1 ns makes timers exact.
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
#endif
    batch forming;
    time_point batch_start{};
    std::uint64_t taken = 0; // jobs moved from the inbox, ever
    std::uint64_t flushes_served = 0;
    time_point earliest_deadline = time_point::max(); // lower bound over the queued jobs' deadlines
    const std::size_t max_size = options_.max_batch_size;
    const auto delay = options_.max_batch_delay;

    for (;;) {
      std::uint64_t flush_ticket = 0;
      std::optional<Shutdown> stopping;
      {
        std::lock_guard lock(collector_mutex_);
        wake_requested_ = false;
        flush_ticket = flush_requested_;
        stopping = shutdown_requested_;
      }
      node_type* arrived = stopping ? inbox_.close() : inbox_.take_all();
      const time_point now_time = now();

      while (arrived != nullptr) {
        node_type* job = arrived;
        arrived = job->next; // read before dispatch: a worker may end the job at once
        ++taken;
        if (forming.empty()) batch_start = job->arrival != time_point::min() ? job->arrival : now_time;
        earliest_deadline = std::min(earliest_deadline, job->deadline);
        forming.push_back(job);
        const bool cancelling = stopping && *stopping == Shutdown::cancel;
        if (max_size != 0 && forming.size >= max_size && !cancelling) dispatch(forming, batches_full_);
      }

      if (stopping) {
        if (*stopping == Shutdown::cancel) {
          cancel_queued(forming);
        } else if (!forming.empty()) {
          dispatch(forming, batches_flushed_);
        }
        {
          std::lock_guard lock(ready_mutex_);
          no_more_batches_ = true;
        }
        ready_cv_.notify_all();
        {
          std::lock_guard lock(collector_mutex_);
          collector_exited_ = true;
          flush_done_ = flush_requested_;
        }
        flush_done_cv_.notify_all();
        return;
      }

      if (delay.count() > 0 && !forming.empty() && now_time >= saturating_add(batch_start, delay))
        dispatch(forming, batches_timed_out_);
      if (sweep_requested_.exchange(false, std::memory_order_acq_rel) || earliest_deadline <= now_time)
        earliest_deadline = expire_queued(forming, now_time);
      if (flush_ticket > flushes_served) {
        if (!forming.empty()) dispatch(forming, batches_flushed_);
        flushes_served = flush_ticket;
        {
          std::lock_guard lock(collector_mutex_);
          flush_done_ = flush_ticket;
        }
        flush_done_cv_.notify_all();
      }

      // Plan the sleep, publish the plan, then look once more: a submitter that pushed before the plan
      // was visible is seen here; one that pushes after it sees the plan and wakes us if it must.
      time_point wake_time = earliest_deadline;
      if (delay.count() > 0 && !forming.empty()) wake_time = std::min(wake_time, saturating_add(batch_start, delay));
      std::uint64_t wake_at = forming.empty() ? taken + 1 : max_size != 0 ? taken + (max_size - forming.size) : never;
      wake_at_accepted_.store(wake_at, std::memory_order_seq_cst);
      planned_wake_.store(wake_time.time_since_epoch().count(), std::memory_order_seq_cst);
      if (!inbox_.empty()) continue;

      if (options_.clock != nullptr) options_.clock->sleeping(collector_sleeper_, wake_time);
      std::unique_lock lock(collector_mutex_);
      auto woken = [&] { return wake_requested_; };
      if (options_.clock != nullptr || wake_time == time_point::max()) {
        collector_wake_.wait(lock, woken);
      } else {
        collector_wake_.wait_until(lock, wake_time, woken);
      }
    }
  }

  /// Queues `forming` for a worker and leaves it empty (collector thread).
  void dispatch(batch& forming, std::atomic<std::uint64_t>& reason) {
    reason.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard lock(ready_mutex_);
      ready_.push(forming);
    }
    forming = batch{};
    ready_cv_.notify_one();
  }

  /// Fails expired jobs in the forming batch and in queued batches; drops cancelled ones. Returns the
  /// earliest deadline left. Jobs end after the ready queue's lock is released.
  time_point expire_queued(batch& forming, time_point now_time) {
    time_point earliest = time_point::max();
    auto leaves = [&](node_type* job) {
      if (job->claimed() || job->deadline <= now_time) return true;
      earliest = std::min(earliest, job->deadline);
      return false;
    };
    batch expired;
    forming.remove_if(leaves, expired);
    {
      std::lock_guard lock(ready_mutex_);
      ready_.remove_if(leaves, expired);
    }
    expired.for_each(
        [&](node_type* job) { end_job(job, expired_error(), failure::expired); }); // a cancelled job is only abandoned
    return earliest;
  }

  /// Shutdown::cancel: fails every job not yet handed to the processor.
  void cancel_queued(batch& forming) {
    batch queued;
    {
      std::lock_guard lock(ready_mutex_);
      ready_.remove_if([](node_type*) { return true; }, queued);
    }
    forming.remove_if([](node_type*) { return true; }, queued);
    queued.for_each([&](node_type* job) {
      end_job(job, detail::make_error<batcher_closed>([] {
                return "microbatch::Batcher: shutdown(Shutdown::cancel) began before the job was processed";
              }));
    });
  }

  // ---- worker threads ----

  void work(runner_base& batch_runner) {
    detail_current_batcher() = this;
    for (;;) {
      batch jobs;
      {
        std::unique_lock lock(ready_mutex_);
        ready_cv_.wait(lock, [&] { return !ready_.empty() || no_more_batches_; });
        if (ready_.empty()) return;
        jobs = ready_.pop();
      }
      batch_runner.run(jobs);
    }
  }

  Processor processor_;
  const Options options_;
  std::function<std::unique_ptr<runner_base>()> make_runner_;

  // Submission side: touched by every submitter, so each hot atomic has its own cache line.
  detail::inbox<node_type> inbox_;
  alignas(64) std::atomic<std::uint64_t> jobs_accepted_{0};
  alignas(64) std::atomic<std::uint64_t> wake_at_accepted_{1}; // collector: wake me when jobs_accepted_ gets here
  std::atomic<time_point::rep> planned_wake_{time_point::max().time_since_epoch().count()}; // collector's timer
  std::atomic<bool> closing_{false};
  std::atomic<bool> sweep_requested_{false}; // a queued job was cancelled: the collector drops it

  // Backpressure (only with max_pending_jobs != 0).
  alignas(64) std::atomic<std::size_t> pending_{0};
  std::atomic<std::size_t> blocked_submitters_{0};
  std::mutex backpressure_mutex_;
  std::condition_variable_any room_available_;

  // Collector wake-ups, flush and shutdown requests.
  std::mutex collector_mutex_;
  std::condition_variable collector_wake_;
  std::condition_variable flush_done_cv_;
  bool wake_requested_ = false;                // guarded by collector_mutex_
  std::uint64_t flush_requested_ = 0;          // guarded by collector_mutex_
  std::uint64_t flush_done_ = 0;               // guarded by collector_mutex_
  std::optional<Shutdown> shutdown_requested_; // guarded by collector_mutex_
  bool collector_exited_ = false;              // guarded by collector_mutex_
  collector_sleeper collector_sleeper_;

  // Batches formed and waiting for a worker.
  std::mutex ready_mutex_;
  std::condition_variable ready_cv_;
  detail::batch_queue<node_type> ready_; // guarded by ready_mutex_
  bool no_more_batches_ = false;         // guarded by ready_mutex_

  // Counters (Stats).
  alignas(64) std::atomic<std::uint64_t> jobs_completed_{0};
  std::atomic<std::uint64_t> jobs_failed_{0};
  std::atomic<std::uint64_t> jobs_expired_{0};
  std::atomic<std::uint64_t> jobs_cancelled_{0};
  std::atomic<std::uint64_t> jobs_rejected_{0};
  std::atomic<std::uint64_t> batches_full_{0};
  std::atomic<std::uint64_t> batches_timed_out_{0};
  std::atomic<std::uint64_t> batches_flushed_{0};
  std::atomic<std::uint64_t> uncorrelated_results_{0};
  std::atomic<std::uint64_t> callback_errors_{0};

  // Slots for callback submits' nodes (the batcher owns those nodes; callers keep nothing).
  using callback_node_type = detail::callback_node<Job, Result>;
  struct callback_home final : callback_node_type::home {
    Batcher* owner = nullptr;
    void callback_threw() noexcept override { owner->callback_errors_.fetch_add(1, std::memory_order_relaxed); }
    void recycle(void* memory, bool pooled) noexcept override { owner->callback_slots_.release({memory, pooled}); }
  };
  detail::slot_pool<sizeof(callback_node_type), alignof(callback_node_type)> callback_slots_;
  callback_home callback_home_;

  std::mutex shutdown_mutex_;
  bool joined_ = false; // guarded by shutdown_mutex_

  std::jthread collector_; // threads last: they start after every other member exists
  std::vector<std::jthread> workers_;
};

// Deduces Job and Result from member-pointer ID extractors: `Batcher b(process, &Job::id, &Result::id);`
template <class Processor, class Job, class JobKey, class Result, class ResultKey>
Batcher(Processor, JobKey Job::*, ResultKey Result::*) -> Batcher<Job, Result, Processor>;
template <class Processor, class Job, class JobKey, class Result, class ResultKey>
Batcher(Processor, JobKey Job::*, ResultKey Result::*, Options) -> Batcher<Job, Result, Processor>;

// Otherwise from the processor itself, when it is a function or has one non-template operator()
// taking std::span<Job> and returning std::vector<Result>: `Batcher b(process);`,
// `Batcher b(process, id_of_job, id_of_result);`.
template <class Processor>
Batcher(Processor) -> Batcher<detail::processor_job_t<Processor>, detail::processor_result_t<Processor>, Processor>;
template <class Processor>
Batcher(Processor, Options)
    -> Batcher<detail::processor_job_t<Processor>, detail::processor_result_t<Processor>, Processor>;
template <class Processor, class JobId, class ResultId>
Batcher(Processor, JobId, ResultId)
    -> Batcher<detail::processor_job_t<Processor>, detail::processor_result_t<Processor>, Processor>;
template <class Processor, class JobId, class ResultId>
Batcher(Processor, JobId, ResultId, Options)
    -> Batcher<detail::processor_job_t<Processor>, detail::processor_result_t<Processor>, Processor>;

template <class Job, class Result, class Processor>
template <class Correlation>
class Batcher<Job, Result, Processor>::runner final : public runner_base {
public:
  runner(Batcher& owner, Correlation correlation) : owner_(owner), correlation_(std::move(correlation)) {}

  void run(batch& offered) override {
    const time_point now_time = owner_.now();
    jobs_.clear();
    admitted_.clear();
    try { // every buffer sized up front: nothing below allocates but the error messages
      correlation_.begin(offered.size);
      jobs_.reserve(offered.size);
      admitted_.reserve(offered.size);
      answered_.reserve(offered.size);
    } catch (...) { // out of memory: the batch fails, the batcher goes on
      std::exception_ptr error = std::current_exception();
      offered.for_each([&](node_type* job) { owner_.end_job(job, error); });
      detail::release_error(error);
      return;
    }
    for (node_type* next = offered.first; next != nullptr;) {
      node_type* job = next;
      next = job->next;     // before the job can end
      if (job->claimed()) { // cancelled while queued
        job->abandon();
        continue;
      }
      if (job->deadline <= now_time) {
        owner_.end_job(job, expired_error(), failure::expired);
        continue;
      }
      try {
        jobs_.push_back(std::move(job->job));
      } catch (...) { // Job's move constructor threw
        owner_.end_job(job, std::current_exception());
        continue;
      }
      std::size_t earlier = detail::no_match;
      try {
        earlier = correlation_.admit(jobs_.back());
      } catch (...) { // the job ID extractor threw: only this job fails
        jobs_.pop_back();
        owner_.end_job(job, std::current_exception());
        continue;
      }
      if (earlier != detail::no_match) {
        jobs_.pop_back();
        owner_.end_job(job, detail::make_error<duplicate_id>([&] {
                         return "microbatch: the job " + correlation_.describe(earlier) +
                                " has the same ID as an earlier job of its batch; it was not processed";
                       }));
        continue;
      }
      admitted_.push_back(job);
    }
    if (admitted_.empty()) return;

    std::vector<Result> results;
    std::exception_ptr failure;
    try {
      results = std::invoke(owner_.processor_, std::span<Job>(jobs_));
    } catch (...) {
      failure = std::current_exception();
    } // the handler's own reference ends here, before the exception is shared
    jobs_.clear();
    if (failure) {
      for (node_type* job : admitted_)
        owner_.end_job(job, failure);
      detail::release_error(failure);
      return;
    }

    answered_.assign(admitted_.size(), false);
    std::uint64_t uncorrelated = 0;
    for (std::size_t position = 0; position < results.size(); ++position) {
      const std::size_t index = correlation_.match(results[position], position, admitted_.size());
      if (index == detail::no_match || answered_[index]) {
        ++uncorrelated;
        continue;
      }
      answered_[index] = true;
      owner_.end_job(admitted_[index], std::move(results[position]));
    }
    for (std::size_t index = 0; index < admitted_.size(); ++index) {
      if (answered_[index]) continue;
      owner_.end_job(admitted_[index], detail::make_error<no_result>([&] {
                       return "microbatch: the processor returned no result for the job " +
                              correlation_.describe(index);
                     }));
    }
    if (uncorrelated != 0) owner_.uncorrelated_results_.fetch_add(uncorrelated, std::memory_order_relaxed);
  }

private:
  Batcher& owner_;
  Correlation correlation_;
  std::vector<Job> jobs_;            // the span handed to the processor; capacity reused
  std::vector<node_type*> admitted_; // admitted_[i] owns jobs_[i]
  std::vector<bool> answered_;
};

} // namespace microbatch
