// When batches are dispatched: size, delay (driven by a manual clock), flush.
#include <catch2/catch.hpp>

#include "support.hpp"

using namespace test;
using microbatch::Options;

TEST_CASE("a batch is dispatched when it reaches max_batch_size", "[triggers]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 3, .max_batch_delay = 0s});
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 6; ++id)
    futures.push_back(batcher.submit({id, int(id)}));
  for (std::uint64_t id = 1; id <= 6; ++id)
    CHECK(futures[id - 1].get().value == 2 * int(id));
  CHECK(log.sizes() == std::vector<std::size_t>{3, 3});
  auto stats = batcher.stats();
  CHECK(stats.batches == 2);
  CHECK(stats.batches_full == 2);
  CHECK(stats.batches_timed_out == 0);
  CHECK(stats.batches_flushed == 0);
}

TEST_CASE("with size and delay both 0 only flush dispatches", "[triggers]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 0, .max_batch_delay = 0s});
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 5; ++id)
    futures.push_back(batcher.submit({id, 1}));
  for (auto& f : futures)
    CHECK_FALSE(is_ready(f));
  batcher.flush();
  for (auto& f : futures)
    CHECK(f.get().value == 2);
  // All five in one batch proves none was dispatched before the flush.
  CHECK(log.sizes() == std::vector<std::size_t>{5});
  CHECK(batcher.stats().batches_flushed == 1);
}

TEST_CASE("flush returns once the batch is dispatched - an empty flush does nothing", "[triggers]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 100, .max_batch_delay = 1h});
  batcher.flush();
  CHECK(batcher.stats().batches == 0);
  auto a = batcher.submit({1, 1});
  auto b = batcher.submit({2, 2});
  batcher.flush();
  CHECK(batcher.stats().batches_flushed == 1); // dispatched before flush returned
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  batcher.flush();
  CHECK(batcher.stats().batches == 1);
}

TEST_CASE("jobs beyond a full batch start the next batch", "[triggers]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 2, .max_batch_delay = 0s});
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 5; ++id)
    futures.push_back(batcher.submit({id, 1}));
  futures[3].wait(); // both full batches are done before the flush
  batcher.flush();
  for (auto& f : futures)
    f.get();
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{1, 2}, {3, 4}, {5}});
  CHECK(batcher.stats().batches_full == 2);
  CHECK(batcher.stats().batches_flushed == 1);
}

TEST_CASE("a partial batch is dispatched max_batch_delay after its first job, not before", "[triggers][clock]") {
  microbatch::manual_clock clock;
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 10ms, .clock = &clock});
  auto first = batcher.submit({1, 1});
  clock.await_timers(1);
  CHECK(clock.next_timer() == clock.now() + 10ms);
  clock.advance(6ms);
  auto second = batcher.submit({2, 2}); // joins the running batch; does not restart its timer
  clock.await_timers(1);
  CHECK_FALSE(is_ready(first));
  CHECK(clock.next_timer() == clock.now() + 4ms);
  clock.advance(3ms);
  clock.await_timers(1); // woke, found 1 ms left, slept again
  CHECK_FALSE(is_ready(first));
  CHECK(batcher.stats().batches == 0);
  clock.advance(1ms);
  CHECK(first.get().value == 2);
  CHECK(second.get().value == 4);
  CHECK(log.sizes() == std::vector<std::size_t>{2});
  CHECK(batcher.stats().batches_timed_out == 1);
}

TEST_CASE("a real-time delay dispatches a partial batch", "[triggers]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 100, .max_batch_delay = 1ms});
  CHECK(batcher.execute_job({7, 21}).value == 42);
  CHECK(batcher.stats().batches_timed_out == 1);
}

TEST_CASE("default options: size 64, delay 1 ms, one batch at a time, unbounded", "[triggers]") {
  Options options;
  CHECK(options.max_batch_size == 64);
  CHECK(options.max_batch_delay == 1ms);
  CHECK(options.max_concurrent_batches == 1);
  CHECK(options.max_pending_jobs == 0);
  CHECK(options.overflow == microbatch::Overflow::block);
}
