// The batcher's parts on their own: admission, batch forming, the collector's clock, the ready queue,
// the histogram and the counters, the callback slot pool and a batch's scope, the runner pool.
#include <catch2/catch.hpp>

#include <microbatch/detail/admission.hpp>
#include <microbatch/detail/batch_forming.hpp>
#include <microbatch/detail/batch_queue.hpp>
#include <microbatch/detail/batch_runner.hpp>
#include <microbatch/detail/batch_scope.hpp>
#include <microbatch/detail/collector.hpp>
#include <microbatch/detail/collector_clock.hpp>
#include <microbatch/detail/counters.hpp>
#include <microbatch/detail/histogram.hpp>
#include <microbatch/detail/ready_queue.hpp>
#include <microbatch/detail/slot_pool.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <set>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "support.hpp"

using namespace std::chrono_literals;

namespace {
struct node {
  node* next = nullptr;
  node* next_batch = nullptr;
  std::uint8_t batch_trigger = 0;
  std::size_t weight = 1;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::time_point::min();
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  bool ends_by_signal = false;
  int id = 0;
  bool cancelled = false; // by its caller: the collector drops it
  [[nodiscard]] bool claimed() const noexcept { return cancelled; }
};
using time_point = std::chrono::steady_clock::time_point;
const time_point t0 = time_point{} + 1h;

std::vector<int> ids(const microbatch::detail::job_list<node>& batch) {
  std::vector<int> out;
  for (node* n = batch.first; n != nullptr; n = n->next)
    out.push_back(n->id);
  return out;
}
} // namespace

TEST_CASE("admission: reject counts and throws at the bound, release makes room, close refuses", "[parts]") {
  microbatch::detail::admission gate(2, microbatch::Overflow::reject);
  std::atomic<std::uint64_t> rejected{0};
  CHECK(gate.reserve(rejected, false));
  CHECK(gate.reserve(rejected, false));
  CHECK_THROWS_AS((void)gate.reserve(rejected, false), microbatch::queue_full);
  CHECK(rejected.load() == 1);
  gate.release(true);
  CHECK(gate.reserve(rejected, false));
  gate.throw_if_closed();
  gate.close();
  CHECK(gate.closed());
  CHECK_THROWS_AS(gate.throw_if_closed(), microbatch::batcher_closed);
}

TEST_CASE("admission: block waits for a release; a batcher thread goes beyond the bound", "[parts]") {
  microbatch::detail::admission gate(1, microbatch::Overflow::block);
  std::atomic<std::uint64_t> rejected{0};
  CHECK(gate.reserve(rejected, false));
  CHECK(gate.reserve(rejected, true)); // beyond the bound: never waits
  auto blocked = std::async(std::launch::async, [&] { return gate.reserve(rejected, false); });
  CHECK(blocked.wait_for(0s) == std::future_status::timeout);
  gate.release(true);
  gate.release(true); // now below the bound: the blocked submitter gets in
  CHECK(blocked.get());
  auto closed_out = std::async(std::launch::async, [&] { return gate.reserve(rejected, false); });
  gate.close();
  CHECK_THROWS_AS(closed_out.get(), microbatch::batcher_closed);
}

TEST_CASE("admission: a new bound counts only the jobs admitted under a bound", "[parts]") {
  microbatch::detail::admission gate(0, microbatch::Overflow::reject);
  std::atomic<std::uint64_t> rejected{0};
  const bool unbounded = gate.reserve(rejected, false);
  CHECK(!unbounded); // nothing counted
  gate.set_limit(1, microbatch::Overflow::reject);
  const bool first = gate.reserve(rejected, false);
  CHECK(first);
  CHECK_THROWS_AS((void)gate.reserve(rejected, false), microbatch::queue_full);
  gate.release(unbounded); // gives back nothing: the bound still holds
  CHECK_THROWS_AS((void)gate.reserve(rejected, false), microbatch::queue_full);
  gate.set_limit(2, microbatch::Overflow::block); // more room at once
  CHECK(gate.reserve(rejected, false));
  auto blocked = std::async(std::launch::async, [&] { return gate.reserve(rejected, false); });
  CHECK(blocked.wait_for(0s) == std::future_status::timeout);
  gate.set_limit(0, microbatch::Overflow::block); // lifting the bound lets the blocked one in, uncounted
  CHECK(!blocked.get());
}

