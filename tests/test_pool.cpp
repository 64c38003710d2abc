// WorkerPool: batchers share its threads and its clock; each batcher's jobs and shutdown stay its own.
#include <catch2/catch.hpp>

#include <fstream>
#include <memory>
#include <string>

#include "support.hpp"

using namespace test;
using microbatch::Options;
using microbatch::WorkerPool;

namespace {
/// Threads of this process now (Linux: /proc/self/status), or 0 where that cannot be read.
std::size_t process_threads() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("Threads:", 0) == 0) return std::stoul(line.substr(8));
  return 0;
}

/// Records which batcher's batch reached a processor, in order. Thread-safe.
class order_log {
public:
  void record(char batcher) {
    std::lock_guard lock(mutex_);
    order_ += batcher;
  }
  std::string order() const {
    std::lock_guard lock(mutex_);
    return order_;
  }

private:
  mutable std::mutex mutex_;
  std::string order_;
};
} // namespace

TEST_CASE("a WorkerPool needs at least one thread", "[pool]") {
  CHECK_THROWS_AS(WorkerPool(0), std::invalid_argument);
  WorkerPool pool(3);
  CHECK(pool.threads() == 3);
}

TEST_CASE("batchers on a pool start no thread of their own and each gets its own results", "[pool]") {
  auto pool = std::make_shared<WorkerPool>(2);
  const std::size_t before = process_threads();
  std::vector<std::unique_ptr<microbatch::Batcher<Job, Result, decltype(&doubled)>>> batchers;
  for (int i = 0; i < 200; ++i)
    batchers.push_back(std::make_unique<microbatch::Batcher<Job, Result, decltype(&doubled)>>(
        &doubled, &Job::id, &Result::id, Options{.max_batch_size = 4, .max_batch_delay = 1h, .workers = pool}));
  if (before != 0) CHECK(process_threads() == before);
  std::vector<std::future<Result>> futures;
  for (std::size_t b = 0; b < batchers.size(); ++b)
    for (int j = 0; j < 4; ++j)
      futures.push_back(batchers[b]->submit({std::uint64_t(j), int(b)}));
  for (std::size_t i = 0; i < futures.size(); ++i)
    CHECK(futures[i].get().value == 2 * int(i / 4));
  for (auto& batcher : batchers)
    CHECK(batcher->stats().batches_full == 1);
}

TEST_CASE("the pool's clock dispatches each batcher's batch by its own delay", "[pool]") {
  microbatch::manual_clock clock;
  auto pool = std::make_shared<WorkerPool>(1);
  microbatch::Batcher slow(doubled, &Job::id, &Result::id,
                           Options{.max_batch_size = 100, .max_batch_delay = 10ms, .clock = &clock, .workers = pool});
  microbatch::Batcher fast(doubled, &Job::id, &Result::id,
                           Options{.max_batch_size = 100, .max_batch_delay = 2ms, .clock = &clock, .workers = pool});
  auto from_slow = slow.submit({1, 1});
  auto from_fast = fast.submit({2, 2});
  clock.await_timers(2);
  clock.advance(2ms);
  CHECK(from_fast.get().value == 4);
  CHECK_FALSE(is_ready(from_slow));
  clock.await_timers(1);
  clock.advance(8ms);
  CHECK(from_slow.get().value == 2);
  CHECK(slow.stats().batches_timed_out == 1);
  CHECK(fast.stats().batches_timed_out == 1);
}

TEST_CASE("the pool's clock fails expired jobs of a batcher while its batches wait", "[pool]") {
  microbatch::manual_clock clock;
  auto pool = std::make_shared<WorkerPool>(1);
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_batch_delay = 1h, .clock = &clock, .workers = pool});
  auto running = batcher.submit({1, 1});
  held.await_entered();
  auto expiring = batcher.submit({2, 2}, clock.now() + 5ms);
  clock.await_timers(1);
  clock.advance(5ms);
  CHECK_THROWS_AS(expiring.get(), microbatch::deadline_exceeded);
  held.open();
  CHECK(running.get().value == 2);
  CHECK(batcher.stats().jobs_expired == 1);
}

