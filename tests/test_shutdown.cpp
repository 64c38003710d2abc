// Shutdown: drains or cancels, releases blocked callers, is idempotent, and futures outlive it.
#include <catch2/catch.hpp>

#include <memory>

#include "support.hpp"

using namespace test;
using microbatch::Options;

TEST_CASE("shutdown dispatches queued jobs and returns after they ended", "[shutdown]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 4, .max_batch_delay = 1h});
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 10; ++id)
    futures.push_back(batcher.submit({id, 1}));
  batcher.shutdown();
  for (auto& f : futures)
    REQUIRE(is_ready(f));
  for (auto& f : futures)
    CHECK(f.get().value == 2);
  CHECK(log.sizes() == std::vector<std::size_t>{4, 4, 2});
  auto stats = batcher.stats();
  CHECK(stats.batches_full == 2);
  CHECK(stats.batches_flushed == 1);
  CHECK(stats.pending_jobs == 0);
  CHECK(stats.jobs_completed == 10);
}

TEST_CASE("submit and execute_job after shutdown throw batcher_closed", "[shutdown]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id);
  batcher.shutdown();
  CHECK_THROWS_AS(batcher.submit({1, 1}), microbatch::batcher_closed);
  CHECK_THROWS_AS(batcher.submit({1, 1}, std::chrono::steady_clock::now() - 1s), microbatch::batcher_closed);
  CHECK_THROWS_AS(batcher.execute_job({1, 1}), microbatch::batcher_closed);
#if defined(__cpp_lib_jthread)
  std::stop_source stop;
  CHECK_THROWS_AS(batcher.execute_job({1, 1}, stop.get_token()), microbatch::batcher_closed);
#endif
  batcher.flush(); // no effect, no hang
  CHECK(batcher.stats().jobs_submitted == 0);
}

TEST_CASE("shutdown is idempotent and safe from several threads at once", "[shutdown]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  auto first = batcher.submit({1, 1});
  held.await_entered();
  auto second = batcher.submit({2, 2});
  std::vector<std::thread> closers;
  std::atomic<int> returned_after_all_ended{0}; // Catch2 assertions are not thread-safe: count here
  for (int i = 0; i < 4; ++i) {
    closers.emplace_back([&] {
      batcher.shutdown();
      if (is_ready(first) && is_ready(second)) returned_after_all_ended.fetch_add(1);
    });
  }
  held.open();
  for (auto& t : closers)
    t.join();
  CHECK(returned_after_all_ended.load() == 4);
  batcher.shutdown();
  CHECK(first.get().value == 2);
  CHECK(second.get().value == 4);
}

TEST_CASE("the destructor drains, and futures outlive the batcher", "[shutdown]") {
  std::vector<std::future<Result>> futures;
  {
    auto batcher = std::make_unique<microbatch::Batcher<Job, Result, decltype(&doubled)>>(
        &doubled, &Job::id, &Result::id, Options{.max_batch_size = 100, .max_batch_delay = 1h});
    for (std::uint64_t id = 1; id <= 5; ++id)
      futures.push_back(batcher->submit({id, int(id)}));
  }
  for (std::uint64_t id = 1; id <= 5; ++id)
    CHECK(futures[id - 1].get().value == 2 * int(id));
}

TEST_CASE("Shutdown::cancel fails queued jobs with batcher_closed - the running batch finishes", "[shutdown]") {
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 2, .max_batch_delay = 1h});
  auto a = batcher.submit({1, 1});
  auto b = batcher.submit({2, 2});
  held.await_entered(); // batch {1, 2} is in the processor
  std::vector<std::future<Result>> queued;
  for (std::uint64_t id = 3; id <= 7; ++id)
    queued.push_back(batcher.submit({id, 1})); // {3,4}, {5,6} and 7
  std::thread closer([&] { batcher.shutdown(microbatch::Shutdown::cancel); });
  for (auto& f : queued)
    CHECK_THROWS_AS(f.get(), microbatch::batcher_closed); // while batch 1 still runs
  held.open();
  closer.join();
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1, 2}});
  auto stats = batcher.stats();
  CHECK(stats.jobs_completed == 2);
  CHECK(stats.jobs_failed == 5);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("a submit blocked by backpressure is released by shutdown with batcher_closed", "[shutdown]") {
  for (auto how : {microbatch::Shutdown::drain, microbatch::Shutdown::cancel}) {
    gate held;
    auto process = gated(held);
    microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1, .max_pending_jobs = 1});
    auto first = batcher.submit({1, 1});
    held.await_entered();
    // The slot is taken until the gate opens, so this submit cannot succeed before shutdown begins.
    auto blocked = std::async(std::launch::async, [&] { return batcher.submit({2, 2}); });
    std::thread closer([&] { batcher.shutdown(how); });
    CHECK_THROWS_AS(blocked.get(), microbatch::batcher_closed);
    held.open();
    closer.join();
    CHECK(first.get().value == 2);
  }
}