TEST_CASE("batch forming: the arrival that fills the batch is told so, once", "[parts]") {
  microbatch::detail::batch_forming<node> forming(3, 10ms);
  std::vector<node> nodes(7);
  std::vector<std::vector<int>> full;
  auto stamp = [](node* n) { n->arrival = t0; };
  int told = 0;
  for (int i = 0; i < 7; ++i) {
    nodes[std::size_t(i)].id = i;
    forming.push(&nodes[std::size_t(i)], stamp);
    if (forming.count_arrival()) {
      ++told;
      std::lock_guard lock(forming.mutex());
      forming.take_arrivals(t0, [&](microbatch::detail::job_list<node> batch) { full.push_back(ids(batch)); });
    }
  }
  CHECK(told == 2);
  CHECK(full == std::vector<std::vector<int>>{{0, 1, 2}, {3, 4, 5}});
  std::lock_guard lock(forming.mutex());
  forming.take_arrivals(t0 + 1ms, [&](auto) { FAIL("not full"); });
  CHECK(forming.size() == 1);
  CHECK(forming.due() == t0 + 10ms); // job 6 was first into an empty inbox: its arrival starts the batch
  CHECK(ids(forming.cut()) == std::vector<int>{6});
  CHECK(forming.due() == time_point::max());
  CHECK(forming.arrivals() == 7);
}

TEST_CASE("batch forming: jobs left over from a full batch start the next one when taken", "[parts]") {
  microbatch::detail::batch_forming<node> forming(3, 10ms);
  std::vector<node> nodes(4);
  bool told = false;
  for (int i = 0; i < 4; ++i) {
    nodes[std::size_t(i)].id = i;
    forming.push(&nodes[std::size_t(i)], [](node* n) { n->arrival = t0; });
    told = forming.count_arrival() || told; // no pass runs: all four wait in the inbox
  }
  CHECK(told);
  std::vector<std::vector<int>> full;
  std::lock_guard lock(forming.mutex());
  forming.take_arrivals(t0 + 2ms, [&](microbatch::detail::job_list<node> batch) { full.push_back(ids(batch)); });
  CHECK(full == std::vector<std::vector<int>>{{0, 1, 2}});
  CHECK(forming.size() == 1);
  CHECK(forming.due() == t0 + 2ms + 10ms);
}

TEST_CASE("batch forming: a batch is due max_batch_delay after its first arrival; closing refuses", "[parts]") {
  microbatch::detail::batch_forming<node> forming(0, 5ms); // no size limit
  node a{}, b{};
  a.deadline = t0 + 2ms;
  forming.push(&a, [](node* n) { n->arrival = t0; });
  CHECK_FALSE(forming.count_arrival()); // size 0: never full
  forming.push(&b, [](node* n) { n->arrival = t0 + 3ms; });
  std::lock_guard lock(forming.mutex());
  forming.take_arrivals(
      t0 + 4ms, [&](auto) { FAIL("no size limit"); }, true);
  CHECK(forming.due() == t0 + 5ms);
  CHECK(forming.earliest_deadline() == t0 + 2ms);
  node late{};
  CHECK(forming.push(&late, [](node*) {}) == microbatch::detail::batch_forming<node>::push_result::closed);
  CHECK(forming.size() == 2);
}

TEST_CASE("batch forming: a caller's job is found among blocking callers' jobs only", "[parts]") {
  microbatch::detail::batch_forming<node> forming(0, 0ms);
  std::vector<node> nodes(3);
  for (auto& n : nodes)
    n.ends_by_signal = true;
  std::lock_guard lock(forming.mutex());
  CHECK_FALSE(forming.holds_only_signalled(&nodes[0])); // empty
  forming.push(&nodes[0], [](node*) {});
  forming.push(&nodes[1], [](node*) {});
  forming.take_arrivals(t0, [](auto) { FAIL("no size limit"); });
  CHECK(forming.holds_only_signalled(&nodes[0]));
  CHECK(forming.holds_only_signalled(&nodes[1]));
  CHECK_FALSE(forming.holds_only_signalled(&nodes[2])); // not in the batch
  nodes[2].ends_by_signal = false;                      // a callback's or a coroutine's job
  forming.push(&nodes[2], [](node*) {});
  forming.take_arrivals(t0, [](auto) { FAIL("no size limit"); });
  CHECK_FALSE(forming.holds_only_signalled(&nodes[0]));
}

TEST_CASE("collector clock: only a sooner time lowers the plan and wakes the sleeper", "[parts]") {
  microbatch::manual_clock source;
  microbatch::detail::collector_clock clock(&source);
  clock.plan(source.now() + 10ms);
  clock.wake_by(source.now() + 20ms); // later than planned: nothing to do
  auto sleeper = std::async(std::launch::async, [&] { clock.sleep(); });
  source.await_timers(1);
  CHECK(source.next_timer() == source.now() + 10ms);
  clock.wake_by(source.now() + 1ms); // sooner: wakes it
  sleeper.get();
  auto round = clock.begin_round();
  CHECK_FALSE(round.shutdown.has_value());
  clock.request_shutdown(microbatch::Shutdown::drain);
  clock.request_shutdown(microbatch::Shutdown::cancel); // a cancel overrides a drain
  CHECK(clock.begin_round().shutdown == microbatch::Shutdown::cancel);
  const auto ticket = clock.request_flush();
  CHECK(clock.begin_round().flush_ticket == ticket);
  clock.flushed(ticket, true);
  clock.await_flush(ticket);         // served: returns
  CHECK(clock.request_flush() == 0); // exited: nothing more to flush
}

