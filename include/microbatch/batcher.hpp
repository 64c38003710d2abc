// microbatch::Batcher: groups single jobs from many threads into batches for one processor call.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#include <version>

#if defined(__cpp_lib_jthread)
#include <stop_token>
#endif

#include "clock.hpp"
#include "detail/admission.hpp"
#include "detail/batch_forming.hpp"
#include "detail/batch_queue.hpp"
#include "detail/batch_runner.hpp"
#include "detail/batch_scope.hpp"
#include "detail/batcher_parts.hpp"
#include "detail/collector.hpp"
#include "detail/collector_clock.hpp"
#include "detail/correlation.hpp"
#include "detail/counters.hpp"
#include "detail/job_node.hpp"
#include "detail/ready_queue.hpp"
#include "detail/slot_pool.hpp"
#include "errors.hpp"
#include "options.hpp"
#include "outcome.hpp"
#include "worker_pool.hpp"

namespace microbatch {

template <class Key, class Job, class Result, class Processor> class KeyedBatcher;

namespace detail {
struct operation_access; // the Asio binding's way in (microbatch/asio.hpp)

/// The parameter of `async_execute_job` with g++. It exists because g++ (seen with 11 and 12) destroys
/// an aggregate temporary inside a `co_await` expression twice (`co_await b.async_execute_job({id})`
/// with a job that owns memory crashed): a braced job becomes this class's constructor arguments
/// instead, and the job is built inside the constructor (parenthesised aggregate initialisation,
/// which g++ has from version 10), outside the coroutine. Named and moved jobs pass through. clang
/// has no such bug and takes `Job` itself (so every brace form works there, nested ones included).
#if defined(__GNUC__) && !defined(__clang__)
template <class Job> class job_argument {
public:
  job_argument(Job&& job) : job_(std::move(job)) {} // NOLINT(google-explicit-constructor)
  job_argument(const Job& job) : job_(job) {}       // NOLINT(google-explicit-constructor)
  template <class... Args>
  requires(!(sizeof...(Args) == 1 && (std::is_same_v<std::remove_cvref_t<Args>, Job> && ...))) &&
      (std::is_constructible_v<Job, Args...> || requires(Args && ... args) { Job{std::forward<Args>(args)...}; })
          job_argument(Args&&... args)
      : job_(make(std::forward<Args>(args)...)) {} // NOLINT(google-explicit-constructor)

  Job&& take() noexcept { return std::move(job_); }

private:
  template <class... Args> static Job make(Args&&... args) {
    if constexpr (std::is_constructible_v<Job, Args...>) {
      return Job(std::forward<Args>(args)...);
    } else {
      return Job{std::forward<Args>(args)...};
    }
  }
  Job job_;
};
#else
template <class Job> using job_argument = Job;
#endif

template <class Job> Job&& take_job(job_argument<Job>& job) noexcept {
  if constexpr (std::is_same_v<job_argument<Job>, Job>) {
    return std::move(job);
  } else {
    return job.take();
  }
}
} // namespace detail

/// Collects jobs submitted one at a time by any number of threads into batches, hands each batch to
/// `Processor` in one call, and gives every caller the result that belongs to its job.
///
/// Behaviour
/// - A batch is dispatched when it holds `max_batch_size` jobs, when `max_batch_delay` has passed since
///   its first job arrived, or on `flush()` / `shutdown()`; with `dispatch_when_idle`, also whenever a
///   processor slot is free and jobs wait. `Options::on_batch` hears about every processed batch.
/// - Threads: the thread whose job fills a batch dispatches it (no hand-off to another thread). One
///   collector thread is the batcher's clock: it dispatches batches whose delay passed, fails jobs
///   whose deadline passed, serves `flush` and `shutdown`. `max_concurrent_batches` worker threads call
///   the processor, each with one batch at a time; a worker that finishes a batch takes the next one
///   without sleeping. With the default of 1 the processor is never called concurrently. A slow
///   processor never delays the forming and timing of the next batches; formed batches wait in a queue
///   for a free worker (where deadlines are still enforced). With `dispatch_when_idle`, a blocking
///   `execute_job` that finds a slot free runs the batch on its own thread instead of a worker (it holds
///   that slot meanwhile), when the batch holds only blocking callers' jobs.
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
/// waits until every batch has been processed and joins the threads; deadlines are enforced until the
/// last queued batch is taken. `shutdown(Shutdown::cancel)` fails what is still queued, also when a
/// drain is already under way (it escalates it). When shutdown returns, every accepted job has ended.
/// Futures outlive the batcher.
///
/// Limitations: do not call `execute_job` from inside the processor with `max_concurrent_batches == 1`
/// (its batch could only run on the thread that is waiting for it); do not destroy the batcher from
/// inside the processor. `shutdown` called from inside the processor begins the shutdown and returns
/// without waiting (a thread cannot join itself).
template <class Job, class Result, class Processor> class Batcher {
  static_assert(std::is_invocable_r_v<std::vector<Result>, Processor&, std::span<Job>>,
                "microbatch: the processor must be callable as std::vector<Result>(std::span<Job>), with the "
                "batcher's Job and Result (see the Batcher<Job, Result, Processor> named below)");
  static_assert(std::is_move_constructible_v<Job>, "microbatch: Job must be move-constructible");
  static_assert(std::is_move_constructible_v<Result>, "microbatch: Result must be move-constructible");

public:
  using job_type = Job;
  using result_type = Result;
  using time_point = std::chrono::steady_clock::time_point;

  /// Correlation mode: `job_id(const Job&)` and `result_id(const Result&)` (anything `std::invoke`
  /// accepts: lambdas, function pointers, member pointers such as `&Job::id`) return the IDs that
  /// match a result to its job; compared in their common type after `std::decay`, hashed with
  /// `std::hash`, stored by value (a `std::string_view` job ID as a `std::string`). Starts the
  /// batcher's threads. Throws `std::invalid_argument` naming the field for invalid options.
  template <class JobId, class ResultId>
  Batcher(Processor processor, JobId job_id, ResultId result_id, Options options = {})
      : processor_(std::move(processor)), options_(checked(std::move(options), true)), keyed_(true) {
    using correlation = detail::keyed_correlation<Job, Result, JobId, ResultId>;
    start([this, job_id, result_id]() -> std::unique_ptr<detail::batch_runner<Job, Result>> {
      return std::make_unique<detail::correlating_runner<Job, Result, correlation>>(
          host(), correlation(job_id, result_id), std::is_copy_constructible_v<Result>);
    });
  }

  /// Positional mode: result i of the processor's vector answers job i of its span.
  explicit Batcher(Processor processor, Options options = {})
      : processor_(std::move(processor)), options_(checked(std::move(options), false)), keyed_(false) {
    start([this]() -> std::unique_ptr<detail::batch_runner<Job, Result>> {
      return std::make_unique<detail::correlating_runner<Job, Result, detail::positional_correlation>>(
          host(), detail::positional_correlation{});
    });
  }

  /// `shutdown()`: waits until every accepted job has ended.
  ~Batcher() {
    if (watch_ == nullptr) shutdown(Shutdown::drain); // (a key's queue: its keyed batcher shut it down)
  }

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
    admission_.throw_if_closed();
    throw_if_past(deadline, "submit");
    auto* submitted = detail::promise_node<Job, Result>::create(std::move(job));
    submitted->deadline = deadline;
    std::future<Result> future = submitted->promise.get_future();
    try {
      admit_and_enqueue(submitted);
    } catch (...) {
      submitted->discard();
      throw;
    }
    return future;
  }

