// microbatch vs the baseline (benchmarks/baseline), workloads W1-W8, side by side in one binary and run.
//
// Job = {uint64 id}, Result = {uint64 id}, correlated by id; the processor returns one result per job
// with the same id and no sleep; every result is checked. Timings are wall-clock (manual time), and
// every figure is reported as a Google Benchmark user counter; at the end the program prints one table
// (workload, metric, baseline, microbatch, ratio). `--smoke` runs every workload once with tiny sizes.
#include <microbatch/microbatch.hpp>

#include <benchmark/benchmark.h>
#include <malloc.h>
#include <sys/resource.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <latch>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "baseline/baseline_batcher.hpp"

// ---- heap accounting: while `counting` is on, every operator new in the process is counted ----
// Only the memory runs of W2 and W2cb turn it on, and they are not timed: the counting costs atomic
// read-modify-writes per allocation (several, on lines all threads share), which slowed the side that
// allocates per job (the baseline, by design) in every workload when it was always on.
namespace heap {
std::atomic<std::uint64_t> allocations{0};
std::atomic<std::uint64_t> bytes{0};
std::atomic<std::int64_t> live{0};
std::atomic<std::int64_t> peak{0};
std::atomic<bool> track_peak{false};

std::atomic<bool> counting{false};
inline void on_alloc(void* p) {
  if (!counting.load(std::memory_order_relaxed)) return;
  const auto size = static_cast<std::int64_t>(malloc_usable_size(p));
  allocations.fetch_add(1, std::memory_order_relaxed);
  bytes.fetch_add(static_cast<std::uint64_t>(size), std::memory_order_relaxed);
  if (track_peak.load(std::memory_order_relaxed)) {
    const std::int64_t now = live.fetch_add(size, std::memory_order_relaxed) + size;
    std::int64_t seen = peak.load(std::memory_order_relaxed);
    while (now > seen && !peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
  }
}
inline void on_free(void* p) {
  if (p != nullptr && counting.load(std::memory_order_relaxed) && track_peak.load(std::memory_order_relaxed))
    live.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}
} // namespace heap

void* operator new(std::size_t size) {
  void* p = std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) throw std::bad_alloc();
  heap::on_alloc(p);
  return p;
}
void* operator new[](std::size_t size) {
  return operator new(size);
}
void operator delete(void* p) noexcept {
  heap::on_free(p);
  std::free(p);
}
void operator delete[](void* p) noexcept {
  operator delete(p);
}
void operator delete(void* p, std::size_t) noexcept {
  operator delete(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  operator delete(p);
}

namespace {

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

struct Job {
  std::uint64_t id;
};
struct Result {
  std::uint64_t id;
};
struct Echo {
  std::vector<Result> operator()(std::span<Job> jobs) const {
    std::vector<Result> results;
    results.reserve(jobs.size());
    for (const Job& job : jobs)
      results.push_back({job.id});
    return results;
  }
};

template <template <class, class, class> class BatcherTemplate> using batcher_of = BatcherTemplate<Job, Result, Echo>;
using ours = batcher_of<microbatch::Batcher>;
using plain = batcher_of<baseline::Batcher>;

template <class B> constexpr const char* impl_name() {
  return std::is_same_v<B, ours> ? "microbatch" : "baseline";
}

bool smoke = false;

// The figures for the final table: workload -> metric -> implementation -> one value per run (the
// table prints the median of the alternated runs).
std::map<std::string, std::map<std::string, std::map<std::string, std::vector<double>>>> table;
std::map<std::string, bool> higher_is_better;

void record(benchmark::State& state, const std::string& workload, const char* impl, const std::string& metric,
            double value, bool higher_better) {
  state.counters[metric] = value;
  table[workload][metric][impl].push_back(value);
  higher_is_better[metric] = higher_better;
}

double seconds_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double percentile(std::vector<double>& values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const auto index = static_cast<std::size_t>(p * double(values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

// Memory figures for W2 and W2cb: heap in use is tracked from here on (its peak in heap::peak), and the
// process's peak resident set (VmHWM) is reset after freed heap was given back to the system.
void start_memory_watch() {
  ::malloc_trim(0);
  { std::ofstream("/proc/self/clear_refs") << "5"; }
  heap::live = 0;
  heap::peak = 0;
  heap::track_peak = true;
  heap::counting = true;
}
void stop_memory_watch() {
  heap::counting = false;
  heap::track_peak = false;
}

double peak_rss_kib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr);
  return 0;
}

// Voluntary + involuntary context switches of the whole process so far (getrusage).
double context_switches() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_nvcsw + usage.ru_nivcsw);
}

// W1 and W4: P producers, released together, each calling execute_job n times in a row.
// Returns jobs/s; fills latencies_us if given.
template <class B>
bool closed_loop(B& batcher, int producers, int jobs_each, double& elapsed_s, std::vector<double>* latencies_us) {
  std::latch start(producers + 1);
  std::atomic<bool> wrong{false};
  std::vector<std::vector<double>> per_thread(static_cast<std::size_t>(producers));
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      auto& mine = per_thread[static_cast<std::size_t>(p)];
      if (latencies_us != nullptr) mine.reserve(static_cast<std::size_t>(jobs_each));
      start.arrive_and_wait();
      for (int i = 0; i < jobs_each; ++i) {
        const std::uint64_t id = (std::uint64_t(p) << 32) | std::uint64_t(i);
        const auto t0 = clock_type::now();
        if (batcher.execute_job({id}).id != id) wrong = true;
        if (latencies_us != nullptr) mine.push_back(seconds_between(t0, clock_type::now()) * 1e6);
      }
    });
  }
  const auto t0 = clock_type::now();
  start.arrive_and_wait();
  for (auto& t : threads)
    t.join();
  elapsed_s = seconds_between(t0, clock_type::now());
  if (latencies_us != nullptr)
    for (auto& v : per_thread)
      latencies_us->insert(latencies_us->end(), v.begin(), v.end());
  return !wrong;
}

