// submit(job, on_complete): exactly one call, on a batcher thread, with the job's Outcome.
#include <catch2/catch.hpp>

#include <array>
#include <functional>
#include <latch>

#include "support.hpp"

using namespace test;
using microbatch::Options;
using microbatch::Outcome;

TEST_CASE("the callback gets the result once, on a batcher thread", "[callbacks]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 4});
  std::latch all_called(8);
  std::atomic<int> calls{0}, right{0}, on_caller_thread{0};
  const auto caller = std::this_thread::get_id();
  for (std::uint64_t id = 0; id < 8; ++id) {
    batcher.submit({id, int(id)}, [&, id](Outcome<Result>&& outcome) {
      calls.fetch_add(1);
      if (outcome.has_value() && outcome.value().id == id && outcome.value().value == 2 * int(id) && !outcome.error())
        right.fetch_add(1);
      if (std::this_thread::get_id() == caller) on_caller_thread.fetch_add(1);
      all_called.count_down();
    });
  }
  all_called.wait();
  batcher.shutdown();
  CHECK(calls.load() == 8);
  CHECK(right.load() == 8);
  CHECK(on_caller_thread.load() == 0);
  CHECK(batcher.stats().jobs_completed == 8);
}

TEST_CASE("the callback gets the error; value() rethrows it", "[callbacks]") {
  auto failing = [](std::span<Job>) -> std::vector<Result> { throw std::runtime_error("backend down"); };
  microbatch::Batcher batcher(failing, &Job::id, &Result::id, Options{.max_batch_size = 1});
  std::promise<std::string> seen;
  batcher.submit({1, 1}, [&](Outcome<Result>&& outcome) {
    try {
      if (outcome.has_value() || !outcome.error()) {
        seen.set_value("no error");
        return;
      }
      outcome.value();
      seen.set_value("value() did not throw");
    } catch (const std::runtime_error& e) {
      seen.set_value(e.what());
    }
  });
  CHECK(seen.get_future().get() == "backend down");
}

TEST_CASE("an exception escaping a callback is contained and counted", "[callbacks]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 2});
  std::latch called(2);
  batcher.submit({1, 1}, [&](Outcome<Result>&&) {
    called.count_down();
    throw std::logic_error("careless callback");
  });
  batcher.submit({2, 2}, [&](Outcome<Result>&&) { called.count_down(); });
  called.wait();
  CHECK(batcher.execute_job({3, 3}).value == 6); // still working
  batcher.shutdown();
  CHECK(batcher.stats().callback_errors == 1);
  CHECK(batcher.stats().jobs_completed == 3);
}

TEST_CASE("large callables, shutdown drains callbacks, submit after shutdown never calls back", "[callbacks]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 100, .max_batch_delay = 1h});
  std::atomic<int> sum{0};
  std::array<char, 200> ballast{}; // makes the callable larger than the inline buffer
  ballast[0] = 1;
  for (std::uint64_t id = 1; id <= 10; ++id)
    batcher.submit({id, 1}, [&sum, ballast](Outcome<Result>&& outcome) { sum += outcome.value().value * ballast[0]; });
  batcher.shutdown();
  CHECK(sum.load() == 20); // every callback ran before shutdown returned
  bool called = false;
  CHECK_THROWS_AS(batcher.submit({11, 1}, [&](Outcome<Result>&&) { called = true; }), microbatch::batcher_closed);
  CHECK_FALSE(called);
}

namespace {
/// A callable that counts its live copies and its calls; `Ballast` bytes decide whether the batcher
/// keeps it inside the node (small) or on the heap (large).
template <std::size_t Ballast> struct counted_callback {
  std::atomic<int>* alive;
  std::atomic<int>* calls;
  bool throws;
  std::array<char, Ballast> ballast{};
  counted_callback(std::atomic<int>& alive_copies, std::atomic<int>& call_count, bool throws_when_called)
      : alive(&alive_copies), calls(&call_count), throws(throws_when_called) {
    ++*alive;
  }
  counted_callback(const counted_callback& other) noexcept
      : alive(other.alive), calls(other.calls), throws(other.throws), ballast(other.ballast) {
    ++*alive;
  }
  counted_callback& operator=(const counted_callback&) = delete;
  ~counted_callback() { --*alive; }
  void operator()(Outcome<Result>&&) const {
    ++*calls;
    if (throws) throw std::logic_error("careless callback");
  }
};
} // namespace

TEMPLATE_TEST_CASE("a callable is called at most once and destroyed exactly once, on every path", "[callbacks]",
                   counted_callback<8>, counted_callback<200>) {
  std::atomic<int> alive{0};
  std::atomic<int> calls{0};
  gate held;
  auto processor = [&held](std::span<Job> jobs) -> std::vector<Result> {
    if (jobs[0].value == 0) held.enter();
    if (jobs[0].value < 0) throw std::runtime_error("backend down");
    return doubled(jobs);
  };
  {
    // Rejected by backpressure after its node was built: destroyed, never called.
    microbatch::Batcher batcher(
        processor, &Job::id, &Result::id,
        Options{.max_batch_size = 1, .max_pending_jobs = 1, .overflow = microbatch::Overflow::reject});
    batcher.submit({1, 0}, TestType(alive, calls, false)); // waits in the processor
    held.await_entered();
    CHECK_THROWS_AS(batcher.submit({2, 1}, TestType(alive, calls, false)), microbatch::queue_full);
    CHECK(calls.load() == 0);
    held.open();
    batcher.shutdown();
    CHECK(calls.load() == 1);
    CHECK(alive.load() == 0);
  }
  {
    // A result, an error, and a callable that throws: each called once, then destroyed.
    microbatch::Batcher batcher(processor, &Job::id, &Result::id, Options{.max_batch_size = 1});
    batcher.submit({3, 1}, TestType(alive, calls, false));
    batcher.submit({4, -1}, TestType(alive, calls, false));
    batcher.submit({5, 1}, TestType(alive, calls, true));
    batcher.shutdown();
    CHECK(calls.load() == 4);
    CHECK(alive.load() == 0);
    CHECK(batcher.stats().callback_errors == 1);
    CHECK(batcher.stats().jobs_failed == 1);
  }
}