TEST_CASE("a free pool thread takes the next batcher round-robin, not the next batch in line", "[pool]") {
  auto pool = std::make_shared<WorkerPool>(1);
  order_log order;
  gate held;
  auto process_a = [&](std::span<Job> jobs) {
    order.record('a');
    held.enter();
    return doubled(jobs);
  };
  auto process_b = [&](std::span<Job> jobs) {
    order.record('b');
    return doubled(jobs);
  };
  microbatch::Batcher a(process_a, &Job::id, &Result::id,
                        Options{.max_batch_size = 1, .max_batch_delay = 1h, .workers = pool});
  microbatch::Batcher b(process_b, &Job::id, &Result::id,
                        Options{.max_batch_size = 1, .max_batch_delay = 1h, .workers = pool});
  std::vector<std::future<Result>> futures;
  futures.push_back(a.submit({0, 0}));
  held.await_entered(); // a's first batch holds the only thread
  for (std::uint64_t id = 1; id <= 10; ++id)
    futures.push_back(a.submit({id, 0})); // ten full batches of a wait behind it
  futures.push_back(b.submit({1, 0}));    // then b fills one
  held.open();
  for (auto& f : futures)
    f.get();
  CHECK(order.order().substr(0, 2) == "ab");
  CHECK(order.order().size() == 12);
}

TEST_CASE("batchers of different types share one pool", "[pool]") {
  auto pool = std::make_shared<WorkerPool>(2);
  microbatch::Batcher numbers(doubled, &Job::id, &Result::id, Options{.max_batch_size = 2, .workers = pool});
  auto lengths = [](std::span<std::string> words) {
    std::vector<std::size_t> sizes;
    for (const auto& word : words)
      sizes.push_back(word.size());
    return sizes;
  };
  microbatch::Batcher words(lengths, Options{.max_batch_size = 2, .workers = pool});
  auto n1 = numbers.submit({1, 5});
  auto w1 = words.submit("four");
  auto n2 = numbers.submit({2, 6});
  auto w2 = words.submit("sixsix");
  CHECK(n1.get().value == 10);
  CHECK(n2.get().value == 12);
  CHECK(w1.get() == 4);
  CHECK(w2.get() == 6);
}

TEST_CASE("one batcher's shutdown on a pool touches only its own jobs", "[pool][shutdown]") {
  auto pool = std::make_shared<WorkerPool>(2);
  gate held;
  auto process = gated(held);
  microbatch::Batcher other(process, &Job::id, &Result::id,
                            Options{.max_batch_size = 1, .max_batch_delay = 1h, .workers = pool});
  auto other_running = other.submit({1, 1});
  held.await_entered(); // one pool thread is held by other's batch
  auto other_queued = other.submit({2, 2});

  SECTION("drain") {
    microbatch::Batcher mine(doubled, &Job::id, &Result::id,
                             Options{.max_batch_size = 10, .max_batch_delay = 1h, .workers = pool});
    auto my_job = mine.submit({7, 7});
    mine.shutdown();
    REQUIRE(is_ready(my_job));
    CHECK(my_job.get().value == 14);
  }
  SECTION("cancel") {
    microbatch::Batcher mine(doubled, &Job::id, &Result::id,
                             Options{.max_batch_size = 10, .max_batch_delay = 1h, .workers = pool});
    auto my_job = mine.submit({7, 7});
    mine.shutdown(microbatch::Shutdown::cancel);
    REQUIRE(is_ready(my_job));
    CHECK_THROWS_AS(my_job.get(), microbatch::batcher_closed);
  }
  CHECK_FALSE(is_ready(other_running));
  CHECK_FALSE(is_ready(other_queued));
  held.open();
  CHECK(other_running.get().value == 2);
  CHECK(other_queued.get().value == 4);
  CHECK(other.stats().jobs_failed == 0);
}