template <class B> void w1_closed_loop(benchmark::State& state) {
  const int producers = static_cast<int>(state.range(0));
  const int jobs_each = smoke ? 20 : producers >= 64 ? 2000 : 400;
  double total_s = 0, total_jobs = 0, switches = 0, batches = 0;
  for (auto _ : state) {
    B batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 64, .max_batch_delay = 1ms});
    double elapsed = 0;
    const double switches_before = context_switches();
    if (!closed_loop(batcher, producers, jobs_each, elapsed, nullptr)) state.SkipWithError("wrong result");
    switches += context_switches() - switches_before;
    batches += double(batcher.stats().batches);
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(producers) * jobs_each;
  }
  const std::string w = "W1 closed loop P=" + std::to_string(producers);
  record(state, w, impl_name<B>(), "jobs/s", total_jobs / total_s, true);
  record(state, w, impl_name<B>(), "ctx switches/batch", switches / batches, false);
}

// W2 with its own batcher; false if a result was wrong. `elapsed`: from the first submit until the
// last result was read (the batcher's start and shutdown are not timed).
template <class B> bool w2_run(std::vector<std::future<Result>>& futures, std::size_t jobs, double& elapsed) {
  futures.clear();
  B batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 1000, .max_batch_delay = 10ms});
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < jobs; ++i)
    futures.push_back(batcher.submit({i}));
  bool wrong = false;
  for (std::size_t i = 0; i < jobs; ++i)
    wrong |= futures[i].get().id != i;
  elapsed = seconds_between(t0, clock_type::now());
  return !wrong;
}

// Each iteration runs W2 twice: timed (no heap accounting), then untimed with the heap watched.
template <class B> void w2_open_loop(benchmark::State& state) {
  const std::size_t jobs = smoke ? 5000 : 1000000;
  double total_s = 0, total_jobs = 0, allocations = 0, bytes = 0, peak_bytes = 0, rss_kib = 0;
  std::vector<std::future<Result>> futures;
  futures.reserve(jobs);
  for (auto _ : state) {
    futures.clear(); // not timed: freeing what the last iteration's watched run allocated
    double elapsed = 0, watched_elapsed = 0;
    ::malloc_trim(0); // both sides start from a trimmed heap, whatever ran before
    bool right = w2_run<B>(futures, jobs, elapsed);
    futures.clear(); // before the watch: freeing what the timed run allocated is not this run's
    start_memory_watch();
    const auto allocations_before = heap::allocations.load();
    const auto bytes_before = heap::bytes.load();
    right = w2_run<B>(futures, jobs, watched_elapsed) && right;
    stop_memory_watch();
    allocations += double(heap::allocations.load() - allocations_before);
    bytes += double(heap::bytes.load() - bytes_before);
    peak_bytes = std::max(peak_bytes, double(heap::peak.load()));
    rss_kib = std::max(rss_kib, peak_rss_kib());
    if (!right) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(jobs);
  }
  const std::string w = "W2 open loop 1M";
  record(state, w, impl_name<B>(), "jobs/s", total_jobs / total_s, true);
  record(state, w, impl_name<B>(), "allocs/job", allocations / total_jobs, false);
  record(state, w, impl_name<B>(), "heap bytes/job", bytes / total_jobs, false);
  // W5: the most heap in use at once while all jobs were pending (futures included), per job,
  // and the process's peak resident set during the run.
  record(state, "W5 memory (W2)", impl_name<B>(), "peak heap bytes/pending job", peak_bytes / double(jobs), false);
  record(state, "W5 memory (W2)", impl_name<B>(), "peak RSS MiB", rss_kib / 1024.0, false);
}

// The floor under W2 for any batcher whose submit returns std::future: the same 1M jobs, one thread
// creating promise/future pairs, another fulfilling them in chunks of 1000 as they appear, the first
// then waiting in order. No queue, no batching, no correlation: only what the API itself costs.
double promise_floor_jobs_per_s = 0;
std::string w3_parts_summary;
void w2_promise_floor(benchmark::State& state) {
  const std::size_t jobs = smoke ? 5000 : 1000000;
  double total_s = 0, total_jobs = 0;
  for (auto _ : state) {
    std::vector<std::promise<Result>> promises(jobs);
    std::vector<std::future<Result>> futures;
    futures.reserve(jobs);
    std::atomic<std::size_t> published{0};
    const auto t0 = clock_type::now();
    std::thread fulfiller([&] {
      for (std::size_t done = 0; done < jobs;) {
        const std::size_t ready = published.load(std::memory_order_acquire);
        if (ready - done < 1000 && ready != jobs) {
          std::this_thread::yield();
          continue;
        }
        for (; done < ready; ++done)
          promises[done].set_value({done});
      }
    });
    for (std::size_t i = 0; i < jobs; ++i) {
      promises[i] = std::promise<Result>();
      futures.push_back(promises[i].get_future());
      published.store(i + 1, std::memory_order_release);
    }
    bool wrong = false;
    for (std::size_t i = 0; i < jobs; ++i)
      wrong |= futures[i].get().id != i;
    fulfiller.join();
    const double elapsed = seconds_between(t0, clock_type::now());
    if (wrong) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(jobs);
  }
  promise_floor_jobs_per_s = total_jobs / total_s;
  state.counters["jobs/s"] = promise_floor_jobs_per_s;
}

