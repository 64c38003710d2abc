// Shared by the test files: job types, processors and a gate that holds a processor inside a batch.
#pragma once

#include <microbatch/microbatch.hpp>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <exception>
#include <future>
#include <mutex>
#include <semaphore>
#include <span>
#include <thread>
#include <vector>

namespace test {

using namespace std::chrono_literals;

struct Job {
  std::uint64_t id = 0;
  int value = 0;
};
struct Result {
  std::uint64_t id = 0;
  int value = 0;
};

/// Records the IDs of every batch the processor saw. Thread-safe.
class batch_log {
public:
  void record(std::span<const Job> jobs) {
    std::vector<std::uint64_t> ids;
    for (const Job& job : jobs)
      ids.push_back(job.id);
    std::lock_guard lock(mutex_);
    batches_.push_back(std::move(ids));
  }
  std::vector<std::vector<std::uint64_t>> batches() const {
    std::lock_guard lock(mutex_);
    return batches_;
  }
  std::vector<std::size_t> sizes() const {
    std::vector<std::size_t> result;
    for (const auto& b : batches())
      result.push_back(b.size());
    return result;
  }
  bool saw(std::uint64_t id) const {
    for (const auto& b : batches())
      for (auto seen : b)
        if (seen == id) return true;
    return false;
  }

private:
  mutable std::mutex mutex_;
  std::vector<std::vector<std::uint64_t>> batches_;
};

/// Answers every job with {id, 2 * value}.
inline std::vector<Result> doubled(std::span<Job> jobs) {
  std::vector<Result> results;
  results.reserve(jobs.size());
  for (const Job& job : jobs)
    results.push_back({job.id, 2 * job.value});
  return results;
}

/// Holds processors inside their batch until `open()`. `await_entered(n)` returns once n batches
/// have entered. Thread-safe.
class gate {
public:
  void enter() {
    entered_.release();
    opened_.wait();
  }
  void await_entered(int batches = 1) {
    for (int i = 0; i < batches; ++i)
      entered_.acquire();
  }
  void open() { open_promise_.set_value(); }

private:
  std::counting_semaphore<> entered_{0};
  std::promise<void> open_promise_;
  std::shared_future<void> opened_ = open_promise_.get_future().share();
};

/// A processor that records each batch in `log`, then answers like `doubled`.
inline auto logged(batch_log& log) {
  return [&log](std::span<Job> jobs) {
    log.record(jobs);
    return doubled(jobs);
  };
}

/// A processor that waits at `held` inside every batch, then answers like `doubled`.
inline auto gated(gate& held) {
  return [&held](std::span<Job> jobs) {
    held.enter();
    return doubled(jobs);
  };
}

/// Both: records the batch in `log`, then waits at `held`, then answers like `doubled`.
inline auto logged_and_gated(batch_log& log, gate& held) {
  return [&log, &held](std::span<Job> jobs) {
    log.record(jobs);
    held.enter();
    return doubled(jobs);
  };
}

/// A processor whose jobs weigh their `value` (think: bytes of a payload); records each batch in `log`.
struct weighing_processor {
  batch_log* log;
  std::vector<Result> operator()(std::span<Job> jobs) const {
    log->record(jobs);
    return doubled(jobs);
  }
  std::size_t weight(const Job& job) const { return std::size_t(job.value); }
};

/// The smallest coroutine type: starts at once, runs to its end, frees its own frame.
struct detached {
  struct promise_type {
    detached get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
};

template <class T> bool is_ready(const std::future<T>& future) {
  return future.wait_for(0s) == std::future_status::ready;
}

} // namespace test
