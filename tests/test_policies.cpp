// Batching policies: dispatch when idle (no latency floor under light load, group commit under load).
#include <catch2/catch.hpp>

#include "support.hpp"

#include <algorithm>
#include <latch>

using namespace test;
using microbatch::Options;

TEST_CASE("dispatch_when_idle: a job meets an idle worker and goes at once, without size or delay",
          "[policies][clock]") {
  microbatch::manual_clock clock; // never advanced: the 1 h delay cannot be what dispatches
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(
      process, &Job::id, &Result::id,
      Options{.max_batch_size = 100, .max_batch_delay = 1h, .clock = &clock, .dispatch_when_idle = true});
  for (std::uint64_t id = 1; id <= 3; ++id)
    CHECK(batcher.execute_job({id, int(id)}).value == 2 * int(id)); // one caller, one job at a time
  CHECK(log.sizes() == std::vector<std::size_t>{1, 1, 1});
  auto stats = batcher.stats();
  CHECK(stats.batches_idle == 3);
  CHECK(stats.batches == 3);
  CHECK(stats.batches_timed_out == 0);
}

TEST_CASE("dispatch_when_idle: while the slot is busy jobs accumulate; the free slot takes them all at once",
          "[policies]") {
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 1h, .dispatch_when_idle = true});
  auto first = batcher.submit({1, 1});
  held.await_entered(); // {1} holds the only slot
  std::vector<std::future<Result>> accumulated;
  for (std::uint64_t id = 2; id <= 5; ++id)
    accumulated.push_back(batcher.submit({id, int(id)}));
  CHECK(batcher.stats().batches == 1); // nothing else went while the slot was busy
  held.open();
  CHECK(first.get().value == 2);
  for (std::uint64_t id = 2; id <= 5; ++id)
    CHECK(accumulated[id - 2].get().value == 2 * int(id));
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1}, {2, 3, 4, 5}}); // group commit
  CHECK(batcher.stats().batches_idle == 2);
}

TEST_CASE("dispatch_when_idle: size still applies while the slot is busy", "[policies]") {
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 2, .max_batch_delay = 1h, .dispatch_when_idle = true});
  auto first = batcher.submit({1, 1});
  held.await_entered();
  std::vector<std::future<Result>> later;
  for (std::uint64_t id = 2; id <= 6; ++id)
    later.push_back(batcher.submit({id, 1})); // {2,3} and {4,5} fill; 6 waits
  CHECK(batcher.stats().batches_full == 2);
  held.open();
  for (auto& f : later)
    CHECK(f.get().value == 2);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1}, {2, 3}, {4, 5}, {6}});
  auto stats = batcher.stats();
  CHECK(stats.batches_idle == 2); // {1} and {6}
  CHECK(stats.batches_full == 2);
  CHECK(first.get().value == 2);
}

TEST_CASE("dispatch_when_idle: two slots take two jobs at once", "[policies]") {
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(
      process, &Job::id, &Result::id,
      Options{.max_batch_size = 100, .max_batch_delay = 1h, .max_concurrent_batches = 2, .dispatch_when_idle = true});
  auto a = batcher.submit({1, 1});
  held.await_entered(1);
  auto b = batcher.submit({2, 2});
  held.await_entered(1); // the second slot took {2} while {1} still runs
  held.open();
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  CHECK(batcher.stats().batches_idle == 2);
}

/// Records the thread of every processor call and of every `on_batch`. Thread-safe.
struct thread_log {
  std::mutex mutex;
  std::vector<std::thread::id> processor, observer; // guarded by mutex
  void record(std::vector<std::thread::id>& where) {
    std::lock_guard lock(mutex);
    where.push_back(std::this_thread::get_id());
  }
  std::size_t count(const std::vector<std::thread::id>& where, std::thread::id thread) {
    std::lock_guard lock(mutex);
    return std::size_t(std::count(where.begin(), where.end(), thread));
  }
};

// Whether a call finds the slot free can race with the worker (starting up, or coming back from the
// previous batch, it may take the next job first): so the tests below call until one batch ran on the
// calling thread, and bound the attempts.
constexpr std::uint64_t attempts = 1000;

TEST_CASE("dispatch_when_idle: a blocking execute_job that finds the slot free runs the batch on its own thread",
          "[policies]") {
  microbatch::manual_clock clock; // never advanced: the 1 h delay cannot be what dispatches
  thread_log threads;
  auto process = [&](std::span<Job> jobs) {
    threads.record(threads.processor);
    return doubled(jobs);
  };
  Options options{.max_batch_size = 100, .max_batch_delay = 1h, .clock = &clock, .dispatch_when_idle = true};
  options.on_batch = [&](const microbatch::BatchInfo&) { threads.record(threads.observer); };
  microbatch::Batcher batcher(process, &Job::id, &Result::id, options);
  const auto caller = std::this_thread::get_id();
  std::uint64_t calls = 0;
  while (calls < attempts && threads.count(threads.processor, caller) == 0) {
    ++calls;
    CHECK(batcher.execute_job({calls, int(calls)}).value == 2 * int(calls));
  }
  REQUIRE(threads.count(threads.processor, caller) == 1);
  CHECK(threads.count(threads.observer, caller) == 1); // on_batch on the thread that ran the batch, before it returned
  CHECK(batcher.stats().batches_idle == calls);
}