TEST_CASE("Shutdown::cancel calls back queued jobs with batcher_closed", "[callbacks]") {
  gate held;
  auto process = gated(held);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, Options{.max_batch_size = 1});
  auto first = batcher.submit({1, 1});
  held.await_entered();
  std::promise<bool> closed;
  batcher.submit({2, 2}, [&](Outcome<Result>&& outcome) {
    try {
      outcome.value();
      closed.set_value(false);
    } catch (const microbatch::batcher_closed&) {
      closed.set_value(true);
    }
  });
  std::thread closer([&] { batcher.shutdown(microbatch::Shutdown::cancel); });
  CHECK(closed.get_future().get());
  held.open();
  closer.join();
  CHECK(first.get().value == 2);
}

TEST_CASE("callbacks that submit again never deadlock on Overflow::block", "[callbacks][backpressure]") {
  // Each completion submits two more jobs until 200 have run. A submit from a batcher thread cannot
  // wait for room (only that thread could make it), so it goes beyond max_pending_jobs instead.
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 4, .max_batch_delay = 50us, .max_pending_jobs = 4});
  constexpr int total = 200;
  std::atomic<int> started{0};
  std::latch finished(total);
  std::function<void()> submit_one = [&] {
    const int n = started.fetch_add(1);
    if (n >= total) return;
    batcher.submit({std::uint64_t(n), 1}, [&](Outcome<Result>&&) {
      submit_one();
      submit_one();
      finished.count_down();
    });
  };
  submit_one();
  finished.wait(); // would hang (and hit the test timeout) if the callbacks blocked
  batcher.shutdown();
  CHECK(batcher.stats().jobs_completed >= std::uint64_t(total));
  CHECK(batcher.stats().pending_jobs == 0);
}

// Jobs submitted from inside a batch (a callback on a worker) count like any other: a batch they fill
// goes at once, while the submitting callback still runs, and they can share a batch with other threads'.
TEST_CASE("jobs a callback submits: a batch they fill goes at once; that thread sees them counted", "[callbacks]") {
  // No delay: only a full batch goes. Two slots: the batch the callback fills runs beside its own.
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 4, .max_batch_delay = 0s, .max_concurrent_batches = 2});
  std::promise<void> inner_done;
  std::atomic<int> inner_left{4};
  std::promise<std::vector<std::uint64_t>> submitted_seen; // jobs_submitted after each inner submit
  std::promise<bool> inner_ran_during_callback;
  std::latch outer(4);
  for (std::uint64_t id = 0; id < 4; ++id) {
    batcher.submit({id, 1}, [&, id](Outcome<Result>&&) {
      if (id == 0) {
        std::vector<std::uint64_t> seen;
        for (std::uint64_t inner = 10; inner < 14; ++inner) {
          batcher.submit({inner, 1}, [&](Outcome<Result>&&) {
            if (inner_left.fetch_sub(1) == 1) inner_done.set_value();
          });
          seen.push_back(batcher.stats().jobs_submitted);
        }
        submitted_seen.set_value(seen);
        // The inner batch is full: it must run now, on the other slot, while this callback waits.
        inner_ran_during_callback.set_value(inner_done.get_future().wait_for(60s) == std::future_status::ready);
      }
      outer.count_down();
    });
  }
  CHECK(submitted_seen.get_future().get() == std::vector<std::uint64_t>{5, 6, 7, 8});
  CHECK(inner_ran_during_callback.get_future().get());
  outer.wait();
  batcher.shutdown();
  CHECK(batcher.stats().jobs_submitted == 8);
  CHECK(batcher.stats().jobs_completed == 8);
}

TEST_CASE("jobs a callback submits and another thread's jobs fill a batch together", "[callbacks]") {
  // No delay: the batch goes only when the two jobs submitted from the callback and the two from
  // this thread are all counted, whichever side is counted last.
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 4, .max_batch_delay = 0s});
  std::atomic<int> left{4}, failed{0}; // counted here, checked on this thread (Catch2 is not thread-safe)
  std::promise<void> all_ran;
  auto count = [&](Outcome<Result>&& outcome) {
    if (!outcome.has_value()) failed.fetch_add(1);
    if (left.fetch_sub(1) == 1) all_ran.set_value();
  };
  std::latch inner_submitted(1);
  batcher.submit({0, 1}, [&](Outcome<Result>&&) {
    batcher.submit({10, 1}, count);
    batcher.submit({11, 1}, count);
    inner_submitted.count_down();
  });
  batcher.flush(); // the batch of job 0 alone
  inner_submitted.wait();
  batcher.submit({20, 1}, count);
  batcher.submit({21, 1}, count);
  // A lost count leaves the batch undispatched (no delay): bounded wait, then the check fails.
  CHECK(all_ran.get_future().wait_for(60s) == std::future_status::ready);
  batcher.shutdown();
  CHECK(failed.load() == 0);
  const auto stats = batcher.stats();
  CHECK(stats.jobs_submitted == 5);
  CHECK(stats.batches_full == 1);
  CHECK(stats.batches_flushed == 1);
}
