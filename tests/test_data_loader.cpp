// DataLoader: one fetch per key while cached, errors uncached at once, LRU bound, ttl, prime, clear,
// duplicate keys in one batch, shutdown, and concurrent loads.
#include <catch2/catch.hpp>

#include <array>
#include <latch>
#include <random>
#include <stdexcept>
#include <string>

#include "support.hpp"

using namespace test;
using microbatch::DataLoaderOptions;
using microbatch::Options;

namespace {

using Key = std::uint64_t;

/// The value every key loads to.
Result answer(Key key) {
  return {key, 10 * int(key)};
}

/// Records every batch of keys the processor saw. Thread-safe.
class fetch_log {
public:
  void record(std::span<const Key> keys) {
    std::lock_guard lock(mutex_);
    batches_.emplace_back(keys.begin(), keys.end());
  }
  std::vector<std::vector<Key>> batches() const {
    std::lock_guard lock(mutex_);
    return batches_;
  }
  /// How many times `key` was handed to the processor.
  std::size_t fetches(Key key) const {
    std::size_t count = 0;
    for (const auto& batch : batches())
      for (Key seen : batch)
        count += seen == key ? 1 : 0;
    return count;
  }

private:
  mutable std::mutex mutex_;
  std::vector<std::vector<Key>> batches_;
};

std::vector<Result> answers(std::span<Key> keys) {
  std::vector<Result> results;
  for (Key key : keys)
    results.push_back(answer(key));
  return results;
}

/// A processor that records each batch, then answers every key.
auto recording(fetch_log& log) {
  return [&log](std::span<Key> keys) {
    log.record(keys);
    return answers(keys);
  };
}

/// Records each batch, waits at `held`, then answers every key.
auto logged_keys_and_gated(fetch_log& log, gate& held) {
  return [&log, &held](std::span<Key> keys) {
    log.record(keys);
    held.enter();
    return answers(keys);
  };
}

/// Only flush() (and shutdown) dispatch: a test decides exactly which loads share a batch.
const Options flush_only{.max_batch_size = 0, .max_batch_delay = 0s};
/// Every job is dispatched at once, alone.
const Options one_at_a_time{.max_batch_size = 1, .max_batch_delay = 0s};

std::vector<Result> fetch_users(std::span<Key> keys) {
  return answers(keys);
}

} // namespace

TEST_CASE("Key and Result are deduced from a function or a non-generic lambda", "[data_loader]") {
  microbatch::DataLoader from_function(fetch_users, &Result::id);
  STATIC_REQUIRE(std::is_same_v<decltype(from_function)::key_type, Key>);
  STATIC_REQUIRE(std::is_same_v<decltype(from_function)::result_type, Result>);
  auto lambda = [](std::span<Key> keys) { return answers(keys); };
  microbatch::DataLoader from_lambda(
      lambda, [](const Result& r) { return r.id; }, DataLoaderOptions{.max_cached = 4});
  STATIC_REQUIRE(std::is_same_v<decltype(from_lambda)::key_type, Key>);
  CHECK(from_function.get(3).value == 30);
  CHECK(from_lambda.get(4).value == 40);
}

TEST_CASE("the first load fetches; later loads share its future; one batch per window", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = flush_only});
  auto one = loader.load(1);
  auto two = loader.load(2);
  auto one_again = loader.load(1);
  const std::vector<Key> keys{2, 3, 3};
  auto many = loader.load_many(keys);
  REQUIRE(many.size() == 3);
  CHECK(one.wait_for(0s) == std::future_status::timeout); // nothing dispatched before the flush
  loader.flush();
  CHECK(one.get().value == 10);
  CHECK(two.get().value == 20);
  CHECK(many[1].get().value == 30);
  // The same shared state: get() returns a reference into it.
  CHECK(&one.get() == &one_again.get());
  CHECK(&two.get() == &many[0].get());
  CHECK(&many[1].get() == &many[2].get());
  CHECK(log.batches() == std::vector<std::vector<Key>>{{1, 2, 3}});
  CHECK(&loader.load(1).get() == &one.get()); // a hit once ready, too
  CHECK(loader.get(3).value == 30);
  auto stats = loader.stats();
  CHECK(stats.misses == 3);
  CHECK(stats.hits == 5);
  CHECK(stats.cached == 3);
  CHECK(stats.evictions == 0);
  CHECK(stats.batcher.jobs_submitted == 3);
  CHECK(log.batches().size() == 1);
}

