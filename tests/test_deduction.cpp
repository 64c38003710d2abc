// Deducing Job and Result, std::ref processors, and the API details a new user reaches for first.
#include <catch2/catch.hpp>

#include <functional>
#include <mutex>
#include <string>

#include "support.hpp"

using namespace test;
using microbatch::Options;

namespace {
std::vector<Result> doubled_noexcept(std::span<Job> jobs) noexcept {
  return doubled(jobs);
}

/// A stateful processor that cannot be moved (it holds a mutex): used through std::ref.
class counting_processor {
public:
  std::vector<Result> operator()(std::span<Job> jobs) {
    std::lock_guard lock(mutex_);
    ++batches_;
    return doubled(jobs);
  }
  int batches() const {
    std::lock_guard lock(mutex_);
    return batches_;
  }

private:
  mutable std::mutex mutex_;
  int batches_ = 0;
};

struct overloaded_processor {
  std::vector<Result> operator()(std::span<Job> jobs) const { return doubled(jobs); }
  std::vector<int> operator()(std::span<int> values) const { return {values.begin(), values.end()}; }
};

const Options one_per_batch{.max_batch_size = 1};
} // namespace

TEST_CASE("Job and Result are deduced from member-pointer IDs whatever the processor is", "[deduction]") {
  microbatch::Batcher from_noexcept(doubled_noexcept, &Job::id, &Result::id, one_per_batch);
  CHECK(from_noexcept.execute_job({1, 2}).value == 4);

  auto generic = [](auto jobs) { return doubled(jobs); };
  microbatch::Batcher from_generic(generic, &Job::id, &Result::id, one_per_batch);
  CHECK(from_generic.execute_job({1, 3}).value == 6);

  microbatch::Batcher from_overloaded(overloaded_processor{}, &Job::id, &Result::id, one_per_batch);
  CHECK(from_overloaded.execute_job({1, 4}).value == 8);

  counting_processor stateful;
  {
    microbatch::Batcher from_ref(std::ref(stateful), &Job::id, &Result::id, one_per_batch);
    CHECK(from_ref.execute_job({1, 5}).value == 10);
    CHECK(from_ref.execute_job({2, 6}).value == 12);
  }
  CHECK(stateful.batches() == 2); // the caller's own object did the work
  STATIC_REQUIRE(std::is_same_v<decltype(from_noexcept)::job_type, Job>);
  STATIC_REQUIRE(std::is_same_v<decltype(from_generic)::result_type, Result>);
}

TEST_CASE("Job and Result are deduced from a noexcept function or std::ref without IDs", "[deduction]") {
  microbatch::Batcher positional(doubled_noexcept, one_per_batch);
  CHECK(positional.execute_job({1, 7}).value == 14);
  microbatch::Batcher pointer(&doubled_noexcept, one_per_batch);
  CHECK(pointer.execute_job({1, 8}).value == 16);
  auto lambda = [](std::span<Job> jobs) noexcept { return doubled(jobs); };
  microbatch::Batcher from_ref(
      std::ref(lambda), [](const Job& j) { return j.id; }, [](const Result& r) { return r.id; }, one_per_batch);
  CHECK(from_ref.execute_job({3, 9}).value == 18);
}

TEST_CASE("Outcome::value() works on const and rvalue outcomes", "[deduction][callbacks]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, one_per_batch);
  std::promise<int> seen;
  batcher.submit({1, 21}, [&](const microbatch::Outcome<Result>& outcome) { seen.set_value(outcome.value().value); });
  CHECK(seen.get_future().get() == 42);
  std::promise<int> moved;
  batcher.submit({2, 5}, [&](microbatch::Outcome<Result>&& outcome) {
    Result taken = std::move(outcome).value();
    moved.set_value(taken.value);
  });
  CHECK(moved.get_future().get() == 10);
}

TEST_CASE("execute_job with a deadline: the job fails with deadline_exceeded if it passes first",
          "[deduction][deadlines][clock]") {
  microbatch::manual_clock clock;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 10, .max_batch_delay = 1h, .clock = &clock});
  CHECK_THROWS_AS(batcher.execute_job({1, 1}, clock.now()), microbatch::deadline_exceeded); // already past
  auto waiting = std::async(std::launch::async, [&] { return batcher.execute_job({2, 2}, clock.now() + 5ms); });
  while (batcher.stats().jobs_submitted == 0)
    std::this_thread::yield(); // wait for a state: the job is queued
  clock.await_timers(1);
  clock.advance(5ms);
  CHECK_THROWS_AS(waiting.get(), microbatch::deadline_exceeded);
  auto in_time = std::async(std::launch::async, [&] { return batcher.execute_job({3, 3}, clock.now() + 1h); });
  while (batcher.stats().jobs_submitted == 1)
    std::this_thread::yield();
  batcher.flush();
  CHECK(in_time.get().value == 6);
}