namespace {
/// The collector's view of a batcher: records what it dispatches and ends; with `ready` set,
/// dispatched batches are queued there (for no worker: they stay until the collector drops them).
struct recording_host {
  microbatch::detail::ready_queue<node>* ready = nullptr;
  std::mutex mutex;
  std::vector<std::pair<std::vector<int>, microbatch::Trigger>> dispatched;
  std::vector<std::pair<int, microbatch::detail::failure>> ended;
  std::vector<std::exception_ptr> errors;

  void dispatch(microbatch::detail::job_list<node> batch, microbatch::Trigger why) {
    std::lock_guard lock(mutex);
    dispatched.emplace_back(ids(batch), why);
    if (ready != nullptr) ready->push(batch);
  }
  void end_job(node* job, std::exception_ptr error, microbatch::detail::failure cause) noexcept {
    std::lock_guard lock(mutex);
    ended.emplace_back(job->id, cause);
    errors.push_back(std::move(error));
  }
};

struct collector_rig {
  explicit collector_rig(std::chrono::nanoseconds delay) : forming(0, delay) {}
  void push(node& job, int id, time_point deadline = time_point::max()) {
    job.id = id;
    job.deadline = deadline;
    const time_point arrival = source.now();
    forming.push(&job, [&](node* first) { first->arrival = arrival; });
    (void)forming.count_arrival();
    clock.wake_by(std::min(arrival + forming.delay(), deadline)); // as Batcher::enqueue does
  }
  microbatch::manual_clock source;
  recording_host host;
  microbatch::detail::batch_forming<node> forming;
  microbatch::detail::ready_queue<node> ready;
  microbatch::detail::collector_clock clock{&source};
  microbatch::detail::collector<node, recording_host> loop{host, forming, ready, clock};
};
} // namespace

TEST_CASE("collector: deadlines, then the delay, then a flush; a cancel ends what is left", "[parts]") {
  using microbatch::Trigger;
  using microbatch::detail::failure;
  collector_rig rig(5ms);
  const time_point start = rig.source.now();
  node a, b, c, d, e;
  rig.push(a, 0);
  rig.push(b, 1, start + 2ms);
  std::thread collector([&] { rig.loop.run(); });
  rig.source.await_timers(1);
  CHECK(rig.source.next_timer() == start + 2ms); // b's deadline comes before a's batch is due
  rig.source.advance(2ms);
  rig.source.await_timers(1);
  CHECK(rig.source.next_timer() == start + 5ms);
  {
    std::lock_guard lock(rig.host.mutex);
    CHECK(rig.host.ended == std::vector<std::pair<int, failure>>{{1, failure::expired}});
    CHECK(rig.host.dispatched.empty());
  }
  rig.source.advance(3ms);
  rig.clock.await_flush(rig.clock.request_flush()); // a round after the advance has run
  rig.push(c, 2);
  rig.push(d, 3);
  rig.clock.await_flush(rig.clock.request_flush());
  {
    std::lock_guard lock(rig.host.mutex);
    CHECK(rig.host.dispatched ==
          std::vector<std::pair<std::vector<int>, Trigger>>{{{0}, Trigger::delay}, {{2, 3}, Trigger::flush}});
  }
  rig.push(e, 4, start + 1h);
  rig.clock.request_shutdown(microbatch::Shutdown::cancel);
  collector.join(); // run returns once everything left has ended
  std::lock_guard lock(rig.host.mutex);
  REQUIRE(rig.host.ended.size() == 2);
  CHECK(rig.host.ended[1] == std::pair<int, failure>{4, failure::other});
  CHECK_THROWS_AS(std::rethrow_exception(rig.host.errors[1]), microbatch::batcher_closed);
}

TEST_CASE("collector: a drain keeps enforcing deadlines until the last queued batch is taken", "[parts]") {
  using microbatch::detail::failure;
  collector_rig rig(0ms);
  rig.host.ready = &rig.ready; // dispatched batches wait there: no worker takes them
  const time_point start = rig.source.now();
  node waiting, withdrawn;
  rig.push(waiting, 0, start + 1ms);
  rig.push(withdrawn, 1);
  withdrawn.cancelled = true; // its caller's stop came
  rig.loop.request_sweep();
  rig.clock.request_shutdown(microbatch::Shutdown::drain); // all before the collector's first round
  std::thread collector([&] { rig.loop.run(); });
  rig.source.await_timers(1); // still running after dispatching the batch, for its job's deadline
  CHECK(rig.source.next_timer() == start + 1ms);
  {
    std::lock_guard lock(rig.host.mutex);
    CHECK(rig.host.ended == std::vector<std::pair<int, failure>>{{1, failure::expired}}); // dropped (abandoned)
  }
  rig.source.advance(1ms);
  collector.join(); // the queued job expired; nothing is left: the drain is over
  std::lock_guard lock(rig.host.mutex);
  CHECK(rig.host.ended == std::vector<std::pair<int, failure>>{{1, failure::expired}, {0, failure::expired}});
  microbatch::detail::job_list<node> left;
  bool emptied = false;
  CHECK_FALSE(rig.ready.pop(left, emptied)); // finished: a worker would exit
}

