// The baseline: a micro-batcher written the way a careful engineer would write one by hand, with the
// parts of microbatch::Batcher's API that the benchmarks use (submit with a future or a callback,
// execute_job, a coroutine awaiter, stats().batches). Its design is the plain one that issue 8 measured
// against: one mutex around the forming batch; the submitter whose job fills a batch hands it straight
// to the workers' queue (no collector in between); a collector thread only times partial batches; one
// std::promise (or std::function callback, or a coroutine handle) per job; an std::unordered_map per
// batch to correlate results; worker threads that take batches from a queue under a second mutex. It is
// meant to be plain and correct, not slow: nobody is woken unless they sleep and are needed; a batch is
// two vectors (jobs, and how each job is answered) reserved once per batch and handed over whole, so
// the processor gets the jobs without a copy; a coroutine is resumed directly, not through a callback.
// (Its lean points came from an independent harness written for issue 8, whose plain batcher of this
// design beat the previous version of this one.)
#pragma once

#include <microbatch/microbatch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace baseline {

template <class Job, class Result, class Processor> class Batcher {
public:
  using Callback = std::function<void(microbatch::Outcome<Result>&&)>;

  template <class JobId, class ResultId>
  Batcher(Processor processor, JobId job_id, ResultId result_id, microbatch::Options options = {})
      : processor_(std::move(processor)), options_(options) {
    using Key = std::decay_t<std::invoke_result_t<JobId&, const Job&>>;
    process_batch_ = [this, job_id, result_id](batch& jobs) {
      const std::size_t size = jobs.jobs.size();
      std::unordered_map<Key, std::size_t> index;
      index.reserve(size);
      for (std::size_t i = 0; i < size; ++i)
        index.emplace(std::invoke(job_id, jobs.jobs[i]), i);
      std::vector<bool> answered(size, false);
      try {
        std::vector<Result> results = processor_(std::span<Job>(jobs.jobs));
        for (Result& result : results) {
          auto it = index.find(std::invoke(result_id, result));
          if (it == index.end() || answered[it->second]) continue;
          answered[it->second] = true;
          jobs.replies[it->second].succeed(std::move(result));
        }
        for (std::size_t i = 0; i < size; ++i)
          if (!answered[i]) jobs.replies[i].fail(std::make_exception_ptr(microbatch::no_result("no result")));
      } catch (...) {
        for (std::size_t i = 0; i < size; ++i)
          if (!answered[i]) jobs.replies[i].fail(std::current_exception());
      }
    };
    forming_ = fresh_batch();
    collector_ = std::thread([this] { collect(); });
    for (std::size_t i = 0; i < options_.max_concurrent_batches; ++i)
      workers_.emplace_back([this] { work(); });
  }

  ~Batcher() { shutdown(); }
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  [[nodiscard]] std::future<Result> submit(Job job) {
    std::promise<Result> promise;
    std::future<Result> future = promise.get_future();
    add(std::move(job), reply{std::move(promise)});
    return future;
  }

  void submit(Job job, Callback on_complete) { add(std::move(job), reply{std::move(on_complete)}); }

  Result execute_job(Job job) { return submit(std::move(job)).get(); }

  /// `co_await batcher.async_execute_job(job)`: resumes on the worker that finished the batch.
  struct awaiter {
    Batcher& owner;
    Job job;
    std::optional<microbatch::Outcome<Result>> outcome;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> waiting) {
      owner.add(std::move(job), reply{resumption{waiting, &outcome}}); // *this may be gone after this
    }
    Result await_resume() { return std::move(*outcome).value(); }
  };
  awaiter async_execute_job(Job job) { return awaiter{*this, std::move(job), std::nullopt}; }

  [[nodiscard]] microbatch::Stats stats() const {
    microbatch::Stats s;
    s.batches = batches_.load(std::memory_order_relaxed);
    return s;
  }

  void shutdown() {
    {
      std::lock_guard lock(mutex_);
      if (closed_) return;
      closed_ = true;
    }
    collector_cv_.notify_one();
    collector_.join();
    for (auto& worker : workers_)
      worker.join();
  }