template <class B> void w3_timer_accuracy(benchmark::State& state) {
  const int jobs = smoke ? 20 : 5000;
  const auto delay = 1ms;
  std::vector<double> overshoot_us;
  double below_delay = 0;
  for (auto _ : state) {
    B batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 64, .max_batch_delay = delay});
    double elapsed = 0;
    for (int i = 0; i < jobs; ++i) {
      const auto t0 = clock_type::now();
      if (batcher.execute_job({std::uint64_t(i)}).id != std::uint64_t(i)) state.SkipWithError("wrong result");
      const auto latency = clock_type::now() - t0;
      elapsed += std::chrono::duration<double>(latency).count();
      overshoot_us.push_back(std::chrono::duration<double, std::micro>(latency - delay).count());
      if (latency < delay) ++below_delay;
    }
    state.SetIterationTime(elapsed);
  }
  const std::string w = "W3 timer overshoot";
  const char* impl = impl_name<B>();
  record(state, w, impl, "p50 us", percentile(overshoot_us, 0.50), false);
  record(state, w, impl, "p99 us", percentile(overshoot_us, 0.99), false);
  record(state, w, impl, "jobs below delay", below_delay, false);
}

// What W3 is made of, measured alone on this machine: (a) a thread sleeping until a 1 ms deadline
// (condition_variable::wait_until, timer slack 1 ns, as microbatch's collector does): how late it
// runs; (b) one hand-off: thread A wakes sleeping thread B (futex), time until B runs. microbatch's
// timed batch costs (a) plus two hand-offs (collector -> worker -> caller).
void w3_parts(benchmark::State& state) {
  const int samples = smoke ? 20 : 2000;
  std::vector<double> timer_late_us, handoff_us;
  for (auto _ : state) {
#if defined(__linux__)
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
#endif
    std::mutex mutex;
    std::condition_variable cv;
    for (int i = 0; i < samples; ++i) {
      std::unique_lock lock(mutex);
      const auto deadline = clock_type::now() + 1ms;
      cv.wait_until(lock, deadline, [] { return false; });
      timer_late_us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - deadline).count());
    }
    std::atomic<std::uint32_t> word{0};
    std::atomic<std::int64_t> woken_at{0};
    std::thread sleeper([&] {
      for (int i = 0; i < samples; ++i) {
        word.wait(std::uint32_t(2 * i));
        woken_at.store(clock_type::now().time_since_epoch().count());
        word.store(std::uint32_t(2 * i + 2));
        word.notify_one();
      }
    });
    for (int i = 0; i < samples; ++i) {
      std::this_thread::sleep_for(200us); // let the sleeper fall asleep in the kernel
      const auto t0 = clock_type::now();
      word.store(std::uint32_t(2 * i + 1));
      word.notify_one();
      word.wait(std::uint32_t(2 * i + 1));
      handoff_us.push_back(double(woken_at.load() - t0.time_since_epoch().count()) / 1000.0);
    }
    sleeper.join();
    state.SetIterationTime(1e-3);
  }
  auto copy_t = timer_late_us, copy_h = handoff_us;
  state.counters["timer late p50 us"] = percentile(copy_t, 0.5);
  state.counters["timer late p99 us"] = percentile(timer_late_us, 0.99);
  state.counters["handoff p50 us"] = percentile(copy_h, 0.5);
  state.counters["handoff p99 us"] = percentile(handoff_us, 0.99);
  w3_parts_summary = "W3 parts on this machine: 1 ms timer wakes late by p50 " +
                     std::to_string(state.counters["timer late p50 us"].value) + " us, p99 " +
                     std::to_string(state.counters["timer late p99 us"].value) + " us; one thread hand-off p50 " +
                     std::to_string(state.counters["handoff p50 us"].value) + " us, p99 " +
                     std::to_string(state.counters["handoff p99 us"].value) + " us";
}

// W6: 64 concurrent requests in a closed loop (size 64, delay 1 ms), three ways: 64 threads calling
// execute_job, 64 coroutines awaiting async_execute_job (started from one thread), 64 callback
// chains (each completion submits the request's next job). microbatch only: the baseline has no
// coroutine or callback API.
struct coroutine_task {
  struct promise_type {
    coroutine_task get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
};

coroutine_task coroutine_request(ours& batcher, std::uint64_t request, int jobs, std::atomic<bool>& wrong,
                                 std::latch& done) {
  for (int i = 0; i < jobs; ++i) {
    const std::uint64_t id = (request << 32) | std::uint64_t(i);
    if ((co_await batcher.async_execute_job({id})).id != id) wrong = true;
  }
  done.count_down();
}

struct callback_request {
  ours* batcher;
  std::uint64_t request;
  int remaining;
  std::atomic<bool>* wrong;
  std::latch* done;
  void next() {
    const std::uint64_t id = (request << 32) | std::uint64_t(remaining);
    batcher->submit({id}, [this, id](microbatch::Outcome<Result>&& outcome) {
      if (!outcome.has_value() || outcome.value().id != id) *wrong = true;
      if (--remaining == 0) {
        done->count_down();
      } else {
        next();
      }
    });
  }
};

std::map<std::string, double> w6_jobs_per_s;

void w6_request_styles(benchmark::State& state) {
  const int requests = 64;
  const int jobs_each = smoke ? 20 : 2000;
  const auto style = state.range(0);
  const char* name = style == 0 ? "threads (execute_job)" : style == 1 ? "coroutines (co_await)" : "callbacks (submit)";
  double total_s = 0, total_jobs = 0;
  for (auto _ : state) {
    ours batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 64, .max_batch_delay = 1ms});
    std::atomic<bool> wrong{false};
    double elapsed = 0;
    if (style == 0) {
      wrong = !closed_loop(batcher, requests, jobs_each, elapsed, nullptr);
    } else {
      std::latch done(requests);
      std::vector<callback_request> chains(requests);
      const auto t0 = clock_type::now();
      for (int r = 0; r < requests; ++r) {
        if (style == 1) {
          coroutine_request(batcher, std::uint64_t(r), jobs_each, wrong, done);
        } else {
          chains[std::size_t(r)] = {&batcher, std::uint64_t(r), jobs_each, &wrong, &done};
          chains[std::size_t(r)].next();
        }
      }
      done.wait();
      elapsed = seconds_between(t0, clock_type::now());
    }
    if (wrong) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(requests) * jobs_each;
  }
  w6_jobs_per_s[name] = total_jobs / total_s;
  state.counters["jobs/s"] = total_jobs / total_s;
}