namespace {
/// Queues each of `nodes` (numbered 0, 1, ...) as a batch of its own.
void queue_one_batch_each(microbatch::detail::ready_queue<node>& ready, std::vector<node>& nodes) {
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    nodes[i].id = int(i);
    microbatch::detail::job_list<node> batch;
    batch.push_back(&nodes[i]);
    ready.push(batch);
  }
}
} // namespace

TEST_CASE("batch queue: a popped batch, measured, has its jobs, size, last, trigger and start", "[parts]") {
  // The queue keeps only a batch's first node (and in it the trigger and the batch's start): the
  // worker measures the rest. remove_if must keep all of that for the batches it leaves.
  std::vector<node> nodes(6);
  for (int i = 0; i < 6; ++i)
    nodes[static_cast<std::size_t>(i)].id = i;
  auto batch_of = [&](std::initializer_list<int> members, microbatch::Trigger why, time_point started) {
    microbatch::detail::job_list<node> batch;
    for (int i : members)
      batch.push_back(&nodes[static_cast<std::size_t>(i)]);
    batch.trigger = why;
    batch.first->arrival = started;
    return batch;
  };
  microbatch::detail::batch_queue<node> queue;
  queue.push(batch_of({0, 1, 2}, microbatch::Trigger::delay, t0));
  queue.push(batch_of({3}, microbatch::Trigger::flush, t0 + 1s));
  queue.push(batch_of({4, 5}, microbatch::Trigger::idle, t0 + 2s));
  CHECK(queue.count() == 3);

  microbatch::detail::job_list<node> removed; // job 0 leaves: batch {1, 2} starts as {0, 1, 2} did
  queue.remove_if([](node* n) { return n->id == 0 || n->id == 3; }, removed);
  CHECK(ids(removed) == std::vector<int>{0, 3});
  REQUIRE(queue.count() == 2);

  // Each popped batch, measured, keeps its members, trigger and start.
  auto check_next = [&](std::vector<int> expected, node* last, microbatch::Trigger why, time_point started) {
    auto popped = queue.pop();
    popped.measure();
    CHECK(ids(popped) == expected);
    CHECK(popped.size == expected.size());
    CHECK(popped.last == last);
    CHECK(popped.trigger == why);
    CHECK(popped.first->arrival == started);
  };
  check_next({1, 2}, &nodes[2], microbatch::Trigger::delay, t0);
  check_next({4, 5}, &nodes[5], microbatch::Trigger::idle, t0 + 2s);
  CHECK(queue.empty());
}

TEST_CASE("ready queue: first in first out; hold stops workers; finish lets them exit", "[parts]") {
  microbatch::detail::ready_queue<node> ready;
  std::vector<node> nodes(3);
  queue_one_batch_each(ready, nodes);
  microbatch::detail::job_list<node> taken;
  bool emptied = false;
  REQUIRE(ready.pop(taken, emptied));
  CHECK(ids(taken) == std::vector<int>{0});
  CHECK_FALSE(emptied);
  ready.hold();
  auto worker = std::async(std::launch::async, [&] {
    microbatch::detail::job_list<node> mine;
    bool now_empty = false;
    return ready.pop(mine, now_empty);
  });
  CHECK(worker.wait_for(0s) == std::future_status::timeout);
  microbatch::detail::job_list<node> removed;
  ready.remove_if([](node* n) { return n->id == 1; }, removed);
  CHECK(ids(removed) == std::vector<int>{1});
  ready.finish();
  CHECK_FALSE(worker.get()); // held and finished: the worker exits without taking batch {2}
  CHECK_FALSE(ready.empty());
}

TEST_CASE("ready queue: no more workers hold a batch than there are slots; set_slots changes that", "[parts]") {
  microbatch::detail::ready_queue<node> ready(1);
  std::vector<node> nodes(3);
  queue_one_batch_each(ready, nodes);
  microbatch::detail::job_list<node> first;
  bool emptied = false;
  REQUIRE(ready.pop(first, emptied)); // takes the one slot
  auto second = std::async(std::launch::async, [&] {
    microbatch::detail::job_list<node> mine;
    bool now_empty = false;
    const bool got = ready.pop(mine, now_empty);
    return got ? ids(mine) : std::vector<int>{};
  });
  CHECK(second.wait_for(0s) == std::future_status::timeout); // a batch is queued, but no slot is free
  ready.set_slots(2);
  CHECK(second.get() == std::vector<int>{1}); // a second slot: taken at once
  ready.set_slots(1);                         // two hold batches; one slot from now on
  auto returning = std::async(std::launch::async, [&] {
    microbatch::detail::job_list<node> mine;
    bool now_empty = false;
    return ready.pop(mine, now_empty, true) ? ids(mine) : std::vector<int>{}; // gives back one: 1 of 1
  });
  CHECK(returning.wait_for(0s) == std::future_status::timeout);
  // The other worker comes back too: now a slot is free, and one of the two takes batch {2}.
  auto other = std::async(std::launch::async, [&] {
    microbatch::detail::job_list<node> mine;
    bool now_empty = false;
    return ready.pop(mine, now_empty, true) ? ids(mine) : std::vector<int>{};
  });
  ready.finish();
  std::vector<std::vector<int>> got{returning.get(), other.get()};
  std::sort(got.begin(), got.end());
  CHECK(got == std::vector<std::vector<int>>{{}, {2}});
}