private:
  struct resumption {
    std::coroutine_handle<> waiting;
    std::optional<microbatch::Outcome<Result>>* outcome;
  };
  struct reply {
    std::variant<std::promise<Result>, Callback, resumption> how;
    void succeed(Result&& result) {
      if (auto* promise = std::get_if<0>(&how)) return promise->set_value(std::move(result));
      if (auto* callback = std::get_if<1>(&how)) return (*callback)(microbatch::Outcome<Result>(std::move(result)));
      auto [waiting, outcome] = std::get<2>(how);
      outcome->emplace(std::move(result));
      waiting.resume();
    }
    void fail(std::exception_ptr error) {
      if (auto* promise = std::get_if<0>(&how)) return promise->set_exception(error);
      if (auto* callback = std::get_if<1>(&how)) return (*callback)(microbatch::Outcome<Result>(error));
      auto [waiting, outcome] = std::get<2>(how);
      outcome->emplace(error);
      waiting.resume();
    }
  };
  struct batch {
    std::vector<Job> jobs;
    std::vector<reply> replies; // replies[i] answers jobs[i]
  };

  batch fresh_batch() const {
    batch fresh;
    fresh.jobs.reserve(options_.max_batch_size);
    fresh.replies.reserve(options_.max_batch_size);
    return fresh;
  }

  void add(Job&& job, reply&& how) {
    batch full;
    bool wake_collector = false;
    {
      std::lock_guard lock(mutex_);
      if (closed_) throw microbatch::batcher_closed("closed");
      forming_.jobs.push_back(std::move(job));
      forming_.replies.push_back(std::move(how));
      if (forming_.jobs.size() == 1) {
        first_arrival_ = std::chrono::steady_clock::now();
        wake_collector = collector_idle_;
      }
      if (options_.max_batch_size != 0 && forming_.jobs.size() >= options_.max_batch_size) {
        full = std::exchange(forming_, fresh_batch()); // the filling submitter dispatches
        wake_collector = false;
      }
    }
    if (!full.jobs.empty()) {
      hand_to_workers(std::move(full));
    } else if (wake_collector) {
      collector_cv_.notify_one();
    }
  }

  void hand_to_workers(batch&& jobs) {
    batches_.fetch_add(1, std::memory_order_relaxed);
    bool wake = false;
    {
      std::lock_guard lock(ready_mutex_);
      ready_.push_back(std::move(jobs));
      wake = idle_workers_ != 0;
    }
    if (wake) ready_cv_.notify_one();
  }

  // The collector only times partial batches (and sends the last one at shutdown).
  void collect() {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (closed_) {
        batch last = std::exchange(forming_, batch{});
        lock.unlock();
        if (!last.jobs.empty()) hand_to_workers(std::move(last));
        {
          std::lock_guard ready_lock(ready_mutex_);
          no_more_ = true;
        }
        ready_cv_.notify_all();
        return;
      }
      if (forming_.jobs.empty() || options_.max_batch_delay.count() == 0) {
        collector_idle_ = true;
        collector_cv_.wait(lock);
        collector_idle_ = false;
        continue;
      }
      const auto due = first_arrival_ + options_.max_batch_delay;
      if (std::chrono::steady_clock::now() < due) {
        collector_cv_.wait_until(lock, due);
        continue;
      }
      batch timed_out = std::exchange(forming_, fresh_batch());
      lock.unlock();
      hand_to_workers(std::move(timed_out));
      lock.lock();
    }
  }

  void work() {
    for (;;) {
      batch jobs;
      {
        std::unique_lock lock(ready_mutex_);
        ++idle_workers_;
        ready_cv_.wait(lock, [&] { return !ready_.empty() || no_more_; });
        --idle_workers_;
        if (ready_.empty()) return;
        jobs = std::move(ready_.front());
        ready_.pop_front();
      }
      process_batch_(jobs);
    }
  }

  Processor processor_;
  microbatch::Options options_;
  std::function<void(batch&)> process_batch_;
  std::atomic<std::uint64_t> batches_{0};

  std::mutex mutex_;
  std::condition_variable collector_cv_;
  batch forming_;                                       // guarded by mutex_
  std::chrono::steady_clock::time_point first_arrival_; // guarded by mutex_
  bool collector_idle_ = false;                         // guarded by mutex_
  bool closed_ = false;                                 // guarded by mutex_

  std::mutex ready_mutex_;
  std::condition_variable ready_cv_;
  std::deque<batch> ready_;      // guarded by ready_mutex_
  std::size_t idle_workers_ = 0; // guarded by ready_mutex_
  bool no_more_ = false;         // guarded by ready_mutex_

  std::thread collector_;
  std::vector<std::thread> workers_;
};

} // namespace baseline
