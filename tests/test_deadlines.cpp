// Deadlines and cancellation: jobs leave the queue on time, even while every processor slot is busy.
#include <catch2/catch.hpp>

#include <algorithm>

#include "support.hpp"

using namespace test;
using microbatch::Options;

TEST_CASE("a job whose deadline passes while queued behind a busy processor fails at its deadline",
          "[deadlines][clock]") {
  microbatch::manual_clock clock;
  gate held;
  batch_log log;
  auto process = logged_and_gated(log, held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_batch_delay = 0s, .clock = &clock});
  auto running = batcher.submit({1, 1});
  held.await_entered();
  auto doomed = batcher.submit({2, 2}, clock.now() + 5ms); // a full batch of one, waiting for the worker
  auto patient = batcher.submit({3, 3}, clock.now() + 1h);
  clock.await_timers(1);
  CHECK(clock.next_timer() == clock.now() + 5ms);
  clock.advance(5ms);
  CHECK_THROWS_AS(doomed.get(), microbatch::deadline_exceeded); // while batch 1 still holds the processor
  CHECK_FALSE(is_ready(running));
  held.open();
  CHECK(running.get().value == 2);
  CHECK(patient.get().value == 6);
  CHECK_FALSE(log.saw(2));
  auto stats = batcher.stats();
  CHECK(stats.jobs_expired == 1);
  CHECK(stats.jobs_failed == 1);
  CHECK(stats.jobs_completed == 2);
}

TEST_CASE("a deadline in the forming batch fails the job without dispatching it", "[deadlines][clock]") {
  microbatch::manual_clock clock;
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 10, .max_batch_delay = 20ms, .clock = &clock});
  auto keeps = batcher.submit({1, 1});
  auto expires = batcher.submit({2, 2}, clock.now() + 3ms);
  clock.await_timers(1);
  clock.advance(3ms);
  CHECK_THROWS_AS(expires.get(), microbatch::deadline_exceeded);
  clock.advance(17ms);
  CHECK(keeps.get().value == 2);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1}});
}

TEST_CASE("a deadline already past at submit throws deadline_exceeded", "[deadlines]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id);
  CHECK_THROWS_AS(batcher.submit({1, 1}, std::chrono::steady_clock::now() - 1ms), microbatch::deadline_exceeded);
  CHECK(batcher.submit({2, 2}, std::chrono::steady_clock::now() + 1h).get().value == 4);
}

#if defined(__cpp_lib_jthread) // cancellation needs std::stop_token: libc++ before 20 has none
TEST_CASE("cancelling a queued job: it leaves the queue and execute_job throws cancelled", "[deadlines][cancel]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 0, .max_batch_delay = 0s});
  std::stop_source stop;
  auto caller = std::async(std::launch::async, [&] { return batcher.execute_job({1, 1}, stop.get_token()); });
  while (batcher.stats().jobs_submitted == 0)
    std::this_thread::yield(); // wait for a state, not a time
  stop.request_stop();
  CHECK_THROWS_AS(caller.get(), microbatch::cancelled);
  batcher.flush();
  CHECK(batcher.stats().batches == 0); // the cancelled job left the queue: nothing to dispatch
  auto later = batcher.submit({2, 2});
  batcher.flush();
  CHECK(later.get().value == 4);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{2}});
  auto stats = batcher.stats();
  CHECK(stats.jobs_cancelled == 1);
  CHECK(stats.jobs_failed == 1);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("cancelling a job in the processor returns at once - its result is discarded", "[deadlines][cancel]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  std::stop_source stop;
  auto caller = std::async(std::launch::async, [&] { return batcher.execute_job({1, 1}, stop.get_token()); });
  held.await_entered();
  stop.request_stop();
  CHECK_THROWS_AS(caller.get(), microbatch::cancelled); // the processor is still inside the batch
  held.open();
  batcher.shutdown();
  auto stats = batcher.stats();
  CHECK(stats.jobs_cancelled == 1);
  CHECK(stats.jobs_completed == 0);
  CHECK(stats.uncorrelated_results == 0);
}

TEST_CASE("cancelling, in the processor, a job whose ID later jobs share: they still get its result",
          "[deadlines][cancel][correlation]") {
  // Results in the jobs' order take the worker's short path; reversed, its general one.
  const bool reversed = GENERATE(false, true);
  gate held;
  auto process = [&held, reversed](std::span<Job> jobs) {
    held.enter();
    auto results = doubled(jobs);
    if (reversed) std::reverse(results.begin(), results.end());
    return results;
  };
  Options options{.max_batch_size = 3, .max_batch_delay = 0s};
  options.duplicate_ids = microbatch::DuplicateIds::coalesce;
  microbatch::Batcher batcher(process, &Job::id, &Result::id, options);
  std::stop_source stop;
  auto leader = std::async(std::launch::async, [&] { return batcher.execute_job({5, 1}, stop.get_token()); });
  while (batcher.stats().jobs_submitted == 0)
    std::this_thread::yield();            // wait for a state, not a time
  auto follower = batcher.submit({5, 2}); // shares the leader's slot
  auto other = batcher.submit({6, 3});    // fills the batch
  held.await_entered();
  stop.request_stop();
  CHECK_THROWS_AS(leader.get(), microbatch::cancelled);
  held.open();
  CHECK(follower.get().value == 2); // the leader's result
  CHECK(other.get().value == 6);
  batcher.shutdown();
  auto stats = batcher.stats();
  CHECK(stats.jobs_completed == 2);
  CHECK(stats.jobs_cancelled == 1);
  CHECK(stats.jobs_coalesced == 1);
  CHECK(stats.jobs_failed == 1);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("a stop requested before execute_job throws cancelled without submitting", "[deadlines][cancel]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id);
  std::stop_source stop;
  stop.request_stop();
  CHECK_THROWS_AS(batcher.execute_job({1, 1}, stop.get_token()), microbatch::cancelled);
  CHECK(batcher.stats().jobs_submitted == 0);
}
#endif