  /// Submits `job` and waits for its end: returns its result or throws its error (or what `submit`
  /// throws). The job's node lives in this call's frame: no allocation by the batcher. With
  /// `dispatch_when_idle`, a call that finds a processor slot free runs the batch (its job, and any
  /// other blocking callers' jobs waiting) on its own thread, as a worker would: no hand-off to a worker
  /// and back. Thread-safe.
  Result execute_job(Job job) { return execute_job(std::move(job), time_point::max()); }

  /// As `execute_job(job)`, and the job fails with `deadline_exceeded` if `deadline` passes before it
  /// is handed to the processor (see `submit(job, deadline)`). Thread-safe.
  Result execute_job(Job job, time_point deadline) {
    admission_.throw_if_closed();
    throw_if_past(deadline, "execute_job");
    detail::waiting_node<Job, Result> waiting(std::move(job));
    waiting.deadline = deadline;
    admit_and_enqueue(&waiting, detail::never_stops{}, true); // this thread may run the batch (when idle)
    waiting.done.wait();
    return waiting.take();
  }

#if defined(__cpp_lib_jthread)
  /// As `execute_job(job)`, and returns promptly with `cancelled` when `stop` is requested before the
  /// job ended: a job still queued leaves the queue; one already in the processor runs on and its result
  /// is discarded. A wait for room (`Overflow::block`) also ends with `cancelled`. If stop was requested
  /// before the call, throws `cancelled` at once (the job is not accepted). Allocates one node (shared by
  /// the caller and the batcher). Only where the standard library has `std::stop_token`
  /// (`__cpp_lib_jthread`). Thread-safe.
  Result execute_job(Job job, std::stop_token stop) {
    admission_.throw_if_closed();
    if (stop.stop_requested())
      throw cancelled("microbatch::Batcher::execute_job: stop was requested before the job was submitted");
    auto* shared = new detail::shared_waiting_node<Job, Result>(std::move(job));
    try {
      admit_and_enqueue(shared, stop);
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
#endif

  /// Queues `job`; `on_complete(Outcome<Result>&&)` is called exactly once, with its result or its
  /// error, on a batcher thread (a worker; the collector for jobs that expired or were ended by
  /// `Shutdown::cancel`). It must not block for long: it holds up the rest of its batch. An exception
  /// escaping it is caught and counted in `Stats::callback_errors`. Throws like `submit(job)` (then
  /// `on_complete` is never called). No allocation per job once warm, for callables up to 48 bytes
  /// (larger ones are moved to the heap). Thread-safe.
  template <class F>
  requires std::invocable < std::decay_t<F>
  &, Outcome<Result>&& > void submit(Job job, F&& on_complete) {
    admission_.throw_if_closed();
    const auto lease = callback_slots_.acquire();
    detail::callback_node<Job, Result>* node = nullptr;
    try {
      node = detail::callback_node<Job, Result>::create(lease.memory, std::move(job), std::forward<F>(on_complete),
                                                        callback_home_, lease.pooled);
    } catch (...) {
      callback_slots_.release(lease);
      throw;
    }
    try {
      admit_and_enqueue(node);
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
        owner_.admission_.throw_if_closed();
        owner_.admit_and_enqueue(&node_); // from here a batcher thread may resume the coroutine at any moment
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
  /// batcher thread (the worker that finished the batch; the collector if the job expired or was ended
  /// by `Shutdown::cancel`), so keep what runs there short, or hop to your own executor. The job's node
  /// lives in the coroutine frame: no allocation per job. With `Overflow::block` at `max_pending_jobs`,
  /// the awaiting thread blocks until there is room. Accepts a named job, a moved one, or a braced
  /// one (`async_execute_job({id, ...})`); see the README for g++ 11/12 and `Job{...}`. Thread-safe.
  [[nodiscard]] job_awaiter async_execute_job(detail::job_argument<Job> job) {
    return job_awaiter(*this, detail::take_job<Job>(job));
  }

  /// Dispatches the batch being formed now, if it has jobs, including every job submitted before this
  /// call began. Returns once the batch is queued for a worker (not once a worker has taken it, nor
  /// once it is processed). No effect after shutdown. Thread-safe (on the collector thread itself, in a
  /// callback of a job it ended, it only requests the flush).
  void flush() {
    const std::uint64_t ticket = clock_.request_flush();
    if (ticket == 0 || collector_of_thread() == this || (pool_ && pool_->on_clock_thread())) return;
    clock_.await_flush(ticket);
  }

  /// `shutdown(Shutdown::drain)`. Idempotent. Thread-safe.
  void shutdown() {
    shutdown(Shutdown::drain);
  }

  /// Stops accepting jobs (later submits throw `batcher_closed`; blocked submits are released with
  /// it), then ends the queued jobs as `how` says, waits until every batch in the processor returned,
  /// and joins the threads. When it returns every accepted job has ended. Idempotent; concurrent calls
  /// all return once the batcher has stopped. `Shutdown::cancel` while another thread drains escalates
  /// the drain: what is still queued fails with `batcher_closed` at once. Called from a batcher thread
  /// (the processor, a callback, a resumed coroutine), it only begins the shutdown. Thread-safe.
  void shutdown(Shutdown how) {
    begin_shutdown(how); // before the lock: a cancel must reach a drain that holds it
    if (on_batcher_thread()) return;
    std::lock_guard lock(shutdown_mutex_);
    if (joined_) return;
    if (pool_) {
      ready_.await_drained(); // the clock's last round is over and no batch of ours runs
      pool_->detach(pool_link_);
    } else {
      collector_thread_.join();
      join_workers();
    }
    ready_.await_borrows();      // callers still running a batch (run_for_caller)
    std::uint64_t published = 0; // every job the inbox ever took: the closed inbox holds no more
    {
      std::lock_guard forming_lock(forming_.mutex());
      published = forming_.taken();
    }
    while (enqueues_returned_.load(std::memory_order_acquire) < published)
      std::this_thread::yield(); // a submitter between its push and its return: microseconds
    joined_ = true;
  }

  /// Changes the options while jobs flow. `options` is validated as by the constructor (invalid:
  /// `std::invalid_argument` naming the field, and nothing changes); the `clock` cannot change (a
  /// different one is invalid). If a thread cannot be started, the call throws and changes nothing but
  /// the threads already started, which stay asleep. No job is lost or ended twice. From when each
  /// field applies:
  ///  - `max_batch_size`, `max_batch_delay`, `max_batch_weight`: at once, to the jobs already waiting:
  ///    a forming batch that is full by the new limits is dispatched now, and the forming batch's delay
  ///    counts from its first job as before. (A waiting job heavier than a lowered weight limit goes
  ///    alone; new ones are refused with `oversized_job`.)
  ///  - `max_concurrent_batches`: more lets more batches run at once right away (threads are started as
  ///    needed); fewer lets the running batches finish, after which no more than the new number run.
  ///    Threads are kept until shutdown.
  ///  - `max_pending_jobs`, `overflow`: for jobs submitted from now on (a job accepted while unbounded
  ///    never counts against a bound set later); submitters blocked at the old bound look again.
  ///  - `dispatch_when_idle`, `duplicate_ids`, `on_batch`: from the next batch. The previous `on_batch`
  ///    may still be running when this returns, or be called once more for a batch that was ending
  ///    meanwhile: keep what it uses alive until `shutdown` (after which no observer runs).
  /// Concurrent calls are serialised; `options()` returns the last one that succeeded. May be called
  /// from the processor, a callback or `on_batch`. Thread-safe.
  void reconfigure(const Options& options) {
    // Declared before the lock: the old options and observer, swapped into these, are destroyed after
    // it is released (a destructor that calls back into the batcher must not find it held).
    Options next = checked(options, keyed_);
    std::shared_ptr<const batch_observer> observer = std::make_shared<const batch_observer>(next.on_batch);
    std::lock_guard config_lock(options_mutex_);
    if (next.clock != options_.clock)
      throw std::invalid_argument("microbatch::Options::clock cannot be changed by reconfigure");
    if (next.workers != options_.workers)
      throw std::invalid_argument("microbatch::Options::workers cannot be changed by reconfigure");
    if (!pool_) {
      std::lock_guard lock(threads_mutex_); // may throw (no thread): before any other change
      if (!threads_closed_) add_workers(std::max(workers_.size(), next.max_concurrent_batches));
    }
    admission_.set_limit(next.max_pending_jobs, next.overflow);
    coalesce_.store(next.duplicate_ids == DuplicateIds::coalesce, std::memory_order_relaxed);
    {
      std::lock_guard lock(on_batch_mutex_);
      on_batch_.swap(observer); // the old one is destroyed below, outside every lock
    }
    has_on_batch_.store(static_cast<bool>(next.on_batch), std::memory_order_release);
    ready_.set_slots(next.max_concurrent_batches);
    {
      std::lock_guard lock(forming_.mutex());
      // Under the forming mutex, as the idle dispatches check it: none happens after this call returns
      // unless the new options allow it.
      dispatch_when_idle_.store(next.dispatch_when_idle, std::memory_order_seq_cst);
      auto full = [&](batch formed) { dispatch(formed, formed.trigger); };
      forming_.set_limits(next.max_batch_size, next.max_batch_delay, next.max_batch_weight, full);
      forming_.take_arrivals(now(), full); // re-arms the thresholds for the new limits
      wake_clock_for_forming();
    }
    clock_.wake(); // the collector plans again (its plan may rest on the old delay)
    if (next.dispatch_when_idle && ready_.idle() != 0) dispatch_for_idle_worker();
    std::swap(options_, next); // the old options (their on_batch) die with `next`, after the locks
  }

  /// The options in force: as constructed, or as last reconfigured. Thread-safe.
  [[nodiscard]] Options options() const {
    std::lock_guard lock(options_mutex_);
    return options_;
  }

  /// A snapshot of the counters. Never blocks. Thread-safe.
  [[nodiscard]] Stats stats() const {
    return counters_.snapshot([this] { return forming_.arrivals(); });
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  friend struct detail::operation_access; // microbatch/asio.hpp: admits its operations, cancels them
  friend class detail::collector<detail::job_node<Job, Result>, Batcher>; // dispatch, end_job
  using node_type = detail::job_node<Job, Result>;
  using batch = detail::job_list<node_type>;
  using failure = detail::failure;
  using runner_type = detail::batch_runner<Job, Result>;
  template <class, class, class, class> friend class KeyedBatcher;

  /// One key's queue of a `KeyedBatcher`: on the keyed batcher's pool (`options.workers`), with its
  /// parts (whose runners it has made), reporting to `watch`. Starts nothing.
  Batcher(detail::key_queue_tag, Processor processor, Options options, bool keyed,
          detail::batcher_parts<Job, Result>& parts, detail::queue_watch& watch)
      : processor_(std::move(processor)), options_(std::move(options)), keyed_(keyed), own_parts_(nullptr),
        parts_(parts), watch_(&watch) {
    clock_.run_on(&pool_link_);
    ready_.serve_by(&pool_link_);
  }

  /// A key's queue stops as `how` says (its keyed batcher closed the door for all keys already).
  void begin_queue_shutdown(Shutdown how) {
    if (how == Shutdown::cancel) ready_.hold(); // no batch is taken any more; the clock fails them
    clock_.request_shutdown(how);
  }

  /// The processor, through a `std::reference_wrapper` if it is one.
  static const auto& unwrapped(const Processor& processor) noexcept {
    if constexpr (detail::is_reference_wrapper_v<Processor>) {
      return processor.get();
    } else {
      return processor;
    }
  }
  static constexpr bool has_weight = requires(const Processor& processor, const Job& job) {
    { unwrapped(processor).weight(job) } -> std::convertible_to<std::size_t>;
  };

  /// Sets `job.weight` from `Processor::weight` (always, so that a weight limit set later by
  /// `reconfigure` finds every waiting job weighed); refuses a job heavier than the limit on its own.
  void weigh(node_type& job) {
    if constexpr (has_weight) {
      job.weight = static_cast<std::size_t>(unwrapped(processor_).weight(std::as_const(job.job)));
      const std::size_t limit = forming_.max_weight();
      if (limit != 0 && job.weight > limit)
        throw oversized_job("microbatch::Batcher::submit: the job's weight (" + std::to_string(job.weight) +
                            ") exceeds max_batch_weight (" + std::to_string(limit) + "): no batch could hold it");
    }
  }

  static Options checked(Options options, bool keyed) {
    if (options.max_batch_weight != 0 && !has_weight)
      throw std::invalid_argument("microbatch::Options::max_batch_weight needs a processor with a member "
                                  "std::size_t weight(const Job&) const");
    if (options.duplicate_ids == DuplicateIds::coalesce && !keyed)
      throw std::invalid_argument("microbatch::Options::duplicate_ids: DuplicateIds::coalesce needs correlation IDs "
                                  "(job_id, result_id); positional mode has none");
    if (options.duplicate_ids == DuplicateIds::coalesce && !std::is_copy_constructible_v<Result>)
      throw std::invalid_argument("microbatch::Options::duplicate_ids: DuplicateIds::coalesce copies the result to "
                                  "every job with the same ID, but Result is not copy-constructible");
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

  static const void*& current_batcher() noexcept {
    thread_local const void* current = nullptr; // the batcher whose thread this is, if any
    return current;
  }
  static const void*& collector_of_thread() noexcept {
    thread_local const void* collector_of = nullptr; // the batcher whose collector this thread is
    return collector_of;
  }

  detail::runner_host<Job, Result>& host() noexcept {
    return runner_link_;
  }

  void start(std::function<std::unique_ptr<detail::batch_runner<Job, Result>>()> make_runner) {
    runners_.set_factory(std::move(make_runner));
    if (pool_) { // no thread of our own: the pool's run our batches and our clock's rounds
      clock_.run_on(&pool_link_);
      ready_.serve_by(&pool_link_);
      return;
    }
    try {
      {
        std::lock_guard lock(threads_mutex_);
        add_workers(options_.max_concurrent_batches);
      }
      collector_thread_ = std::thread([this] {
        current_batcher() = this;
        collector_of_thread() = this;
        collector_loop_.run();
      });
    } catch (...) {
      begin_shutdown(Shutdown::drain);
      if (collector_thread_.joinable()) {
        collector_thread_.join();
      } else {
        ready_.finish(); // no collector to do it
      }
      join_workers();
      throw;
    }
  }

  /// (threads_mutex_ held) Starts workers until there are `count`: one per processor slot ever
  /// configured (a slot taken away by `reconfigure` leaves its thread asleep until shutdown).
  void add_workers(std::size_t count) {
    workers_.reserve(count);
    while (workers_.size() < count)
      workers_.emplace_back([this, runner = std::shared_ptr<runner_type>(runners_.make())] { work(*runner); });
  }

  /// Joins every worker; `reconfigure` starts no more.
  void join_workers() {
    std::vector<std::thread> workers;
    {
      std::lock_guard lock(threads_mutex_);
      threads_closed_ = true;
      workers.swap(workers_);
    }
    for (auto& worker : workers)
      worker.join();
  }

  /// True on a thread that runs this batcher's batches or clock, or any thread of its pool: such a
  /// thread must not wait for the batcher (its progress may need that very thread).
  [[nodiscard]] bool on_batcher_thread() const noexcept {
    return current_batcher() == this || (pool_ && WorkerPool::of_thread() == pool_.get());
  }

  // ---- on a pool ----

  /// (a pool worker) Runs one of our ready batches, if the pool found one; with dispatch when idle,
  /// then also what formed meanwhile (group commit), as a worker of our own would.
  void run_pooled_batch() noexcept {
    if (watch_ == nullptr) return run_batch_in_slot();
    if (!watch_->take_slot()) return; // the keyed batcher's cap for all keys: it readies us again
    run_batch_in_slot();
    watch_->give_slot();
  }

  /// (a pool worker) `run_pooled_batch` once the keyed batcher, if any, gave a slot.
  void run_batch_in_slot() noexcept {
    batch jobs;
    bool queue_emptied = false;
    bool borrowed = false; // a slot for an idle dispatch, not for a queued batch
    if (!ready_.try_take(jobs, queue_emptied)) {
      if (!dispatch_when_idle_.load(std::memory_order_seq_cst) || admission_.closed()) return;
      if (!ready_.try_borrow_slot()) return; // a queued batch comes first, or no slot is free
      borrowed = true;
      jobs = take_for_idle_worker();
      if (jobs.empty()) {
        ready_.return_slot();
        ready_.end_borrow();
        return;
      }
    } else if (queue_emptied && admission_.closed()) {
      clock_.wake(); // a draining clock waits for this
    }
    std::size_t ran = 0; // jobs that leave the queue here
    std::unique_ptr<runner_type> runner = runners_.take();
    if (runner) {
      struct batcher_thread { // for the batch's callbacks and the processor: see current_batcher()
        const void* previous;
        ~batcher_thread() { current_batcher() = previous; }
      } mark{std::exchange(current_batcher(), this)};
      for (;;) {
        ran += jobs.size;
        {
          batch_scope running{callback_slots_, enqueues_returned_};
          runner->run(jobs);
        }
        if (!dispatch_when_idle_.load(std::memory_order_seq_cst) || admission_.closed()) break;
        jobs = take_for_idle_worker();
        if (jobs.empty()) break;
      }
      runners_.give_back(std::move(runner));
    } else { // out of memory for a runner: the batch fails
      const std::exception_ptr error = std::make_exception_ptr(std::bad_alloc());
      ran = jobs.size;
      jobs.for_each([&](node_type* job) { end_job(job, error, failure::other); });
    }
    if (borrowed) {
      ready_.return_slot();
      ready_.end_borrow();
    } else {
      ready_.give_back_slot();
    }
    if (watch_ != nullptr) watch_->left(ran); // last: it may retire this queue
  }

  /// (the pool's clock thread) One round of our clock, then the next one planned.
  void run_pooled_round() noexcept {
    struct clock_thread { // as on a collector thread of our own
      const void* previous_batcher;
      const void* previous_collector;
      ~clock_thread() {
        current_batcher() = previous_batcher;
        collector_of_thread() = previous_collector;
      }
    } mark{std::exchange(current_batcher(), this), std::exchange(collector_of_thread(), this)};
    using next_round = typename detail::collector<node_type, Batcher>::next_round;
    const next_round next = collector_loop_.round();
    if (watch_ != nullptr && collector_loop_.jobs_left() != 0) watch_->left(collector_loop_.jobs_left());
    if (next == next_round::again) {
      pool_->schedule_round_now(pool_link_);
    } else if (next == next_round::planned) {
      clock_.rest();
    }
  }

  /// What a pool sees of this batcher.
  struct pool_link final : detail::pool_client, detail::round_scheduler, detail::ready_listener {
    explicit pool_link(Batcher& batcher) : owner(batcher) {}
    Batcher& owner;
    void run_one_batch() noexcept override { owner.run_pooled_batch(); }
    void clock_round() noexcept override { owner.run_pooled_round(); }
    void run_round_now() noexcept override { owner.pool_->schedule_round_now(*this); }
    void run_round_at(std::chrono::steady_clock::time_point when) noexcept override {
      owner.pool_->schedule_round(*this, when);
    }
    void batch_ready() noexcept override { owner.pool_->batch_ready(*this); }
    [[nodiscard]] std::size_t idle_threads() const noexcept override { return owner.pool_->idle_threads(); }
    void destroy() noexcept override {
      if (owner.watch_ != nullptr) owner.watch_->destroy();
    }
  };

  // ---- admission (any thread) ----

  void throw_if_past(time_point deadline, const char* function) const {
    if (deadline != time_point::max() && deadline <= now())
      throw deadline_exceeded(std::string("microbatch::Batcher::") + function +
                              ": the deadline passed before the job was submitted");
  }

  /// Weighs `job` (with a weight limit), takes a place (backpressure), then queues it; on success the
  /// batcher owns it.
  /// `caller_waits`: the calling thread blocks for this job next (`execute_job`), so with dispatch when
  /// idle it may run the batch itself (`run_for_caller`).
  template <class StopToken = detail::never_stops>
  void admit_and_enqueue(node_type* job, const StopToken& stop = {}, bool caller_waits = false) {
    if constexpr (has_weight) weigh(*job);
    if (watch_ != nullptr) {
#if defined(__cpp_lib_jthread)
      if constexpr (std::is_same_v<StopToken, std::stop_token>) {
        watch_->admit(on_batcher_thread(), stop);
      } else {
        watch_->admit(on_batcher_thread());
      }
#else
      watch_->admit(on_batcher_thread());
#endif
      try {
        job->admission_counted = admission_.reserve(counters_.rejected(), on_batcher_thread(), stop);
      } catch (...) {
        watch_->refused();
        throw;
      }
    } else {
      job->admission_counted = admission_.reserve(counters_.rejected(), on_batcher_thread(), stop);
    }
    enqueue(job, caller_waits);
  }

  /// Publishes `job` into the forming batch (ownership passes on success) or throws batcher_closed.
  /// If it fills the batch, dispatches it here, on this thread (with dispatch when idle also for an
  /// idle worker, or runs it here: `caller_waits`). Wakes the collector only if this job needs it
  /// sooner than planned: it starts a batch whose delay ends before the collector's next look, or has a
  /// deadline before it.
  void enqueue(node_type* job, bool caller_waits = false) {
    const time_point deadline = job->deadline; // after the push, the node may already be gone
    const std::size_t weight = job->weight;
    time_point arrival = time_point::max();
    const auto pushed = forming_.push(job, [&](node_type* first) { first->arrival = arrival = now(); });
    if (pushed == detail::batch_forming<node_type>::push_result::closed) {
      admission_.release(job->admission_counted);
      if (watch_ != nullptr) watch_->refused();
      throw batcher_closed("microbatch::Batcher: the batcher is shut down; no new jobs are accepted");
    }
    // From here the job may end at any moment on another thread, and a callback or coroutine that
    // completes it may let its owner shut down and destroy the batcher while this call still runs:
    // `shutdown` waits until every call that published a job has counted itself out here, last (on a
    // thread running one of this batcher's batches, into that batch's scope: see detail::batch_scope).
    struct count_out {
      Batcher& owner;
      ~count_out() {
        if (auto* running = batch_scope::of_thread(&owner.callback_slots_)) {
          ++running->enqueues_returned;
        } else {
          owner.enqueues_returned_.fetch_add(1, std::memory_order_release);
        }
      }
    } on_return{*this};
    // A forming pass here takes this job from the inbox (or finds it taken by an earlier pass) and
    // wakes the clock for what it leaves forming: this call need not wake it for the job again.
    bool formed = false;
    if (forming_.count_arrival(weight)) {
      form_full_batches();
      formed = true;
    }
    if (pool_) {
      // On a pool, a job that opens the inbox puts the batcher in the ring (one lock per batch, not
      // per job): the next free pool thread takes what formed meanwhile, or a sleeping one is woken.
      if (pushed == detail::batch_forming<node_type>::push_result::first &&
          dispatch_when_idle_.load(std::memory_order_seq_cst))
        pool_->batch_ready(pool_link_);
    } else if (dispatch_when_idle_.load(std::memory_order_seq_cst) && ready_.idle() != 0) {
      // Only with a worker idle (one atomic load): under load no lock is taken here.
      if (!(caller_waits && run_for_caller(job))) dispatch_for_idle_worker();
      formed = true;
    }
    if (formed) return;
    if (arrival != time_point::max()) {
      const std::chrono::nanoseconds delay = forming_.delay();
      if (delay.count() > 0) clock_.wake_by(detail::saturating_add(arrival, delay));
    }
    if (deadline != time_point::max()) clock_.wake_by(deadline);
  }

  /// A forming pass on the thread whose job filled the batch.
  void form_full_batches() {
    std::lock_guard lock(forming_.mutex());
    forming_.take_arrivals(now(), [&](batch full) { dispatch(full, full.trigger); });
    wake_clock_for_forming();
  }

  /// Dispatch when idle, on a submitting thread that found a worker idle: the forming batch goes now,
  /// if no queued batch will occupy that worker first.
  void dispatch_for_idle_worker() {
    std::lock_guard lock(forming_.mutex());
    auto full = [&](batch formed) { dispatch(formed, formed.trigger); };
    forming_.take_arrivals(now(), full);
    if (dispatch_when_idle_.load(std::memory_order_relaxed) && !forming_.empty() && ready_.idle_capacity() != 0) {
      dispatch(forming_.cut(), Trigger::idle);
      forming_.take_arrivals(now(), full); // re-arms the size threshold
    }
    wake_clock_for_forming();
  }

  /// Dispatch when idle, on a caller about to block for its job `mine` (`execute_job`): if a processor
  /// slot is free and no queued batch waits for one, and the forming batch holds `mine` and only other
  /// blocking callers' jobs (so ending them runs no one else's callback or coroutine on this thread),
  /// the caller borrows the slot, takes that batch and runs it on its own thread, as a worker would (no
  /// hand-off to a worker and back: on two cores those cost more than a fast processor). Then, as a
  /// worker coming back from a batch would, it hands jobs that arrived meanwhile to an idle worker.
  /// Never on the collector (it would stall the clock). Always runs a forming pass; true if it ran a
  /// batch.
  bool run_for_caller(const node_type* mine) {
    batch jobs;
    {
      std::lock_guard lock(forming_.mutex());
      auto full = [&](batch formed) { dispatch(formed, formed.trigger); };
      forming_.take_arrivals(now(), full);
      // Not once shutdown began: the collector ends what is left (Shutdown::cancel fails it).
      if (dispatch_when_idle_.load(std::memory_order_relaxed) && !admission_.closed() && !forming_.empty() &&
          collector_of_thread() != this && ready_.try_borrow_slot()) {
        if (forming_.holds_only_signalled(mine)) { // walked only with the slot in hand: rare under load
          counters_.dispatched(Trigger::idle);
          jobs = forming_.cut(Trigger::idle);
          forming_.take_arrivals(now(), full);
        } else {
          ready_.return_slot();
          ready_.end_borrow();
        }
      }
      wake_clock_for_forming();
    }
    if (jobs.empty()) return false;
    struct borrowed_slot { // shutdown waits for end_borrow: the last touch of the batcher
      Batcher& owner;
      ~borrowed_slot() {
        owner.ready_.return_slot();
        if (owner.dispatch_when_idle_.load(std::memory_order_seq_cst) && owner.ready_.idle() != 0)
          owner.dispatch_for_idle_worker();
        owner.ready_.end_borrow();
      }
    } slot{*this};
    std::unique_ptr<runner_type> runner = runners_.take();
    if (!runner) { // out of memory for a runner: the batch fails (pushing it now could outlive shutdown)
      const std::exception_ptr error = std::make_exception_ptr(std::bad_alloc());
      jobs.for_each([&](node_type* job) { end_job(job, error, failure::other); });
      return true;
    }
    {
      struct batcher_thread { // for the batch's callbacks and the processor: see current_batcher()
        const void* previous;
        ~batcher_thread() { current_batcher() = previous; }
      } mark{std::exchange(current_batcher(), this)};
      batch_scope running{callback_slots_, enqueues_returned_};
      runner->run(jobs);
    }
    runners_.give_back(std::move(runner));
    return true;
  }

  /// Dispatch when idle, on a worker about to sleep with jobs waiting: it takes the forming batch
  /// itself (group commit: everything that accumulated while every slot was busy), unless a queued
  /// batch came first. Returns the batch to run (possibly empty).
  batch take_for_idle_worker() {
    std::lock_guard lock(forming_.mutex());
    auto full = [&](batch formed) { dispatch(formed, formed.trigger); };
    forming_.take_arrivals(now(), full);
    batch taken;
    // Not once shutdown began: the collector ends what is left (Shutdown::cancel fails it).
    if (dispatch_when_idle_.load(std::memory_order_relaxed) && !admission_.closed() && !forming_.empty() &&
        ready_.empty()) {
      counters_.dispatched(Trigger::idle);
      taken = forming_.cut();
      taken.trigger = Trigger::idle;
      forming_.take_arrivals(now(), full);
    }
    wake_clock_for_forming();
    return taken;
  }

  /// (forming mutex held) After a forming pass off the collector: the jobs it took may start the next
  /// batch (its delay) or carry the earliest deadline, which their submitters may have found covered by
  /// a plan the collector then replaced. Costs a compare-exchange only when it lowers the plan.
  void wake_clock_for_forming() noexcept {
    clock_.wake_by(std::min(forming_.due(), forming_.earliest_deadline()));
  }

  /// (forming mutex held) Queues a formed batch for a worker.
  void dispatch(batch formed, Trigger why) {
    counters_.dispatched(why);
    formed.trigger = why;
    ready_.push(formed);
  }

  void begin_shutdown(Shutdown how) {
    admission_.close();
    begin_queue_shutdown(how); // Shutdown::cancel: workers take nothing more; the collector fails it
  }

  // ---- the one place where a job ends ----

  void end_job(node_type* job, Result&& value) noexcept {
    if (!job->try_claim()) return job->abandon();
    counters_.completed();
    admission_.release(job->admission_counted);
    job->finish(std::move(value));
  }

  void end_job(node_type* job, std::exception_ptr error, failure cause) noexcept {
    if (!job->try_claim()) return job->abandon();
    counters_.failed(cause);
    admission_.release(job->admission_counted);
    job->finish(std::move(error));
  }

#if defined(__cpp_lib_jthread)
  /// The caller's stop callback (any thread). The batcher keeps its hold on the node (it may be queued
  /// or in the processor) and drops it when it next meets the node.
  void cancel_job(detail::shared_waiting_node<Job, Result>* job) noexcept {
    if (!job->begin_cancel()) return;
    cancelled_by_caller(job);
    job->end_cancel();
    job->deliver(detail::make_error<cancelled>(
        [] { return "microbatch::Batcher::execute_job: stop was requested before the job completed"; }));
  }
#endif

  /// A caller won `begin_cancel` on its own cancellable (shared) job: counts the cancellation, gives
  /// its place back, and has the collector drop the job from the queue now rather than when its batch
  /// is dispatched. The caller then calls `end_cancel` and delivers `cancelled` to itself. Any thread.
  void cancelled_by_caller(node_type* job) noexcept {
    counters_.failed(failure::cancelled);
    admission_.release(job->admission_counted);
    collector_loop_.request_sweep();
  }

  [[nodiscard]] time_point now() const noexcept {
    return clock_.now();
  }

  /// What the workers' runners see of the batcher (so that Batcher itself has no virtual functions).
  struct runner_link final : detail::runner_host<Job, Result> {
    explicit runner_link(Batcher& batcher) : owner(batcher) {}
    Batcher& owner;
    [[nodiscard]] time_point now() const noexcept override { return owner.now(); }
    std::vector<Result> call_processor(std::span<Job> jobs) override { return std::invoke(owner.processor_, jobs); }
    void end_job(node_type* job, Result&& value) noexcept override { owner.end_job(job, std::move(value)); }
    void count_completed(std::uint64_t jobs) noexcept override { owner.counters_.completed(jobs); }
    void finish_claimed(node_type* job, Result&& value) noexcept override {
      owner.admission_.release(job->admission_counted);
      job->finish(std::move(value));
    }
    void end_job(node_type* job, std::exception_ptr error, failure cause) noexcept override {
      owner.end_job(job, std::move(error), cause);
    }
    void count_uncorrelated(std::uint64_t results) noexcept override { owner.counters_.uncorrelated(results); }
    void batch_ran(const BatchInfo& info) noexcept override { owner.observe(info); }
    void count_coalesced(std::uint64_t jobs) noexcept override { owner.counters_.coalesced(jobs); }
    [[nodiscard]] bool coalesce_duplicates() const noexcept override {
      return owner.coalesce_.load(std::memory_order_relaxed);
    }
  };

  /// After a batch that reached the processor: the life-long figures, then `Options::on_batch`.
  void observe(const BatchInfo& info) noexcept {
    counters_.processed(info);
    if (!has_on_batch_.load(std::memory_order_acquire)) return;
    std::shared_ptr<const batch_observer> on_batch;
    {
      std::lock_guard lock(on_batch_mutex_); // one lock per batch, only with an observer
      on_batch = on_batch_;
    }
    if (!on_batch || !*on_batch) return;
    try {
      (*on_batch)(info);
    } catch (...) {
      counters_.observer_threw();
    }
  }

  // ---- worker threads ----

  void work(detail::batch_runner<Job, Result>& runner) {
    current_batcher() = this;
    batch jobs;
    bool queue_emptied = false;
    bool returning = false; // from a batch: its slot is free again
    auto jobs_waiting = [this] {
      if (!dispatch_when_idle_.load(std::memory_order_seq_cst) || admission_.closed())
        return false; // (at shutdown the collector dispatches what is left)
      std::lock_guard lock(forming_.mutex());
      return !forming_.inbox_empty() || !forming_.empty();
    };
    for (;;) {
      const auto what = ready_.pop(jobs, queue_emptied, returning, jobs_waiting);
      if (what == detail::ready_queue<node_type>::taken::finished) return;
      returning = true;
      if (what == detail::ready_queue<node_type>::taken::form_idle) {
        jobs = take_for_idle_worker();
        if (jobs.empty()) continue;
      } else if (queue_emptied && admission_.closed()) {
        clock_.wake(); // a draining collector waits for this
      }
      batch_scope running{callback_slots_, enqueues_returned_};
      runner.run(jobs);
    }
  }

  using batch_observer = std::function<void(const BatchInfo&)>;

  Processor processor_;
  Options options_;                  // as constructed or last reconfigured; guarded by options_mutex_
  mutable std::mutex options_mutex_; // also serialises reconfigure
  const bool keyed_; // NOLINT(modernize-use-default-member-init): the two constructors set it differently
  std::atomic<bool> dispatch_when_idle_{options_.dispatch_when_idle};
  std::atomic<bool> coalesce_{options_.duplicate_ids == DuplicateIds::coalesce};
  std::atomic<bool> has_on_batch_{static_cast<bool>(options_.on_batch)};
  std::mutex on_batch_mutex_;
  std::shared_ptr<const batch_observer> on_batch_ = std::make_shared<const batch_observer>(options_.on_batch);

  const std::shared_ptr<WorkerPool> pool_ = options_.workers; // null: our own threads

  // What this batcher's queue shares with others: its own (a Batcher), or its keyed batcher's.
  using parts_type = detail::batcher_parts<Job, Result>;
  std::unique_ptr<parts_type> own_parts_ = std::make_unique<parts_type>(options_.max_pending_jobs, options_.overflow);
  parts_type& parts_ = *own_parts_;
  detail::queue_watch* const watch_ = nullptr; // a keyed batcher's, for one of its keys' queues

  // The parts, in the order a job meets them.
  detail::admission& admission_ = parts_.admission_gate;
  detail::batch_forming<node_type> forming_{options_.max_batch_size, options_.max_batch_delay,
                                            options_.max_batch_weight, has_weight};
  detail::collector_clock clock_{options_.clock};
  detail::ready_queue<node_type> ready_{options_.max_concurrent_batches};
  std::atomic<std::uint64_t> enqueues_returned_{0}; // enqueue calls that published a job and returned
  // Its own cache line: a worker reads it for every job, and every submit made outside this batcher's
  // own batches adds to enqueues_returned_
  // (sharing a line cost W2cb's submitter a third of its time in admit_and_enqueue).
  alignas(64) runner_link runner_link_{*this};

  detail::counters& counters_ = parts_.counts; // Stats
  // The collector's references, read every round: not on the line of enqueues_returned_, which every
  // submit outside a batch writes.
  detail::collector<node_type, Batcher> collector_loop_{*this, forming_, ready_, clock_};
  pool_link pool_link_{*this}; // on a pool: how the pool reaches us

  using callback_node_type = detail::callback_node<Job, Result>;
  using callback_pool = typename parts_type::callback_pool;
  callback_pool& callback_slots_ = parts_.callback_slots;
  typename callback_node_type::home& callback_home_ = parts_.callback_home;

  // A thread running one of this batcher's batches gives the slots of the callback nodes it ends back
  // together, and counts its own returned enqueues once, when the batch is over.
  using batch_scope = typename parts_type::batch_scope;

  std::mutex shutdown_mutex_;
  bool joined_ = false; // guarded by shutdown_mutex_

  detail::runner_pool<Job, Result>& runners_ = parts_.runners; // one per worker, and per borrowed slot
  std::mutex threads_mutex_;
  bool threads_closed_ = false;      // guarded by threads_mutex_: shutdown took the workers to join
  std::vector<std::thread> workers_; // guarded by threads_mutex_; threads last: they start after every other
  std::thread collector_thread_;     // member exists
};

// Deduces Job and Result from member-pointer ID extractors, whatever the processor is (a generic
// lambda, `std::ref(processor)`, an overloaded function object): `Batcher b(process, &Job::id, &Result::id);`
template <class Processor, class Job, class JobKey, class Result, class ResultKey>
Batcher(Processor, JobKey Job::*, ResultKey Result::*) -> Batcher<Job, Result, Processor>;
template <class Processor, class Job, class JobKey, class Result, class ResultKey>
Batcher(Processor, JobKey Job::*, ResultKey Result::*, Options) -> Batcher<Job, Result, Processor>;

// Otherwise from the processor itself, when it is a function (noexcept or not), a non-generic lambda or
// a `std::reference_wrapper` to one: `Batcher b(process);`, `Batcher b(process, id_of_job, id_of_result);`.
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

} // namespace microbatch
