// Heap allocations per job, counted by replacing the global operator new in this test program.
// Deterministic counts, not timings: the hot paths must not allocate beyond what the API needs.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <new>

#include "support.hpp"

namespace {
std::atomic<std::uint64_t> allocations{0};
thread_local bool not_counted = false;  // set inside the processor: its result vector is the user's

struct uncounted_scope {
  uncounted_scope() { not_counted = true; }
  ~uncounted_scope() { not_counted = false; }
};
}  // namespace

void* operator new(std::size_t size) {
  if (!not_counted) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace test;
using microbatch::Options;

namespace {
std::vector<Result> doubled_uncounted(std::span<Job> jobs) {
  uncounted_scope scope;
  return doubled(jobs);
}
}  // namespace

TEST_CASE("execute_job allocates nothing per job in steady state", "[allocations]") {
  for (std::size_t batch_size : {1, 8}) {
    microbatch::Batcher batcher(&doubled_uncounted, &Job::id, &Result::id,
                                Options{.max_batch_size = batch_size, .max_batch_delay = 0s});
    auto run = [&](std::uint64_t first, int count) {
      // One producer: with batch_size 8 the batches are completed by flush.
      for (int i = 0; i < count; ++i) {
        const std::uint64_t id = first + std::uint64_t(i);
        if (batch_size == 1) {
          REQUIRE(batcher.execute_job({id, 1}).value == 2);
        } else {
          auto waiter = std::async(std::launch::async, [&] { return batcher.execute_job({id, 1}); });
          while (batcher.stats().jobs_submitted <= id) std::this_thread::yield();  // a state, not a time
          batcher.flush();
          REQUIRE(waiter.get().value == 2);
        }
      }
    };
    run(0, 200);  // warm up: buffers reach their steady sizes
    const std::uint64_t before = allocations.load();
    if (batch_size == 1) {
      run(200, 1000);
      CHECK(allocations.load() - before == 0);
    } else {
      // std::async itself allocates; measure it alone and subtract.
      const std::uint64_t async_before = allocations.load();
      std::async(std::launch::async, [] { return 0; }).get();
      const std::uint64_t per_async = allocations.load() - async_before;
      const std::uint64_t start = allocations.load();
      run(200, 100);
      CHECK(allocations.load() - start == 100 * per_async);
    }
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
  for (std::uint64_t id = 0; id < 200; ++id) REQUIRE(batcher.submit({id, 1}).get().value == 2);
  const std::uint64_t before = allocations.load();
  for (std::uint64_t id = 200; id < 1200; ++id) REQUIRE(batcher.submit({id, 1}).get().value == 2);
  const std::uint64_t per_submit_x1000 = allocations.load() - before;
  INFO("std::promise alone: " << promise_allocations << " allocations; 1000 submits: " << per_submit_x1000);
  CHECK(per_submit_x1000 <= 1000 * promise_allocations);
  CHECK(per_submit_x1000 == 1000);  // one block per job: node, shared state and result holder together
}
