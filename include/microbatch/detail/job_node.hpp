// microbatch::detail: the job node, which carries one job from submit to its end, and its kinds.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <future>
#include <optional>
#include <utility>

#include "completion_flag.hpp"

namespace microbatch::detail {

using time_point = std::chrono::steady_clock::time_point;

/// Drops a reference to an exception object that other threads' futures share (a processor's
/// exception goes to every job of its batch). The reference count lives in the C++ runtime, which
/// ThreadSanitizer does not instrument, so it cannot see that the last owner frees the object only after
/// every other owner is done with it. Releasing through this named, never-inlined function lets
/// tests/tsan.supp suppress exactly that false report and nothing else of ours.
[[gnu::noinline]] inline void release_error(std::exception_ptr& error) noexcept { error = nullptr; }

/// One submitted job. Ownership: the submitting call creates it; from a successful push into the inbox
/// until `finish` or `abandon`, the batcher holds it (collector, then ready queue, then one worker).
/// A node ends exactly once: whoever wins `try_claim` decides the outcome. Only a cancellation (the
/// caller's stop_token) races with the batcher for that; everything else happens on the one batcher
/// thread that holds the node at the time.
template <class Job, class Result>
class job_node {
 public:
  explicit job_node(Job&& submitted) : job(std::move(submitted)) {}
  job_node(const job_node&) = delete;
  job_node& operator=(const job_node&) = delete;

  job_node* next = nullptr;             // inbox link; written before the push publishes the node
  time_point arrival = time_point::min();  // set when this job was the first into an empty inbox
  time_point deadline = time_point::max();
  Job job;

  /// True for the caller that gets to end the job. Thread-safe.
  bool try_claim() noexcept { return !claimed_.exchange(true, std::memory_order_acq_rel); }
  [[nodiscard]] bool claimed() const noexcept { return claimed_.load(std::memory_order_acquire); }

  /// Delivers the outcome and drops the batcher's hold. Call only after winning `try_claim`.
  /// Afterwards the node may be gone.
  virtual void finish(Result&& value) noexcept = 0;
  virtual void finish(std::exception_ptr error) noexcept = 0;

  /// Drops the batcher's hold on a node that someone else claimed. Afterwards it may be gone.
  virtual void abandon() noexcept {}

 protected:
  ~job_node() = default;  // never deleted through the base

 private:
  std::atomic<bool> claimed_{false};
};

/// `submit(job)`: owned by the batcher; its promise hands the outcome to the caller's future.
template <class Job, class Result>
class promise_node final : public job_node<Job, Result> {
 public:
  using job_node<Job, Result>::job_node;
  std::promise<Result> promise;

  void finish(Result&& value) noexcept override {
    try {
      promise.set_value(std::move(value));
    } catch (...) {  // Result's move constructor threw
      promise.set_exception(std::current_exception());
    }
    delete this;
  }
  void finish(std::exception_ptr error) noexcept override {
    promise.set_exception(std::move(error));
    delete this;
  }
};

/// `execute_job(job)`: lives on the caller's stack; the caller waits on `done` and owns it throughout.
template <class Job, class Result>
class waiting_node final : public job_node<Job, Result> {
 public:
  using job_node<Job, Result>::job_node;
  std::optional<Result> value;
  std::exception_ptr error;
  completion_flag done;

  void finish(Result&& result) noexcept override {
    try {
      value.emplace(std::move(result));
    } catch (...) {
      error = std::current_exception();
    }
    done.signal();  // last touch: the caller may return at once
  }
  void finish(std::exception_ptr failure) noexcept override {
    error = std::move(failure);
    done.signal();
  }

  Result take() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};

/// `execute_job(job, stop_token)`: shared by the caller and the batcher (two references), because a
/// cancelled caller returns while the batcher may still hold the node. The caller's stop callback
/// delivers `cancelled` through `deliver` without dropping the batcher's reference.
template <class Job, class Result>
class shared_waiting_node final : public job_node<Job, Result> {
 public:
  using job_node<Job, Result>::job_node;
  std::optional<Result> value;
  std::exception_ptr error;
  completion_flag done;

  void deliver(std::exception_ptr failure) noexcept {
    error = std::move(failure);
    done.signal();
  }
  void finish(Result&& result) noexcept override {
    try {
      value.emplace(std::move(result));
    } catch (...) {
      error = std::current_exception();
    }
    done.signal();
    release();
  }
  void finish(std::exception_ptr failure) noexcept override {
    deliver(std::move(failure));
    release();
  }
  void abandon() noexcept override { release(); }

  /// Drops one reference; the last one deletes the node.
  void release() noexcept {
    if (references_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

 private:
  std::atomic<int> references_{2};
};

}  // namespace microbatch::detail
