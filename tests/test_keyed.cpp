// KeyedBatcher: a batch per key, every key on one pool; per-key triggers, order, bounds, fairness, reclaim.
#include <catch2/catch.hpp>

#include <malloc.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>

#include "support.hpp"

using namespace test;
using microbatch::KeyedBatcher;
using microbatch::KeyedOptions;
using microbatch::Options;
using microbatch::WorkerPool;

namespace {
struct Event {
  std::string tenant;
  std::uint64_t id = 0;
  int value = 0;
};
struct Stored {
  std::uint64_t id = 0;
  int value = 0;
};

/// Records each batch the processor saw: its key and its jobs' IDs. Thread-safe.
class keyed_log {
public:
  void record(const std::string& key, std::span<const Event> jobs) {
    std::vector<std::uint64_t> ids;
    bool mixed = false;
    for (const Event& job : jobs) {
      mixed = mixed || job.tenant != key; // (Catch2 assertions only on the test's thread)
      ids.push_back(job.id);
    }
    std::lock_guard lock(mutex_);
    mixed_ = mixed_ || mixed;
    batches_.emplace_back(key, std::move(ids));
  }
  /// True if a batch held a job of another key.
  bool mixed() const {
    std::lock_guard lock(mutex_);
    return mixed_;
  }
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> batches() const {
    std::lock_guard lock(mutex_);
    return batches_;
  }
  std::vector<std::vector<std::uint64_t>> of(const std::string& key) const {
    std::vector<std::vector<std::uint64_t>> result;
    for (auto& [k, ids] : batches())
      if (k == key) result.push_back(ids);
    return result;
  }

private:
  mutable std::mutex mutex_;
  std::vector<std::pair<std::string, std::vector<std::uint64_t>>> batches_;
  bool mixed_ = false;
};

std::vector<Stored> stored(std::span<Event> jobs) {
  std::vector<Stored> results;
  for (const Event& job : jobs)
    results.push_back({job.id, 2 * job.value});
  return results;
}

std::vector<Stored> stored_by_key(const std::string&, std::span<Event> jobs) {
  return stored(jobs);
}

auto logging(keyed_log& log) {
  return [&log](const std::string& tenant, std::span<Event> jobs) {
    log.record(tenant, jobs);
    return stored(jobs);
  };
}

/// Heap bytes in use now (glibc), or 0 under a sanitizer (its allocator does not report through it).
std::size_t heap_in_use() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return 0;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
  return 0;
#else
  return mallinfo2().uordblks;
#endif
#else
  return mallinfo2().uordblks;
#endif
}
} // namespace

TEST_CASE("a batch holds one key's jobs, and each key's batch fills by its own size", "[keyed]") {
  keyed_log log;
  auto process = logging(log);
  KeyedBatcher batcher(process, &Event::tenant, &Event::id, &Stored::id,
                       KeyedOptions<std::string>{.batching = {.max_batch_size = 3, .max_batch_delay = 1h}});
  std::vector<std::future<Stored>> futures;
  for (std::uint64_t id = 1; id <= 6; ++id)
    futures.push_back(batcher.submit({id % 2 == 0 ? "even" : "odd", id, int(id)}));
  for (std::size_t i = 0; i < futures.size(); ++i)
    CHECK(futures[i].get().value == 2 * int(i + 1));
  CHECK(log.of("odd") == std::vector<std::vector<std::uint64_t>>{{1, 3, 5}});
  CHECK(log.of("even") == std::vector<std::vector<std::uint64_t>>{{2, 4, 6}});
  CHECK_FALSE(log.mixed());
  CHECK(batcher.stats().batches_full == 2);
  CHECK(batcher.stats().jobs_completed == 6);
}

TEST_CASE("each key's delay counts from that key's first job", "[keyed][triggers]") {
  microbatch::manual_clock clock;
  keyed_log log;
  auto process = logging(log);
  KeyedBatcher batcher(
      process, &Event::tenant, &Event::id, &Stored::id,
      KeyedOptions<std::string>{.batching = {.max_batch_size = 100, .max_batch_delay = 10ms, .clock = &clock}});
  auto early = batcher.submit({"a", 1, 1});
  clock.await_timers(1);
  clock.advance(6ms);
  auto late = batcher.submit({"b", 2, 2});
  clock.await_timers(2);
  clock.advance(4ms); // a's delay is over, b's is not
  CHECK(early.get().value == 2);
  CHECK_FALSE(is_ready(late));
  clock.await_timers(1);
  clock.advance(6ms);
  CHECK(late.get().value == 4);
  CHECK(batcher.stats().batches_timed_out == 2);
}

