// Batcher::reconfigure and Batcher::options: validated like the constructor, applied while jobs flow.
#include <catch2/catch.hpp>

#include <latch>
#include <mutex>
#include <semaphore>

#include "support.hpp"

using namespace test;
using microbatch::Options;

namespace {

/// Lets batches through one at a time (`let_one`), and records how many batches were inside the
/// processor when each one entered. Thread-safe.
class turnstile {
public:
  std::vector<Result> process(std::span<Job> jobs) {
    {
      std::lock_guard lock(mutex_);
      ++inside_;
      inside_at_entry_.push_back(inside_);
    }
    entered_.release();
    permits_.acquire();
    {
      std::lock_guard lock(mutex_);
      --inside_;
    }
    return doubled(jobs);
  }
  void await_entered(int batches = 1) {
    for (int i = 0; i < batches; ++i)
      entered_.acquire();
  }
  void let_one() { permits_.release(); }
  std::vector<int> inside_at_entry() const {
    std::lock_guard lock(mutex_);
    return inside_at_entry_;
  }

private:
  mutable std::mutex mutex_;
  int inside_ = 0;
  std::vector<int> inside_at_entry_;
  std::counting_semaphore<> entered_{0};
  std::counting_semaphore<> permits_{0};
};

} // namespace

TEST_CASE("reconfigure: options() returns what is in force; invalid options change nothing", "[reconfigure]") {
  microbatch::manual_clock clock;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 8, .max_batch_delay = 5ms, .clock = &clock});
  CHECK(batcher.options().max_batch_size == 8);
  CHECK(batcher.options().max_batch_delay == 5ms);

  Options next = batcher.options();
  next.max_batch_size = 16;
  next.max_concurrent_batches = 3;
  next.dispatch_when_idle = true;
  batcher.reconfigure(next);
  CHECK(batcher.options().max_batch_size == 16);
  CHECK(batcher.options().max_concurrent_batches == 3);
  CHECK(batcher.options().dispatch_when_idle);

  Options invalid = next;
  invalid.max_concurrent_batches = 0;
  CHECK_THROWS_WITH(batcher.reconfigure(invalid), Catch::Contains("max_concurrent_batches"));
  invalid = next;
  invalid.max_batch_delay = -1ms;
  CHECK_THROWS_WITH(batcher.reconfigure(invalid), Catch::Contains("max_batch_delay"));
  invalid = next;
  invalid.max_pending_jobs = 4; // below max_batch_size
  CHECK_THROWS_AS(batcher.reconfigure(invalid), std::invalid_argument);
  invalid = next;
  invalid.max_batch_weight = 10; // doubled has no weight()
  CHECK_THROWS_WITH(batcher.reconfigure(invalid), Catch::Contains("max_batch_weight"));
  invalid = next;
  microbatch::manual_clock other_clock;
  invalid.clock = &other_clock;
  CHECK_THROWS_WITH(batcher.reconfigure(invalid), Catch::Contains("clock"));
  invalid.clock = nullptr; // the steady clock is another clock too
  CHECK_THROWS_AS(batcher.reconfigure(invalid), std::invalid_argument);
  CHECK(batcher.options().max_batch_size == 16); // all refused: nothing changed
  CHECK(batcher.options().clock == &clock);

  microbatch::Batcher positional(doubled);
  Options coalescing;
  coalescing.duplicate_ids = microbatch::DuplicateIds::coalesce;
  CHECK_THROWS_WITH(positional.reconfigure(coalescing), Catch::Contains("duplicate_ids"));
}

TEST_CASE("reconfigure: a smaller max_batch_size dispatches the waiting jobs that fill batches now",
          "[reconfigure][clock]") {
  microbatch::manual_clock clock; // never advanced: the delay cannot be what dispatches
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 10, .max_batch_delay = 1h, .clock = &clock});
  std::vector<std::future<Result>> results;
  for (std::uint64_t id = 11; id <= 15; ++id)
    results.push_back(batcher.submit({id, int(id)})); // all five wait: for the size of ten, or the hour
  Options smaller = batcher.options();
  smaller.max_batch_size = 2;
  batcher.reconfigure(smaller); // 5 waiting: two full batches go now, one job stays
  for (std::size_t i = 0; i < 4; ++i)
    CHECK(results[i].get().value == 2 * int(11 + i));
  CHECK_FALSE(is_ready(results[4]));
  const auto stats = batcher.stats();
  CHECK(stats.batches_full == 2);
  auto late = batcher.submit({16, 16}); // fills the third batch of two
  CHECK(results[4].get().value == 30);
  CHECK(late.get().value == 32);
  CHECK(log.sizes() == std::vector<std::size_t>{2, 2, 2});
}