template <class B> void w4_full_batches(benchmark::State& state) {
  const int producers = 64;
  const int jobs_each = smoke ? 10 : 500;
  std::vector<double> latencies_us;
  double total_s = 0, total_jobs = 0, switches = 0, batches = 0;
  for (auto _ : state) {
    B batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 64, .max_batch_delay = 100ms});
    double elapsed = 0;
    const double switches_before = context_switches();
    if (!closed_loop(batcher, producers, jobs_each, elapsed, &latencies_us)) state.SkipWithError("wrong result");
    switches += context_switches() - switches_before;
    batches += double(batcher.stats().batches);
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(producers) * jobs_each;
  }
  const std::string w = "W4 full batches P=64";
  const char* impl = impl_name<B>();
  record(state, w, impl, "jobs/s", total_jobs / total_s, true);
  record(state, w, impl, "p50 us", percentile(latencies_us, 0.50), false);
  record(state, w, impl, "p99 us", percentile(latencies_us, 0.99), false);
  record(state, w, impl, "ctx switches/batch", switches / batches, false);
}

// W1co and W4co: 64 coroutines started from one thread, each awaiting async_execute_job n times in a
// row (size 64; delay 1 ms for W1co, 100 ms for W4co, so that every W4co batch fills). Per-job latency
// from the previous job's resumption (or the start) to this job's. Context switches per batch from getrusage.
template <class B>
coroutine_task timed_coroutine(B& batcher, std::uint64_t request, int jobs, std::atomic<bool>& wrong,
                               std::vector<double>* latencies_us, std::latch& done) {
  // The clock only where latencies are wanted (W4co), and once per job: a job's resumption is where the
  // next one starts, so the time read there ends one latency and begins the next (which then also
  // counts the few instructions before its co_await). A read costs about 28 ns on this VM; with one
  // per job `perf` found a third of W1co's time in the clock, which would dilute what is measured.
  auto started = latencies_us != nullptr ? clock_type::now() : clock_type::time_point{};
  for (int i = 0; i < jobs; ++i) {
    const std::uint64_t id = (request << 32) | std::uint64_t(i);
    const Result result = co_await batcher.async_execute_job(Job{id}); // Job is trivial: no g++ 12 issue
    if (result.id != id) wrong = true;
    if (latencies_us != nullptr) {
      const auto resumed = clock_type::now();
      (*latencies_us)[std::size_t(i)] = seconds_between(started, resumed) * 1e6;
      started = resumed;
    }
  }
  done.count_down();
}

template <class B>
void coroutine_closed_loop(benchmark::State& state, const std::string& workload, std::chrono::nanoseconds delay,
                           bool latencies) {
  const int requests = 64;
  const int jobs_each = smoke ? 20 : 20000;
  double total_s = 0, total_jobs = 0, switches = 0, batches = 0;
  std::vector<std::vector<double>> latencies_us(requests);
  // Sized and written before the timed loop: no reallocation, and no first touch of a fresh page (a
  // page fault every 512 latencies, which `perf` showed in the timed runs) while the clock runs.
  if (latencies)
    for (auto& each : latencies_us)
      each.assign(std::size_t(jobs_each), 0.0);
  for (auto _ : state) {
    B batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 64, .max_batch_delay = delay});
    std::atomic<bool> wrong{false};
    std::latch done(requests);
    const double switches_before = context_switches();
    const auto t0 = clock_type::now();
    for (int r = 0; r < requests; ++r)
      timed_coroutine(batcher, std::uint64_t(r), jobs_each, wrong, latencies ? &latencies_us[std::size_t(r)] : nullptr,
                      done);
    done.wait();
    const double elapsed = seconds_between(t0, clock_type::now());
    switches += context_switches() - switches_before;
    batches += double(batcher.stats().batches);
    if (wrong) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(requests) * jobs_each;
  }
  const char* impl = impl_name<B>();
  record(state, workload, impl, "jobs/s", total_jobs / total_s, true);
  record(state, workload, impl, "ctx switches/batch", switches / batches, false);
  if (latencies) {
    std::vector<double> all;
    for (auto& v : latencies_us)
      all.insert(all.end(), v.begin(), v.end());
    record(state, workload, impl, "p50 us", percentile(all, 0.50), false);
    record(state, workload, impl, "p99 us", percentile(all, 0.99), false);
  }
}

template <class B> void w1co(benchmark::State& state) {
  coroutine_closed_loop<B>(state, "W1co 64 coroutines", 1ms, false);
}
template <class B> void w4co(benchmark::State& state) {
  coroutine_closed_loop<B>(state, "W4co 64 coroutines", 100ms, true);
}

