// max_pending_jobs: block or reject, and when a slot frees up.
#include <catch2/catch.hpp>

#include "support.hpp"

using namespace test;
using microbatch::Options;
using microbatch::Overflow;

TEST_CASE("Overflow::reject throws queue_full at max_pending_jobs and counts it", "[backpressure]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_pending_jobs = 2, .overflow = Overflow::reject});
  auto a = batcher.submit({1, 1});
  held.await_entered();
  auto b = batcher.submit({2, 2});
  CHECK(batcher.stats().pending_jobs == 2);
  CHECK_THROWS_AS(batcher.submit({3, 3}), microbatch::queue_full);
  CHECK_THROWS_WITH(batcher.execute_job({3, 3}), Catch::Contains("max_pending_jobs"));
  held.open();
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  auto stats = batcher.stats();
  CHECK(stats.jobs_rejected == 2);
  CHECK(stats.jobs_submitted == 2);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("Overflow::block waits until a job completes", "[backpressure]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1, .max_pending_jobs = 1});
  auto a = batcher.submit({1, 1});
  held.await_entered();
  auto blocked = std::async(std::launch::async, [&] {
    auto future = batcher.submit({2, 2});
    // The only way in was a completed job: the slot is freed by a completion, never earlier.
    const auto completed_when_admitted = batcher.stats().jobs_completed;
    return std::make_pair(std::move(future), completed_when_admitted);
  });
  CHECK_FALSE(blocked.wait_for(0s) == std::future_status::ready);
  held.open();
  auto [b, completed_when_admitted] = blocked.get();
  CHECK(completed_when_admitted >= 1);
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
}

TEST_CASE("a job counts as completed before its future becomes ready", "[backpressure]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_pending_jobs = 1, .overflow = Overflow::reject});
  for (std::uint64_t id = 0; id < 200; ++id) {
    // Would throw queue_full if the previous job's slot were freed after its result was visible.
    auto future = batcher.submit({id, 1});
    CHECK(future.get().value == 2);
    CHECK(batcher.execute_job({id, 2}).value == 4);
  }
  CHECK(batcher.stats().jobs_rejected == 0);
  CHECK(batcher.stats().jobs_completed == 400);
}

#if defined(__cpp_lib_jthread) // std::stop_token: libc++ before 20 has none
TEST_CASE("a submit blocked by backpressure is released by its stop_token with cancelled", "[backpressure]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1, .max_pending_jobs = 1});
  auto a = batcher.submit({1, 1});
  held.await_entered();
  std::stop_source stop;
  auto blocked = std::async(std::launch::async, [&] { return batcher.execute_job({2, 2}, stop.get_token()); });
  stop.request_stop();
  CHECK_THROWS_AS(blocked.get(), microbatch::cancelled);
  held.open();
  CHECK(a.get().value == 2);
  batcher.shutdown();
  CHECK(batcher.stats().jobs_submitted == 1); // the cancelled wait never got in
}
#endif
