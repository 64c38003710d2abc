// Processor failures, invalid options, and how errors reach callers.
#include <catch2/catch.hpp>

#include <set>
#include <string>

#include "support.hpp"

using namespace test;
using microbatch::Options;

TEST_CASE("a throwing processor fails every job of its batch with the same exception", "[errors]") {
  std::atomic<int> calls{0};
  auto flaky = [&](std::span<Job> jobs) {
    if (calls.fetch_add(1) == 0) throw std::runtime_error("database unavailable");
    return doubled(jobs);
  };
  microbatch::Batcher batcher(flaky, &Job::id, &Result::id, Options{.max_batch_size = 3, .max_batch_delay = 0s});
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 3; ++id)
    futures.push_back(batcher.submit({id, 1}));
  std::set<const void*> exception_objects;
  for (auto& f : futures) {
    try {
      f.get();
      FAIL("expected the processor's exception");
    } catch (const std::runtime_error& e) {
      CHECK(std::string(e.what()) == "database unavailable");
      exception_objects.insert(&e);
    }
  }
  CHECK(exception_objects.size() == 1); // one exception object, shared by the batch

  // The batcher keeps working.
  auto next = batcher.submit({4, 5});
  batcher.flush();
  CHECK(next.get().value == 10);
  auto stats = batcher.stats();
  CHECK(stats.jobs_failed == 3);
  CHECK(stats.jobs_completed == 1);
}

TEST_CASE("execute_job returns the result or rethrows the job's error", "[errors]") {
  auto process = [](std::span<Job> jobs) {
    if (jobs[0].value < 0) throw std::invalid_argument("negative");
    return doubled(jobs);
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  CHECK(batcher.execute_job({1, 4}).value == 8);
  CHECK_THROWS_AS(batcher.execute_job({2, -4}), std::invalid_argument);
  CHECK(batcher.execute_job({3, 5}).value == 10);
}

TEST_CASE("exceptions of any type reach the caller", "[errors]") {
  auto process = [](std::span<Job>) -> std::vector<Result> { throw 42; };
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  CHECK_THROWS_AS(batcher.execute_job({1, 1}), int);
}

TEST_CASE("invalid options throw std::invalid_argument naming the field", "[errors]") {
  auto make = [](Options options) { microbatch::Batcher batcher(doubled, &Job::id, &Result::id, options); };
  CHECK_THROWS_WITH(make(Options{.max_concurrent_batches = 0}), Catch::Contains("max_concurrent_batches"));
  CHECK_THROWS_AS(make(Options{.max_concurrent_batches = 0}), std::invalid_argument);
  CHECK_THROWS_WITH(make(Options{.max_batch_delay = -1ns}), Catch::Contains("max_batch_delay"));
  CHECK_THROWS_AS(make(Options{.max_batch_delay = -1ns}), std::invalid_argument);
  CHECK_THROWS_WITH(make(Options{.max_batch_size = 10, .max_pending_jobs = 5}),
                    Catch::Contains("max_batch_size") && Catch::Contains("max_pending_jobs"));
  CHECK_THROWS_AS(make(Options{.max_batch_size = 10, .max_pending_jobs = 5}), std::invalid_argument);
  CHECK_NOTHROW(make(Options{.max_batch_size = 5, .max_pending_jobs = 5}));
  CHECK_NOTHROW(make(Options{.max_batch_size = 0, .max_batch_delay = 0s, .max_pending_jobs = 1}));
}

TEST_CASE("all microbatch errors derive from microbatch::error and std::runtime_error", "[errors]") {
  STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, microbatch::error>);
  STATIC_REQUIRE(std::is_base_of_v<microbatch::error, microbatch::no_result>);
  STATIC_REQUIRE(std::is_base_of_v<microbatch::error, microbatch::duplicate_id>);
  STATIC_REQUIRE(std::is_base_of_v<microbatch::error, microbatch::batcher_closed>);
  STATIC_REQUIRE(std::is_base_of_v<microbatch::error, microbatch::queue_full>);
  STATIC_REQUIRE(std::is_base_of_v<microbatch::error, microbatch::deadline_exceeded>);
  STATIC_REQUIRE(std::is_base_of_v<microbatch::error, microbatch::cancelled>);
}
