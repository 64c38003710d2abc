// Heap allocations per job, counted by replacing the global operator new in this test program.
// Deterministic counts, not timings: the hot paths must not allocate beyond what the API needs.
#include <catch2/catch.hpp>

#include <barrier>
#include <coroutine>
#include <cstdlib>
#include <new>

#include "support.hpp"

namespace {
std::atomic<std::uint64_t> allocations{0};
thread_local bool not_counted = false; // set inside the processor: its result vector is the user's

struct uncounted_scope {
  uncounted_scope() { not_counted = true; }
  ~uncounted_scope() { not_counted = false; }
};
} // namespace

void* operator new(std::size_t size) {
  if (!not_counted) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  return operator new(size);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}

using namespace test;
using microbatch::Options;

namespace {
std::vector<Result> doubled_uncounted(std::span<Job> jobs) {
  uncounted_scope scope;
  return doubled(jobs);
}
} // namespace

TEST_CASE("execute_job allocates nothing per job in steady state", "[allocations]") {
  SECTION("one caller, batches of one") {
    microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                                Options{.max_batch_size = 1, .max_batch_delay = 0s});
    for (std::uint64_t id = 0; id < 200; ++id)
      REQUIRE(batcher.execute_job({id, 1}).value == 2); // warm up
    const std::uint64_t before = allocations.load();
    for (std::uint64_t id = 200; id < 1200; ++id)
      REQUIRE(batcher.execute_job({id, 1}).value == 2);
    CHECK(allocations.load() - before == 0);
  }
  SECTION("one caller with dispatch_when_idle: it runs its own batches (a runner reused, not made per batch)") {
    microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                                Options{.max_batch_size = 64, .max_batch_delay = 1h, .dispatch_when_idle = true});
    for (std::uint64_t id = 0; id < 200; ++id)
      REQUIRE(batcher.execute_job({id, 1}).value == 2); // warm up
    const std::uint64_t before = allocations.load();
    for (std::uint64_t id = 200; id < 1200; ++id)
      REQUIRE(batcher.execute_job({id, 1}).value == 2);
    CHECK(allocations.load() - before == 0);
  }
  SECTION("eight callers, full batches of eight") {
    // Each caller has one job pending at a time and a batch needs eight, so the callers move in
    // lockstep and every phase ends with no job left over.
    constexpr int callers = 8, jobs_per_phase = 100;
    microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                                Options{.max_batch_size = callers, .max_batch_delay = 0s});
    std::barrier phase(callers + 1);
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int c = 0; c < callers; ++c) {
      threads.emplace_back([&, c] {
        for (int round = 0; round < 2; ++round) {
          for (int i = 0; i < jobs_per_phase; ++i) {
            const auto id = std::uint64_t(c) * 100000 + std::uint64_t(round * jobs_per_phase + i);
            if (batcher.execute_job({id, i}).value != 2 * i) wrong.fetch_add(1);
          }
          phase.arrive_and_wait(); // end of a phase
          phase.arrive_and_wait(); // the main thread has read the counter
        }
      });
    }
    phase.arrive_and_wait(); // warm-up done
    const std::uint64_t before = allocations.load();
    phase.arrive_and_wait();
    phase.arrive_and_wait(); // measured phase done
    const std::uint64_t after = allocations.load();
    phase.arrive_and_wait();
    for (auto& t : threads)
      t.join();
    CHECK(wrong.load() == 0);
    CHECK(after - before == 0);
  }
}

TEST_CASE("submit allocates no more than std::promise itself needs", "[allocations]") {
  const std::uint64_t promise_before = allocations.load();
  {
    std::promise<Result> promise;
    auto future = promise.get_future();
    promise.set_value({1, 1});
  }
  const std::uint64_t promise_allocations = allocations.load() - promise_before;

  microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_batch_delay = 0s});
  for (std::uint64_t id = 0; id < 200; ++id)
    REQUIRE(batcher.submit({id, 1}).get().value == 2);
  const std::uint64_t before = allocations.load();
  for (std::uint64_t id = 200; id < 1200; ++id)
    REQUIRE(batcher.submit({id, 1}).get().value == 2);
  const std::uint64_t per_submit_x1000 = allocations.load() - before;
  INFO("std::promise alone: " << promise_allocations << " allocations; 1000 submits: " << per_submit_x1000);
  CHECK(per_submit_x1000 <= 1000 * promise_allocations);
  CHECK(per_submit_x1000 == 1000); // one block per job: node, shared state and result holder together
}

TEST_CASE("submit with a small callback allocates nothing per job once warm", "[allocations]") {
  // The backlog is bounded (64 pending jobs). The warm-up builds the largest backlog the measured run
  // can have (the worker held inside a finished job's callback, 64 more jobs queued behind it), so every
  // buffer has grown to its final size before counting starts.
  // Batches of 8 as well: their callback slots go back to the pool together when the batch ends
  // (a slot lost on the way would make the pool grow past its first slab, which allocates).
  const std::size_t batch_size = GENERATE(1u, 8u);
  microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                              Options{.max_batch_size = batch_size, .max_batch_delay = 0s, .max_pending_jobs = 64});
  std::atomic<int> remaining{0};
  auto submit_all = [&](std::uint64_t first, int count) {
    remaining += count;
    for (int i = 0; i < count; ++i) {
      batcher.submit({first + std::uint64_t(i), 1}, [&remaining](microbatch::Outcome<Result>&& outcome) {
        if (outcome.has_value()) remaining.fetch_sub(1);
      });
    }
  };
  auto await_all = [&] {
    while (remaining.load() != 0)
      std::this_thread::yield(); // a state, not a time
  };
  gate held;
  batcher.submit({0, 1}, [&](microbatch::Outcome<Result>&&) { held.enter(); });
  batcher.flush();      // no timer (delay 0): a batch of 8 goes out on its size, or now
  held.await_entered(); // job 0 has completed (its slot is free); the worker waits in its callback
  // From here every count is a multiple of 8: with batches of 8 and no timer, each batch fills.
  submit_all(1, 64);
  held.open();
  await_all();
  submit_all(100, 1000);
  await_all();
  const std::uint64_t before = allocations.load();
  submit_all(2000, 1000);
  await_all();
  CHECK(allocations.load() - before == 0);
}

namespace {

template <class B>
detached ask_in_a_loop(B& batcher, int count, std::uint64_t& allocations_in_loop, std::promise<void>& done) {
  (void)co_await batcher.async_execute_job({0, 1}); // warm up
  const std::uint64_t before = allocations.load();
  for (int i = 1; i <= count; ++i)
    (void)co_await batcher.async_execute_job({std::uint64_t(i), 1});
  allocations_in_loop = allocations.load() - before;
  done.set_value();
}
} // namespace

TEST_CASE("co_await async_execute_job allocates nothing beyond the coroutine frame", "[allocations]") {
  microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_batch_delay = 0s});
  std::uint64_t allocations_in_loop = 999;
  std::promise<void> done;
  auto finished = done.get_future();
  ask_in_a_loop(batcher, 1000, allocations_in_loop, done);
  finished.wait();
  CHECK(allocations_in_loop == 0);
}
