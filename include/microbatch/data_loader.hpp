// microbatch::DataLoader: a per-key cache of futures in front of a Batcher (load, prime, clear).
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "batcher.hpp"
#include "clock.hpp"
#include "detail/correlation.hpp"
#include "errors.hpp"
#include "options.hpp"
#include "outcome.hpp"

namespace microbatch {

/// How a `DataLoader` batches and caches. An aggregate: use designated initialisers, e.g.
/// `DataLoaderOptions{.batching = {.max_batch_size = 100}, .max_cached = 10'000, .ttl = 30s}`.
struct DataLoaderOptions {
  /// The underlying batcher's options (checked by the batcher: invalid ones throw
  /// `std::invalid_argument` from the constructor). Its `clock` is also the cache's clock for `ttl`.
  Options batching{};

  /// The most entries cached at once, over all keys. When a new entry would exceed it, the least
  /// recently used entry (a load that hit or created it counts as a use) is evicted first. 0 (default)
  /// = unbounded.
  std::size_t max_cached = 0;

  /// How long a value stays cached, from when it arrived (or was primed); a load at or after that age
  /// fetches again. 0 (default) = never expires. Precondition: >= 0.
  std::chrono::nanoseconds ttl{0};
};

/// A snapshot of a loader's counters, all since construction. Read one by one without stopping the
/// loader, so they may disagree by the loads in flight at that instant.
struct DataLoaderStats {
  std::uint64_t hits = 0;        ///< loads answered by a cached entry (its future, ready or not)
  std::uint64_t misses = 0;      ///< loads that found no usable entry and fetched (or failed at once)
  std::uint64_t evictions = 0;   ///< entries removed by the max_cached bound
  std::uint64_t expirations = 0; ///< entries found older than ttl and dropped (the load counts as a miss)
  std::size_t cached = 0;        ///< entries in the cache now
  Stats batcher;                 ///< the underlying batcher's counters
};

/// Loads values by key through a `Batcher`, caching one `std::shared_future` per key: the first
/// `load(k)` submits `k`, every later `load(k)` gets the same future while the entry is cached. Keys
/// loaded within one batch window go to the processor in one call.
///
/// Behaviour
/// - The processor is called as `processor(std::span<Key>)` and returns `std::vector<Result>` in any
///   order; `result_key(const Result&)` names the key each result answers (the batcher's keyed
///   correlation: job ID = the key itself). Keys are hashed with `std::hash<Key>` and compared with ==.
/// - A load that ends with an error (the processor's exception, `no_result`, `deadline_exceeded`,
///   `batcher_closed`, `queue_full`) leaves the cache before its future is made ready: every holder of
///   the future sees the error, and the next `load(k)` fetches again. Successful values stay.
/// - `max_cached`: one global bound with exact least-recently-used eviction over all shards (see
///   "Implementation"). An evicted entry whose fetch is still running still completes its future.
/// - `ttl`: an entry whose value arrived `ttl` or longer ago counts as absent. An entry still being
///   fetched never expires. Time comes from `DataLoaderOptions::batching.clock` (nullptr = steady_clock).
/// - `clear`, `clear_all`, eviction and expiry only drop the cache's own reference: futures already
///   handed out keep their state and still receive their result.
/// - Reloading a key whose previous fetch is still queued (after `clear`, an eviction or an expiry)
///   may put the key into one batch twice; the batcher then fails the later job with `duplicate_id`.
///   The loader resubmits that job (from the completion callback, into the next batch), so a caller
///   never sees `duplicate_id`. If shutdown has begun by then, that load ends with `batcher_closed`.
///
/// Threads: the batcher's threads run the processor and the loader's completion callbacks (short:
/// they lock one shard and set one promise). `load` never waits for a fetch; with
/// `Options::max_pending_jobs` and `Overflow::block` it may wait for room, holding no lock of the
/// loader. Shutdown: `shutdown()` (also run by the destructor) stops new fetches, drains the queued
/// ones and waits until every callback has run; futures outlive the loader.
///
/// Requirements: `Key` copy-constructible, equality-comparable, hashable with `std::hash`; `Result`
/// copy-constructible (the future is shared). The processor must not throw `microbatch::duplicate_id`
/// itself (the loader would take it for its own duplicate and resubmit).
template <class Key, class Result, class Processor> class DataLoader {
  struct key_of_job {
    const Key& operator()(const Key& key) const noexcept { return key; }
  };

public:
  using key_type = Key;
  using result_type = Result;
  using batcher_type = Batcher<Key, Result, Processor>;

  /// Starts the underlying batcher with `options.batching`. `result_key(const Result&)` (anything
  /// `std::invoke` accepts, e.g. `&User::id`) returns the key a result answers. Throws
  /// `std::invalid_argument` naming the field for invalid options.
  template <class ResultKey>
  DataLoader(Processor processor, ResultKey result_key, DataLoaderOptions options = {})
      : options_(checked(options)), shards_(std::make_unique<shard[]>(shard_count)),
        batcher_(std::move(processor), key_of_job{}, std::move(result_key), options.batching) {
    for (auto& oldest : oldest_use_)
      oldest.store(no_entry, std::memory_order_relaxed); // every shard starts empty
    for (std::size_t index = 0; index < shard_count; ++index)
      shards_[index].mutex.share_reads(!bounded());
  }

  /// `shutdown()`: waits until every fetch has ended and every callback has run.
  ~DataLoader() { shutdown(); }

  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  /// The future of `key`'s value. A cached entry (fetching or fetched, not expired) returns its future
  /// (a hit); otherwise a new entry is cached and `key` is submitted to the batcher (a miss), evicting
  /// the least recently used entry first if `max_cached` is reached. After `shutdown`, an uncached key
  /// gets a ready future holding `batcher_closed` and nothing is cached. Never waits for the fetch;
  /// a hit locks one shard (shared, when unbounded: hits of one shard do not wait for each other) and
  /// copies the future. Thread-safe.
  [[nodiscard]] std::shared_future<Result> load(const Key& key) {
    const std::size_t index = shard_of(key);
    shard& home = shards_[index];
    if (!bounded()) { // a hit changes nothing but a counter: readers share the shard
      std::shared_lock reading(home.mutex);
      if (auto found = home.entries.find(key); found != home.entries.end() && !expired(found->second)) {
        home.hits.fetch_add(1, std::memory_order_relaxed);
        return found->second.future;
      }
    }
    std::unique_lock lock(home.mutex);
    for (;;) {
      if (auto found = home.entries.find(key); found != home.entries.end()) {
        entry& cached = found->second;
        if (!expired(cached)) {
          home.hits.fetch_add(1, std::memory_order_relaxed); // (unbounded hits may run beside this)
          if (bounded()) touch(index, cached);
          return cached.future;
        }
        bump(home.expirations);
        remove(index, found);
      }
      if (closed_.load(std::memory_order_acquire)) {
        bump(home.misses);
        return failed(detail::make_error<batcher_closed>(
            [] { return "microbatch::DataLoader::load: the loader is shut down and the key is not cached"; }));
      }
      if (take_slot()) break;
      lock.unlock(); // max_cached reached: evict the least recently used entry, wherever it is, and look again
      evict_one();
      lock.lock();
    }
    bump(home.misses);
    std::shared_ptr<std::promise<Result>> promise;
    std::shared_future<Result> future;
    std::uint64_t generation = 0;
    try {
      promise = std::make_shared<std::promise<Result>>();
      future = promise->get_future().share();
      generation = ++home.generations;
      insert(index, key, entry(future, generation), time_point::max());
    } catch (...) {
      give_slot_back();
      throw;
    }
    lock.unlock(); // submit may wait for room (Overflow::block): never with a shard locked
    try {
      batcher_.submit(Key(key), fetch{this, key, generation, promise});
    } catch (...) { // not accepted (shutdown began, queue_full): uncache, then fail its holders
      forget(key, generation);
      promise->set_exception(std::current_exception());
    }
    return future;
  }

  /// `load(key)` for each key, in order (a key repeated in `keys` is a hit on its first load).
  /// Thread-safe.
  [[nodiscard]] std::vector<std::shared_future<Result>> load_many(std::span<const Key> keys) {
    std::vector<std::shared_future<Result>> futures;
    futures.reserve(keys.size());
    for (const Key& key : keys)
      futures.push_back(load(key));
    return futures;
  }

  /// `load(key).get()`: waits for the value and returns a copy, or throws the load's error. Do not
  /// call it from the processor or a callback of this loader's batcher. Thread-safe.
  Result get(const Key& key) { return load(key).get(); }

  /// Caches `value` for `key` (ready, its age starting now) unless `key` is cached, fetching or
  /// fetched; an expired entry counts as absent and is replaced. May evict as `load` does. Works after
  /// shutdown too. Thread-safe.
  void prime(const Key& key, Result value) {
    const std::size_t index = shard_of(key);
    shard& home = shards_[index];
    std::unique_lock lock(home.mutex);
    for (;;) {
      if (auto found = home.entries.find(key); found != home.entries.end()) {
        if (!expired(found->second)) return;
        bump(home.expirations);
        remove(index, found);
      }
      if (take_slot()) break;
      lock.unlock();
      evict_one();
      lock.lock();
    }
    try {
      std::promise<Result> promise;
      promise.set_value(std::move(value));
      const std::uint64_t generation = ++home.generations;
      insert(index, key, entry(promise.get_future().share(), generation), now());
    } catch (...) {
      give_slot_back();
      throw;
    }
  }

  /// Drops `key`'s entry, if any: the next `load(key)` fetches again. Futures already handed out are
  /// untouched (one still fetching still gets its result). Thread-safe.
  void clear(const Key& key) {
    const std::size_t index = shard_of(key);
    std::lock_guard lock(shards_[index].mutex);
    if (auto found = shards_[index].entries.find(key); found != shards_[index].entries.end()) remove(index, found);
  }

  /// Drops every entry, as `clear` does for one key. Entries cached concurrently may survive.
  /// Thread-safe.
  void clear_all() {
    for (std::size_t index = 0; index < shard_count; ++index) {
      shard& each = shards_[index];
      std::lock_guard lock(each.mutex);
      cached_.fetch_sub(each.entries.size(), std::memory_order_relaxed);
      each.entries.clear();
      each.newest = nullptr;
      each.oldest = nullptr;
      publish_oldest(index);
    }
  }

  /// Dispatches the batch being formed now (`Batcher::flush`): returns once it is handed to a
  /// worker. Thread-safe.
  void flush() { batcher_.flush(); }

  /// Stops fetching (later loads of uncached keys get `batcher_closed`; cached keys still hit), then
  /// `Batcher::shutdown()`: dispatches what is queued and waits until every fetch has ended and its
  /// future is ready. Idempotent; the destructor calls it. Thread-safe.
  void shutdown() {
    closed_.store(true, std::memory_order_release);
    batcher_.shutdown();
  }

  /// A snapshot of the counters and of the batcher's. Never blocks on the cache. Thread-safe.
  [[nodiscard]] DataLoaderStats stats() const {
    DataLoaderStats s;
    for (std::size_t index = 0; index < shard_count; ++index) {
      const shard& each = shards_[index];
      s.hits += each.hits.load(std::memory_order_relaxed);
      s.misses += each.misses.load(std::memory_order_relaxed);
      s.evictions += each.evictions.load(std::memory_order_relaxed);
      s.expirations += each.expirations.load(std::memory_order_relaxed);
    }
    s.cached = cached_.load(std::memory_order_relaxed);
    s.batcher = batcher_.stats();
    return s;
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
  //
  // The cache is split into `shard_count` shards by a hash of the key; each shard has its own mutex,
  // map and (when bounded) recency list, so loads of different keys rarely contend. A hit locks one
  // shard, and nothing else is shared between hits (unbounded) but the future's own reference count.
  //
  // max_cached is global and exact: every use (a hit, or the insert of a miss or a prime) takes a
  // ticket from one global counter, `use_clock_`; each shard keeps its entries in ticket order (its
  // mutex orders its uses) and publishes the ticket of its oldest entry in `oldest_use_`. Evicting
  // takes the shard whose published oldest ticket is the smallest and removes that entry, after
  // checking under that shard's mutex that it is still the same one. Published tickets only grow
  // (except when an empty shard gets a fresh, larger one), so that entry is the least recently used
  // of all, among uses that completed before the eviction began. The count of entries, `cached_`, is
  // reserved before an insert (take_slot), so the cache never holds more than max_cached entries, not
  // even for an instant.
private:
  using time_point = std::chrono::steady_clock::time_point;
  static constexpr std::size_t shard_bits = 6;
  static constexpr std::size_t shard_count = std::size_t{1} << shard_bits;
  static constexpr std::uint64_t no_entry = std::numeric_limits<std::uint64_t>::max();

  struct entry {
    entry(std::shared_future<Result> f, std::uint64_t g) : future(std::move(f)), generation(g) {}
    std::shared_future<Result> future;
    std::uint64_t generation;               // tells this entry from later ones for the same key
    time_point arrived = time_point::max(); // when its value arrived; max while fetching
    std::uint64_t last_use = 0;             // use_clock_ ticket (bounded only)
    entry* newer = nullptr;                 // recency list (bounded only)
    entry* older = nullptr;
    const Key* key = nullptr; // the map's own key, to erase the entry when evicted
  };

  /// A shard's lock. Unbounded, hits share it (a `std::shared_mutex`); bounded, every use changes the
  /// recency list, so nothing is shared, and a plain `std::mutex` is cheaper (W7 with max_cached = 1000:
  /// about 12% more loads/s than a `std::shared_mutex` taken exclusively). Chosen once, before use.
  /// (With glibc, readers win: a steady stream of hits on one shard can hold off that shard's inserts
  /// and fetch completions for as long as it lasts.)
  class shard_mutex {
  public:
    void share_reads(bool readers_share) noexcept { readers_share_ = readers_share; }
    void lock() { readers_share_ ? shared_.lock() : plain_.lock(); }
    void unlock() { readers_share_ ? shared_.unlock() : plain_.unlock(); }
    void lock_shared() { shared_.lock_shared(); } // only when readers share
    void unlock_shared() { shared_.unlock_shared(); }

  private:
    bool readers_share_ = true;
    std::mutex plain_;
    std::shared_mutex shared_;
  };

  struct alignas(64) shard {
    shard_mutex mutex;                      // shared only by unbounded hits, which change nothing but `hits`
    std::unordered_map<Key, entry> entries; // guarded by mutex
    entry* newest = nullptr;                // guarded by mutex; recency list (bounded only)
    entry* oldest = nullptr;                // guarded by mutex
    std::uint64_t generations = 0;          // guarded by mutex; last generation handed out
    // Written only under mutex held exclusively (a plain load and store), read by stats() without it;
    // `hits` also under it shared (a fetch-add).
    std::atomic<std::uint64_t> hits{0};
    std::atomic<std::uint64_t> misses{0};
    std::atomic<std::uint64_t> evictions{0};
    std::atomic<std::uint64_t> expirations{0};
  };

  /// The completion callback of one fetch: `submit(key, fetch{...})`. Shares the promise with the
  /// `load` that made it, which still holds it if the submit throws (then this is never called).
  struct fetch {
    DataLoader* owner;
    Key key;
    std::uint64_t generation;
    std::shared_ptr<std::promise<Result>> promise;
    void operator()(Outcome<Result>&& outcome) noexcept { owner->complete(*this, std::move(outcome)); }
  };

  static DataLoaderOptions checked(const DataLoaderOptions& options) {
    if (options.ttl.count() < 0) throw std::invalid_argument("microbatch::DataLoaderOptions::ttl must not be negative");
    return options;
  }

  static std::size_t shard_of(const Key& key) {
    // Fibonacci hashing: the top bits of hash * 2^64/phi spread identity hashes over the shards.
    const auto hash = static_cast<std::uint64_t>(std::hash<Key>{}(key));
    return static_cast<std::size_t>((hash * 0x9E3779B97F4A7C15ull) >> (64 - shard_bits));
  }

  static void bump(std::atomic<std::uint64_t>& counter) noexcept { // caller holds the counter's shard mutex
    counter.store(counter.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }

  static std::shared_future<Result> failed(std::exception_ptr error) {
    std::promise<Result> promise;
    promise.set_exception(std::move(error));
    return promise.get_future().share();
  }

  [[nodiscard]] bool bounded() const noexcept { return options_.max_cached != 0; }

  [[nodiscard]] time_point now() const noexcept {
    microbatch::clock* source = options_.batching.clock;
    return source != nullptr ? source->now() : std::chrono::steady_clock::now();
  }

  [[nodiscard]] bool expired(const entry& cached) const noexcept {
    return options_.ttl.count() != 0 && cached.arrived != time_point::max() && now() - cached.arrived >= options_.ttl;
  }

  /// Reserves room for one entry: false when max_cached entries exist (the caller evicts and retries).
  bool take_slot() noexcept {
    if (!bounded()) {
      cached_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    std::size_t count = cached_.load(std::memory_order_relaxed);
    while (count < options_.max_cached) {
      if (cached_.compare_exchange_weak(count, count + 1, std::memory_order_relaxed)) return true;
    }
    return false;
  }
  void give_slot_back() noexcept { cached_.fetch_sub(1, std::memory_order_relaxed); }

  /// Adds an entry for a key that has none, in the slot already taken. Caller holds the shard's mutex.
  void insert(std::size_t index, const Key& key, entry&& made, time_point arrived) {
    shard& home = shards_[index];
    auto [placed, inserted] = home.entries.try_emplace(key, std::move(made));
    entry& cached = placed->second;
    cached.key = &placed->first;
    cached.arrived = arrived;
    if (bounded()) link_newest(index, cached);
  }

  /// Erases an entry and frees its slot. Caller holds the shard's mutex.
  void remove(std::size_t index, typename std::unordered_map<Key, entry>::iterator found) {
    if (bounded()) unlink(index, found->second);
    shards_[index].entries.erase(found);
    give_slot_back();
  }

  // ---- recency (max_cached only); each helper requires the shard's mutex ----

  void link_newest(std::size_t index, entry& cached) noexcept {
    shard& home = shards_[index];
    cached.last_use = use_clock_.fetch_add(1, std::memory_order_relaxed);
    cached.newer = nullptr;
    cached.older = home.newest;
    if (home.newest != nullptr) home.newest->newer = &cached;
    home.newest = &cached;
    if (home.oldest == nullptr) {
      home.oldest = &cached;
      publish_oldest(index);
    }
  }

  void unlink(std::size_t index, entry& cached) noexcept {
    shard& home = shards_[index];
    if (cached.newer != nullptr) {
      cached.newer->older = cached.older;
    } else {
      home.newest = cached.older;
    }
    if (cached.older != nullptr) {
      cached.older->newer = cached.newer;
    } else {
      home.oldest = cached.newer;
      publish_oldest(index);
    }
    cached.newer = cached.older = nullptr;
  }

  void touch(std::size_t index, entry& cached) noexcept {
    if (shards_[index].newest == &cached) {
      cached.last_use = use_clock_.fetch_add(1, std::memory_order_relaxed);
      if (shards_[index].oldest == &cached) publish_oldest(index);
      return;
    }
    unlink(index, cached);
    link_newest(index, cached);
  }

  void publish_oldest(std::size_t index) noexcept {
    const entry* oldest = shards_[index].oldest;
    oldest_use_[index].store(oldest != nullptr ? oldest->last_use : no_entry, std::memory_order_release);
  }

  /// Evicts the least recently used entry of all shards. Holds no mutex on entry; takes only the
  /// victim's shard mutex. Returns without evicting if every shard is empty (the slots are taken by
  /// inserts in progress: the caller looks again).
  void evict_one() {
    for (;;) {
      std::size_t victim = shard_count;
      std::uint64_t least = no_entry;
      for (std::size_t index = 0; index < shard_count; ++index) {
        const std::uint64_t oldest = oldest_use_[index].load(std::memory_order_acquire);
        if (oldest < least) {
          least = oldest;
          victim = index;
        }
      }
      if (victim == shard_count) {
        std::this_thread::yield();
        return;
      }
      shard& home = shards_[victim];
      std::lock_guard lock(home.mutex);
      if (home.oldest == nullptr || home.oldest->last_use != least) continue; // used or gone since: look again
      bump(home.evictions);
      remove(victim, home.entries.find(*home.oldest->key));
      return;
    }
  }

  // ---- completion (a batcher thread) ----

  void complete(fetch& done, Outcome<Result>&& outcome) noexcept {
    std::exception_ptr error;
    if (outcome.has_value()) {
      try {
        if (options_.ttl.count() != 0) stamp_arrival(done.key, done.generation);
        done.promise->set_value(std::move(outcome.value()));
        return;
      } catch (...) { // hashing the key, or Result's move constructor, threw
        error = std::current_exception();
      }
    } else {
      error = outcome.error();
      if (is_duplicate(error)) { // our own earlier job for this key was in the same batch: go again
        try {
          batcher_.submit(Key(done.key), fetch(done));
          return;
        } catch (...) { // shutdown began (or queue_full): this load ends with that
          error = std::current_exception();
        }
      }
    }
    try {
      forget(done.key, done.generation); // before the error is visible: whoever sees it can reload
    } catch (...) {                      // hashing the key threw; the entry stays, its future holds the error
    }
    try {
      done.promise->set_exception(error);
    } catch (...) { // already satisfied (set_value stored a value, then something threw)
    }
  }

  static bool is_duplicate(const std::exception_ptr& error) noexcept {
    try {
      std::rethrow_exception(error);
    } catch (const duplicate_id&) {
      return true;
    } catch (...) {
      return false;
    }
  }

  /// Records when the value of `key`'s entry `generation` arrived (if that entry is still cached).
  void stamp_arrival(const Key& key, std::uint64_t generation) {
    const std::size_t index = shard_of(key);
    std::lock_guard lock(shards_[index].mutex);
    auto found = shards_[index].entries.find(key);
    if (found != shards_[index].entries.end() && found->second.generation == generation) found->second.arrived = now();
  }

  /// Drops `key`'s entry if it is still entry `generation` (never a newer entry for the same key).
  void forget(const Key& key, std::uint64_t generation) {
    const std::size_t index = shard_of(key);
    std::lock_guard lock(shards_[index].mutex);
    auto found = shards_[index].entries.find(key);
    if (found != shards_[index].entries.end() && found->second.generation == generation) remove(index, found);
  }

  const DataLoaderOptions options_;
  std::unique_ptr<shard[]> shards_;
  std::atomic<bool> closed_{false};
  alignas(64) std::atomic<std::size_t> cached_{0};      // entries cached, plus slots taken for inserts
  alignas(64) std::atomic<std::uint64_t> use_clock_{0}; // recency tickets (bounded only)
  alignas(64) std::array<std::atomic<std::uint64_t>, shard_count> oldest_use_{}; // per shard: its oldest entry's ticket
  batcher_type batcher_; // last: its callbacks use the members above until its shutdown returns
};

// Deduces Key and Result from the processor when it is a function or has one non-template operator()
// taking std::span<Key> and returning std::vector<Result>: `DataLoader loader(fetch_users, &User::id);`.
template <class Processor, class ResultKey>
DataLoader(Processor, ResultKey)
    -> DataLoader<detail::processor_job_t<Processor>, detail::processor_result_t<Processor>, Processor>;
template <class Processor, class ResultKey>
DataLoader(Processor, ResultKey, DataLoaderOptions)
    -> DataLoader<detail::processor_job_t<Processor>, detail::processor_result_t<Processor>, Processor>;

} // namespace microbatch