TEST_CASE("a failed load leaves the cache before its error is visible; the next load fetches again", "[data_loader]") {
  fetch_log log;
  std::atomic<int> calls{0};
  std::string kind;
  auto process = [&](std::span<Key> keys) -> std::vector<Result> {
    log.record(keys);
    if (calls.fetch_add(1) == 0) {
      if (kind == "throws") throw std::runtime_error("backend down");
      if (kind == "deadline") throw microbatch::deadline_exceeded("the backend's own deadline");
      return {}; // no_result for every key
    }
    return answers(keys);
  };
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = flush_only});
  auto check_first_fails = [&](auto expected_error) {
    using error_type = decltype(expected_error);
    auto first = loader.load(1);
    auto same = loader.load(1);
    loader.flush();
    CHECK_THROWS_AS(first.get(), error_type);
    CHECK_THROWS_AS(same.get(), error_type); // every holder sees it
    // The entry left before the error became visible: this load fetches again, at once.
    CHECK(loader.stats().cached == 0);
    auto again = loader.load(1);
    loader.flush();
    CHECK(again.get().value == 10);
    CHECK(log.fetches(1) == 2);
    CHECK(loader.stats().misses == 2);
    CHECK(loader.stats().hits == 1);
    CHECK(&loader.load(1).get() == &again.get()); // a value stays cached
  };
  SECTION("the processor's exception") {
    kind = "throws";
    check_first_fails(std::runtime_error("x"));
  }
  SECTION("no_result") {
    kind = "no result";
    check_first_fails(microbatch::no_result("x"));
  }
  SECTION("deadline_exceeded") {
    kind = "deadline";
    check_first_fails(microbatch::deadline_exceeded("x"));
  }
}

TEST_CASE("a load the batcher does not accept (queue_full) is not cached", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  microbatch::DataLoader loader(process, &Result::id,
                                DataLoaderOptions{.batching = Options{.max_batch_size = 0,
                                                                      .max_batch_delay = 0s,
                                                                      .max_pending_jobs = 1,
                                                                      .overflow = microbatch::Overflow::reject}});
  auto first = loader.load(1);
  auto rejected = loader.load(2);
  CHECK_THROWS_AS(rejected.get(), microbatch::queue_full);
  CHECK(loader.stats().cached == 1);
  loader.flush();
  CHECK(first.get().value == 10);
  auto second = loader.load(2); // room again: fetched
  loader.flush();
  CHECK(second.get().value == 20);
  CHECK(log.fetches(2) == 1);
}

TEST_CASE("an error never uncaches a newer entry for the same key", "[data_loader]") {
  fetch_log log;
  gate held;
  std::atomic<int> calls{0};
  auto process = [&](std::span<Key> keys) -> std::vector<Result> {
    log.record(keys);
    held.enter();
    if (calls.fetch_add(1) == 0) throw std::runtime_error("first fetch fails");
    return answers(keys);
  };
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = one_at_a_time});
  auto first = loader.load(1);
  held.await_entered(); // the first fetch is in the processor
  loader.clear(1);
  auto second = loader.load(1); // a newer entry, queued behind the first batch
  held.open();                  // the first fetch fails now: its entry is gone, the newer one must stay
  CHECK_THROWS_AS(first.get(), std::runtime_error);
  CHECK(second.get().value == 10);
  CHECK(&loader.load(1).get() == &second.get());
  CHECK(log.fetches(1) == 2);
  CHECK(loader.stats().cached == 1);
}