// W2cb: one thread submits 1,000,000 jobs, each with a small callback that checks the id and counts;
// then waits until every callback ran. Size 1000, delay 10 ms. Heap per pending job as in W5.
// W2cb with its own batcher; false if a callback saw a wrong result or one did not run. `elapsed`:
// from the first submit until the last callback ran (the batcher's start and shutdown are not timed).
// Adds the run's context switches and batches.
template <class B> bool w2cb_run(std::size_t jobs, double& elapsed, double& switches, double& batches) {
  struct tally {
    explicit tally(std::size_t jobs) : all_ran(static_cast<std::ptrdiff_t>(jobs)) {}
    std::atomic<std::size_t> ran{0}, wrong{0};
    std::latch all_ran;
  } counts(jobs); // before the batcher: it outlives the last callback's count_down
  B batcher(Echo{}, &Job::id, &Result::id, microbatch::Options{.max_batch_size = 1000, .max_batch_delay = 10ms});
  const double switches_before = context_switches();
  const auto t0 = clock_type::now();
  // 16 bytes of captures: std::function (the baseline's callback) keeps them without allocating.
  for (std::size_t i = 0; i < jobs; ++i)
    batcher.submit({i}, [counts = &counts, i](microbatch::Outcome<Result>&& outcome) {
      if (!outcome.has_value() || outcome.value().id != i) counts->wrong.fetch_add(1, std::memory_order_relaxed);
      counts->ran.fetch_add(1, std::memory_order_relaxed);
      counts->all_ran.count_down();
    });
  counts.all_ran.wait();
  elapsed = seconds_between(t0, clock_type::now());
  switches += context_switches() - switches_before;
  batches += double(batcher.stats().batches);
  return counts.wrong.load() == 0 && counts.ran.load() == jobs;
}

// Each iteration runs W2cb twice: timed (no heap accounting), then untimed with the heap watched.
template <class B> void w2cb(benchmark::State& state) {
  const std::size_t jobs = smoke ? 5000 : 1000000;
  double total_s = 0, total_jobs = 0, peak_bytes = 0, rss_kib = 0, switches = 0, batches = 0;
  for (auto _ : state) {
    double elapsed = 0, watched_elapsed = 0, watched_switches = 0, watched_batches = 0;
    ::malloc_trim(0); // both sides start from a trimmed heap, whatever ran before
    bool right = w2cb_run<B>(jobs, elapsed, switches, batches);
    start_memory_watch();
    right = w2cb_run<B>(jobs, watched_elapsed, watched_switches, watched_batches) && right;
    stop_memory_watch();
    peak_bytes = std::max(peak_bytes, double(heap::peak.load()));
    rss_kib = std::max(rss_kib, peak_rss_kib());
    if (!right) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(jobs);
  }
  const std::string w = "W2cb callbacks 1M";
  const char* impl = impl_name<B>();
  record(state, w, impl, "jobs/s", total_jobs / total_s, true);
  // Callers keep nothing here, so jobs are pending only until the worker catches up: the peak heap
  // in use is the figure (nodes in flight plus the batcher's pools), not a per-job one.
  record(state, w, impl, "peak heap MiB", peak_bytes / double(1 << 20), false);
  record(state, w, impl, "peak RSS MiB", rss_kib / 1024.0, false);
  record(state, w, impl, "ctx switches/batch", switches / batches, false);
}

// W8: dispatch_when_idle against a fixed delay, with a processor that costs what a database round
// trip does (sleeps 200 us per call plus 2 us per job). Light load: one caller in a closed loop. Heavy
// load: 64 coroutines in a closed loop. Size 256, delay 1 ms. The "baseline" column is the fixed delay,
// the "microbatch" column dispatch_when_idle (both microbatch).
struct RoundTrip {
  std::vector<Result> operator()(std::span<Job> jobs) const {
    std::this_thread::sleep_for(200us + 2us * jobs.size());
    return Echo{}(jobs);
  }
};
using round_trip_batcher = microbatch::Batcher<Job, Result, RoundTrip>;

coroutine_task w8_caller(round_trip_batcher& batcher, std::uint64_t caller, int jobs, std::vector<double>& latencies_us,
                         std::atomic<bool>& wrong, std::latch& done) {
  for (int i = 0; i < jobs; ++i) {
    const std::uint64_t id = (caller << 32) | std::uint64_t(i);
    const auto t0 = clock_type::now();
    const Result result = co_await batcher.async_execute_job(Job{id});
    if (result.id != id) wrong = true;
    latencies_us.push_back(seconds_between(t0, clock_type::now()) * 1e6);
  }
  done.count_down();
}

void w8_when_idle(benchmark::State& state) {
  const bool when_idle = state.range(0) != 0;
  const bool heavy = state.range(1) != 0;
  const int callers = heavy ? 64 : 1;
  const int jobs_each = smoke ? 10 : heavy ? 300 : 1500;
  std::vector<std::vector<double>> latencies(static_cast<std::size_t>(callers));
  double total_s = 0, total_jobs = 0;
  for (auto _ : state) {
    microbatch::Options options{.max_batch_size = 256, .max_batch_delay = 1ms};
    options.dispatch_when_idle = when_idle;
    round_trip_batcher batcher(RoundTrip{}, &Job::id, &Result::id, options);
    std::atomic<bool> wrong{false};
    std::latch done(callers);
    const auto t0 = clock_type::now();
    for (int c = 0; c < callers; ++c)
      w8_caller(batcher, std::uint64_t(c), jobs_each, latencies[std::size_t(c)], wrong, done);
    done.wait();
    const double elapsed = seconds_between(t0, clock_type::now());
    if (wrong) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_jobs += double(callers) * jobs_each;
  }
  std::vector<double> all;
  for (auto& v : latencies)
    all.insert(all.end(), v.begin(), v.end());
  const std::string w = heavy ? "W8 heavy 64 coroutines" : "W8 light 1 caller";
  const char* column = when_idle ? "microbatch" : "baseline";
  record(state, w, column, "jobs/s", total_jobs / total_s, true);
  record(state, w, column, "p50 us", percentile(all, 0.50), false);
  record(state, w, column, "p99 us", percentile(all, 0.99), false);
}