TEST_CASE("flush(key) dispatches that key's batch only; flush() every key's", "[keyed][triggers]") {
  keyed_log log;
  auto process = logging(log);
  KeyedBatcher batcher(process, &Event::tenant, &Event::id, &Stored::id,
                       KeyedOptions<std::string>{.batching = {.max_batch_size = 100, .max_batch_delay = 1h}});
  auto a = batcher.submit({"a", 1, 1});
  auto b = batcher.submit({"b", 2, 2});
  auto c = batcher.submit({"c", 3, 3});
  batcher.flush("a");
  CHECK(a.get().value == 2);
  CHECK_FALSE(is_ready(b));
  batcher.flush("nobody"); // a key with nothing forming: nothing happens
  batcher.flush();
  CHECK(b.get().value == 4);
  CHECK(c.get().value == 6);
  CHECK(batcher.stats().batches_flushed == 3);
  CHECK(log.batches().size() == 3);
}

TEST_CASE("a key's batches reach the processor one at a time, in the order they formed", "[keyed][order]") {
  auto pool = std::make_shared<WorkerPool>(2);
  keyed_log log;
  gate held;
  std::atomic<int> inside{0}, most{0};
  auto process = [&](const std::string& tenant, std::span<Event> jobs) {
    const int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    log.record(tenant, jobs);
    held.enter();
    --inside;
    return stored(jobs);
  };
  const std::size_t per_key = GENERATE(1, 2);
  KeyedBatcher batcher(
      process, &Event::tenant, &Event::id, &Stored::id,
      KeyedOptions<std::string>{
          .batching = {.max_batch_size = 1, .max_batch_delay = 1h, .max_concurrent_batches = 2, .workers = pool},
          .max_concurrent_batches_per_key = per_key});
  std::vector<std::future<Stored>> futures;
  for (std::uint64_t id = 1; id <= 6; ++id)
    futures.push_back(batcher.submit({"k", id, 1}));
  held.await_entered(int(per_key));
  const auto first = log.of("k");
  REQUIRE(first.size() == per_key);
  for (std::size_t i = 0; i < per_key; ++i)
    CHECK(first[i] == std::vector<std::uint64_t>{i + 1}); // the first batches formed went first
  held.open();
  for (auto& f : futures)
    f.get();
  CHECK(most.load() == int(per_key));
  if (per_key == 1) {
    std::vector<std::vector<std::uint64_t>> in_order;
    for (std::uint64_t id = 1; id <= 6; ++id)
      in_order.push_back({id});
    CHECK(log.of("k") == in_order);
  }
}

TEST_CASE("a free thread takes the next key round-robin: a busy key cannot starve another", "[keyed][fairness]") {
  auto pool = std::make_shared<WorkerPool>(1);
  keyed_log log;
  gate held;
  auto process = [&](const std::string& tenant, std::span<Event> jobs) {
    log.record(tenant, jobs);
    if (tenant == "a") held.enter();
    return stored(jobs);
  };
  KeyedBatcher batcher(
      process, &Event::tenant, &Event::id, &Stored::id,
      KeyedOptions<std::string>{.batching = {.max_batch_size = 2, .max_batch_delay = 1h, .workers = pool}});
  std::vector<std::future<Stored>> futures;
  futures.push_back(batcher.submit({"a", 1, 1}));
  futures.push_back(batcher.submit({"a", 2, 1}));
  held.await_entered(); // a's first batch runs on the only thread
  for (std::uint64_t id = 3; id <= 22; ++id)
    futures.push_back(batcher.submit({"a", id, 1})); // ten full batches of a queue behind it
  futures.push_back(batcher.submit({"b", 1, 1}));
  futures.push_back(batcher.submit({"b", 2, 1})); // then b fills one
  held.open();
  for (auto& f : futures)
    f.get();
  const auto batches = log.batches();
  REQUIRE(batches.size() == 12);
  CHECK(batches[0].first == "a");
  CHECK(batches[1].first == "b"); // b's batch is the next to reach the processor
  CHECK_FALSE(log.mixed());
}