TEST_CASE("reconfigure: a new max_batch_delay applies to the forming batch, from its first job",
          "[reconfigure][clock]") {
  microbatch::manual_clock clock;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 1h, .clock = &clock});
  const auto started = clock.now();
  auto waiting = batcher.submit({1, 1});
  clock.await_timers(1);
  CHECK(clock.next_timer() == started + 1h);
  Options shorter = batcher.options();
  shorter.max_batch_delay = 10ms;
  batcher.reconfigure(shorter);
  clock.advance(0ns); // a new generation: await_timers now waits for the collector's next sleep
  clock.await_timers(1);
  CHECK(clock.next_timer() == started + 10ms);
  clock.advance(10ms);
  CHECK(waiting.get().value == 2);
  CHECK(batcher.stats().batches_timed_out == 1);
}

TEST_CASE("reconfigure: more max_concurrent_batches let a queued batch run at once", "[reconfigure]") {
  turnstile door;
  microbatch::Batcher batcher([&](std::span<Job> jobs) { return door.process(jobs); }, &Job::id, &Result::id,
                              Options{.max_batch_size = 1});
  auto first = batcher.submit({1, 1});
  door.await_entered();
  auto second = batcher.submit({2, 2}); // queued: the one slot is busy
  Options wider = batcher.options();
  wider.max_concurrent_batches = 2;
  batcher.reconfigure(wider);
  door.await_entered(); // the second batch entered while the first is still inside
  CHECK(door.inside_at_entry() == std::vector<int>{1, 2});
  door.let_one();
  door.let_one();
  CHECK(first.get().value == 2);
  CHECK(second.get().value == 4);
}

TEST_CASE("reconfigure: fewer max_concurrent_batches let running batches finish, then no more run at once",
          "[reconfigure]") {
  turnstile door;
  microbatch::Batcher batcher([&](std::span<Job> jobs) { return door.process(jobs); }, &Job::id, &Result::id,
                              Options{.max_batch_size = 1, .max_concurrent_batches = 2});
  std::vector<std::future<Result>> results;
  results.push_back(batcher.submit({1, 1}));
  results.push_back(batcher.submit({2, 2}));
  door.await_entered(2); // both slots busy
  Options narrower = batcher.options();
  narrower.max_concurrent_batches = 1;
  batcher.reconfigure(narrower); // the two running batches run on
  results.push_back(batcher.submit({3, 3}));
  results.push_back(batcher.submit({4, 4}));
  door.let_one(); // one of the first two leaves; the other still holds the one slot left
  door.let_one(); // now it leaves too: from here one batch at a time
  door.await_entered();
  door.let_one();
  door.await_entered();
  door.let_one();
  for (std::size_t i = 0; i < results.size(); ++i)
    CHECK(results[i].get().value == 2 * int(i + 1));
  CHECK(door.inside_at_entry() == std::vector<int>{1, 2, 1, 1});
}

TEST_CASE("reconfigure: max_pending_jobs and overflow apply to the jobs submitted from then on",
          "[reconfigure][backpressure]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 1,
                                      .max_batch_delay = 0ms,
                                      .max_pending_jobs = 2,
                                      .overflow = microbatch::Overflow::reject});
  std::vector<std::future<Result>> results;
  results.push_back(batcher.submit({1, 1}));
  results.push_back(batcher.submit({2, 2}));
  CHECK_THROWS_AS(batcher.submit({3, 3}), microbatch::queue_full);
  Options roomier = batcher.options();
  roomier.max_pending_jobs = 3;
  batcher.reconfigure(roomier);
  results.push_back(batcher.submit({3, 3}));
  CHECK_THROWS_AS(batcher.submit({4, 4}), microbatch::queue_full);
  Options unbounded = batcher.options();
  unbounded.max_pending_jobs = 0;
  batcher.reconfigure(unbounded);
  results.push_back(batcher.submit({4, 4})); // not counted
  Options bounded = batcher.options();
  bounded.max_pending_jobs = 4;
  batcher.reconfigure(bounded); // 3 counted jobs pending (job 4 was accepted unbounded): room for one
  results.push_back(batcher.submit({5, 5}));
  CHECK_THROWS_AS(batcher.submit({6, 6}), microbatch::queue_full);
  CHECK(batcher.stats().jobs_rejected == 3);
  held.open();
  for (std::size_t i = 0; i < results.size(); ++i)
    CHECK(results[i].get().value == 2 * int(i + 1));
  CHECK(batcher.stats().pending_jobs == 0);
}