// W7: DataLoader. 64 threads make 1,000,000 loads over 10,000 keys drawn from a Zipf distribution
// (s = 1.0; drawn before timing from a seeded std::mt19937_64, so every run and implementation loads
// the same sequence). Each thread makes its loads (keeping the futures), then checks every answer; the
// time runs from the common start until every thread has checked its last answer. Compared, each in
// front of the same microbatch::Batcher (default options: size 64, delay 1 ms): a plain std::mutex
// around one std::unordered_map<key, std::shared_future> (the Go seed's design, written out below),
// microbatch::DataLoader unbounded, and microbatch::DataLoader with max_cached = 1000.
struct KeyEcho {
  std::vector<Result> operator()(std::span<std::uint64_t> keys) const {
    std::vector<Result> results;
    results.reserve(keys.size());
    for (std::uint64_t key : keys)
      results.push_back({key});
    return results;
  }
};

class plain_map_loader {
public:
  plain_map_loader()
      : batcher_(
            KeyEcho{}, [](std::uint64_t key) { return key; }, &Result::id, microbatch::Options{}) {}

  std::shared_future<Result> load(std::uint64_t key) {
    std::lock_guard lock(mutex_);
    if (auto found = cache_.find(key); found != cache_.end()) {
      ++hits_;
      return found->second;
    }
    ++misses_;
    std::shared_future<Result> future = batcher_.submit(key).share();
    cache_.emplace(key, future);
    return future;
  }
  double hit_rate() {
    std::lock_guard lock(mutex_);
    return double(hits_) / double(hits_ + misses_);
  }

private:
  std::mutex mutex_;
  std::unordered_map<std::uint64_t, std::shared_future<Result>> cache_; // guarded by mutex_
  std::uint64_t hits_ = 0;                                              // guarded by mutex_
  std::uint64_t misses_ = 0;                                            // guarded by mutex_
  microbatch::Batcher<std::uint64_t, Result, KeyEcho> batcher_;
};

// The same plain design with a least-recently-used bound, as one would write it by hand: a list in
// use order beside the map, the oldest entry dropped when an insert goes over `max_cached`. The fair
// comparison for a bounded DataLoader: both then fetch again every key the bound pushed out (the
// unbounded plain map above fetches each key once).
class plain_lru_loader {
public:
  explicit plain_lru_loader(std::size_t max_cached)
      : max_cached_(max_cached),
        batcher_(
            KeyEcho{}, [](std::uint64_t key) { return key; }, &Result::id, microbatch::Options{}) {}

  std::shared_future<Result> load(std::uint64_t key) {
    std::lock_guard lock(mutex_);
    if (auto found = cache_.find(key); found != cache_.end()) {
      ++hits_;
      recency_.splice(recency_.begin(), recency_, found->second); // now the most recently used
      return found->second->second;
    }
    ++misses_;
    std::shared_future<Result> future = batcher_.submit(key).share();
    recency_.emplace_front(key, future);
    cache_.emplace(key, recency_.begin());
    if (cache_.size() > max_cached_) {
      cache_.erase(recency_.back().first);
      recency_.pop_back();
    }
    return future;
  }
  double hit_rate() {
    std::lock_guard lock(mutex_);
    return double(hits_) / double(hits_ + misses_);
  }

private:
  using use_order = std::list<std::pair<std::uint64_t, std::shared_future<Result>>>; // most recent first
  const std::size_t max_cached_;
  std::mutex mutex_;
  use_order recency_;                                            // guarded by mutex_
  std::unordered_map<std::uint64_t, use_order::iterator> cache_; // guarded by mutex_
  std::uint64_t hits_ = 0;                                       // guarded by mutex_
  std::uint64_t misses_ = 0;                                     // guarded by mutex_
  microbatch::Batcher<std::uint64_t, Result, KeyEcho> batcher_;
};

using data_loader = microbatch::DataLoader<std::uint64_t, Result, KeyEcho>;

std::vector<std::uint64_t> zipf_keys(std::size_t count, std::size_t keys, double s, std::uint64_t seed) {
  std::vector<double> cdf(keys);
  double sum = 0;
  for (std::size_t rank = 0; rank < keys; ++rank)
    cdf[rank] = sum += 1.0 / std::pow(double(rank + 1), s);
  std::mt19937_64 random(seed);
  std::vector<std::uint64_t> drawn(count);
  for (auto& key : drawn) {
    const double u = double(random() >> 11) * 0x1.0p-53 * sum;                      // uniform in [0, sum)
    key = std::uint64_t(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin()); // key = rank, 0 the most loaded
    key = std::min<std::uint64_t>(key, keys - 1);
  }
  return drawn;
}

// How many distinct keys W7 draws from.
std::uint64_t w7_key_count() {
  return smoke ? 2'000 : 10'000;
}

const std::vector<std::uint64_t>& w7_keys() {
  static const std::vector<std::uint64_t> keys = zipf_keys(smoke ? 6'400 : 1'000'000, w7_key_count(), 1.0, 7);
  return keys;
}

// The floor of any cache bounded to 1000 entries with least-recently-used eviction, on W7's keys: the
// loads that such a cache misses (found by replaying the keys, in order, through an exact LRU of 1000
// before timing) are fetched through the same batcher the cheapest way a loader can (a callback submit
// that sets the load's promise, with a job ID of its own); every other load copies a ready future made
// before timing. No cache, no lock, no bookkeeping: only what the misses cost. `jobs[i]`: the ID that
// load i's answer must carry.
struct w7_floor_plan {
  std::vector<std::uint64_t> jobs;
  std::vector<bool> miss;
  std::size_t misses = 0;
};
const w7_floor_plan& w7_floor() {
  static const w7_floor_plan plan = [] {
    const auto& keys = w7_keys();
    const std::uint64_t key_count = w7_key_count();
    w7_floor_plan made;
    made.jobs.resize(keys.size());
    made.miss.resize(keys.size());
    std::list<std::uint64_t> recency; // most recent first
    std::unordered_map<std::uint64_t, std::list<std::uint64_t>::iterator> cached;
    std::vector<std::uint64_t> fetches(key_count, 0);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const std::uint64_t key = keys[i];
      if (auto found = cached.find(key); found != cached.end()) {
        recency.splice(recency.begin(), recency, found->second);
        made.jobs[i] = key;
        continue;
      }
      made.miss[i] = true;
      ++made.misses;
      made.jobs[i] = key + key_count * ++fetches[key]; // unique: two fetches of a key may share a batch
      recency.push_front(key);
      cached.emplace(key, recency.begin());
      if (cached.size() > 1000) {
        cached.erase(recency.back());
        recency.pop_back();
      }
    }
    return made;
  }();
  return plan;
}