TEST_CASE("max_pending_jobs_per_key bounds each key on its own", "[keyed][backpressure]") {
  gate held;
  auto process = [&](const std::string&, std::span<Event> jobs) {
    held.enter();
    return stored(jobs);
  };
  auto pool = std::make_shared<WorkerPool>(2);

  SECTION("reject") {
    KeyedBatcher batcher(process, &Event::tenant, &Event::id, &Stored::id,
                         KeyedOptions<std::string>{.batching = {.max_batch_size = 1,
                                                                .max_batch_delay = 1h,
                                                                .overflow = microbatch::Overflow::reject,
                                                                .workers = pool},
                                                   .max_pending_jobs_per_key = 2});
    auto a1 = batcher.submit({"a", 1, 1});
    auto a2 = batcher.submit({"a", 2, 1});
    try {
      (void)batcher.submit({"a", 3, 1});
      FAIL("the third job of a key bounded at 2 was accepted");
    } catch (const microbatch::queue_full& error) {
      CHECK(std::string(error.what()).find("max_pending_jobs_per_key") != std::string::npos);
    }
    auto b1 = batcher.submit({"b", 1, 1}); // another key has its own room
    CHECK(batcher.stats().jobs_rejected == 1);
    held.open();
    CHECK(a1.get().value == 2);
    CHECK(a2.get().value == 2);
    CHECK(b1.get().value == 2);
  }
  SECTION("block") {
    KeyedBatcher batcher(
        process, &Event::tenant, &Event::id, &Stored::id,
        KeyedOptions<std::string>{.batching = {.max_batch_size = 1, .max_batch_delay = 1h, .workers = pool},
                                  .max_pending_jobs_per_key = 1});
    auto a1 = batcher.submit({"a", 1, 1});
    held.await_entered();
    std::promise<void> third_accepted;
    int second_value = 0; // read after the join (Catch2 assertions only on the test's thread)
    std::thread blocked([&] {
      auto a2 = batcher.submit({"a", 2, 1}); // waits until a1 is out of the queue
      third_accepted.set_value();
      second_value = a2.get().value;
    });
    auto accepted = third_accepted.get_future();
    CHECK(accepted.wait_for(0s) == std::future_status::timeout);
    held.open(); // a1 ends: room for a2
    accepted.get();
    CHECK(a1.get().value == 2);
    blocked.join();
    CHECK(second_value == 2);
  }
}

TEST_CASE("a key's state is freed when its last job ended", "[keyed][reclaim]") {
  KeyedBatcher batcher(stored_by_key, &Event::tenant, &Event::id, &Stored::id,
                       KeyedOptions<std::string>{.batching = {.max_batch_size = 2, .max_batch_delay = 1h}});
  auto a = batcher.submit({"a", 1, 1});
  auto b = batcher.submit({"b", 2, 1});
  CHECK(batcher.active_keys() == 2);
  auto a2 = batcher.submit({"a", 3, 1}); // fills a's batch
  a.get();
  a2.get();
  batcher.flush();
  b.get();
  // The last hold on a key goes on a pool thread after its batch's callbacks: wait for it to be freed.
  batcher.shutdown();
  CHECK(batcher.active_keys() == 0);
}

TEST_CASE("a million distinct keys, each used once, leave no memory behind", "[keyed][reclaim]") {
#if defined(__SANITIZE_THREAD__) || defined(MICROBATCH_TEST_SHORT)
  constexpr std::uint64_t keys = 20'000;
#else
  constexpr std::uint64_t keys = 1'000'000;
#endif
  auto process = [](const std::uint64_t&, std::span<Job> jobs) { return doubled(jobs); };
  auto batcher = std::make_unique<KeyedBatcher<std::uint64_t, Job, Result, decltype(process)>>(
      process, &Job::id, &Job::id, &Result::id,
      KeyedOptions<std::uint64_t>{
          .batching = {.max_batch_size = 1, .max_concurrent_batches = 2, .max_pending_jobs = 1000}});
  std::atomic<std::uint64_t> answered{0};
  for (std::uint64_t warm = 0; warm < 1000; ++warm) // pools, slabs and runners reach their steady size
    batcher->submit({warm + keys, 1}, [&](microbatch::Outcome<Result>&&) { ++answered; });
  while (batcher->active_keys() != 0 || answered.load() != 1000)
    std::this_thread::yield();
  const std::size_t before = heap_in_use();
  for (std::uint64_t key = 0; key < keys; ++key)
    batcher->submit({key, 1}, [&](microbatch::Outcome<Result>&& outcome) {
      if (outcome.has_value()) ++answered;
    });
  while (answered.load() != keys + 1000 || batcher->active_keys() != 0)
    std::this_thread::yield(); // the last holds go on the pool's threads
  batcher->flush();
  const std::size_t after = heap_in_use();
  CHECK(batcher->stats().jobs_completed == keys + 1000);
  if (before != 0) CHECK(after < before + (1U << 20));
  batcher.reset();
}

