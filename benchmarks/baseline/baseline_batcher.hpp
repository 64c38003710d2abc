// The baseline: a micro-batcher written the way a careful engineer would write one by hand, with the
// parts of microbatch::Batcher's API that the benchmarks use (submit with a future or a callback,
// execute_job, a coroutine awaiter, stats().batches). Its design is the plain one that issue 8 measured
// against: one mutex around the forming batch; the submitter whose job fills a batch hands it straight
// to the workers' queue (no collector in between); a collector thread only times partial batches; one
// std::promise (or std::function callback) per job; an std::unordered_map per batch to correlate
// results; worker threads that take batches from a queue under a second mutex. It is meant to be plain
// and correct, not slow: nobody is woken unless they sleep and are needed.
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
          items[it->second].succeed(std::move(result));
        }
        for (std::size_t i = 0; i < items.size(); ++i)
          if (!answered[i]) items[i].fail(std::make_exception_ptr(microbatch::no_result("no result")));
      } catch (...) {
        for (std::size_t i = 0; i < items.size(); ++i)
          if (!answered[i]) items[i].fail(std::current_exception());
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
    add(Item{std::move(job), std::move(promise)});
    return future;
  }

  void submit(Job job, Callback on_complete) { add(Item{std::move(job), std::move(on_complete)}); }

  Result execute_job(Job job) { return submit(std::move(job)).get(); }

  /// `co_await batcher.async_execute_job(job)`: resumes on the worker that finished the batch.
  struct awaiter {
    Batcher& owner;
    Job job;
    std::optional<microbatch::Outcome<Result>> outcome;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> waiting) {
      owner.add(Item{std::move(job), Callback([this, waiting](microbatch::Outcome<Result>&& done) {
                       outcome.emplace(std::move(done));
                       waiting.resume();
                     })});
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
  struct Item {
    Job job;
    std::variant<std::promise<Result>, Callback> reply;
    void succeed(Result&& result) {
      if (auto* promise = std::get_if<0>(&reply)) return promise->set_value(std::move(result));
      std::get<1>(reply)(microbatch::Outcome<Result>(std::move(result)));
    }
    void fail(std::exception_ptr error) {
      if (auto* promise = std::get_if<0>(&reply)) return promise->set_exception(error);
      std::get<1>(reply)(microbatch::Outcome<Result>(error));
    }
  };

  void add(Item item) {
    std::vector<Item> full;
    bool wake_collector = false;
    {
      std::lock_guard lock(mutex_);
      if (closed_) throw microbatch::batcher_closed("closed");
      forming_.push_back(std::move(item));
      if (forming_.size() == 1) {
        first_arrival_ = std::chrono::steady_clock::now();
        wake_collector = collector_idle_;
      }
      if (options_.max_batch_size != 0 && forming_.size() >= options_.max_batch_size) {
        full.swap(forming_); // the filling submitter dispatches
        wake_collector = false;
      }
    }
    if (!full.empty()) {
      hand_to_workers(std::move(full));
    } else if (wake_collector) {
      collector_cv_.notify_one();
    }
  }

  void hand_to_workers(std::vector<Item> batch) {
    batches_.fetch_add(1, std::memory_order_relaxed);
    bool wake = false;
    {
      std::lock_guard lock(ready_mutex_);
      ready_.push_back(std::move(batch));
      wake = idle_workers_ != 0;
    }
    if (wake) ready_cv_.notify_one();
  }

  // The collector only times partial batches (and sends the last one at shutdown).
  void collect() {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (closed_) {
        std::vector<Item> last;
        last.swap(forming_);
        lock.unlock();
        if (!last.empty()) hand_to_workers(std::move(last));
        {
          std::lock_guard ready_lock(ready_mutex_);
          no_more_ = true;
        }
        ready_cv_.notify_all();
        return;
      }
      if (forming_.empty() || options_.max_batch_delay.count() == 0) {
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
      std::vector<Item> batch;
      batch.swap(forming_);
      lock.unlock();
      hand_to_workers(std::move(batch));
      lock.lock();
    }
  }

  void work() {
    for (;;) {
      std::vector<Item> batch;
      {
        std::unique_lock lock(ready_mutex_);
        ++idle_workers_;
        ready_cv_.wait(lock, [&] { return !ready_.empty() || no_more_; });
        --idle_workers_;
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
  std::atomic<std::uint64_t> batches_{0};

  std::mutex mutex_;
  std::condition_variable collector_cv_;
  std::vector<Item> forming_;                           // guarded by mutex_
  std::chrono::steady_clock::time_point first_arrival_; // guarded by mutex_
  bool collector_idle_ = false;                         // guarded by mutex_
  bool closed_ = false;                                 // guarded by mutex_

  std::mutex ready_mutex_;
  std::condition_variable ready_cv_;
  std::deque<std::vector<Item>> ready_; // guarded by ready_mutex_
  std::size_t idle_workers_ = 0;        // guarded by ready_mutex_
  bool no_more_ = false;                // guarded by ready_mutex_

  std::thread collector_;
  std::vector<std::thread> workers_;
};

} // namespace baseline