std::vector<double> w7_floor_loads_per_s; // variant 4's runs

// variant: 0 = plain map, 1 = DataLoader unbounded, 2 = DataLoader max_cached = 1000, 3 = plain LRU
// map of 1000 entries, 4 = the floor of a 1000-entry LRU cache (w7_floor).
void w7_data_loader(benchmark::State& state) {
  const int variant = static_cast<int>(state.range(0));
  const int threads = 64;
  const auto& keys = w7_keys();
  const std::size_t each = keys.size() / threads;
  double total_s = 0, total_loads = 0, hit_rate = 0;
  for (auto _ : state) {
    std::optional<plain_map_loader> plain_loader;
    std::optional<plain_lru_loader> lru_loader;
    std::optional<data_loader> loader;
    std::optional<microbatch::Batcher<std::uint64_t, Result, KeyEcho>> floor_batcher;
    std::vector<std::shared_future<Result>> ready; // variant 4: one per key, made before timing
    if (variant == 4) {
      (void)w7_floor(); // the replay, before timing
      floor_batcher.emplace(
          KeyEcho{}, [](std::uint64_t key) { return key; }, &Result::id, microbatch::Options{});
      for (std::uint64_t key = 0; key < w7_key_count(); ++key) {
        std::promise<Result> answered;
        answered.set_value({key});
        ready.push_back(answered.get_future().share());
      }
    } else if (variant == 0) {
      plain_loader.emplace();
    } else if (variant == 3) {
      lru_loader.emplace(1000);
    } else {
      loader.emplace(KeyEcho{}, &Result::id, microbatch::DataLoaderOptions{.max_cached = variant == 2 ? 1000u : 0u});
    }
    std::latch start(threads + 1);
    std::atomic<bool> wrong{false};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        const std::size_t first = std::size_t(t) * each;
        const std::uint64_t* mine = keys.data() + first;
        // The answers' IDs: the keys, except for the floor's misses (their own job IDs).
        const std::uint64_t* answers = variant == 4 ? w7_floor().jobs.data() + first : mine;
        std::vector<std::shared_future<Result>> futures;
        futures.reserve(each);
        start.arrive_and_wait();
        for (std::size_t i = 0; i < each; ++i) {
          if (variant == 4) {
            if (w7_floor().miss[first + i]) {
              std::promise<Result> answer;
              futures.push_back(answer.get_future().share());
              floor_batcher->submit(answers[i],
                                    [answer = std::move(answer)](microbatch::Outcome<Result>&& outcome) mutable {
                                      if (outcome.has_value()) {
                                        answer.set_value(outcome.value());
                                      } else {
                                        answer.set_exception(outcome.error());
                                      }
                                    });
            } else {
              futures.push_back(ready[mine[i]]);
            }
          } else {
            futures.push_back(variant == 0   ? plain_loader->load(mine[i])
                              : variant == 3 ? lru_loader->load(mine[i])
                                             : loader->load(mine[i]));
          }
        }
        for (std::size_t i = 0; i < each; ++i)
          if (futures[i].get().id != answers[i]) wrong = true;
      });
    }
    const auto t0 = clock_type::now();
    start.arrive_and_wait();
    for (auto& worker : workers)
      worker.join();
    const double elapsed = seconds_between(t0, clock_type::now());
    if (variant == 4) {
      hit_rate = 1.0 - double(w7_floor().misses) / double(keys.size());
    } else if (variant == 0) {
      hit_rate = plain_loader->hit_rate();
    } else if (variant == 3) {
      hit_rate = lru_loader->hit_rate();
    } else {
      const auto stats = loader->stats();
      hit_rate = double(stats.hits) / double(stats.hits + stats.misses);
    }
    if (wrong) state.SkipWithError("wrong result");
    state.SetIterationTime(elapsed);
    total_s += elapsed;
    total_loads += double(each) * threads;
  }
  const double loads_per_s = total_loads / total_s;
  if (variant == 4) { // not a row: the bound's floor, printed under the table
    w7_floor_loads_per_s.push_back(loads_per_s);
    state.counters["loads/s"] = loads_per_s;
    state.counters["hit rate"] = hit_rate;
    return;
  }
  // The plain map is the baseline column of both rows the issue asks for; the bounded DataLoader is
  // also set beside the plain LRU map, with the same bound, in a row of its own.
  std::vector<const char*> rows;
  if (variant == 0 || variant == 1) rows.push_back("W7 DataLoader unbounded");
  if (variant == 0 || variant == 2) rows.push_back("W7 DataLoader max 1000");
  if (variant == 2 || variant == 3) rows.push_back("W7 max 1000 vs LRU map");
  for (const char* workload : rows) {
    const char* impl = variant == 0 || variant == 3 ? "baseline" : "microbatch";
    record(state, workload, impl, "loads/s", loads_per_s, true);
    record(state, workload, impl, "hit rate", hit_rate, true);
  }
}