TEST_CASE("ready queue: a caller borrows a free slot; a worker that waited meanwhile takes the queued batch",
          "[parts]") {
  microbatch::detail::ready_queue<node> ready(1);
  REQUIRE(ready.try_borrow_slot());
  CHECK_FALSE(ready.try_borrow_slot()); // the only slot is borrowed
  std::vector<node> nodes(1);
  queue_one_batch_each(ready, nodes);
  auto worker = std::async(std::launch::async, [&] {
    microbatch::detail::job_list<node> mine;
    bool now_empty = false;
    return ready.pop(mine, now_empty) ? ids(mine) : std::vector<int>{};
  });
  CHECK(worker.wait_for(0s) == std::future_status::timeout); // queued, but no slot is free
  auto shutdown = std::async(std::launch::async, [&] { ready.await_borrows(); });
  ready.return_slot();
  CHECK(worker.get() == std::vector<int>{0}); // return_slot woke it (or it came after): it has the slot
  CHECK_FALSE(ready.try_borrow_slot());
  CHECK(shutdown.wait_for(0s) == std::future_status::timeout); // the borrower has not let go yet
  ready.end_borrow();
  shutdown.get();
}

TEST_CASE("histogram: p50 and p99 within 5%, max exact, zero when empty", "[parts]") {
  microbatch::detail::histogram h;
  CHECK(h.percentiles().max == 0ns);
  for (int i = 1; i <= 1000; ++i)
    h.record(std::chrono::microseconds(i));
  const auto p = h.percentiles();
  CHECK(p.max == 1000us);
  CHECK(std::abs(double(p.p50.count()) - 500e3) <= 0.05 * 500e3);
  CHECK(std::abs(double(p.p99.count()) - 990e3) <= 0.05 * 990e3);
  microbatch::detail::histogram two; // nearest rank: p99 of two samples is the larger one
  two.record(10ms);
  two.record(20ms);
  CHECK(two.percentiles().p99 >= 20ms * 0.97);
  CHECK(two.percentiles().p50 <= 10ms * 1.03);
  microbatch::detail::histogram small;
  small.record(7ns);
  CHECK(small.percentiles().p50 == 7ns); // below 32 ns every value has its own bucket
}

TEST_CASE("slot pool: gathered slots come back together, none lost or handed out twice", "[parts]") {
  using pool_type = microbatch::detail::slot_pool<48, 8>;
  pool_type pool;
  std::vector<void*> held;
  for (int i = 0; i < 5; ++i) {
    const pool_type::lease lease = pool.acquire();
    REQUIRE(lease.pooled);
    held.push_back(lease.memory);
  }
  REQUIRE(std::set<void*>(held.begin(), held.end()).size() == 5);

  pool_type::gathered gathered;
  CHECK(gathered.empty());
  pool.release_gathered(gathered); // nothing to give back
  pool.gather({held[0], true}, gathered);
  pool.gather({::operator new (48, std::align_val_t{8}), false}, gathered); // not pooled: freed at once
  pool.gather({held[2], true}, gathered);
  pool.gather({held[3], true}, gathered);
  CHECK_FALSE(gathered.empty());
  pool.release_gathered(gathered);
  CHECK(gathered.empty());

  // The three come back first (on top of the free stack), each once.
  std::set<void*> again;
  for (int i = 0; i < 3; ++i)
    again.insert(pool.acquire().memory);
  CHECK(again == std::set<void*>{held[0], held[2], held[3]});
  // A chain of one goes back on top too.
  pool_type::gathered one;
  pool.gather({held[0], true}, one);
  pool.release_gathered(one);
  CHECK(pool.acquire().memory == held[0]);

  // The rest of the first slab is still linked behind the chains. Taking as many slots as a slab has
  // (the five held ones included) must yield the first slab whole: distinct slots, one evenly spaced
  // array. A slot lost on the way would make the pool grow, and a second slab's slot cannot sit on
  // the first slab's grid.
  std::vector<void*> all(held.begin(), held.end());
  while (all.size() < pool_type::slots_per_slab)
    all.push_back(pool.acquire().memory);
  std::sort(all.begin(), all.end(), std::less<>());
  REQUIRE(std::adjacent_find(all.begin(), all.end()) == all.end()); // none handed out twice
  const auto address = [](const void* memory) { return reinterpret_cast<std::uintptr_t>(memory); };
  const std::uintptr_t stride = address(all[1]) - address(all[0]);
  std::size_t off_grid = 0;
  for (std::size_t i = 1; i < all.size(); ++i)
    off_grid += address(all[i]) - address(all[i - 1]) != stride ? 1 : 0;
  CHECK(stride >= 48);
  CHECK(off_grid == 0);
  // The next slot comes from a new slab.
  void* beyond = pool.acquire().memory;
  CHECK_FALSE(std::binary_search(all.begin(), all.end(), beyond, std::less<>()));
}