TEST_CASE("shutdown called from inside the processor begins the shutdown without deadlock", "[shutdown]") {
  microbatch::Batcher<Job, Result, std::function<std::vector<Result>(std::span<Job>)>>* self = nullptr;
  std::function<std::vector<Result>(std::span<Job>)> process = [&](std::span<Job> jobs) {
    self->shutdown();
    return doubled(jobs);
  };
  microbatch::Batcher<Job, Result, std::function<std::vector<Result>(std::span<Job>)>> batcher(
      process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  self = &batcher;
  CHECK(batcher.execute_job({1, 3}).value == 6);
  CHECK_THROWS_AS(batcher.submit({2, 2}), microbatch::batcher_closed);
}

TEST_CASE("abandoned futures never disturb anything", "[shutdown]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 8, .max_batch_delay = 100us});
  for (std::uint64_t id = 0; id < 1000; ++id)
    (void)batcher.submit({id, 1}); // nobody waits for these
  auto kept = batcher.submit({5000, 21});
  batcher.shutdown();
  CHECK(kept.get().value == 42);
  auto stats = batcher.stats();
  CHECK(stats.jobs_completed == 1001);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("a drain keeps enforcing deadlines until the last queued batch is taken", "[shutdown][deadlines][clock]") {
  microbatch::manual_clock clock;
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 2, .max_batch_delay = 1h, .clock = &clock});
  auto running = batcher.submit({1, 1});
  auto running_too = batcher.submit({2, 2});
  held.await_entered(); // batch {1, 2} holds the only processor slot
  auto doomed = batcher.submit({3, 3}, clock.now() + 5ms);
  std::thread drainer([&] { batcher.shutdown(); });
  while (batcher.stats().batches_flushed == 0)
    std::this_thread::yield(); // wait for a state: the drain has queued {3}, behind the busy slot
  clock.advance(5ms);
  // Before the fix the collector had exited by now and {3} failed only once a worker took it: never,
  // while the gate is shut.
  REQUIRE(doomed.wait_for(30s) == std::future_status::ready);
  CHECK_THROWS_AS(doomed.get(), microbatch::deadline_exceeded);
  CHECK_FALSE(is_ready(running));
  held.open();
  drainer.join();
  CHECK(running.get().value == 2);
  CHECK(running_too.get().value == 4);
  CHECK_FALSE(log.saw(3));
  CHECK(batcher.stats().jobs_expired == 1);
}

TEST_CASE("Shutdown::cancel escalates a drain in progress - queued jobs fail at once", "[shutdown]") {
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 2, .max_batch_delay = 1h});
  auto a = batcher.submit({1, 1});
  auto b = batcher.submit({2, 2});
  held.await_entered(); // batch {1, 2} is in the processor
  std::vector<std::future<Result>> queued;
  for (std::uint64_t id = 3; id <= 7; ++id)
    queued.push_back(batcher.submit({id, 1})); // {3,4}, {5,6} queued, 7 forming
  std::atomic<bool> drain_returned{false}, cancel_returned{false};
  std::thread drainer([&] {
    batcher.shutdown();
    drain_returned = true;
  });
  while (batcher.stats().batches_flushed == 0)
    std::this_thread::yield(); // wait for a state: the drain has begun (it queued {7})
  std::thread canceller([&] {
    batcher.shutdown(microbatch::Shutdown::cancel);
    cancel_returned = true;
  });
  for (auto& f : queued) {
    REQUIRE(f.wait_for(30s) == std::future_status::ready); // while batch 1 still holds the processor
    CHECK_THROWS_AS(f.get(), microbatch::batcher_closed);
  }
  CHECK_FALSE(drain_returned.load());
  CHECK_FALSE(cancel_returned.load()); // both return only once the batcher has stopped
  held.open();
  drainer.join();
  canceller.join();
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1, 2}});
  auto stats = batcher.stats();
  CHECK(stats.jobs_failed == 5);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("the batcher may be destroyed as soon as a callback's job ended, even while submit is returning",
          "[shutdown]") {
  // The callback runs on a worker and may complete before `submit` has returned on the submitting
  // thread; its owner then destroys the batcher. `shutdown` waits until that `submit` is out (ASan
  // would report the use after free otherwise). Many rounds make the window likely to be hit.
  for (int round = 0; round < 200; ++round) {
    auto batcher = std::make_unique<microbatch::Batcher<Job, Result, decltype(&doubled)>>(
        &doubled, &Job::id, &Result::id, Options{.max_batch_size = 1});
    std::promise<int> ended;
    auto result = ended.get_future();
    std::thread submitter([&] {
      batcher->submit({1, 21}, [&](microbatch::Outcome<Result>&& outcome) { ended.set_value(outcome.value().value); });
    });
    CHECK(result.get() == 42);
    batcher.reset(); // the submitting thread may still be inside submit
    submitter.join();
  }
}
