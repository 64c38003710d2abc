// microbatch::detail::batch_forming: where jobs wait to become a batch, and when a batch is full or due.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>

#include "batch_queue.hpp"
#include "inbox.hpp"

namespace microbatch::detail {

/// Why a batch was dispatched.
enum class dispatch_reason { size, delay, flush };

/// The forming batch. Submitters leave jobs in a lock-free inbox (one compare-exchange) and count them
/// (one fetch-add; a job with a deadline one more, see `deadline_pushes`); nothing else happens per
/// job. The submitter whose job makes the forming batch
/// reach `max_batch_size` is told so by `count_arrival` and runs a forming pass itself, on its own
/// thread (`take_arrivals` under `mutex()`): it moves the inbox into the forming batch and hands out
/// every full batch. The collector runs the same pass for the delay, deadlines, flush and shutdown.
/// So a full batch never waits for another thread to notice it: the thread that filled it dispatches.
///
/// The one place that decides "full" and "due": a later policy (weights, dispatch-when-idle) plugs in
/// here. The limits may change while jobs flow (`set_limits`, mutex held); the waiting jobs are judged
/// by the new ones at once. Members marked "(mutex held)" need `mutex()`; the others are lock-free and
/// thread-safe.
///
/// How "full" reaches the right submitter without a lock: every pass stores `fill_at_`, the arrival
/// count at which the forming batch will be full, then looks at the count once more. A submitter
/// whose count reaches `fill_at_` claims the pass by exchanging it for `never` (so one submitter per
/// batch goes to the lock). Either the pass sees the count (and goes round again), or the submitter
/// sees the threshold: the crossing is never missed.
template <class Node> class batch_forming {
public:
  using time_point = std::chrono::steady_clock::time_point;
  using push_result = typename inbox<Node>::push_result;

  /// `max_batch_weight` 0: no weight limit. `weighed`: jobs carry weights (the processor has `weight`),
  /// which are then tracked whatever the limit, so that a limit set later finds the counts right.
  batch_forming(std::size_t max_batch_size, std::chrono::nanoseconds max_batch_delay, std::size_t max_batch_weight = 0,
                bool weighed = false)
      : weighed_(weighed || max_batch_weight != 0), max_size_(max_batch_size), delay_(max_batch_delay),
        max_weight_(max_batch_weight) {
    fill_at_.store(max_size_ == 0 ? never : max_size_, std::memory_order_relaxed);
    weight_fill_at_.store(max_batch_weight == 0 ? never : max_batch_weight, std::memory_order_relaxed);
  }

  /// The current `max_batch_delay` and `max_batch_weight`. Lock-free.
  [[nodiscard]] std::chrono::nanoseconds delay() const noexcept { return delay_.load(std::memory_order_acquire); }
  [[nodiscard]] std::size_t max_weight() const noexcept { return max_weight_.load(std::memory_order_acquire); }

  /// (mutex held) New limits. The forming batch is judged by them at once: `full(job_list)` gets each
  /// batch that is full now (as in `take_arrivals`, which the caller runs next to re-arm the
  /// thresholds); the jobs left keep the forming batch's start. Needs `weighed` for a weight limit.
  template <class Full>
  void set_limits(std::size_t max_batch_size, std::chrono::nanoseconds max_batch_delay, std::size_t max_batch_weight,
                  Full&& full) {
    max_size_ = max_batch_size;
    delay_.store(max_batch_delay, std::memory_order_release);
    max_weight_.store(weighed_ ? max_batch_weight : 0, std::memory_order_release);
    job_list<Node> waiting = forming_;
    const time_point started = start_;
    forming_ = {};
    forming_weight_ = 0;
    for (Node* next = waiting.first; next != nullptr;) {
      Node* job = next;
      next = job->next; // before `full`: a worker may end the job at once
      add(job, started, full);
    }
  }
  batch_forming(const batch_forming&) = delete;
  batch_forming& operator=(const batch_forming&) = delete;

  /// Publishes `job`; `stamp(job)` runs first when it is the first job into an empty inbox (the
  /// batcher records its arrival time there). Fails only after `close`. Lock-free.
  template <class Stamp> push_result push(Node* job, Stamp&& stamp) noexcept {
    const bool has_deadline = job->deadline != time_point::max(); // after the push `job` may be gone
    const push_result pushed = inbox_.push(job, std::forward<Stamp>(stamp));
    if (has_deadline && pushed != push_result::closed) deadline_pushes_.fetch_add(1, std::memory_order_seq_cst);
    return pushed;
  }

  /// Jobs with a deadline published so far, each counted after its push and before its submitter
  /// reads the collector's plan. The collector reads it before a round takes the inbox: if it is the
  /// same after the round published its plan, no job left in the inbox can have a deadline that its
  /// submitter judged by an older plan (see the collector). Lock-free.
  [[nodiscard]] std::uint64_t deadline_pushes() const noexcept {
    return deadline_pushes_.load(std::memory_order_seq_cst);
  }

  /// Counts a published job (of `weight`, with a weight limit). True if this arrival fills the forming
  /// batch, by count or by weight: the caller must run a forming pass (`take_arrivals`). Lock-free.
  bool count_arrival(std::size_t weight = 1) noexcept {
    const std::uint64_t count = arrivals_.fetch_add(1, std::memory_order_seq_cst) + 1;
    const bool full = count >= fill_at_.load(std::memory_order_seq_cst) &&
                      fill_at_.exchange(never, std::memory_order_seq_cst) != never;
    if (weighed_) [[unlikely]]
      return count_weight(weight) || full;
    return full;
  }

  /// Jobs counted so far. Lock-free.
  [[nodiscard]] std::uint64_t arrivals() const noexcept { return arrivals_.load(std::memory_order_acquire); }

  /// True if nothing waits in the inbox. Sequentially consistent with `push` (the collector's "publish
  /// the plan, then look once more"). Lock-free.
  [[nodiscard]] bool inbox_empty() const noexcept { return inbox_.empty(); }

  std::mutex& mutex() noexcept { return mutex_; }

  /// (mutex held) Moves every published job into the forming batch, in arrival order, and calls
  /// `full(job_list)` for each batch that reaches `max_batch_size` (its `trigger`: `Trigger::size`) or
  /// `max_batch_weight` (`Trigger::weight`; a job that would take the batch over the weight limit first
  /// closes it and then starts the next one); then re-arms the fill thresholds,
  /// going round again if a submitter crossed it meanwhile. With `closing`, later pushes fail. Jobs
  /// that were first into an empty inbox carry their arrival time; a forming batch starts at its first
  /// job's (or at `now` for jobs left over from a full batch).
  template <class Full> void take_arrivals(time_point now, Full&& full, bool closing = false) {
    do {
      Node* arrived = closing ? inbox_.close() : inbox_.take_all();
      while (arrived != nullptr) {
        Node* job = arrived;
        arrived = job->next; // before `full`: a worker may end the job at once
        ++taken_;
        if (weighed_) weight_taken_ += job->weight;
        earliest_deadline_ = std::min(earliest_deadline_, job->deadline);
        add(job, job->arrival != time_point::min() ? job->arrival : now, full);
      }
    } while (rearm());
  }

  /// (mutex held) Jobs taken from the inbox, ever (after `close`: every job ever published).
  [[nodiscard]] std::uint64_t taken() const noexcept { return taken_; }

  /// (mutex held) Jobs in the forming batch.
  [[nodiscard]] std::size_t size() const noexcept { return forming_.size; }
  [[nodiscard]] bool empty() const noexcept { return forming_.empty(); }

  /// (mutex held) True if the forming batch holds `job` and only jobs whose end runs no user code
  /// (`ends_by_signal`: blocking callers). Walks the batch.
  [[nodiscard]] bool holds_only_signalled(const Node* job) const noexcept {
    bool found = false;
    for (const Node* each = forming_.first; each != nullptr; each = each->next) {
      if (!each->ends_by_signal) return false;
      found = found || each == job;
    }
    return found;
  }

  /// (mutex held) When the forming batch is due by `max_batch_delay`, or `time_point::max()` (empty,
  /// or no delay).
  [[nodiscard]] time_point due() const noexcept {
    const std::chrono::nanoseconds delay = delay_.load(std::memory_order_relaxed);
    if (forming_.empty() || delay.count() == 0) return time_point::max();
    return delay >= time_point::max() - start_ ? time_point::max() : start_ + delay;
  }

  /// (mutex held) Takes the whole forming batch, leaving it empty. Call `take_arrivals` before
  /// unlocking: it re-arms the fill threshold for the next batch.
  job_list<Node> cut(Trigger why = Trigger::size) noexcept {
    job_list<Node> batch = forming_;
    batch.trigger = why;
    forming_ = {};
    forming_weight_ = 0;
    if (batch.first != nullptr) batch.first->arrival = start_; // the batch's start travels with it
    return batch;
  }

  /// (mutex held) A lower bound on the deadlines of every job taken and not yet known to have left the
  /// batcher (in the forming batch or queued for a worker). `set_earliest_deadline` replaces it after
  /// a scan of both.
  [[nodiscard]] time_point earliest_deadline() const noexcept { return earliest_deadline_; }
  void set_earliest_deadline(time_point deadline) noexcept { earliest_deadline_ = deadline; }

  /// (mutex held) Unlinks the forming batch's jobs for which `leaves(job)` is true into `removed`.
  /// Call `take_arrivals` before unlocking (it re-arms the fill threshold).
  template <class Leaves> void remove_if(Leaves&& leaves, job_list<Node>& removed) {
    forming_.remove_if(std::forward<Leaves>(leaves), removed);
    forming_weight_ = 0;
    forming_.for_each([&](Node* job) { forming_weight_ += job->weight; });
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  static constexpr std::uint64_t never = std::numeric_limits<std::uint64_t>::max();

  /// `count_arrival`'s weight half: true if `weight` more fills the forming batch by weight. Out of
  /// line, so that the count alone (every job's path) stays small enough to inline.
  [[gnu::noinline]] bool count_weight(std::size_t weight) noexcept {
    const std::uint64_t total = weight_arrived_.fetch_add(weight, std::memory_order_seq_cst) + weight;
    return total >= weight_fill_at_.load(std::memory_order_seq_cst) &&
           weight_fill_at_.exchange(never, std::memory_order_seq_cst) != never;
  }

  /// (mutex held) Appends `job` to the forming batch, cutting batches that the limits say are full: a
  /// job that would take the batch over the weight limit closes it first. `start`: the forming batch's
  /// start, if `job` opens it.
  template <class Full> void add(Node* job, time_point start, Full& full) {
    const std::size_t max_weight = max_weight_.load(std::memory_order_relaxed);
    if (max_weight != 0 && !forming_.empty() && forming_weight_ + job->weight > max_weight) full(cut(Trigger::weight));
    if (forming_.empty()) start_ = start;
    forming_.push_back(job);
    forming_weight_ += job->weight;
    if (max_weight != 0 && forming_weight_ >= max_weight) {
      full(cut(Trigger::weight));
    } else if (max_size_ != 0 && forming_.size >= max_size_) {
      full(cut(Trigger::size));
    }
  }

  /// (mutex held) Stores the arrival count at which the forming batch will be full; true if that count
  /// was already reached (the jobs are in the inbox: take them now). A submitter may have seen the same
  /// crossing and be waiting for the lock: its pass then finds nothing to do.
  bool rearm() noexcept {
    bool again = false;
    if (max_size_ != 0) {
      const std::uint64_t fill_at = taken_ + (max_size_ - forming_.size);
      fill_at_.store(fill_at, std::memory_order_seq_cst);
      again = arrivals_.load(std::memory_order_seq_cst) >= fill_at;
    } else {
      fill_at_.store(never, std::memory_order_seq_cst);
    }
    const std::size_t max_weight = max_weight_.load(std::memory_order_relaxed);
    if (max_weight != 0) { // forming_weight_ < max_weight here: a batch that reached it was cut
      const std::uint64_t fill_at = weight_taken_ + (max_weight - forming_weight_);
      weight_fill_at_.store(fill_at, std::memory_order_seq_cst);
      again = weight_arrived_.load(std::memory_order_seq_cst) >= fill_at || again;
    } else {
      weight_fill_at_.store(never, std::memory_order_seq_cst);
    }
    return again;
  }

  const bool weighed_;                          // jobs carry weights: weight_arrived_ and weight_taken_ count
  std::size_t max_size_;                        // guarded by mutex_
  std::atomic<std::chrono::nanoseconds> delay_; // written under mutex_, read anywhere
  std::atomic<std::size_t> max_weight_;         // written under mutex_, read anywhere (weigh: the job limit)

  inbox<Node> inbox_;
  alignas(64) std::atomic<std::uint64_t> arrivals_{0};        // jobs published and counted, ever
  alignas(64) std::atomic<std::uint64_t> fill_at_{0};         // arrivals_ value that fills the forming batch
  alignas(64) std::atomic<std::uint64_t> weight_arrived_{0};  // with a weight limit: weight counted, ever
  std::atomic<std::uint64_t> weight_fill_at_{never};          // weight_arrived_ value that fills it
  alignas(64) std::atomic<std::uint64_t> deadline_pushes_{0}; // jobs with a deadline published, ever

  std::mutex mutex_;
  job_list<Node> forming_;                           // guarded by mutex_
  time_point start_{};                               // guarded by mutex_; the forming batch's first arrival
  time_point earliest_deadline_ = time_point::max(); // guarded by mutex_
  std::uint64_t taken_ = 0;                          // guarded by mutex_; jobs moved out of the inbox, ever
  std::uint64_t weight_taken_ = 0;                   // guarded by mutex_; their weight (when weighed_)
  std::uint64_t forming_weight_ = 0;                 // guarded by mutex_; the forming batch's weight
};

} // namespace microbatch::detail