TEST_CASE("slot pool: a large batch's slots rest behind newer ones before they are handed out again", "[parts]") {
  using pool_type = microbatch::detail::slot_pool<48, 8>;
  pool_type pool;
  const std::size_t large = pool_type::min_resting_slots();
  REQUIRE(large > 1);
  auto take = [&](std::size_t count) {
    std::set<void*> taken;
    for (std::size_t i = 0; i < count; ++i)
      taken.insert(pool.acquire().memory);
    REQUIRE(taken.size() == count);
    return taken;
  };
  auto give_back = [&](const std::set<void*>& slots) {
    pool_type::gathered gathered;
    for (void* slot : slots)
      pool.gather({slot, true}, gathered);
    pool.release_gathered(gathered);
  };
  auto disjoint = [](const std::set<void*>& a, const std::set<void*>& b) {
    return std::none_of(a.begin(), a.end(), [&](void* slot) { return b.count(slot) != 0; });
  };

  // One slot fewer: free at once, on top of the free stack.
  const std::set<void*> small = take(large - 1);
  give_back(small);
  CHECK(take(large - 1) == small);

  SECTION("it rests until resting_chains newer chains came back") {
    const std::set<void*> first = take(large);
    give_back(first);
    std::vector<std::set<void*>> newer;
    for (std::size_t i = 0; i + 1 < pool_type::resting_chains; ++i) {
      newer.push_back(take(large));
      CHECK(disjoint(newer.back(), first));
    }
    for (const auto& chain : newer)
      give_back(chain); // resting_chains chains rest now, `first` the oldest
    const std::set<void*> probe = take(large);
    CHECK(disjoint(probe, first));
    give_back(probe); // one more: `first` is free again, on top
    CHECK(take(large) == first);
  }
  SECTION("it rests until the large chains newer than it hold more than max_resting_slots()") {
    const std::size_t most = pool_type::max_resting_slots(); // resting_bytes of slots
    REQUIRE(most >= 2 * large);
    const std::set<void*> first = take(large);
    give_back(first);
    const std::set<void*> bulk = take(most - large);
    CHECK(disjoint(bulk, first));
    give_back(bulk);
    const std::set<void*> exactly = take(large);
    CHECK(disjoint(exactly, first));
    give_back(exactly); // newer than `first`: exactly max_resting_slots(), so it still rests
    const std::set<void*> over = take(large);
    CHECK(disjoint(over, first));
    give_back(over); // newer: one chain more than that: `first` is free again, on top
    CHECK(take(large) == first);
  }
  SECTION("in a long run each chain wakes when the resting_chains-th chain after it comes back") {
    const std::size_t count = 2 * pool_type::resting_chains + 2;
    std::vector<std::set<void*>> chains;
    for (std::size_t i = 0; i < count; ++i)
      chains.push_back(take(large));
    for (const auto& chain : chains)
      give_back(chain);
    // The first count - resting_chains woke, in order, so the last of them is on top; the rest rest.
    for (std::size_t woken = count - pool_type::resting_chains; woken-- > 0;)
      CHECK(take(large) == chains[woken]);
    const std::set<void*> next = take(large);
    for (std::size_t resting = count - pool_type::resting_chains; resting < count; ++resting)
      CHECK(disjoint(next, chains[resting]));
  }
}

