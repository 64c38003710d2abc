// Worker threads: how many batches run at once, and a busy processor never stalls batch forming.
#include <catch2/catch.hpp>

#include <latch>

#include "support.hpp"

using namespace test;
using microbatch::Options;

TEST_CASE("with max_concurrent_batches == 1 the processor is never called concurrently", "[concurrency]") {
  std::atomic<int> inside{0};
  std::atomic<int> most_inside{0};
  auto process = [&](std::span<Job> jobs) {
    const int now_inside = inside.fetch_add(1) + 1;
    int seen = most_inside.load();
    while (now_inside > seen && !most_inside.compare_exchange_weak(seen, now_inside)) {
    }
    auto results = doubled(jobs);
    inside.fetch_sub(1);
    return results;
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 4, .max_batch_delay = 100us});
  std::vector<std::thread> producers;
  std::atomic<int> wrong{0};
  for (int p = 0; p < 8; ++p) {
    producers.emplace_back([&, p] {
      for (int i = 0; i < 300; ++i) {
        const auto id = std::uint64_t(p) * 1000 + std::uint64_t(i);
        if (batcher.execute_job({id, i}).value != 2 * i) wrong.fetch_add(1);
      }
    });
  }
  for (auto& t : producers)
    t.join();
  CHECK(wrong.load() == 0);
  CHECK(most_inside.load() == 1);
  CHECK(batcher.stats().jobs_completed == 8 * 300);
}

TEST_CASE("max_concurrent_batches batches are processed at once", "[concurrency]") {
  std::latch all_inside(3);
  auto process = [&](std::span<Job> jobs) {
    all_inside.arrive_and_wait(); // returns only when three batches are inside together
    return doubled(jobs);
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_concurrent_batches = 3});
  auto a = batcher.submit({1, 1});
  auto b = batcher.submit({2, 2});
  auto c = batcher.submit({3, 3});
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  CHECK(c.get().value == 6);
}

TEST_CASE("a busy processor does not stop the collector from forming and timing batches", "[concurrency][clock]") {
  microbatch::manual_clock clock;
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 10ms, .clock = &clock});
  auto a = batcher.submit({1, 1});
  clock.await_timers(1);
  clock.advance(10ms);
  held.await_entered(); // batch 1 is in the (only) processor slot
  auto b = batcher.submit({2, 2});
  clock.await_timers(1);
  clock.advance(10ms);
  batcher.flush(); // the collector has handled the advance: batch 2 timed out while batch 1 runs
  auto stats = batcher.stats();
  CHECK(stats.batches_timed_out == 2);
  CHECK(stats.batches_flushed == 0);
  CHECK_FALSE(is_ready(a));
  held.open();
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
}

TEST_CASE("many producers, every submission style, every result right", "[concurrency]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 16, .max_batch_delay = 200us, .max_concurrent_batches = 2});
  constexpr int producers = 6, jobs_each = 500;
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      std::vector<std::pair<int, std::future<Result>>> futures;
#if defined(__cpp_lib_jthread)
      std::stop_source never_stopped;
#endif
      for (int i = 0; i < jobs_each; ++i) {
        const auto id = std::uint64_t(p) * 100000 + std::uint64_t(i);
        switch (i % 3) {
        case 0:
          futures.emplace_back(i, batcher.submit({id, i}));
          break;
        case 1:
          wrong += batcher.execute_job({id, i}).value != 2 * i;
          break;
        default:
#if defined(__cpp_lib_jthread)
          wrong += batcher.execute_job({id, i}, never_stopped.get_token()).value != 2 * i;
#else
          wrong += batcher.execute_job({id, i}, std::chrono::steady_clock::now() + 1h).value != 2 * i;
#endif
          break;
        }
      }
      for (auto& [i, f] : futures)
        wrong += f.get().value != 2 * i;
    });
  }
  for (auto& t : threads)
    t.join();
  CHECK(wrong.load() == 0);
  auto stats = batcher.stats();
  CHECK(stats.jobs_submitted == producers * jobs_each);
  CHECK(stats.jobs_completed == producers * jobs_each);
  CHECK(stats.pending_jobs == 0);
}

TEST_CASE("callbacks in large batches from several threads: each runs once, with its own result", "[concurrency]") {
  // Batches of 1000 (every one fills: 60 of them, no timer): their callback slots rest before they are
  // handed out again (detail::slot_pool), while two workers give batches back and three threads take
  // slots and grow the pool.
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 1000, .max_batch_delay = 0s, .max_concurrent_batches = 2});
  constexpr int producers = 3, jobs_each = 20000;
  std::atomic<int> wrong{0};
  std::latch all_ran(producers * jobs_each);
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < jobs_each; ++i) {
        const auto id = std::uint64_t(p) * 100000 + std::uint64_t(i);
        batcher.submit({id, i}, [&wrong, &all_ran, id, i](microbatch::Outcome<Result>&& outcome) {
          if (!outcome.has_value() || outcome.value().id != id || outcome.value().value != 2 * i) ++wrong;
          all_ran.count_down();
        });
      }
    });
  }
  for (auto& t : threads)
    t.join();
  all_ran.wait();
  CHECK(wrong.load() == 0);
  const auto stats = batcher.stats();
  CHECK(stats.jobs_completed == producers * jobs_each);
  CHECK(stats.pending_jobs == 0);
  CHECK(stats.batches_full == producers * jobs_each / 1000);
}
