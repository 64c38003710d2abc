// The baseline: a micro-batcher written the way a careful user would write one by hand, with the same
// public API as microbatch::Batcher (the parts the benchmarks use). One mutex and condition variable
// around a queue, one std::promise per job, an std::unordered_map to correlate results, worker threads.
// It is meant to be plain and correct, not slow: it wakes the collector only when the queue goes from
// empty to non-empty or fills a batch, and it moves results rather than copying them.
#pragma once

#include <microbatch/microbatch.hpp>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

namespace baseline {

template <class Job, class Result, class Processor> class Batcher {
public:
  template <class JobId, class ResultId>
  Batcher(Processor processor, JobId job_id, ResultId result_id, microbatch::Options options = {})
      : processor_(std::move(processor)), options_(options) {
    using Key = std::decay_t<std::invoke_result_t<JobId&, const Job&>>;
    process_batch_ = [this, job_id, result_id](std::vector<Item>& items) {
      std::vector<Job> jobs;
      jobs.reserve(items.size());
      std::unordered_map<Key, std::size_t> index;
      for (std::size_t i = 0; i < items.size(); ++i) {
        index.emplace(std::invoke(job_id, items[i].job), i);
        jobs.push_back(std::move(items[i].job));
      }
      std::vector<bool> answered(items.size(), false);
      try {
        std::vector<Result> results = processor_(std::span<Job>(jobs));
        for (Result& result : results) {
          auto it = index.find(std::invoke(result_id, result));
          if (it == index.end() || answered[it->second]) continue;
          answered[it->second] = true;
          items[it->second].promise.set_value(std::move(result));
        }
        for (std::size_t i = 0; i < items.size(); ++i)
          if (!answered[i]) items[i].promise.set_exception(std::make_exception_ptr(microbatch::no_result("no result")));
      } catch (...) {
        for (std::size_t i = 0; i < items.size(); ++i)
          if (!answered[i]) items[i].promise.set_exception(std::current_exception());
      }
    };
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
    {
      std::lock_guard lock(mutex_);
      if (closed_) throw microbatch::batcher_closed("closed");
      queue_.push_back(Item{std::move(job), std::move(promise)});
      if (queue_.size() == 1) first_arrival_ = std::chrono::steady_clock::now();
      if (queue_.size() != 1 && queue_.size() != options_.max_batch_size) return future;
    }
    collector_cv_.notify_one();
    return future;
  }

  Result execute_job(Job job) { return submit(std::move(job)).get(); }

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
  struct Item {
    Job job;
    std::promise<Result> promise;
  };

  void collect() {
    std::unique_lock lock(mutex_);
    for (;;) {
      const std::size_t max_size = options_.max_batch_size;
      auto full = [&] { return max_size != 0 && queue_.size() >= max_size; };
      if (queue_.empty() && !closed_) {
        collector_cv_.wait(lock, [&] { return !queue_.empty() || closed_; });
        continue;
      }
      if (!full() && !closed_) {
        const auto deadline = first_arrival_ + options_.max_batch_delay;
        if (std::chrono::steady_clock::now() < deadline) {
          collector_cv_.wait_until(lock, deadline, [&] { return full() || closed_; });
          continue;
        }
      }
      // Full, timed out or closing: take up to one batch.
      std::vector<Item> batch;
      const std::size_t take = max_size == 0 ? queue_.size() : std::min(queue_.size(), max_size);
      for (std::size_t i = 0; i < take; ++i) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      if (!queue_.empty()) first_arrival_ = std::chrono::steady_clock::now();
      const bool done = closed_ && queue_.empty();
      lock.unlock();
      if (!batch.empty()) {
        {
          std::lock_guard ready_lock(ready_mutex_);
          ready_.push_back(std::move(batch));
        }
        ready_cv_.notify_one();
      }
      if (done) {
        {
          std::lock_guard ready_lock(ready_mutex_);
          no_more_ = true;
        }
        ready_cv_.notify_all();
        return;
      }
      lock.lock();
    }
  }

  void work() {
    for (;;) {
      std::vector<Item> batch;
      {
        std::unique_lock lock(ready_mutex_);
        ready_cv_.wait(lock, [&] { return !ready_.empty() || no_more_; });
        if (ready_.empty()) return;
        batch = std::move(ready_.front());
        ready_.pop_front();
      }
      process_batch_(batch);
    }
  }

  Processor processor_;
  microbatch::Options options_;
  std::function<void(std::vector<Item>&)> process_batch_;

  std::mutex mutex_;
  std::condition_variable collector_cv_;
  std::deque<Item> queue_;                              // guarded by mutex_
  std::chrono::steady_clock::time_point first_arrival_; // guarded by mutex_
  bool closed_ = false;                                 // guarded by mutex_

  std::mutex ready_mutex_;
  std::condition_variable ready_cv_;
  std::deque<std::vector<Item>> ready_; // guarded by ready_mutex_
  bool no_more_ = false;                // guarded by ready_mutex_

  std::thread collector_;
  std::vector<std::thread> workers_;
};

} // namespace baseline