TEST_CASE("a keyed batcher and a Batcher of other types share one pool; one's shutdown leaves the other alone",
          "[keyed][pool][shutdown]") {
  auto pool = std::make_shared<WorkerPool>(2);
  gate held;
  auto process = gated(held);
  microbatch::Batcher other(process, &Job::id, &Result::id,
                            Options{.max_batch_size = 1, .max_batch_delay = 1h, .workers = pool});
  auto other_running = other.submit({1, 1});
  held.await_entered();
  auto other_queued = other.submit({2, 2});
  const auto how = GENERATE(microbatch::Shutdown::drain, microbatch::Shutdown::cancel);
  {
    KeyedBatcher keyed(
        stored_by_key, &Event::tenant, &Event::id, &Stored::id,
        KeyedOptions<std::string>{.batching = {.max_batch_size = 10, .max_batch_delay = 1h, .workers = pool}});
    auto mine = keyed.submit({"t", 7, 7});
    keyed.shutdown(how);
    REQUIRE(is_ready(mine));
    if (how == microbatch::Shutdown::drain) {
      CHECK(mine.get().value == 14);
    } else {
      CHECK_THROWS_AS(mine.get(), microbatch::batcher_closed);
    }
    CHECK(keyed.active_keys() == 0);
    CHECK_THROWS_AS(keyed.submit({"t", 8, 8}), microbatch::batcher_closed);
  }
  CHECK_FALSE(is_ready(other_running));
  CHECK_FALSE(is_ready(other_queued));
  held.open();
  CHECK(other_running.get().value == 2);
  CHECK(other_queued.get().value == 4);
}

TEST_CASE("every way to submit works per key, with the key's errors", "[keyed][errors]") {
  microbatch::manual_clock clock;
  auto process = [](const std::string& tenant, std::span<Event> jobs) {
    if (tenant == "broken") throw std::runtime_error("broken tenant");
    return stored(jobs);
  };
  KeyedBatcher batcher(
      process, &Event::tenant, &Event::id, &Stored::id,
      KeyedOptions<std::string>{.batching = {.max_batch_size = 1, .max_batch_delay = 1h, .clock = &clock}});
  CHECK(batcher.execute_job({"a", 1, 1}).value == 2);
  CHECK(batcher.execute_job({"a", 2, 2}, clock.now() + 1h).value == 4);
  CHECK(batcher.submit({"b", 3, 3}, clock.now() + 1h).get().value == 6);
  std::promise<int> called;
  batcher.submit({"c", 4, 4}, [&](microbatch::Outcome<Stored>&& outcome) { called.set_value(outcome.value().value); });
  CHECK(called.get_future().get() == 8);
#if defined(__cpp_lib_jthread)
  std::stop_source stop;
  CHECK(batcher.execute_job({"d", 5, 5}, stop.get_token()).value == 10);
#endif
  std::promise<int> resumed;
  auto coroutine = [&]() -> detached {
    Event job{"e", 6, 6}; // named: g++ 11/12 destroy an aggregate temporary in co_await twice (README)
    Stored result = co_await batcher.async_execute_job(std::move(job));
    resumed.set_value(result.value);
  };
  coroutine();
  CHECK(resumed.get_future().get() == 12);
  CHECK_THROWS_WITH(batcher.execute_job({"broken", 7, 7}), "broken tenant");
  CHECK_THROWS_AS(batcher.submit({"a", 8, 8}, clock.now()), microbatch::deadline_exceeded);
  const auto stats = batcher.stats();
#if defined(__cpp_lib_jthread)
  constexpr std::uint64_t ways = 7;
#else
  constexpr std::uint64_t ways = 6;
#endif
  CHECK(stats.jobs_submitted == ways);
  CHECK(stats.jobs_completed == ways - 1);
  CHECK(stats.jobs_failed == 1);
}