TEST_CASE("dispatch_when_idle: jobs that arrive while a caller runs a batch go to the worker once it is done",
          "[policies]") {
  gate held;
  thread_log threads;
  std::thread::id caller_id;
  std::atomic<bool> gated{false};
  auto process = [&](std::span<Job> jobs) {
    threads.record(threads.processor);
    if (std::this_thread::get_id() == caller_id && !gated.exchange(true)) held.enter(); // the first caller-run batch
    return doubled(jobs);
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 1h, .dispatch_when_idle = true});
  std::latch started(1);
  std::uint64_t calls = 0, wrong = 0; // (Catch2 checks on the main thread only)
  std::thread caller([&] {
    caller_id = std::this_thread::get_id();
    started.count_down();
    while (calls < attempts && !gated.load()) {
      ++calls;
      if (batcher.execute_job({calls, int(calls)}).value != 2 * int(calls)) ++wrong;
    }
  });
  started.wait();
  held.await_entered(); // a batch holds the only slot, on the caller's thread
  auto later = batcher.submit({attempts + 1, 1});
  auto last = batcher.submit({attempts + 2, 2});
  CHECK(later.wait_for(0s) == std::future_status::timeout); // the slot is taken: they wait
  held.open();
  CHECK(later.get().value == 2); // well before the 1 h delay: the caller handed them to the worker
  CHECK(last.get().value == 4);
  caller.join();
  REQUIRE(gated.load());
  CHECK(wrong == 0);
  std::lock_guard lock(threads.mutex);
  REQUIRE(threads.processor.size() == calls + 1); // {attempts + 1, attempts + 2} went as one batch
  CHECK(threads.processor.back() != caller_id);
}

TEST_CASE("dispatch_when_idle: shutdown waits for a batch that a caller runs on its own thread",
          "[policies][shutdown]") {
  gate held;
  std::thread::id caller_id;
  std::atomic<bool> gated{false};
  std::atomic<bool> processor_returned{false};
  auto process = [&](std::span<Job> jobs) {
    const bool first_on_caller = std::this_thread::get_id() == caller_id && !gated.exchange(true);
    if (first_on_caller) held.enter();
    auto results = doubled(jobs);
    if (first_on_caller) processor_returned.store(true);
    return results;
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 1h, .dispatch_when_idle = true});
  std::latch started(1);
  std::uint64_t wrong = 0; // (Catch2 checks on the main thread only)
  std::thread caller([&] {
    caller_id = std::this_thread::get_id();
    started.count_down();
    for (std::uint64_t calls = 1; calls <= attempts && !gated.load(); ++calls)
      if (batcher.execute_job({calls, int(calls)}).value != 2 * int(calls)) ++wrong;
  });
  started.wait();
  held.await_entered();
  bool returned_after_batch = false;
  std::uint64_t pending_after_shutdown = 1;
  std::thread stopper([&] {
    batcher.shutdown();
    returned_after_batch = processor_returned.load(); // shutdown returned only after the caller's batch ended
    pending_after_shutdown = batcher.stats().pending_jobs;
  });
  // Until shutdown began, a probe with a past deadline is refused with deadline_exceeded (and accepted
  // nowhere); from then on with batcher_closed.
  for (;;) {
    try {
      (void)batcher.submit({0, 0}, std::chrono::steady_clock::time_point{});
    } catch (const microbatch::batcher_closed&) {
      break;
    } catch (const microbatch::deadline_exceeded&) {
      std::this_thread::yield();
    }
  }
  held.open();
  stopper.join();
  caller.join();
  CHECK(returned_after_batch);
  CHECK(pending_after_shutdown == 0);
  CHECK(wrong == 0);
}

