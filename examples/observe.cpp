// Observe: why batches form, and what dispatch_when_idle changes. The same processor (a fixed 200 us
// per call plus 2 us per job, standing in for a database round trip) runs under light load (one caller
// in a closed loop) and heavy load (64 coroutines in a closed loop), once with a fixed 1 ms delay and once
// with dispatch_when_idle. Every second it prints what Options::on_batch and stats() saw; at the end, a
// comparison table.
//
// Usage: observe [seconds per scenario, default 2]
#include <microbatch/microbatch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <latch>
#include <span>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

struct Request {
  std::uint64_t id;
};
struct Reply {
  std::uint64_t id;
};

std::vector<Reply> slow_backend(std::span<Request> requests) {
  std::this_thread::sleep_for(200us + 2us * requests.size()); // one round trip, plus a little per row
  std::vector<Reply> replies;
  replies.reserve(requests.size());
  for (const Request& r : requests)
    replies.push_back({r.id});
  return replies;
}

/// What on_batch counted (it runs on the batcher's worker thread, so everything here is atomic).
struct batch_counts {
  std::atomic<std::uint64_t> by_trigger[6]{};
  void add(const microbatch::BatchInfo& info) {
    by_trigger[static_cast<int>(info.trigger)].fetch_add(1, std::memory_order_relaxed);
  }
};

struct task {
  struct promise_type {
    task get_return_object() noexcept { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };
};

using batcher_type = microbatch::Batcher<Request, Reply, decltype(&slow_backend)>;

task caller_coroutine(batcher_type& batcher, std::uint64_t caller, const std::atomic<bool>& stop,
                      std::atomic<std::uint64_t>& done, std::vector<double>& latencies_us, std::latch& finished) {
  for (std::uint64_t i = 0; !stop.load(std::memory_order_relaxed); ++i) {
    const std::uint64_t id = (caller << 32) | i;
    const auto t0 = steady::now();
    const Reply reply = co_await batcher.async_execute_job(Request{id});
    if (reply.id != id) std::abort();
    latencies_us.push_back(std::chrono::duration<double, std::micro>(steady::now() - t0).count());
    done.fetch_add(1, std::memory_order_relaxed);
  }
  finished.count_down();
}

struct outcome {
  double jobs_per_s, mean_batch, p50_us, p99_us;
};

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[static_cast<std::size_t>(p * double(values.size() - 1))];
}

outcome run(const char* name, int callers, bool when_idle, int seconds) {
  std::printf("\n== %s, %s\n", callers == 1 ? "light load (1 caller)" : "heavy load (64 coroutines)",
              when_idle ? "dispatch_when_idle" : "fixed 1 ms delay");
  (void)name;
  batch_counts counts;
  microbatch::Options options{.max_batch_size = 256, .max_batch_delay = 1ms};
  options.dispatch_when_idle = when_idle;
  options.on_batch = [&counts](const microbatch::BatchInfo& info) { counts.add(info); };
  batcher_type batcher(&slow_backend, &Request::id, &Reply::id, options);

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> done{0};
  std::vector<std::vector<double>> latencies(static_cast<std::size_t>(callers));
  std::latch finished(callers);
  for (int c = 0; c < callers; ++c)
    caller_coroutine(batcher, std::uint64_t(c), stop, done, latencies[std::size_t(c)], finished);

  std::printf("%4s %10s %10s %10s %12s   %s\n", "s", "jobs/s", "batches/s", "mean size", "p99 wait us",
              "batches by trigger (size delay flush shutdown idle)");
  microbatch::Stats before = batcher.stats();
  const auto start = steady::now();
  for (int second = 1; second <= seconds; ++second) {
    std::this_thread::sleep_until(start + std::chrono::seconds(second));
    const microbatch::Stats now = batcher.stats();
    const double jobs = double(now.jobs_completed - before.jobs_completed);
    const double batches = double(now.batches - before.batches);
    std::printf("%4d %10.0f %10.0f %10.1f %12.0f   %llu %llu %llu %llu %llu\n", second, jobs, batches,
                batches > 0 ? jobs / batches : 0.0,
                std::chrono::duration<double, std::micro>(now.queue_wait.p99).count(),
                static_cast<unsigned long long>(counts.by_trigger[0].load()),
                static_cast<unsigned long long>(counts.by_trigger[1].load()),
                static_cast<unsigned long long>(counts.by_trigger[2].load()),
                static_cast<unsigned long long>(counts.by_trigger[3].load()),
                static_cast<unsigned long long>(counts.by_trigger[4].load()));
    before = now;
  }
  stop = true;
  finished.wait(); // every caller has seen its last answer
  const double elapsed = std::chrono::duration<double>(steady::now() - start).count();
  const microbatch::Stats final_stats = batcher.stats();
  std::vector<double> all;
  for (auto& v : latencies)
    all.insert(all.end(), v.begin(), v.end());
  return {double(done.load()) / elapsed, final_stats.batch_size_mean, percentile(all, 0.50), percentile(all, 0.99)};
}

} // namespace

int main(int argc, char** argv) {
  const int seconds = argc > 1 ? std::atoi(argv[1]) : 2;
  if (seconds < 1) {
    std::fprintf(stderr, "usage: %s [seconds per scenario >= 1]\n", argv[0]);
    return 2;
  }
  const outcome light_fixed = run("light", 1, false, seconds);
  const outcome light_idle = run("light", 1, true, seconds);
  const outcome heavy_fixed = run("heavy", 64, false, seconds);
  const outcome heavy_idle = run("heavy", 64, true, seconds);

  std::printf("\n%-28s %12s %12s %10s %10s\n", "scenario", "jobs/s", "mean batch", "p50 us", "p99 us");
  auto row = [](const char* name, const outcome& o) {
    std::printf("%-28s %12.0f %12.1f %10.0f %10.0f\n", name, o.jobs_per_s, o.mean_batch, o.p50_us, o.p99_us);
  };
  row("light, fixed 1 ms delay", light_fixed);
  row("light, dispatch_when_idle", light_idle);
  row("heavy, fixed 1 ms delay", heavy_fixed);
  row("heavy, dispatch_when_idle", heavy_idle);
  std::printf("light load: dispatch_when_idle p50 is %.1fx lower; heavy load: its throughput is %.2fx the fixed "
              "delay's\n",
              light_fixed.p50_us / light_idle.p50_us, heavy_idle.jobs_per_s / heavy_fixed.jobs_per_s);
  return 0;
}
