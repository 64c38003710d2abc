// microbatch::detail::batch_runner: runs one batch on a worker thread, from its jobs to their ends.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../options.hpp"
#include "batch_queue.hpp"
#include "correlation.hpp"
#include "counters.hpp"
#include "job_node.hpp"

namespace microbatch::detail {

/// What a runner needs from its batcher: the processor, the time, and the one place where a job ends.
/// Implemented by `Batcher`; called only from the worker thread that runs the batch.
template <class Job, class Result> class runner_host {
public:
  using node_type = job_node<Job, Result>;
  using time_point = std::chrono::steady_clock::time_point;

  [[nodiscard]] virtual time_point now() const noexcept = 0;
  virtual std::vector<Result> call_processor(std::span<Job> jobs) = 0;
  virtual void end_job(node_type* job, Result&& value) noexcept = 0;
  /// The cheaper way for a whole batch: `count_completed(n)` once for n jobs the runner claimed
  /// (`job_node::try_claim`), then `finish_claimed` for each of them.
  virtual void count_completed(std::uint64_t jobs) noexcept = 0;
  virtual void finish_claimed(node_type* job, Result&& value) noexcept = 0;
  virtual void end_job(node_type* job, std::exception_ptr error, failure cause) noexcept = 0;
  virtual void count_uncorrelated(std::uint64_t results) noexcept = 0;
  virtual void count_coalesced(std::uint64_t jobs) noexcept = 0;
  /// `Options::duplicate_ids == DuplicateIds::coalesce` now (it may change between batches).
  [[nodiscard]] virtual bool coalesce_duplicates() const noexcept = 0;
  /// After every job of a batch that reached the processor has ended.
  virtual void batch_ran(const BatchInfo& info) noexcept = 0;

protected:
  ~runner_host() = default;
};

/// Runs a batch: drops jobs cancelled or expired while queued, admits the others (the correlation
/// policy rejects duplicate IDs), calls the processor once, and ends every admitted job with its
/// result or an error. One per worker thread, so its buffers (reused from batch to batch: no allocation
/// in steady state) need no lock. The ID extractors' types are erased behind `run`: one virtual call
/// per batch, never per job.
template <class Job, class Result> class batch_runner {
public:
  using node_type = job_node<Job, Result>;
  virtual ~batch_runner() = default;
  virtual void run(job_list<node_type>& batch) = 0;
};

/// Makes runners and keeps the spare ones that callers borrowed to run a batch themselves
/// (`Options::dispatch_when_idle`): a worker owns its runner for life; a caller takes one here and gives
/// it back, so there are never more runners than processor slots ever used at once. Thread-safe.
template <class Job, class Result> class runner_pool {
public:
  using runner = batch_runner<Job, Result>;

  void set_factory(std::function<std::unique_ptr<runner>()> make) { make_ = std::move(make); }

  /// A new runner; throws what the factory throws.
  [[nodiscard]] std::unique_ptr<runner> make() const { return make_(); }

  /// A spare runner, or a new one; null if none could be made (out of memory: the caller fails its batch).
  std::unique_ptr<runner> take() noexcept {
    {
      std::lock_guard lock(mutex_);
      if (!spare_.empty()) {
        std::unique_ptr<runner> taken = std::move(spare_.back());
        spare_.pop_back();
        return taken;
      }
    }
    try {
      return make_();
    } catch (...) {
      return nullptr;
    }
  }

  void give_back(std::unique_ptr<runner> returned) noexcept {
    std::lock_guard lock(mutex_);
    try {
      spare_.push_back(std::move(returned));
    } catch (...) { // out of memory: the runner is destroyed here, and a new one made next time
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  std::function<std::unique_ptr<runner>()> make_; // set once, before any thread starts
  std::mutex mutex_;
  std::vector<std::unique_ptr<runner>> spare_; // guarded by mutex_
};

template <class Job, class Result, class Correlation>
class correlating_runner final : public batch_runner<Job, Result> {
public:
  using node_type = job_node<Job, Result>;

  /// `can_coalesce` (IDs and a copyable Result): while the host says `coalesce_duplicates`, a job whose
  /// ID equals an earlier job's in the batch shares that job's slot (it ends with a copy of its result,
  /// or its error) instead of failing with `duplicate_id`. Read once per batch.
  correlating_runner(runner_host<Job, Result>& host, Correlation correlation, bool can_coalesce = false)
      : host_(host), correlation_(std::move(correlation)), can_coalesce_(can_coalesce) {}

  void run(job_list<node_type>& offered) override {
    coalesce_ = can_coalesce_ && host_.coalesce_duplicates();
    // The time is read for the first job that has a deadline: a batch without deadlines pays no
    // clock read for them (24-28 ns on the test VM, more than admitting a job costs there).
    std::optional<time_point> now_time;
    // The batch's start is its oldest job's arrival, read before any job can end (and be freed).
    const time_point first_arrival = offered.first != nullptr ? offered.first->arrival : time_point::min();
    failed_ = 0;
    admitted_weight_ = 0;
    jobs_.clear();
    admitted_.clear();
    positions_.clear();
    followers_.clear();
    first_follower_.clear();
    try { // every buffer sized up front: nothing below allocates but the error messages
      correlation_.begin(offered.size);
      jobs_.reserve(offered.size);
      admitted_.reserve(offered.size);
      positions_.reserve(offered.size);
      answered_.reserve(offered.size);
      claimed_.reserve(offered.size);
      matched_.reserve(offered.size);
      if (coalesce_) {
        followers_.reserve(offered.size);
        first_follower_.reserve(offered.size);
      }
    } catch (...) { // out of memory: the batch fails, the batcher goes on
      std::exception_ptr error = std::current_exception();
      offered.for_each([&](node_type* job) { host_.end_job(job, error, failure::other); });
      release_error(error);
      return;
    }
    std::size_t position = 0; // of the job in its batch as dispatched, for error messages
    for (node_type* next = offered.first; next != nullptr; ++position) {
      node_type* job = next;
      next = job->next;     // before the job can end
      if (job->claimed()) { // cancelled while queued
        ++failed_;
        job->abandon();
        continue;
      }
      if (job->deadline != time_point::max()) {
        if (!now_time) now_time = host_.now();
        if (job->deadline <= *now_time) {
          fail(job, expired_error(), failure::expired);
          continue;
        }
      }
      admit(job, position);
    }
    if (admitted_.empty()) return;
    if (!followers_.empty()) host_.count_coalesced(followers_.size()); // before any of them ends

    std::vector<Result> results;
    std::exception_ptr processor_error;
    const auto called = host_.now();
    const auto started = first_arrival != time_point::min() ? first_arrival : called;
    try {
      results = host_.call_processor(std::span<Job>(jobs_));
    } catch (...) {
      processor_error = std::current_exception();
    } // the handler's own reference ends here, before the exception is shared
    const auto returned = host_.now();
    const std::size_t processed = jobs_.size();
    jobs_.clear();
    if (processor_error) {
      for (std::size_t index = 0; index < admitted_.size(); ++index)
        fail_admitted(index, processor_error);
      release_error(processor_error);
    } else {
      correlate(results);
    }
    host_.batch_ran(BatchInfo{offered.trigger, processed, admitted_weight_, failed_,
                              std::chrono::duration_cast<std::chrono::nanoseconds>(called - started),
                              std::chrono::duration_cast<std::chrono::nanoseconds>(returned - called)});
  }

private:
  using time_point = typename runner_host<Job, Result>::time_point;

  void fail(node_type* job, std::exception_ptr error, failure cause) {
    ++failed_;
    host_.end_job(job, std::move(error), cause);
  }

  void admit(node_type* job, std::size_t position) {
    try {
      jobs_.push_back(std::move(job->job));
    } catch (...) { // Job's move constructor threw
      fail(job, std::current_exception(), failure::other);
      return;
    }
    std::size_t earlier = no_match;
    try {
      earlier = correlation_.admit(jobs_.back());
    } catch (...) { // the job ID extractor threw: only this job fails
      jobs_.pop_back();
      fail(job, std::current_exception(), failure::other);
      return;
    }
    if (earlier != no_match) {
      jobs_.pop_back();
      if (coalesce_) { // shares the earlier job's slot: ends with its outcome
        followers_.push_back({job, first_follower_[earlier]});
        first_follower_[earlier] = followers_.size() - 1;
        return;
      }
      fail(job, make_error<duplicate_id>([&] {
             return "microbatch: the job at position " + std::to_string(position) + " of its batch" +
                    correlation_.describe_id(earlier) + " has the same ID as the earlier job at position " +
                    std::to_string(position_of(earlier)) + "; it was not processed";
           }),
           failure::other);
      return;
    }
    admitted_.push_back(job);
    note_position(position);
    admitted_weight_ += job->weight;
    if (coalesce_) first_follower_.push_back(no_match);
  }

  /// Records the position of the job just admitted, for error messages. While no job of the batch
  /// was left out (cancelled, expired, failed, a duplicate), positions equal admitted indexes and
  /// nothing is recorded (capacity reserved in run(): no allocation).
  void note_position(std::size_t position) {
    const std::size_t index = admitted_.size() - 1;
    if (positions_.empty()) {
      if (position == index) return;
      for (std::size_t earlier = 0; earlier < index; ++earlier)
        positions_.push_back(earlier);
    }
    positions_.push_back(position);
  }

  [[nodiscard]] std::size_t position_of(std::size_t index) const noexcept {
    return positions_.empty() ? index : positions_[index];
  }

  /// Ends admitted job `index` with `value`, after giving each job that shares its slot a copy. The
  /// admitted job itself was claimed and counted already (`claimed`), or was cancelled meanwhile.
  void succeed(std::size_t index, Result&& value, bool claimed) {
    if constexpr (std::is_copy_constructible_v<Result>) {
      for (std::size_t k = follower_of(index); k != no_match; k = followers_[k].next) {
        try {
          host_.end_job(followers_[k].job, Result(std::as_const(value)));
        } catch (...) { // Result's copy constructor threw: only this follower fails
          fail(followers_[k].job, std::current_exception(), failure::other);
        }
      }
    }
    if (claimed) host_.finish_claimed(admitted_[index], std::move(value));
  }

  /// Fails admitted job `index`, and every job that shares its slot, with `error`.
  void fail_admitted(std::size_t index, const std::exception_ptr& error) {
    for (std::size_t k = follower_of(index); k != no_match; k = followers_[k].next)
      fail(followers_[k].job, error, failure::other);
    fail(admitted_[index], error, failure::other);
  }

  [[nodiscard]] std::size_t follower_of(std::size_t index) const noexcept {
    return coalesce_ ? first_follower_[index] : no_match;
  }

  /// Matches results to admitted jobs, then ends them: the jobs that get a result are claimed and
  /// counted together (one atomic add per batch, not per job) before any of them is finished.
  void correlate(std::vector<Result>& results) {
    // Most processors answer in the jobs' order (result i answers admitted job i): then the batch
    // ends without the bookkeeping below. Each result's ID is read once either way: the results
    // matched in order, and the first one out of order, are not matched again.
    const in_order_prefix prefix = match_in_order(results);
    if (prefix.length == admitted_.size() && prefix.length == results.size()) {
      finish_in_order(results);
      return;
    }
    answered_.assign(admitted_.size(), false); // capacity reserved in run(): no allocation
    matched_.clear();
    try {
      matched_.reserve(results.size()); // more results than jobs is allowed (the extra ones are dropped)
    } catch (...) {                     // out of memory: the batch fails, the batcher goes on
      std::exception_ptr error = std::current_exception();
      for (std::size_t index = 0; index < admitted_.size(); ++index)
        fail_admitted(index, error);
      release_error(error);
      return;
    }
    for (std::size_t position = 0; position < prefix.length; ++position) {
      answered_[position] = true;
      matched_.push_back(position);
    }
    std::uint64_t uncorrelated = 0;
    for (std::size_t position = prefix.length; position < results.size(); ++position) {
      const std::size_t index = position == prefix.length
                                    ? prefix.next_match
                                    : correlation_.match(results[position], position, admitted_.size());
      if (index == no_match || answered_[index]) {
        ++uncorrelated;
        matched_.push_back(no_match);
        continue;
      }
      answered_[index] = true;
      matched_.push_back(index);
    }
    claimed_.assign(admitted_.size(), false);
    std::uint64_t completed = 0;
    for (const std::size_t index : matched_) {
      if (index == no_match) continue;
      if (admitted_[index]->try_claim()) {
        claimed_[index] = true;
        ++completed;
      } else {
        admitted_[index]->abandon(); // its caller cancelled it meanwhile: only the result is dropped
      }
    }
    if (completed != 0) host_.count_completed(completed);
    for (std::size_t position = 0; position < results.size(); ++position) {
      const std::size_t index = matched_[position];
      if (index != no_match) succeed(index, std::move(results[position]), claimed_[index]);
    }
    for (std::size_t index = 0; index < admitted_.size(); ++index) {
      if (answered_[index]) continue;
      fail_admitted(index, make_error<no_result>([&] {
                      return "microbatch: the processor returned no result for the job at position " +
                             std::to_string(position_of(index)) + " of its batch" + correlation_.describe_id(index);
                    }));
    }
    if (uncorrelated != 0) host_.count_uncorrelated(uncorrelated);
  }

  struct in_order_prefix {
    std::size_t length;     // results 0..length-1 answer admitted jobs 0..length-1
    std::size_t next_match; // what result `length` (if there is one) answers: another job, or no_match
  };

  /// How many results, from the first, answer the admitted job at their own position.
  [[nodiscard]] in_order_prefix match_in_order(const std::vector<Result>& results) const noexcept {
    for (std::size_t position = 0; position < results.size(); ++position) {
      const std::size_t index = correlation_.match(results[position], position, admitted_.size());
      if (index != position) return {position, index};
    }
    return {results.size(), no_match};
  }

  /// `correlate` for results in the jobs' order: claims and counts them together, then ends each.
  void finish_in_order(std::vector<Result>& results) {
    std::uint64_t completed = 0;
    for (node_type*& job : admitted_) {
      if (job->try_claim()) {
        ++completed;
      } else {
        job->abandon(); // its caller cancelled it meanwhile: only the result is dropped
        job = nullptr;  // not to be finished; its followers (coalesce) still get their copies
      }
    }
    if (completed != 0) host_.count_completed(completed);
    for (std::size_t index = 0; index < results.size(); ++index)
      succeed(index, std::move(results[index]), admitted_[index] != nullptr);
  }

  runner_host<Job, Result>& host_;
  Correlation correlation_;
  std::vector<Job> jobs_;              // the span handed to the processor; capacity reused
  std::vector<node_type*> admitted_;   // admitted_[i] owns jobs_[i]
  std::vector<std::size_t> positions_; // positions_[i]: admitted_[i]'s position in its batch, or empty
                                       // while every position equals its index (position_of)
  std::vector<bool> answered_;
  std::vector<bool> claimed_;        // per admitted job: claimed by this runner for its result
  std::vector<std::size_t> matched_; // per result: the admitted job it answers, or no_match
  std::size_t failed_ = 0;           // jobs of the running batch that ended with an error
  std::size_t admitted_weight_ = 0;  // their total weight (1 per job without weights)
  const bool can_coalesce_;
  bool coalesce_ = false; // for the batch being run
  struct follower {
    node_type* job;
    std::size_t next; // the next follower of the same admitted job, or no_match
  };
  std::vector<follower> followers_;         // jobs sharing an admitted job's slot (coalesce)
  std::vector<std::size_t> first_follower_; // per admitted job: its first follower, or no_match
};

} // namespace microbatch::detail