TEST_CASE("on_batch: once per processed batch, after its jobs ended, with exact times on a manual clock",
          "[policies][observe][clock]") {
  microbatch::manual_clock clock;
  std::mutex seen_mutex;
  std::vector<microbatch::BatchInfo> seen; // guarded by seen_mutex
  std::vector<std::future<Result>> futures;
  std::atomic<int> ended_before_call{0};
  std::promise<void> observed;
  auto process = [&](std::span<Job> jobs) {
    clock.advance(3ms); // the processor "takes" 3 ms
    auto results = doubled(jobs);
    results.pop_back(); // the last job gets no_result
    return results;
  };
  Options options{.max_batch_size = 10, .max_batch_delay = 5ms, .clock = &clock};
  options.on_batch = [&](const microbatch::BatchInfo& info) {
    int ready = 0;
    for (auto& f : futures)
      ready += is_ready(f);
    ended_before_call = ready;
    {
      std::lock_guard lock(seen_mutex);
      seen.push_back(info);
    }
    observed.set_value();
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id, options);
  futures.push_back(batcher.submit({1, 1}));
  futures.push_back(batcher.submit({2, 2}));
  clock.await_timers(1);
  clock.advance(5ms);           // the delay dispatches {1, 2}
  observed.get_future().wait(); // the futures are only read by on_batch until here
  CHECK(futures[0].get().value == 2);
  CHECK_THROWS_AS(futures[1].get(), microbatch::no_result);
  batcher.shutdown();
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].trigger == microbatch::Trigger::delay);
  CHECK(seen[0].size == 2);
  CHECK(seen[0].weight == 2);
  CHECK(seen[0].failed == 1);
  CHECK(seen[0].queue_wait == 5ms);
  CHECK(seen[0].processing_time == 3ms);
  CHECK(ended_before_call.load() == 2);
  auto stats = batcher.stats();
  CHECK(stats.batch_size_mean == 2.0);
  CHECK(stats.batch_size_max == 2);
  CHECK(stats.processing_time.max == 3ms);
  CHECK(stats.queue_wait.max == 5ms);
  CHECK(stats.queue_wait.p50 >= 5ms * 0.95);
  CHECK(stats.queue_wait.p50 <= 5ms * 1.05);
}

TEST_CASE("on_batch: triggers size, flush, shutdown and idle; an exception is contained and counted",
          "[policies][observe]") {
  std::mutex seen_mutex;
  std::vector<microbatch::Trigger> triggers; // guarded by seen_mutex
  Options options{.max_batch_size = 2, .max_batch_delay = 1h};
  options.on_batch = [&](const microbatch::BatchInfo& info) {
    {
      std::lock_guard lock(seen_mutex);
      triggers.push_back(info.trigger);
    }
    throw std::runtime_error("careless observer");
  };
  {
    microbatch::Batcher batcher(doubled, &Job::id, &Result::id, options);
    CHECK(batcher.stats().queue_wait.p99 == 0ns); // all zero before any batch
    auto a = batcher.submit({1, 1});
    auto b = batcher.submit({2, 2}); // size
    CHECK(a.get().value == 2);
    CHECK(b.get().value == 4);
    auto c = batcher.submit({3, 3});
    batcher.flush(); // flush
    CHECK(c.get().value == 6);
    auto d = batcher.submit({4, 4});
    batcher.shutdown(); // shutdown
    CHECK(d.get().value == 8);
    CHECK(batcher.stats().observer_errors == 3);
  }
  options.dispatch_when_idle = true;
  microbatch::Batcher idle(doubled, &Job::id, &Result::id, options);
  CHECK(idle.execute_job({5, 5}).value == 10);
  idle.shutdown();
  using microbatch::Trigger;
  CHECK(triggers == std::vector<Trigger>{Trigger::size, Trigger::flush, Trigger::shutdown, Trigger::idle});
}

TEST_CASE("DuplicateIds::coalesce: equal IDs in a batch reach the processor once and share its outcome",
          "[policies][correlation]") {
  batch_log log;
  auto process = logged(log);
  Options options{.max_batch_size = 4, .max_batch_delay = 1h};
  options.duplicate_ids = microbatch::DuplicateIds::coalesce;
  microbatch::Batcher batcher(process, &Job::id, &Result::id, options);
  auto first = batcher.submit({5, 10});
  auto other = batcher.submit({6, 1});
  auto second = batcher.submit({5, 99}); // same ID: shares the first's slot (and its result)
  auto third = batcher.submit({5, 7});
  CHECK(first.get().value == 20);
  CHECK(second.get().value == 20);
  CHECK(third.get().value == 20);
  CHECK(other.get().value == 2);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{5, 6}});
  CHECK(batcher.stats().jobs_coalesced == 2);
  CHECK(batcher.stats().jobs_failed == 0);
}