TEST_CASE("a job whose deadline passes in its key's queue fails with deadline_exceeded", "[keyed][deadlines]") {
  microbatch::manual_clock clock;
  KeyedBatcher batcher(
      stored_by_key, &Event::tenant, &Event::id, &Stored::id,
      KeyedOptions<std::string>{.batching = {.max_batch_size = 10, .max_batch_delay = 1h, .clock = &clock}});
  auto expiring = batcher.submit({"a", 1, 1}, clock.now() + 5ms);
  auto staying = batcher.submit({"a", 2, 2});
  clock.await_timers(1);
  clock.advance(5ms);
  CHECK_THROWS_AS(expiring.get(), microbatch::deadline_exceeded);
  batcher.flush("a");
  CHECK(staying.get().value == 4);
  CHECK(batcher.stats().jobs_expired == 1);
}

TEST_CASE("KeyedOptions are checked, naming the field", "[keyed][options]") {
  using Keyed = KeyedBatcher<std::string, Event, Stored, decltype(&stored_by_key)>;
  auto throws_naming = [](auto make, const std::string& field) {
    try {
      make();
      FAIL("accepted invalid options");
    } catch (const std::invalid_argument& error) {
      CHECK(std::string(error.what()).find(field) != std::string::npos);
    }
  };
  throws_naming([] { Keyed(&stored_by_key, &Event::tenant, {.max_concurrent_batches_per_key = 0}); },
                "max_concurrent_batches_per_key");
  throws_naming(
      [] {
        Keyed(&stored_by_key, &Event::tenant, {.batching = {.max_batch_size = 10}, .max_pending_jobs_per_key = 5});
      },
      "max_pending_jobs_per_key");
  throws_naming([] { Keyed(&stored_by_key, &Event::tenant, {.batching = {.max_concurrent_batches = 0}}); },
                "max_concurrent_batches");
  throws_naming(
      [] {
        Keyed(&stored_by_key, &Event::tenant, {.batching = {.duplicate_ids = microbatch::DuplicateIds::coalesce}});
      },
      "duplicate_ids");
}

TEST_CASE("keys by string_view are stored as strings; on_batch hears the key", "[keyed]") {
  std::mutex mutex;
  std::multiset<std::string> heard;
  auto process = [](const std::string_view& tenant, std::span<Job> jobs) {
    std::vector<Result> results;
    for (const Job& job : jobs)
      results.push_back({job.id, int(tenant.size())});
    return results;
  };
  KeyedBatcher<std::string_view, Job, Result, decltype(process)> batcher(
      process, [](const Job& job) { return job.value == 0 ? std::string_view("zero") : std::string_view("other"); },
      KeyedOptions<std::string_view>{.batching = {.max_batch_size = 1},
                                     .on_batch = [&](const std::string_view& key, const microbatch::BatchInfo&) {
                                       std::lock_guard lock(mutex);
                                       heard.emplace(key);
                                     }});
  CHECK(batcher.submit({1, 0}).get().value == 4);
  CHECK(batcher.submit({2, 1}).get().value == 5);
  batcher.shutdown();
  CHECK(heard == std::multiset<std::string>{"other", "zero"});
}

TEST_CASE("on a shared pool, max_concurrent_batches caps all keys together", "[keyed][pool]") {
  auto pool = std::make_shared<WorkerPool>(3);
  gate held;
  std::atomic<int> inside{0}, most{0};
  auto process = [&](const std::string&, std::span<Event> jobs) {
    const int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    held.enter();
    --inside;
    return stored(jobs);
  };
  KeyedBatcher batcher(
      process, &Event::tenant, &Event::id, &Stored::id,
      KeyedOptions<std::string>{
          .batching = {.max_batch_size = 1, .max_batch_delay = 1h, .max_concurrent_batches = 2, .workers = pool}});
  std::vector<std::future<Stored>> futures;
  for (std::uint64_t id = 1; id <= 6; ++id)
    futures.push_back(batcher.submit({"key" + std::to_string(id), id, 1}));
  held.await_entered(2);
  CHECK(inside.load() == 2);
  held.open();
  for (auto& f : futures)
    CHECK(f.get().value == 2);
  CHECK(most.load() == 2);
}