TEST_CASE("a pool lives as long as a batcher on it, and is freed after the last", "[pool]") {
  auto pool = std::make_shared<WorkerPool>(1);
  std::weak_ptr<WorkerPool> watch = pool;
  auto batcher = std::make_unique<microbatch::Batcher<Job, Result, decltype(&doubled)>>(
      &doubled, &Job::id, &Result::id, Options{.max_batch_size = 1, .workers = pool});
  pool.reset();
  REQUIRE_FALSE(watch.expired());
  CHECK(batcher->submit({1, 21}).get().value == 42);
  batcher.reset();
  CHECK(watch.expired());
}

TEST_CASE("callbacks of a batcher on a pool run on a pool thread", "[pool][callbacks]") {
  auto pool = std::make_shared<WorkerPool>(1);
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 1, .workers = pool});
  std::promise<const WorkerPool*> ran_on;
  batcher.submit({1, 1}, [&](microbatch::Outcome<Result>&& outcome) {
    outcome.value();
    ran_on.set_value(WorkerPool::of_thread());
  });
  CHECK(ran_on.get_future().get() == pool.get());
}

TEST_CASE("flush and shutdown from inside a processor on a pool do not wait for themselves", "[pool][shutdown]") {
  auto pool = std::make_shared<WorkerPool>(1);
  microbatch::Batcher<Job, Result, std::function<std::vector<Result>(std::span<Job>)>>* self = nullptr;
  std::function<std::vector<Result>(std::span<Job>)> process = [&](std::span<Job> jobs) {
    self->flush();
    self->shutdown();
    return doubled(jobs);
  };
  microbatch::Batcher<Job, Result, std::function<std::vector<Result>(std::span<Job>)>> batcher(
      process, &Job::id, &Result::id, Options{.max_batch_size = 1, .workers = pool});
  self = &batcher;
  auto first = batcher.submit({1, 1});
  CHECK(first.get().value == 2);
  batcher.shutdown();
  CHECK_THROWS_AS(batcher.submit({2, 2}), microbatch::batcher_closed);
}

TEST_CASE("reconfigure cannot move a batcher to another pool", "[pool][reconfigure]") {
  auto pool = std::make_shared<WorkerPool>(1);
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.workers = pool});
  Options next = batcher.options();
  next.max_batch_size = 8;
  batcher.reconfigure(next);
  CHECK(batcher.options().max_batch_size == 8);
  next.workers = std::make_shared<WorkerPool>(1);
  CHECK_THROWS_AS(batcher.reconfigure(next), std::invalid_argument);
  next.workers = nullptr;
  CHECK_THROWS_AS(batcher.reconfigure(next), std::invalid_argument);
}

TEST_CASE("max_concurrent_batches caps a batcher inside a larger pool", "[pool]") {
  auto pool = std::make_shared<WorkerPool>(3);
  std::atomic<int> inside{0}, most{0};
  gate held;
  auto process = [&](std::span<Job> jobs) {
    const int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    held.enter();
    --inside;
    return doubled(jobs);
  };
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_concurrent_batches = 2, .workers = pool});
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 0; id < 6; ++id)
    futures.push_back(batcher.submit({id, 1}));
  held.await_entered(2);
  CHECK(inside.load() == 2);
  held.open();
  for (auto& f : futures)
    CHECK(f.get().value == 2);
  CHECK(most.load() == 2);
}

TEST_CASE("dispatch when idle on a pool sends a lone job at once", "[pool][policies]") {
  auto pool = std::make_shared<WorkerPool>(1);
  microbatch::Batcher batcher(
      doubled, &Job::id, &Result::id,
      Options{.max_batch_size = 100, .max_batch_delay = 1h, .dispatch_when_idle = true, .workers = pool});
  // The pool's thread may not be asleep yet when the job comes; it then finds the job before it sleeps.
  CHECK(batcher.execute_job({1, 4}).value == 8);
  CHECK(batcher.stats().batches_idle == 1);
}