TEST_CASE("max_cached evicts the least recently used entry, a hit counting as a use", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = one_at_a_time, .max_cached = 3});
  for (Key key : {1, 2, 3})
    CHECK(loader.get(key).value == answer(key).value);
  CHECK(loader.get(1).value == 10); // hit: recency now 2, 3, 1
  CHECK(loader.get(4).value == 40); // evicts 2: 3, 1, 4
  CHECK(loader.stats().evictions == 1);
  CHECK(loader.stats().cached == 3);
  for (Key key : {3, 1, 4})
    loader.get(key);                // hits: 3, 1, 4
  CHECK(loader.get(2).value == 20); // fetched again, evicts 3: 1, 4, 2
  CHECK(loader.get(3).value == 30); // fetched again, evicts 1: 4, 2, 3
  CHECK(log.fetches(1) == 1);
  CHECK(log.fetches(2) == 2);
  CHECK(log.fetches(3) == 2);
  CHECK(log.fetches(4) == 1);
  auto stats = loader.stats();
  CHECK(stats.evictions == 3);
  CHECK(stats.hits == 4);
  CHECK(stats.misses == 6);
  CHECK(stats.cached == 3);
  loader.get(4);
  loader.get(2);
  CHECK(log.fetches(4) == 1); // 4 and 2 were kept
  CHECK(log.fetches(2) == 2);
}

TEST_CASE("the max_cached bound and the LRU order are global over all keys", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = one_at_a_time, .max_cached = 10});
  for (Key key = 0; key < 100; ++key) {
    CHECK(loader.get(key).value == answer(key).value);
    CHECK(loader.stats().cached == std::min<std::size_t>(key + 1, 10));
  }
  // Exactly the ten most recent keys are cached, wherever their shards are.
  for (Key key = 90; key < 100; ++key)
    loader.get(key);
  CHECK(log.batches().size() == 100);
  CHECK(loader.stats().hits == 10);
  loader.get(89);
  CHECK(log.batches().size() == 101);
  CHECK(loader.stats().evictions == 91);
}

TEST_CASE("an evicted entry whose fetch is still running completes for its callers", "[data_loader]") {
  fetch_log log;
  gate held;
  auto process = logged_keys_and_gated(log, held);
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = one_at_a_time, .max_cached = 1});
  auto first = loader.load(1);
  held.await_entered();
  auto second = loader.load(2); // evicts 1 while its fetch is in the processor
  CHECK(loader.stats().evictions == 1);
  CHECK(loader.stats().cached == 1);
  held.open();
  CHECK(first.get().value == 10);
  CHECK(second.get().value == 20);
  CHECK(loader.get(1).value == 10); // fetched again
  CHECK(log.fetches(1) == 2);
}

TEST_CASE("ttl: an entry older than ttl, counted from its value's arrival, is fetched again", "[data_loader][clock]") {
  microbatch::manual_clock clock;
  fetch_log log;
  gate held;
  auto process = logged_keys_and_gated(log, held);
  Options batching = one_at_a_time;
  batching.clock = &clock;
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = batching, .ttl = 10ms});
  auto first = loader.load(1);
  held.await_entered();
  clock.advance(20ms); // a fetch in progress never expires
  auto during = loader.load(1);
  CHECK(loader.stats().hits == 1);
  held.open();
  CHECK(first.get().value == 10); // arrived at +20 ms
  CHECK(&during.get() == &first.get());
  clock.advance(9ms);
  CHECK(&loader.load(1).get() == &first.get()); // 9 ms old: a hit
  clock.advance(1ms);
  auto refetched = loader.load(1); // 10 ms old: expired
  CHECK(refetched.get().value == 10);
  CHECK(&refetched.get() != &first.get());
  CHECK(log.fetches(1) == 2);
  CHECK(loader.stats().expirations == 1);

  loader.prime(5, {5, 55}); // a primed value's age starts now
  clock.advance(9ms);
  CHECK(loader.get(5).value == 55);
  clock.advance(1ms);
  CHECK(loader.get(5).value == 50); // expired: fetched
  CHECK(log.fetches(5) == 1);
  CHECK(loader.stats().expirations == 2);
}