TEST_CASE("reconfigure: dispatch_when_idle switched on sends the waiting jobs to the idle worker",
          "[reconfigure][clock]") {
  microbatch::manual_clock clock; // never advanced
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 1h, .clock = &clock});
  auto waiting = batcher.submit({1, 1});
  clock.await_timers(1); // it waits for its delay
  Options eager = batcher.options();
  eager.dispatch_when_idle = true;
  batcher.reconfigure(eager);
  CHECK(waiting.get().value == 2);
  CHECK(batcher.stats().batches_idle == 1);
  CHECK(batcher.execute_job({2, 2}).value == 4); // and from now on, at once
  eager.dispatch_when_idle = false;
  batcher.reconfigure(eager);
  auto stays = batcher.submit({3, 3});
  clock.await_timers(1);
  CHECK_FALSE(is_ready(stays)); // waits for its delay again
  batcher.flush();
  CHECK(stays.get().value == 6);
}

TEST_CASE("reconfigure: duplicate_ids and on_batch apply from the next batch", "[reconfigure]") {
  std::latch first_observed(1); // the first batch's observer ran (it runs after its jobs ended)
  Options options{.max_batch_size = 2, .max_batch_delay = 1h};
  options.on_batch = [&](const microbatch::BatchInfo&) { first_observed.count_down(); };
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, options);
  auto first = batcher.submit({7, 1});
  auto twin = batcher.submit({7, 1});
  CHECK(first.get().value == 2);
  CHECK_THROWS_AS(twin.get(), microbatch::duplicate_id);
  first_observed.wait();

  std::mutex seen_mutex;
  std::vector<std::size_t> seen; // guarded by seen_mutex
  Options next = batcher.options();
  next.duplicate_ids = microbatch::DuplicateIds::coalesce;
  next.on_batch = [&](const microbatch::BatchInfo& info) {
    std::lock_guard lock(seen_mutex);
    seen.push_back(info.size);
  };
  batcher.reconfigure(next);
  auto again = batcher.submit({8, 1});
  auto shared = batcher.submit({8, 1});
  CHECK(again.get().value == 2);
  CHECK(shared.get().value == 2);
  batcher.shutdown(); // on_batch ran before shutdown returned
  CHECK(batcher.stats().jobs_coalesced == 1);
  std::lock_guard lock(seen_mutex);
  CHECK(seen == std::vector<std::size_t>{1});
}

TEST_CASE("reconfigure: a weight limit set later judges the waiting jobs by their weights", "[reconfigure][weight]") {
  microbatch::manual_clock clock; // never advanced
  batch_log log;
  microbatch::Batcher batcher(weighing_processor{&log}, &Job::id, &Result::id,
                              Options{.max_batch_size = 100, .max_batch_delay = 1h, .clock = &clock});
  std::vector<std::future<Result>> results;
  for (std::uint64_t id = 1; id <= 3; ++id)
    results.push_back(batcher.submit({id, 3})); // weight 3 each, no limit yet
  Options heavy = batcher.options();
  heavy.max_batch_weight = 5;
  batcher.reconfigure(heavy); // {1} closes when {2} would take it to 6, and so on
  CHECK(results[0].get().value == 6);
  CHECK(results[1].get().value == 6);
  CHECK_FALSE(is_ready(results[2]));
  CHECK(batcher.stats().batches_weight == 2);
  CHECK_THROWS_AS(batcher.submit({9, 6}), microbatch::oversized_job);
  batcher.flush();
  CHECK(results[2].get().value == 6);
  CHECK(log.sizes() == std::vector<std::size_t>{1, 1, 1});
}

TEST_CASE("reconfigure from inside the processor and while shutting down", "[reconfigure]") {
  microbatch::Batcher<Job, Result, std::function<std::vector<Result>(std::span<Job>)>>* self = nullptr;
  std::function<std::vector<Result>(std::span<Job>)> process = [&](std::span<Job> jobs) {
    Options next = self->options();
    next.max_batch_size = next.max_batch_size == 1 ? 2 : 1;
    self->reconfigure(next); // a batcher thread: no lock it holds is needed here
    return doubled(jobs);
  };
  microbatch::Batcher<Job, Result, std::function<std::vector<Result>(std::span<Job>)>> batcher(
      process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  self = &batcher;
  for (std::uint64_t id = 1; id <= 20; ++id)
    CHECK(batcher.execute_job({id, 1}).value == 2);
  batcher.shutdown();
  Options after = batcher.options();
  after.max_concurrent_batches = 4;
  batcher.reconfigure(after); // after shutdown: recorded, no thread started, nothing else happens
  CHECK(batcher.options().max_concurrent_batches == 4);
  CHECK_THROWS_AS(batcher.submit({99, 1}), microbatch::batcher_closed);
}