TEST_CASE("DuplicateIds::coalesce: the shared slot's error reaches every job with that ID", "[policies][correlation]") {
  Options options{.max_batch_size = 3, .max_batch_delay = 1h};
  options.duplicate_ids = microbatch::DuplicateIds::coalesce;
  auto drops_five = [](std::span<Job> jobs) {
    std::vector<Result> results;
    for (const Job& job : jobs)
      if (job.id != 5) results.push_back({job.id, 0});
    return results;
  };
  microbatch::Batcher dropping(drops_five, &Job::id, &Result::id, options);
  auto a = dropping.submit({5, 1});
  auto b = dropping.submit({5, 2});
  auto c = dropping.submit({6, 3});
  CHECK_THROWS_AS(a.get(), microbatch::no_result);
  CHECK_THROWS_AS(b.get(), microbatch::no_result);
  CHECK(c.get().id == 6);

  auto throws = [](std::span<Job>) -> std::vector<Result> { throw std::runtime_error("backend down"); };
  microbatch::Batcher failing(throws, &Job::id, &Result::id, options);
  auto d = failing.submit({5, 1});
  auto e = failing.submit({5, 2});
  auto f = failing.submit({6, 3});
  CHECK_THROWS_WITH(d.get(), "backend down");
  CHECK_THROWS_WITH(e.get(), "backend down");
  CHECK_THROWS_WITH(f.get(), "backend down");
  CHECK(failing.stats().jobs_coalesced == 1);
}

TEST_CASE("DuplicateIds::coalesce is refused without IDs or with a Result that cannot be copied",
          "[policies][errors]") {
  Options options;
  options.duplicate_ids = microbatch::DuplicateIds::coalesce;
  using positional = microbatch::Batcher<Job, Result, decltype(&doubled)>;
  CHECK_THROWS_WITH(positional(&doubled, options), Catch::Contains("duplicate_ids"));
  struct Unique {
    std::uint64_t id;
    std::unique_ptr<int> payload;
  };
  auto process = [](std::span<Job> jobs) {
    std::vector<Unique> out;
    for (const Job& j : jobs)
      out.push_back({j.id, nullptr});
    return out;
  };
  using move_only = microbatch::Batcher<Job, Unique, decltype(process)>;
  CHECK_THROWS_WITH(move_only(process, &Job::id, &Unique::id, options), Catch::Contains("copy-constructible"));
}

TEST_CASE("max_batch_weight: a batch that reaches the weight goes at once; a job that would exceed it closes "
          "the batch first",
          "[policies][weight]") {
  batch_log log;
  std::mutex seen_mutex;
  std::vector<std::pair<microbatch::Trigger, std::size_t>> seen; // guarded by seen_mutex
  Options options{.max_batch_size = 100, .max_batch_delay = 1h};
  options.max_batch_weight = 10;
  options.on_batch = [&](const microbatch::BatchInfo& info) {
    std::lock_guard lock(seen_mutex);
    seen.emplace_back(info.trigger, info.weight);
  };
  microbatch::Batcher batcher(weighing_processor{&log}, &Job::id, &Result::id, options);
  auto a = batcher.submit({1, 4});
  auto b = batcher.submit({2, 6}); // 4 + 6 = 10: reaches the limit, goes at once
  CHECK(a.get().value == 8);
  CHECK(b.get().value == 12);
  auto c = batcher.submit({3, 7});
  auto d = batcher.submit({4, 5}); // 7 + 5 > 10: {3} goes, {4} starts the next batch
  CHECK(c.get().value == 14);
  CHECK_FALSE(is_ready(d));
  batcher.flush();
  CHECK(d.get().value == 10);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1, 2}, {3}, {4}});
  batcher.shutdown();
  auto stats = batcher.stats();
  CHECK(stats.batches_weight == 2);
  CHECK(stats.batches_flushed == 1);
  using microbatch::Trigger;
  CHECK(seen ==
        std::vector<std::pair<Trigger, std::size_t>>{{Trigger::weight, 10}, {Trigger::weight, 7}, {Trigger::flush, 5}});
}

TEST_CASE("max_batch_weight: a job heavier than the limit is refused with oversized_job", "[policies][weight]") {
  batch_log log;
  Options options{.max_batch_size = 100, .max_batch_delay = 1h};
  options.max_batch_weight = 10;
  microbatch::Batcher batcher(weighing_processor{&log}, &Job::id, &Result::id, options);
  CHECK_THROWS_AS(batcher.submit({1, 11}), microbatch::oversized_job);
  CHECK_THROWS_WITH(batcher.execute_job({1, 11}), Catch::Contains("11") && Catch::Contains("max_batch_weight (10)"));
  CHECK(batcher.stats().jobs_submitted == 0);
  auto fits = batcher.submit({2, 10});
  CHECK(fits.get().value == 20);
}

TEST_CASE("max_batch_weight without a weight member is refused by the constructor", "[policies][weight][errors]") {
  Options options;
  options.max_batch_weight = 10;
  using unweighed = microbatch::Batcher<Job, Result, decltype(&doubled)>;
  CHECK_THROWS_AS(unweighed(&doubled, &Job::id, &Result::id, options), std::invalid_argument);
  CHECK_THROWS_WITH(unweighed(&doubled, &Job::id, &Result::id, options), Catch::Contains("max_batch_weight"));
}