TEST_CASE("prime caches a value unless the key is cached or being fetched", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = flush_only});
  loader.prime(1, {1, 111});
  CHECK(loader.load(1).get().value == 111); // ready at once, no fetch
  loader.prime(1, {1, 222});
  CHECK(loader.load(1).get().value == 111); // already cached: unchanged
  auto fetching = loader.load(2);
  loader.prime(2, {2, 999}); // being fetched counts as cached
  loader.flush();
  CHECK(fetching.get().value == 20);
  CHECK(loader.load(2).get().value == 20);
  loader.clear(1);
  loader.prime(1, {1, 333});
  CHECK(loader.load(1).get().value == 333);
  CHECK(log.batches() == std::vector<std::vector<Key>>{{2}});
  CHECK(loader.stats().cached == 2);
  CHECK(loader.stats().misses == 1);
}

TEST_CASE("clear and clear_all never touch futures handed out; the next load fetches again", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = flush_only});
  std::vector<std::shared_future<Result>> futures;
  for (Key key : {1, 2, 3})
    futures.push_back(loader.load(key));
  loader.flush();
  loader.clear(2);
  CHECK(loader.stats().cached == 2);
  CHECK(futures[1].get().value == 20);
  auto still_fetching = loader.load(4);
  loader.clear(4);  // before its batch: its future still gets the value
  loader.clear(99); // not cached: nothing happens
  auto two_again = loader.load(2);
  loader.flush();
  CHECK(still_fetching.get().value == 40);
  CHECK(two_again.get().value == 20);
  CHECK(&two_again.get() != &futures[1].get());
  CHECK(log.fetches(2) == 2);
  loader.clear_all();
  CHECK(loader.stats().cached == 0);
  for (std::size_t i = 0; i < 3; ++i)
    CHECK(futures[i].get().value == answer(i + 1).value);
  auto one_again = loader.load(1);
  loader.flush();
  CHECK(one_again.get().value == 10);
  CHECK(log.fetches(1) == 2);
  CHECK(log.fetches(3) == 1);
}

TEST_CASE("a reload that meets its own queued fetch in one batch never sees duplicate_id", "[data_loader]") {
  fetch_log log;
  auto process = recording(log);
  std::size_t max_cached = 0;
  SECTION("after clear") {}
  SECTION("after an eviction") {
    max_cached = 1;
  }
  microbatch::DataLoader loader(process, &Result::id,
                                DataLoaderOptions{.batching = flush_only, .max_cached = max_cached});
  auto first = loader.load(1);
  if (max_cached == 0) {
    loader.clear(1);
  } else {
    auto other = loader.load(2); // evicts 1 while its fetch is queued
    CHECK(loader.stats().evictions == 1);
  }
  auto second = loader.load(1); // the same batch as the first: the batcher fails it with duplicate_id
  loader.flush();
  CHECK(first.get().value == 10); // duplicates end before the processor runs: the resubmit is queued
  loader.flush();
  CHECK_NOTHROW(second.get());
  CHECK(second.get().value == 10);
  CHECK(&second.get() != &first.get());
  CHECK(loader.stats().batcher.jobs_failed == 1); // the batcher did reject the duplicate
  const auto batches = log.batches();
  REQUIRE(batches.size() == 2);
  CHECK(batches[1] == std::vector<Key>{1});
  CHECK(&loader.load(1).get() == &second.get());
}

TEST_CASE("after shutdown cached keys still load; uncached keys get batcher_closed", "[data_loader][shutdown]") {
  fetch_log log;
  auto process = recording(log);
  // max_cached = 1: a load of an uncached key after shutdown must not evict the cached one.
  microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = one_at_a_time, .max_cached = 1});
  const auto& cached = loader.load(1).get();
  loader.shutdown();
  loader.shutdown(); // idempotent
  CHECK(&loader.load(1).get() == &cached);
  CHECK(loader.get(1).value == 10);
  CHECK_THROWS_AS(loader.load(2).get(), microbatch::batcher_closed);
  CHECK_THROWS_AS(loader.get(2), microbatch::batcher_closed);
  CHECK(&loader.load(1).get() == &cached);
  auto stats = loader.stats();
  CHECK(stats.cached == 1);
  CHECK(stats.evictions == 0);
  CHECK(stats.misses == 3);
  CHECK(log.fetches(2) == 0);
}