TEST_CASE("counters: each trigger and failure counts where Stats says; ends are read before arrivals", "[parts]") {
  using microbatch::Trigger;
  using microbatch::detail::failure;
  microbatch::detail::counters counters;
  for (Trigger why : {Trigger::size, Trigger::size, Trigger::delay, Trigger::flush, Trigger::shutdown, Trigger::idle,
                      Trigger::weight})
    counters.dispatched(why);
  counters.completed();
  counters.completed(4);
  counters.failed(failure::expired);
  counters.failed(failure::cancelled);
  counters.failed(failure::other);
  counters.rejected().fetch_add(2);
  counters.processed({Trigger::size, 2, 2, 0, 1ms, 3ms});
  counters.processed({Trigger::delay, 6, 6, 1, 1ms, 3ms});
  counters.uncorrelated(3);
  counters.coalesced(2);
  counters.observer_threw();
  counters.callback_threw();

  // A job that ends while the snapshot is taken (here: between reading the ends and the arrivals) is
  // counted as accepted but not yet as ended, never the other way round.
  const microbatch::Stats s = counters.snapshot([&] {
    counters.completed();
    return std::uint64_t{10};
  });
  CHECK(s.jobs_completed == 5);
  CHECK(s.jobs_failed == 3);
  CHECK(s.jobs_submitted == 10);
  CHECK(s.pending_jobs == 2);
  CHECK(s.jobs_expired == 1);
  CHECK(s.jobs_cancelled == 1);
  CHECK(s.jobs_rejected == 2);
  CHECK(s.batches_full == 2);
  CHECK(s.batches_timed_out == 1);
  CHECK(s.batches_flushed == 2);
  CHECK(s.batches_idle == 1);
  CHECK(s.batches_weight == 1);
  CHECK(s.batches == 7);
  CHECK(s.batch_size_mean == 4.0);
  CHECK(s.batch_size_max == 6);
  CHECK(s.processing_time.max == 3ms);
  CHECK(s.uncorrelated_results == 3);
  CHECK(s.jobs_coalesced == 2);
  CHECK(s.observer_errors == 1);
  CHECK(s.callback_errors == 1);
  // Arrivals read as fewer than the ends (they are counted apart): submitted is at least the ends.
  const microbatch::Stats late = counters.snapshot([] { return std::uint64_t{0}; });
  CHECK(late.jobs_submitted == late.jobs_completed + late.jobs_failed);
  CHECK(late.pending_jobs == 0);
}

TEST_CASE("batch scope: the innermost scope of its owner saves slots and counts until it ends", "[parts]") {
  using pool_type = microbatch::detail::slot_pool<48, 8>;
  using scope = microbatch::detail::batch_scope<pool_type>;
  pool_type pool;
  std::atomic<std::uint64_t> returned{0};
  pool_type other_pool; // another batcher's
  CHECK(scope::of_thread(&pool) == nullptr);
  void* slot = pool.acquire().memory;
  {
    scope outer(pool, returned);
    REQUIRE(scope::of_thread(&pool) != nullptr);
    CHECK(scope::of_thread(&other_pool) == nullptr);
    ++scope::of_thread(&pool)->enqueues_returned;
    {
      scope inner(other_pool, returned); // another batcher's batch run from within this one
      CHECK(scope::of_thread(&pool) == nullptr);
      ++scope::of_thread(&other_pool)->enqueues_returned;
    }
    CHECK(returned.load() == 1); // the inner scope's, at its end
    REQUIRE(scope::of_thread(&pool) != nullptr);
    ++scope::of_thread(&pool)->enqueues_returned;
    pool.gather({slot, true}, scope::of_thread(&pool)->slots);
    CHECK(returned.load() == 1);
    CHECK(pool.acquire().memory != slot); // still gathered, not yet free
  }
  CHECK(scope::of_thread(&pool) == nullptr);
  CHECK(returned.load() == 3);
  CHECK(pool.acquire().memory == slot); // given back when the scope ended
}

namespace {
struct runner_job {
  std::uint64_t id;
};
struct runner_result {
  std::uint64_t id;
};
using runner_node_base = microbatch::detail::job_node<runner_job, runner_result>;

/// A job as the runner sees it, recording how it ended.
struct runner_node final : runner_node_base {
  explicit runner_node(std::uint64_t id, time_point due = time_point::max(), bool cancellable = false)
      : runner_node_base(runner_job{id}, cancellable) {
    deadline = due;
  }
  void finish(runner_result&& result) noexcept override { value = result.id; }
  void finish(std::exception_ptr failure) noexcept override { error = std::move(failure); }
  void abandon() noexcept override { abandoned = true; }
  std::optional<std::uint64_t> value;
  std::exception_ptr error;
  bool abandoned = false;
};

/// The batcher's side of a runner: a fixed time, a processor that answers in the order `order` gives
/// (indexes into the batch; empty: in the jobs' order), and a record of what was counted.
struct runner_rig final : microbatch::detail::runner_host<runner_job, runner_result> {
  time_point time = t0;
  mutable int clock_reads = 0;
  std::vector<std::size_t> order;
  std::function<void()> inside_processor = [] {};
  std::uint64_t completed = 0;
  std::uint64_t uncorrelated = 0;

