// microbatch::KeyedBatcher: a batch per key (tenant, shard, table, model), every key on one pool of threads.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>
#include <version>

#if defined(__cpp_lib_jthread)
#include <stop_token>
#endif

#include "batcher.hpp"
#include "worker_pool.hpp"

namespace microbatch {

/// How a `KeyedBatcher` forms and runs batches. An aggregate, fields in this order.
template <class Key> struct KeyedOptions {
  /// Per key: `max_batch_size`, `max_batch_delay`, `max_batch_weight`, `dispatch_when_idle`,
  /// `duplicate_ids` (each key's batch is formed by these, on its own). For all keys together:
  /// `max_concurrent_batches` (the threads of the private pool made when `workers` is null),
  /// `max_pending_jobs`, `overflow`, `clock`, `workers`. Its `on_batch` is called when `on_batch` below
  /// is empty. Checked as `Batcher` checks `Options`.
  Options batching{};
  /// Batches of one key in the processor at once. 1 (default): a key's batches reach the processor one
  /// at a time, in the order they formed. Precondition: >= 1.
  std::size_t max_concurrent_batches_per_key = 1;
  /// Bound on one key's jobs submitted and not yet out of its queue (forming, queued or in the
  /// processor). 0 (default) = unbounded. At the bound, `batching.overflow` applies (`queue_full` names
  /// this field). Precondition: 0, or >= `batching.max_batch_size`.
  std::size_t max_pending_jobs_per_key = 0;
  /// Called once per batch that reached the processor, with its key, as `Options::on_batch` is.
  std::function<void(const Key&, const BatchInfo&)> on_batch{};
};

namespace detail {
/// How a key is stored: by value, a `std::string_view` as a `std::string`.
template <class Key>
using stored_key_t = std::conditional_t<std::is_same_v<std::remove_cvref_t<Key>, std::string_view>, std::string,
                                        std::remove_cvref_t<Key>>;

/// Hashes a key and anything it compares with (a `std::string` key looked up by `std::string_view`).
struct key_hash {
  using is_transparent = void;
  template <class Key> std::size_t operator()(const Key& key) const noexcept(noexcept(std::hash<Key>{}(key))) {
    return std::hash<Key>{}(key);
  }
};

/// A keyed processor's signature: `std::vector<Result>(const Key&, std::span<Job>)` (also with the key
/// by value, `noexcept`, or as a member function).
template <class Signature> struct keyed_signature {};
template <class Result, class Key, class Job> struct keyed_signature<std::vector<Result>(Key, std::span<Job>)> {
  using key = std::remove_cvref_t<Key>;
  using job = Job;
  using result = Result;
};
template <class Result, class Key, class Job>
struct keyed_signature<std::vector<Result>(Key, std::span<Job>) noexcept>
    : keyed_signature<std::vector<Result>(Key, std::span<Job>)> {};
template <class Signature> struct keyed_signature<Signature*> : keyed_signature<Signature> {};
template <class Class, class Result, class Key, class Job>
struct keyed_signature<std::vector<Result> (Class::*)(Key, std::span<Job>)>
    : keyed_signature<std::vector<Result>(Key, std::span<Job>)> {};
template <class Class, class Result, class Key, class Job>
struct keyed_signature<std::vector<Result> (Class::*)(Key, std::span<Job>) const>
    : keyed_signature<std::vector<Result>(Key, std::span<Job>)> {};
template <class Class, class Result, class Key, class Job>
struct keyed_signature<std::vector<Result> (Class::*)(Key, std::span<Job>) noexcept>
    : keyed_signature<std::vector<Result>(Key, std::span<Job>)> {};
template <class Class, class Result, class Key, class Job>
struct keyed_signature<std::vector<Result> (Class::*)(Key, std::span<Job>) const noexcept>
    : keyed_signature<std::vector<Result>(Key, std::span<Job>)> {};

template <class Processor> struct keyed_traits : keyed_signature<Processor> {};
template <class Processor>
requires requires {
  &Processor::operator();
}
struct keyed_traits<Processor> : keyed_signature<decltype(&Processor::operator())> {};
template <class Processor>
struct keyed_traits<std::reference_wrapper<Processor>> : keyed_traits<std::remove_cv_t<Processor>> {};

template <class Processor> using keyed_key_t = typename keyed_traits<Processor>::key;
template <class Processor> using keyed_job_t = typename keyed_traits<Processor>::job;
template <class Processor> using keyed_result_t = typename keyed_traits<Processor>::result;

struct keyed_tag {};
} // namespace detail

/// Groups jobs into batches per key: a batch holds jobs of one key only (`batch_key(job)`), and every
/// key's batches go to one processor, called as `processor(key, std::span<Job>)`. Every key runs on one
/// shared `WorkerPool` (`batching.workers`, or a private pool of `batching.max_concurrent_batches`
/// threads), so a key costs no thread: a keyed batcher uses the pool's threads plus its clock thread.
///
/// Behaviour
/// - Each key's batch forms as a `Batcher`'s does, by that key's jobs alone: size, delay since that
///   key's batch's first job, weight, dispatch when idle, and `flush(key)` / `flush()`.
/// - A key's batches reach the processor at most `max_concurrent_batches_per_key` at a time; with 1, in
///   the order they formed. Across keys the pool is fair: a free thread takes the next key with a ready
///   batch, round-robin, so a key with many queued batches delays another key's by at most one batch
///   per pool thread.
/// - A key's state (its queue, about 2.5 KiB) exists only while it has jobs forming, queued or in the
///   processor; it is freed when its last job has ended, so memory does not grow with the number of
///   distinct keys ever seen.
/// - Every guarantee of `Batcher` holds per job: the same errors (numbered in `Batcher`'s comment),
///   deadlines, cancellation, both shutdown modes, backpressure (`batching.max_pending_jobs` for all
///   keys together, `max_pending_jobs_per_key` for each), callbacks and coroutines. Callbacks and
///   coroutines resume on the pool thread that ended the job (the clock thread for expired jobs and
///   `Shutdown::cancel`).
///
/// Keys: `batch_key` is anything `std::invoke` accepts with `const Job&` (`&Event::tenant`); keys are
/// hashed with `std::hash`, compared with `==`, stored by value (a `std::string_view` as a
/// `std::string`). The processor gets the key of the batch as `const Key&`.
///
/// Shutdown: `shutdown()` (also run by the destructor) stops accepting jobs, dispatches every key's
/// queued jobs and returns once every accepted job has ended and every key's state is freed;
/// `shutdown(Shutdown::cancel)` fails what is still queued with `batcher_closed`. Other batchers on the
/// same pool are not touched. Called on a thread of its pool (a processor, a callback), it only begins.
///
/// Not copyable, not movable. Do not destroy it on a thread of its pool.
template <class Key, class Job, class Result, class Processor> class KeyedBatcher {
  static_assert(std::is_invocable_r_v<std::vector<Result>, Processor&, const Key&, std::span<Job>>,
                "microbatch: a KeyedBatcher's processor must be callable as std::vector<Result>(const Key&, "
                "std::span<Job>), with the batcher's Key, Job and Result");

public:
  using key_type = Key;
  using job_type = Job;
  using result_type = Result;
  using time_point = std::chrono::steady_clock::time_point;

  /// Correlation by IDs, as `Batcher(processor, job_id, result_id, options)`; `batch_key(const Job&)`
  /// gives a job's key. Throws `std::invalid_argument` naming the field for invalid options.
  template <class BatchKey, class JobId, class ResultId>
  KeyedBatcher(Processor processor, BatchKey batch_key, JobId job_id, ResultId result_id,
               KeyedOptions<Key> options = {})
      : KeyedBatcher(detail::keyed_tag{}, std::move(processor), std::move(batch_key), std::move(options), true) {
    using correlation = detail::keyed_correlation<Job, Result, JobId, ResultId>;
    parts_.runners.set_factory([this, job_id, result_id]() -> std::unique_ptr<detail::batch_runner<Job, Result>> {
      return std::make_unique<detail::correlating_runner<Job, Result, correlation>>(
          host_, correlation(job_id, result_id), std::is_copy_constructible_v<Result>);
    });
  }

  /// Positional: result i of the processor's vector answers job i of its span.
  template <class BatchKey>
  KeyedBatcher(Processor processor, BatchKey batch_key, KeyedOptions<Key> options = {})
      : KeyedBatcher(detail::keyed_tag{}, std::move(processor), std::move(batch_key), std::move(options), false) {
    parts_.runners.set_factory([this]() -> std::unique_ptr<detail::batch_runner<Job, Result>> {
      return std::make_unique<detail::correlating_runner<Job, Result, detail::positional_correlation>>(
          host_, detail::positional_correlation{});
    });
  }

  /// `shutdown()`.
  ~KeyedBatcher() { shutdown(Shutdown::drain); }

  KeyedBatcher(const KeyedBatcher&) = delete;
  KeyedBatcher& operator=(const KeyedBatcher&) = delete;

  /// As `Batcher::submit(job)`, into the batch of the job's key. Thread-safe.
  [[nodiscard]] std::future<Result> submit(Job job) { return submit(std::move(job), time_point::max()); }

  /// As `Batcher::submit(job, deadline)`. Thread-safe.
  [[nodiscard]] std::future<Result> submit(Job job, time_point deadline) {
    return with_queue(job, [&](queue_batcher& queue) { return queue.submit(std::move(job), deadline); });
  }

  /// As `Batcher::submit(job, on_complete)`. Thread-safe.
  template <class F>
  requires std::invocable < std::decay_t<F>
  &, Outcome<Result>&& > void submit(Job job, F&& on_complete) {
    with_queue(job, [&](queue_batcher& queue) { queue.submit(std::move(job), std::forward<F>(on_complete)); });
  }

  /// As `Batcher::execute_job(job)`. Thread-safe.
  Result execute_job(Job job) { return execute_job(std::move(job), time_point::max()); }

  /// As `Batcher::execute_job(job, deadline)`. Thread-safe.
  Result execute_job(Job job, time_point deadline) {
    return with_queue(job, [&](queue_batcher& queue) { return queue.execute_job(std::move(job), deadline); });
  }

#if defined(__cpp_lib_jthread)
  /// As `Batcher::execute_job(job, stop)`. Thread-safe.
  Result execute_job(Job job, std::stop_token stop) {
    return with_queue(job, [&](queue_batcher& queue) { return queue.execute_job(std::move(job), std::move(stop)); });
  }
#endif

  /// The awaitable of `async_execute_job`; awaited where it was made.
  class job_awaiter {
  public:
    job_awaiter(const job_awaiter&) = delete;
    job_awaiter& operator=(const job_awaiter&) = delete;

    [[nodiscard]] bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> waiting) {
      node_.waiting = waiting;
      try {
        owner_.with_queue(node_.job, [&](queue_batcher& queue) {
          queue.admission_.throw_if_closed();
          queue.admit_and_enqueue(&node_); // from here a pool thread may resume the coroutine at any moment
        });
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
    friend class KeyedBatcher;
    job_awaiter(KeyedBatcher& owner, Job&& job) : owner_(owner), node_(std::move(job)) {}
    KeyedBatcher& owner_;
    detail::coroutine_node<Job, Result> node_;
  };

  /// As `Batcher::async_execute_job(job)`: `Result r = co_await keyed.async_execute_job(job);`.
  /// Thread-safe.
  [[nodiscard]] job_awaiter async_execute_job(detail::job_argument<Job> job) {
    return job_awaiter(*this, detail::take_job<Job>(job));
  }

  /// Dispatches every key's forming batch, as `Batcher::flush()` does for one. Thread-safe.
  void flush() {
    for (key_queue* queue : hold_every_queue()) {
      queue->batcher.flush();
      drop_holds(*queue, 1);
    }
  }

  /// Dispatches the forming batch of `key`, if it has one. Thread-safe.
  void flush(const Key& key) {
    key_queue* queue = hold_queue(key, false);
    if (queue == nullptr) return;
    queue->batcher.flush();
    drop_holds(*queue, 1);
  }

  /// `shutdown(Shutdown::drain)`. Idempotent. Thread-safe.
  void shutdown() {
    shutdown(Shutdown::drain);
  }

  /// As `Batcher::shutdown(how)`, for every key; returns once every accepted job has ended and every
  /// key's state is freed. Only begins the shutdown on a thread of its pool. Thread-safe.
  void shutdown(Shutdown how) {
    parts_.admission_gate.close();
    for (shard& each : shards_) {
      std::lock_guard lock(each.mutex);
      each.closed = true; // no key is added from now on
    }
    for (key_queue* queue : hold_every_queue()) {
      queue->batcher.begin_queue_shutdown(how);
      if (queue->places) queue->places->close();
      drop_holds(*queue, 1);
    }
    if (WorkerPool::of_thread() == pool_.get()) return;
    std::unique_lock lock(live_mutex_);
    all_freed_.wait(lock, [&] { return live_queues_ == 0; });
  }

  /// A snapshot of the counters of all keys together (as `Batcher::stats()`). Never blocks.
  /// Thread-safe.
  [[nodiscard]] Stats stats() const {
    return parts_.counts.snapshot([this] { return submitted_.load(std::memory_order_acquire); });
  }

  /// Keys that have jobs forming, queued or in the processor now, or whose state is being freed after
  /// their last job ended (the pool's clock thread frees it moments later). Thread-safe.
  [[nodiscard]] std::size_t active_keys() const noexcept {
    return active_keys_.load(std::memory_order_acquire);
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  using stored_key = detail::stored_key_t<Key>;

  /// The processor of one key's queue: the keyed batcher's, with that key.
  struct key_processor {
    KeyedBatcher* owner;
    stored_key key;
    std::vector<Result> operator()(std::span<Job> jobs) { return std::invoke(owner->processor_, key_view(), jobs); }
    [[nodiscard]] std::size_t weight(const Job& job) const requires requires(const Processor& processor) {
      { unwrapped(processor).weight(job) } -> std::convertible_to<std::size_t>;
    }
    { return static_cast<std::size_t>(unwrapped(owner->processor_).weight(job)); }
    [[nodiscard]] decltype(auto) key_view() const {
      if constexpr (std::is_same_v<stored_key, std::remove_cvref_t<Key>>) {
        return static_cast<const Key&>(key);
      } else {
        return Key(key);
      }
    }
  };
  using queue_batcher = Batcher<Job, Result, key_processor>;
  friend queue_batcher;
  friend struct detail::operation_access; // microbatch/asio.hpp: starts an operation on a key's queue

  static const auto& unwrapped(const Processor& processor) noexcept {
    if constexpr (detail::is_reference_wrapper_v<Processor>) {
      return processor.get();
    } else {
      return processor;
    }
  }

  struct shard;

  /// One key's state: its queue (a `Batcher` on the pool) and the holds that keep it: one per caller
  /// inside a member of ours for it, one per job in it. The last hold to go frees it.
  struct key_queue final : detail::queue_watch {
    key_queue(KeyedBatcher& keyed, stored_key key, shard& in)
        : owner(keyed), home(in), batcher(detail::key_queue_tag{}, key_processor{&keyed, std::move(key)},
                                          keyed.per_key_options_, keyed.correlated_, keyed.parts_, *this) {
      if (keyed.max_pending_per_key_ != 0) places.emplace(keyed.max_pending_per_key_, keyed.per_key_options_.overflow);
    }

    void admit(bool beyond_bound) override { take_place(beyond_bound, detail::never_stops{}); }
#if defined(__cpp_lib_jthread)
    void admit(bool beyond_bound, const std::stop_token& stop) override {
      take_place(beyond_bound, stop);
    }
#endif
    template <class StopToken> void take_place(bool beyond_bound, const StopToken& stop) {
      if (places) {
        try {
          (void)places->reserve(owner.parts_.counts.rejected(), beyond_bound, stop);
        } catch (const queue_full&) {
          throw queue_full("microbatch::KeyedBatcher::submit: max_pending_jobs_per_key (" +
                           std::to_string(owner.max_pending_per_key_) + ") jobs of this key are pending");
        }
      }
      holds.fetch_add(1, std::memory_order_relaxed); // a job's hold: the caller holds one already
      owner.submitted_.fetch_add(1, std::memory_order_release);
    }
    void refused() noexcept override {
      owner.submitted_.fetch_sub(1, std::memory_order_relaxed);
      if (places) places->release(true);
      owner.drop_holds(*this, 1);
    }
    void left(std::size_t jobs) noexcept override {
      if (places)
        for (std::size_t i = 0; i < jobs; ++i)
          places->release(true);
      owner.drop_holds(*this, jobs);
    }
    void destroy() noexcept override {
      owner.destroy_queue(this);
    }
    bool take_slot() noexcept override {
      return owner.take_slot(*this);
    }
    void give_slot() noexcept override {
      owner.give_slot();
    }

    KeyedBatcher& owner;
    shard& home;
    std::atomic<std::size_t> holds{0};       // callers inside for this key, plus its jobs; 0 -> freed
    bool retired = false;                    // guarded by home.mutex
    std::optional<detail::admission> places; // max_pending_jobs_per_key
    queue_batcher batcher;
  };

  struct alignas(64) shard {
    std::mutex mutex;
    std::unordered_map<stored_key, key_queue*, detail::key_hash, std::equal_to<>> queues; // guarded by mutex
    bool closed = false;                                                                  // guarded by mutex
  };
  static constexpr std::size_t shard_count = 16;

  /// What the pool's threads see of the runner's host: the queue whose batch they run, whose
  /// `Batcher` sets itself as the thread's current batcher.
  struct keyed_host final : detail::runner_host<Job, Result> {
    explicit keyed_host(KeyedBatcher& keyed) : owner(keyed) {}
    KeyedBatcher& owner;
    using node_type = detail::job_node<Job, Result>;
    static queue_batcher& queue() noexcept {
      return *static_cast<queue_batcher*>(const_cast<void*>(queue_batcher::current_batcher()));
    }
    [[nodiscard]] time_point now() const noexcept override { return queue().now(); }
    std::vector<Result> call_processor(std::span<Job> jobs) override { return queue().processor_(jobs); }
    void end_job(node_type* job, Result&& value) noexcept override { queue().end_job(job, std::move(value)); }
    void count_completed(std::uint64_t jobs) noexcept override { owner.parts_.counts.completed(jobs); }
    void finish_claimed(node_type* job, Result&& value) noexcept override {
      owner.parts_.admission_gate.release(job->admission_counted);
      job->finish(std::move(value));
    }
    void end_job(node_type* job, std::exception_ptr error, detail::failure cause) noexcept override {
      queue().end_job(job, std::move(error), cause);
    }
    void count_uncorrelated(std::uint64_t results) noexcept override { owner.parts_.counts.uncorrelated(results); }
    void batch_ran(const BatchInfo& info) noexcept override { owner.observe(queue().processor_.key_view(), info); }
    void count_coalesced(std::uint64_t jobs) noexcept override { owner.parts_.counts.coalesced(jobs); }
    [[nodiscard]] bool coalesce_duplicates() const noexcept override { return owner.coalesce_; }
  };

  template <class BatchKey>
  KeyedBatcher(detail::keyed_tag, Processor processor, BatchKey batch_key, KeyedOptions<Key> options, bool correlated)
      : processor_(std::move(processor)), batch_key_(std::move(batch_key)),
        options_(checked(std::move(options), correlated)), correlated_(correlated) {}

  static KeyedOptions<Key> checked(KeyedOptions<Key> options, bool correlated) {
    const Options& batching = options.batching;
    if (batching.max_concurrent_batches == 0)
      throw std::invalid_argument("microbatch::Options::max_concurrent_batches must be at least 1");
    if (options.max_concurrent_batches_per_key == 0)
      throw std::invalid_argument("microbatch::KeyedOptions::max_concurrent_batches_per_key must be at least 1");
    if (batching.max_batch_delay.count() < 0)
      throw std::invalid_argument("microbatch::Options::max_batch_delay must not be negative");
    if (batching.max_pending_jobs != 0 && batching.max_batch_size > batching.max_pending_jobs)
      throw std::invalid_argument("microbatch::Options::max_batch_size (" + std::to_string(batching.max_batch_size) +
                                  ") exceeds max_pending_jobs (" + std::to_string(batching.max_pending_jobs) +
                                  "): a batch could never fill");
    if (options.max_pending_jobs_per_key != 0 && batching.max_batch_size > options.max_pending_jobs_per_key)
      throw std::invalid_argument("microbatch::KeyedOptions::max_pending_jobs_per_key (" +
                                  std::to_string(options.max_pending_jobs_per_key) + ") is below max_batch_size (" +
                                  std::to_string(batching.max_batch_size) + "): a batch could never fill");
    constexpr bool has_weight = requires(const Processor& processor, const Job& job) {
      { unwrapped(processor).weight(job) } -> std::convertible_to<std::size_t>;
    };
    if (batching.max_batch_weight != 0 && !has_weight)
      throw std::invalid_argument("microbatch::Options::max_batch_weight needs a processor with a member "
                                  "std::size_t weight(const Job&) const");
    if (batching.duplicate_ids == DuplicateIds::coalesce && !correlated)
      throw std::invalid_argument("microbatch::Options::duplicate_ids: DuplicateIds::coalesce needs correlation IDs "
                                  "(job_id, result_id); positional mode has none");
    if (batching.duplicate_ids == DuplicateIds::coalesce && !std::is_copy_constructible_v<Result>)
      throw std::invalid_argument("microbatch::Options::duplicate_ids: DuplicateIds::coalesce copies the result to "
                                  "every job with the same ID, but Result is not copy-constructible");
    return options;
  }

  [[nodiscard]] Options per_key(const Options& batching) const {
    Options each = batching;
    each.max_concurrent_batches = options_.max_concurrent_batches_per_key;
    each.max_pending_jobs = 0; // the bound for all keys is the shared gate's
    each.on_batch = {};        // observe() calls ours, with the key
    each.workers = pool_;
    return each;
  }

  /// Runs `submit(queue)` for the queue of `job`'s key, made if the key has none, held meanwhile.
  template <class Submit> decltype(auto) with_queue(const Job& job, Submit&& submit) {
    parts_.admission_gate.throw_if_closed();
    key_queue& queue = *hold_queue(std::invoke(batch_key_, job), true);
    struct release_hold {
      KeyedBatcher& owner;
      key_queue& queue;
      ~release_hold() { owner.drop_holds(queue, 1); }
    } on_exit{*this, queue};
    return submit(queue.batcher);
  }

  /// The queue of `key` with a hold on it, made if it has none and `make`; null if none (and not
  /// `make`). Throws `batcher_closed` for a new key after shutdown began.
  template <class K> key_queue* hold_queue(const K& key, bool make) {
    shard& home = shards_[shard_of(detail::key_hash{}(key))];
    std::lock_guard lock(home.mutex);
    auto found = home.queues.find(key);
    key_queue* queue = nullptr;
    if (found != home.queues.end()) {
      queue = found->second;
    } else {
      if (!make) return nullptr;
      if (home.closed)
        throw batcher_closed("microbatch::KeyedBatcher: the batcher is shut down; no new jobs are accepted");
      auto made = std::make_unique<key_queue>(*this, stored_key(key), home);
      home.queues.emplace(stored_key(key), made.get());
      queue = made.release();
      active_keys_.fetch_add(1, std::memory_order_release);
      std::lock_guard live(live_mutex_);
      ++live_queues_;
    }
    queue->holds.fetch_add(1, std::memory_order_relaxed);
    return queue;
  }

  /// Every key's queue, each with a hold on it.
  std::vector<key_queue*> hold_every_queue() {
    std::vector<key_queue*> held;
    for (shard& each : shards_) {
      std::lock_guard lock(each.mutex);
      for (auto& [key, queue] : each.queues) {
        queue->holds.fetch_add(1, std::memory_order_relaxed);
        held.push_back(queue);
      }
    }
    return held;
  }

  static std::size_t shard_of(std::size_t hash) noexcept {
    return (hash ^ (hash >> 17) ^ (hash >> 31)) % shard_count; // some hashes (integers) are the identity
  }

  /// Drops `count` holds on `queue`. The holds that do not bring it to 0 go without a lock; the one that
  /// may, goes under the key's shard mutex, where a new hold is also taken: so the queue is retired
  /// exactly when its last hold goes, and never while anyone may still take one.
  void drop_holds(key_queue& queue, std::size_t count) noexcept {
    if (count == 0) return;
    std::size_t now = queue.holds.load(std::memory_order_relaxed);
    while (now > count) {
      if (queue.holds.compare_exchange_weak(now, now - count, std::memory_order_acq_rel)) return;
    }
    std::lock_guard lock(queue.home.mutex);
    if (queue.holds.fetch_sub(count, std::memory_order_acq_rel) != count || queue.retired) return;
    queue.retired = true;
    auto& queues = queue.home.queues;
    queues.erase(queues.find(queue.batcher.processor_.key));
    if (queues.empty()) {
      queues = {}; // gives the buckets back: memory follows the keys active now, not the most ever seen
    } else if (queues.bucket_count() > 64 && queues.size() * 8 < queues.bucket_count()) {
      queues.rehash(0);
    }
    pool_->retire(queue.batcher.pool_link_); // destroy() comes once no pool thread is inside it
  }

  /// A pool thread may run a batch of `queue` if fewer than `max_concurrent_batches` of ours run. On a
  /// private pool its size is that bound already; on a shared one the queues refused wait here (each
  /// with a hold) until a slot is free.
  bool take_slot(key_queue& queue) noexcept {
    if (!options_.batching.workers) return true;
    std::lock_guard lock(slots_mutex_);
    if (running_batches_ < options_.batching.max_concurrent_batches) {
      ++running_batches_;
      return true;
    }
    queue.holds.fetch_add(1, std::memory_order_relaxed); // dropped when it is readied again
    refused_.push_back(&queue);
    return false;
  }

  /// A batch `take_slot` allowed is over: every refused queue is readied again (one may take the slot).
  void give_slot() noexcept {
    if (!options_.batching.workers) return;
    std::vector<key_queue*> again;
    {
      std::lock_guard lock(slots_mutex_);
      --running_batches_;
      again.swap(refused_);
    }
    for (key_queue* queue : again) {
      pool_->batch_ready(queue->batcher.pool_link_);
      drop_holds(*queue, 1);
    }
  }

  /// (the pool's clock thread) A retired queue is left by every pool thread: free it.
  void destroy_queue(key_queue* queue) noexcept {
    {
      std::lock_guard lock(queue->home.mutex); // the thread that retired it has let go of the shard
    }
    delete queue;
    active_keys_.fetch_sub(1, std::memory_order_release); // after the free: 0 means the memory is back
    std::lock_guard lock(live_mutex_); // notified under the lock: shutdown may destroy us once it is released
    if (--live_queues_ == 0) all_freed_.notify_all();
  }

  /// After a batch of `key` that reached the processor: `KeyedOptions::on_batch`, else
  /// `Options::on_batch`. (The counters have it from the queue.)
  void observe(const Key& key, const BatchInfo& info) noexcept {
    parts_.counts.processed(info);
    if (!options_.on_batch && !options_.batching.on_batch) return;
    try {
      if (options_.on_batch) {
        options_.on_batch(key, info);
      } else {
        options_.batching.on_batch(info);
      }
    } catch (...) {
      parts_.counts.observer_threw();
    }
  }

  Processor processor_;
  std::function<Key(const Job&)> batch_key_;
  const KeyedOptions<Key> options_;
  const bool correlated_ = false; // set by the constructor: IDs, or positional
  const bool coalesce_ = options_.batching.duplicate_ids == DuplicateIds::coalesce;
  const std::size_t max_pending_per_key_ = options_.max_pending_jobs_per_key;
  const std::shared_ptr<WorkerPool> pool_ =
      options_.batching.workers ? options_.batching.workers
                                : std::make_shared<WorkerPool>(options_.batching.max_concurrent_batches);
  const Options per_key_options_ = per_key(options_.batching);
  detail::batcher_parts<Job, Result> parts_{options_.batching.max_pending_jobs, options_.batching.overflow};
  keyed_host host_{*this};
  alignas(64) std::atomic<std::uint64_t> submitted_{0}; // jobs accepted (Stats::jobs_submitted)
  alignas(64) std::atomic<std::size_t> active_keys_{0};
  std::array<shard, shard_count> shards_;
  std::mutex slots_mutex_;
  std::size_t running_batches_ = 0; // guarded by slots_mutex_: on a shared pool, batches of ours running
  std::vector<key_queue*> refused_; // guarded by slots_mutex_: queues a full cap turned away, held
  std::mutex live_mutex_;
  std::condition_variable all_freed_;
  std::size_t live_queues_ = 0; // guarded by live_mutex_: made and not yet freed
};

// Deduces Key, Job and Result from member pointers: `KeyedBatcher b(process, &Event::tenant, &Event::id,
// &Stored::id);`, whatever the processor is.
template <class Processor, class Job, class KeyMember, class JobKey, class Result, class ResultKey>
KeyedBatcher(Processor, KeyMember Job::*, JobKey Job::*, ResultKey Result::*)
    -> KeyedBatcher<KeyMember, Job, Result, Processor>;
template <class Processor, class Job, class KeyMember, class JobKey, class Result, class ResultKey>
KeyedBatcher(Processor, KeyMember Job::*, JobKey Job::*, ResultKey Result::*, KeyedOptions<KeyMember>)
    -> KeyedBatcher<KeyMember, Job, Result, Processor>;

// Otherwise from the processor's signature (a function, a non-generic lambda, a reference_wrapper).
template <class Processor, class BatchKey>
KeyedBatcher(Processor, BatchKey) -> KeyedBatcher<detail::keyed_key_t<Processor>, detail::keyed_job_t<Processor>,
                                                  detail::keyed_result_t<Processor>, Processor>;
template <class Processor, class BatchKey>
KeyedBatcher(Processor, BatchKey, KeyedOptions<detail::keyed_key_t<Processor>>)
    -> KeyedBatcher<detail::keyed_key_t<Processor>, detail::keyed_job_t<Processor>, detail::keyed_result_t<Processor>,
                    Processor>;
template <class Processor, class BatchKey, class JobId, class ResultId>
KeyedBatcher(Processor, BatchKey, JobId, ResultId)
    -> KeyedBatcher<detail::keyed_key_t<Processor>, detail::keyed_job_t<Processor>, detail::keyed_result_t<Processor>,
                    Processor>;
template <class Processor, class BatchKey, class JobId, class ResultId>
KeyedBatcher(Processor, BatchKey, JobId, ResultId, KeyedOptions<detail::keyed_key_t<Processor>>)
    -> KeyedBatcher<detail::keyed_key_t<Processor>, detail::keyed_job_t<Processor>, detail::keyed_result_t<Processor>,
                    Processor>;

} // namespace microbatch