TEST_CASE("the destructor drains: queued loads get their values, futures outlive the loader",
          "[data_loader][shutdown]") {
  fetch_log log;
  auto process = recording(log);
  std::shared_future<Result> queued;
  {
    microbatch::DataLoader loader(process, &Result::id, DataLoaderOptions{.batching = flush_only});
    queued = loader.load(7);
  }
  CHECK(queued.get().value == 70);
}

TEST_CASE("invalid options throw std::invalid_argument", "[data_loader]") {
  CHECK_THROWS_AS(microbatch::DataLoader(fetch_users, &Result::id, DataLoaderOptions{.ttl = -1ms}),
                  std::invalid_argument);
  CHECK_THROWS_AS(microbatch::DataLoader(fetch_users, &Result::id,
                                         DataLoaderOptions{.batching = Options{.max_concurrent_batches = 0}}),
                  std::invalid_argument);
}

TEST_CASE("16 threads, 10,000 loads each over 500 keys: every answer right, every key fetched once",
          "[data_loader][concurrency]") {
  constexpr Key keys = 500;
  constexpr int threads = 16;
  constexpr int loads_each = 10'000;
  std::array<std::atomic<int>, keys> fetched{};
  auto process = [&](std::span<Key> batch) {
    for (Key key : batch)
      fetched[key].fetch_add(1);
    return answers(batch);
  };
  microbatch::DataLoader loader(process, &Result::id); // default batching: size 64, delay 1 ms
  std::latch start(threads);
  std::atomic<int> wrong{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 random(std::uint64_t(t) + 1);
      std::uniform_int_distribution<Key> pick(0, keys - 1);
      start.arrive_and_wait();
      for (int i = 0; i < loads_each; ++i) {
        const Key key = pick(random);
        const Result result = loader.get(key);
        if (result.id != key || result.value != answer(key).value) wrong.fetch_add(1);
      }
    });
  }
  for (auto& worker : workers)
    worker.join();
  CHECK(wrong.load() == 0);
  int fetched_once = 0;
  for (const auto& count : fetched)
    fetched_once += count.load() == 1 ? 1 : 0;
  CHECK(fetched_once == int(keys));
  auto stats = loader.stats();
  CHECK(stats.misses == keys);
  CHECK(stats.hits == std::uint64_t(threads) * loads_each - keys);
  CHECK(stats.cached == keys);
  CHECK(stats.batcher.jobs_failed == 0);
}

TEST_CASE("concurrent loads, clears and primes under a small max_cached: right answers, no duplicate_id",
          "[data_loader][concurrency]") {
  constexpr Key keys = 200;
  constexpr std::size_t bound = 16;
  constexpr int threads = 8;
  constexpr int loads_each = 3'000;
  auto process = [](std::span<Key> batch) { return answers(batch); };
  microbatch::DataLoader loader(
      process, &Result::id,
      DataLoaderOptions{.batching = Options{.max_batch_size = 16, .max_batch_delay = 100us}, .max_cached = bound});
  std::latch start(threads);
  std::atomic<int> wrong{0}, errors{0};
  std::atomic<std::size_t> most_cached{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 random(std::uint64_t(t) + 100);
      std::uniform_int_distribution<Key> pick(0, keys - 1);
      std::uniform_int_distribution<int> action(0, 99);
      start.arrive_and_wait();
      for (int i = 0; i < loads_each; ++i) {
        const Key key = pick(random);
        const int what = action(random);
        if (what < 5) loader.clear(key);
        if (what == 5) loader.prime(key, answer(key));
        if (what == 6) loader.clear_all();
        try {
          const Result result = loader.get(key);
          if (result.id != key || result.value != answer(key).value) wrong.fetch_add(1);
        } catch (...) {
          errors.fetch_add(1);
        }
        std::size_t cached = loader.stats().cached, seen = most_cached.load();
        while (cached > seen && !most_cached.compare_exchange_weak(seen, cached)) {
        }
      }
    });
  }
  for (auto& worker : workers)
    worker.join();
  CHECK(wrong.load() == 0);
  CHECK(errors.load() == 0);
  CHECK(most_cached.load() <= bound);
  auto stats = loader.stats();
  CHECK(stats.cached <= bound);
  CHECK(stats.evictions > 0);
  CHECK(stats.hits + stats.misses == std::uint64_t(threads) * loads_each);
}