  [[nodiscard]] time_point now() const noexcept override {
    ++clock_reads;
    return time;
  }
  std::vector<runner_result> call_processor(std::span<runner_job> jobs) override {
    inside_processor();
    std::vector<runner_result> results;
    for (std::size_t k = 0; k < jobs.size(); ++k)
      results.push_back({jobs[order.empty() ? k : order[k]].id});
    return results;
  }
  void end_job(node_type* job, runner_result&& value) noexcept override { job->finish(std::move(value)); }
  void count_completed(std::uint64_t jobs) noexcept override { completed += jobs; }
  void finish_claimed(node_type* job, runner_result&& value) noexcept override { job->finish(std::move(value)); }
  void end_job(node_type* job, std::exception_ptr error, microbatch::detail::failure) noexcept override {
    job->finish(std::move(error));
  }
  void count_uncorrelated(std::uint64_t results) noexcept override { uncorrelated += results; }
  void count_coalesced(std::uint64_t) noexcept override {}
  [[nodiscard]] bool coalesce_duplicates() const noexcept override { return false; }
  void batch_ran(const microbatch::BatchInfo&) noexcept override {}
};

/// Runs `nodes` as one batch through a runner that correlates by ID, counting result ID reads.
int run_batch(runner_rig& rig, std::initializer_list<runner_node*> nodes) {
  int result_id_reads = 0;
  auto job_id = [](const runner_job& job) { return job.id; };
  auto result_id = [&result_id_reads](const runner_result& result) {
    ++result_id_reads;
    return result.id;
  };
  using correlation =
      microbatch::detail::keyed_correlation<runner_job, runner_result, decltype(job_id), decltype(result_id)>;
  microbatch::detail::correlating_runner<runner_job, runner_result, correlation> runner(rig,
                                                                                        correlation(job_id, result_id));
  microbatch::detail::job_list<runner_node_base> batch;
  for (runner_node* node : nodes)
    batch.push_back(node);
  runner.run(batch);
  return result_id_reads;
}
} // namespace

TEST_CASE("runner: deadlines are judged when a worker takes the batch; the clock is read for them only if "
          "a job has one",
          "[parts]") {
  runner_rig rig;
  runner_node none(1), passed(2, t0 - 1ms), later(3, t0 + 1ms), also_none(4);
  run_batch(rig, {&none, &passed, &later, &also_none});
  CHECK(none.value == 1u);
  CHECK(later.value == 3u);
  CHECK(also_none.value == 4u);
  REQUIRE(passed.error);
  CHECK_THROWS_AS(std::rethrow_exception(passed.error), microbatch::deadline_exceeded);
  CHECK(rig.completed == 3);
  CHECK(rig.clock_reads == 3); // the deadlines, the processor's call, its return

  runner_rig at_the_end_of_time; // a job without a deadline never expires, whatever the time
  at_the_end_of_time.time = time_point::max();
  runner_node a(1), b(2);
  run_batch(at_the_end_of_time, {&a, &b});
  CHECK(a.value == 1u);
  CHECK(b.value == 2u);
  CHECK(at_the_end_of_time.clock_reads == 2); // no job has a deadline: only the processor's call and return
}

TEST_CASE("runner: every job gets its own result, in order or not, each result's ID read once", "[parts]") {
  using order = std::vector<std::size_t>;
  // Parenthesised: the preprocessor would split a braced list at its commas.
  const order answers =
      GENERATE(order(), (order{0, 1, 2, 3}), (order{0, 2, 1, 3}), (order{3, 2, 1, 0}), (order{0, 1, 3, 2}));
  runner_rig rig;
  rig.order = answers;
  runner_node a(10), b(20), c(30), d(40);
  CHECK(run_batch(rig, {&a, &b, &c, &d}) == 4);
  CHECK(a.value == 10u);
  CHECK(b.value == 20u);
  CHECK(c.value == 30u);
  CHECK(d.value == 40u);
  CHECK(rig.completed == 4);
  CHECK(rig.uncorrelated == 0);
}

TEST_CASE("runner: a job its caller cancelled in the processor is dropped, not counted, in order or not", "[parts]") {
  using order = std::vector<std::size_t>;
  const order answers = GENERATE(order(), (order{2, 1, 0}));
  runner_rig rig;
  rig.order = answers;
  runner_node a(1), b(2, time_point::max(), true), c(3);
  rig.inside_processor = [&] {
    REQUIRE(b.begin_cancel());
    b.end_cancel();
  };
  run_batch(rig, {&a, &b, &c});
  CHECK(a.value == 1u);
  CHECK(c.value == 3u);
  CHECK(b.abandoned);
  CHECK_FALSE(b.value);
  CHECK_FALSE(b.error);
  CHECK(rig.completed == 2);
}

TEST_CASE("runner pool: a given-back runner is taken again; a failing factory gives null", "[parts]") {
  struct runner final : microbatch::detail::batch_runner<int, int> {
    void run(microbatch::detail::job_list<node_type>&) override {}
  };
  microbatch::detail::runner_pool<int, int> pool;
  int made = 0;
  bool fail = false;
  pool.set_factory([&]() -> std::unique_ptr<microbatch::detail::batch_runner<int, int>> {
    if (fail) throw std::bad_alloc();
    ++made;
    return std::make_unique<runner>();
  });
  auto first = pool.take();
  REQUIRE(first);
  CHECK(made == 1);
  auto* const first_address = first.get();
  pool.give_back(std::move(first));
  fail = true;
  auto again = pool.take();
  CHECK(again.get() == first_address);
  CHECK(made == 1);
  CHECK(pool.take() == nullptr); // none spare, and none can be made
  CHECK_THROWS_AS(pool.make(), std::bad_alloc);
}