// Each workload runs `runs` times against the baseline and microbatch, alternated (baseline, microbatch,
// baseline, ...) in the same process, one iteration each; the table shows the medians.
int runs = 3;
void register_all() {
  runs = smoke ? 1 : 3;
  auto both = [&](const std::string& workload, auto baseline_fn, auto microbatch_fn, int arg) {
    for (int run = 0; run < runs; ++run) {
      for (auto [impl, fn] : {std::pair<const char*, void (*)(benchmark::State&)>{"baseline", baseline_fn},
                              std::pair<const char*, void (*)(benchmark::State&)>{"microbatch", microbatch_fn}}) {
        auto* b = benchmark::RegisterBenchmark((workload + "/" + impl).c_str(), fn);
        if (arg >= 0) b->Arg(arg);
        b->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);
      }
    }
  };
  for (int producers : {1, 2, 8, 64})
    both("W1_closed_loop", w1_closed_loop<plain>, w1_closed_loop<ours>, producers);
  both("W1co_64_coroutines", w1co<plain>, w1co<ours>, -1);
  both("W2_open_loop", w2_open_loop<plain>, w2_open_loop<ours>, -1);
  benchmark::RegisterBenchmark("W2_open_loop/std_promise_floor", w2_promise_floor)
      ->UseManualTime()
      ->Iterations(runs)
      ->Unit(benchmark::kMillisecond);
  both("W2cb_callbacks", w2cb<plain>, w2cb<ours>, -1);
  both("W3_timer_accuracy", w3_timer_accuracy<plain>, w3_timer_accuracy<ours>, -1);
  benchmark::RegisterBenchmark("W3_timer_accuracy/parts", w3_parts)->UseManualTime()->Iterations(1);
  both("W4_full_batches", w4_full_batches<plain>, w4_full_batches<ours>, -1);
  both("W4co_64_coroutines", w4co<plain>, w4co<ours>, -1);
  for (int run = 0; run < runs; ++run)
    for (auto [variant, name] :
         {std::pair{0, "plain_mutex_map"}, std::pair{1, "unbounded"}, std::pair{2, "max_cached_1000"},
          std::pair{3, "plain_lru_map_1000"}, std::pair{4, "lru_1000_floor"}})
      benchmark::RegisterBenchmark((std::string("W7_data_loader/") + name).c_str(), w7_data_loader)
          ->Arg(variant)
          ->UseManualTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
  for (int heavy : {0, 1})
    for (int run = 0; run < runs; ++run)
      for (int when_idle : {0, 1})
        benchmark::RegisterBenchmark(when_idle != 0 ? "W8_when_idle/dispatch_when_idle" : "W8_when_idle/fixed_delay",
                                     w8_when_idle)
            ->Args({when_idle, heavy})
            ->UseManualTime()
            ->Iterations(1)
            ->Unit(benchmark::kMillisecond);
  for (int style : {0, 1, 2})
    benchmark::RegisterBenchmark("W6_64_requests/microbatch", w6_request_styles)
        ->Arg(style)
        ->UseManualTime()
        ->Iterations(runs)
        ->Unit(benchmark::kMillisecond);
}

void print_table() {
  std::printf("\n%-24s %-28s %14s %14s %8s\n", "workload", "metric", "baseline", "microbatch", "ratio");
  for (const auto& [workload, metrics] : table) {
    for (const auto& [metric, by_impl] : metrics) {
      auto get = [&](const char* impl) {
        auto it = by_impl.find(impl);
        if (it == by_impl.end()) return -1.0;
        auto runs = it->second;
        return percentile(runs, 0.5); // the median run
      };
      const double base = get("baseline"), ours_value = get("microbatch");
      // ratio > 1 means microbatch is better: faster, or less latency / memory.
      double ratio = 0;
      if (base > 0 && ours_value > 0) ratio = higher_is_better[metric] ? ours_value / base : base / ours_value;
      std::printf("%-24s %-28s %14.6g %14.6g %7.2fx\n", workload.c_str(), metric.c_str(), base, ours_value, ratio);
    }
  }
  std::printf("(medians of %d alternated runs; ratio > 1: microbatch is better; for latency, memory, allocations\n"
              " and context switches the ratio is baseline/microbatch)\n",
              runs);
  if (promise_floor_jobs_per_s > 0)
    std::printf("W2 floor: std::promise/std::future alone, no batcher: %.6g jobs/s\n", promise_floor_jobs_per_s);
  if (!w7_floor_loads_per_s.empty())
    std::printf("W7 floor of any 1000-entry LRU cache: its %zu misses fetched (a callback submit setting a promise),\n"
                "    every other load copies a ready future, no cache at all: %.6g loads/s\n",
                w7_floor().misses, percentile(w7_floor_loads_per_s, 0.5));
  if (!w3_parts_summary.empty()) std::printf("%s\n", w3_parts_summary.c_str());
  for (const auto& [style, rate] : w6_jobs_per_s)
    std::printf("W6 64 concurrent requests, closed loop, microbatch: %-24s %.6g jobs/s\n", style.c_str(), rate);
  if (table.count("W8 light 1 caller") != 0)
    std::printf("W8: baseline = fixed 1 ms delay, microbatch = dispatch_when_idle (both microbatch; processor sleeps\n"
                "    200 us per call + 2 us per job; size 256)\n");
  if (table.count("W7 DataLoader unbounded") != 0)
    std::printf(
        "W7: baseline = one std::mutex around an unordered_map of shared_futures in front of the same batcher;\n"
        "    microbatch = microbatch::DataLoader (64 threads, %zu loads, Zipf s=1 over %llu keys);\n"
        "    'vs LRU map': the baseline is the same plain design with a least-recently-used bound of 1000\n",
        w7_keys().size(), static_cast<unsigned long long>(w7_key_count()));
}

} // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  int count = static_cast<int>(args.size());
  register_all();
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  print_table();
  return 0;
}
