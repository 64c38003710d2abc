// microbatch::async_execute (microbatch/asio.hpp): every completion token, the handler's executor and
// allocator, errors as the exception_ptr, cancellation. Built against standalone Asio, and against
// Boost.Asio as a second program (MICROBATCH_BOOST_ASIO).
#include <catch2/catch.hpp>

#include <microbatch/asio.hpp>

#if defined(MICROBATCH_BOOST_ASIO)
#include <boost/asio.hpp>
namespace net = boost::asio;
#else
#include <asio.hpp>
namespace net = asio;
#endif
// Asio 1.22 (standalone, Debian's libasio-dev) has every token of the issue; Boost 1.74's Asio 1.18
// (Debian's libboost-dev) has no cancellation slots, deferred, as_tuple or bind_allocator.
#if MICROBATCH_ASIO_VERSION >= 102200
#define TEST_ASIO_TOKENS 1
#if defined(MICROBATCH_BOOST_ASIO)
#include <boost/asio/experimental/as_tuple.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/experimental/deferred.hpp>
#else
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/experimental/deferred.hpp>
#endif
#else
#define TEST_ASIO_TOKENS 0
#endif

#include <string>

#include "support.hpp"

using namespace test;
using microbatch::Options;

namespace {

/// Fails the test from inside a handler: Catch2 assertions are not thread-safe, so handlers record
/// and the test thread checks.
struct outcome {
  std::exception_ptr error;
  Result result;
  std::thread::id thread;
  bool called = false;
};

template <class Error> bool holds(const std::exception_ptr& error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const Error&) {
    return true;
  } catch (...) {
  }
  return false;
}

/// Counts what the handler's allocator hands out. Shared by copies.
template <class T> struct counting_allocator {
  using value_type = T;
  std::atomic<int>* allocations;
  explicit counting_allocator(std::atomic<int>* counter) noexcept : allocations(counter) {}
  template <class U>
  counting_allocator(const counting_allocator<U>& other) noexcept : allocations(other.allocations) {} // NOLINT
  T* allocate(std::size_t n) {
    allocations->fetch_add(1);
    return std::allocator<T>{}.allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept { std::allocator<T>{}.deallocate(p, n); }
  template <class U> bool operator==(const counting_allocator<U>& other) const noexcept {
    return allocations == other.allocations;
  }
};

// Each test declares its io_context before its batcher, so that the batcher (whose threads post
// completions to the io_context) is gone before the io_context is: the rule for users too.

/// Holds every job in the forming batch until shutdown or an explicit flush.
Options held() {
  return Options{.max_batch_size = 1000, .max_batch_delay = std::chrono::hours(1)};
}

} // namespace

TEST_CASE("a callback bound to an io_context completes on that io_context's thread", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 1});
  outcome seen;
  microbatch::async_execute(batcher, Job{1, 21}, net::bind_executor(io, [&](std::exception_ptr error, Result result) {
                              seen = {error, result, std::this_thread::get_id(), true};
                            }));
  io.run(); // returns once the handler ran: the operation holds work on the io_context until then
  REQUIRE(seen.called);
  CHECK(!seen.error);
  CHECK(seen.result.value == 42);
  CHECK(seen.thread == std::this_thread::get_id());
}

TEST_CASE("completions bound to a strand run on the strand, one at a time", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 8});
  auto strand = net::make_strand(io);
  constexpr int operations = 64;
  int completed = 0; // guarded by the strand alone
  int outside_strand = 0;
  for (int i = 0; i < operations; ++i)
    microbatch::async_execute(batcher, Job{std::uint64_t(i), i},
                              net::bind_executor(strand, [&, i](std::exception_ptr error, Result result) {
                                if (!strand.running_in_this_thread() || error || result.value != 2 * i)
                                  ++outside_strand;
                                ++completed;
                              }));
  std::thread second([&] { io.run(); });
  io.run();
  second.join();
  CHECK(completed == operations);
  CHECK(outside_strand == 0);
}

TEST_CASE("use_awaitable resumes the coroutine on its executor and throws the job's error", "[asio]") {
  auto failing_odd = [](std::span<Job> jobs) {
    if (jobs.size() == 1 && jobs[0].id % 2 == 1) throw std::out_of_range("no such row");
    return doubled(jobs);
  };
  net::io_context io;
  microbatch::Batcher batcher(failing_odd, &Job::id, &Result::id, Options{.max_batch_size = 1});
  int value = 0;
  bool threw_out_of_range = false;
  bool resumed_on_io_thread = true;
  const auto io_thread = std::this_thread::get_id();
  net::co_spawn(
      io,
      [&]() -> net::awaitable<void> {
        Result result = co_await microbatch::async_execute(batcher, Job{2, 21}, net::use_awaitable);
        value = result.value;
        resumed_on_io_thread = resumed_on_io_thread && std::this_thread::get_id() == io_thread;
        try {
          co_await microbatch::async_execute(batcher, Job{3, 1}, net::use_awaitable);
        } catch (const std::out_of_range&) {
          threw_out_of_range = true;
        }
        resumed_on_io_thread = resumed_on_io_thread && std::this_thread::get_id() == io_thread;
      },
      net::detached);
  io.run();
  CHECK(value == 42);
  CHECK(threw_out_of_range);
  CHECK(resumed_on_io_thread);
}

TEST_CASE("use_future, and (Asio 1.22) deferred and as_tuple", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 1});

  SECTION("use_future: the future holds the result or rethrows the error") {
    std::future<Result> future = microbatch::async_execute(batcher, Job{1, 5}, net::use_future);
    CHECK(future.get().value == 10);
    batcher.shutdown();
    std::future<Result> refused = microbatch::async_execute(batcher, Job{2, 5}, net::use_future);
    CHECK_THROWS_AS(refused.get(), microbatch::batcher_closed);
  }

#if TEST_ASIO_TOKENS
  SECTION("deferred: nothing is submitted until the operation is launched") {
    auto operation = microbatch::async_execute(batcher, Job{3, 7}, net::experimental::deferred);
    CHECK(batcher.stats().jobs_submitted == 0);
    outcome seen;
    std::move(operation)(net::bind_executor(io, [&](std::exception_ptr error, Result result) {
      seen = {error, result, std::this_thread::get_id(), true};
    }));
    io.run();
    REQUIRE(seen.called);
    CHECK(seen.result.value == 14);
    CHECK(batcher.stats().jobs_submitted == 1);
  }

  SECTION("as_tuple(use_awaitable): the error arrives in the tuple, nothing is thrown") {
    std::exception_ptr error_seen;
    int value = 0;
    net::co_spawn(
        io,
        [&]() -> net::awaitable<void> {
          auto [error, result] =
              co_await microbatch::async_execute(batcher, Job{4, 8}, net::experimental::as_tuple(net::use_awaitable));
          value = result.value;
          batcher.shutdown();
          auto [refused, nothing] =
              co_await microbatch::async_execute(batcher, Job{5, 8}, net::experimental::as_tuple(net::use_awaitable));
          error_seen = refused;
          (void)error;
          (void)nothing;
        },
        net::detached);
    io.run();
    CHECK(value == 16);
    CHECK(holds<microbatch::batcher_closed>(error_seen));
  }
#endif
}

TEST_CASE("errors arrive as the exception_ptr, never inline in the initiating call", "[asio]") {
  auto drops_id_2 = [](std::span<Job> jobs) {
    std::vector<Result> results = doubled(jobs);
    std::erase_if(results, [](const Result& r) { return r.id == 2; });
    if (jobs.size() == 1 && jobs[0].id == 3) throw std::runtime_error("database is down");
    return results;
  };
  net::io_context io;
  microbatch::Batcher batcher(drops_id_2, &Job::id, &Result::id, Options{.max_batch_size = 1});
  outcome no_result, thrown, closed;
  auto record = [&](outcome& into) {
    return net::bind_executor(io, [&into](std::exception_ptr error, Result result) {
      into = {error, result, std::this_thread::get_id(), true};
    });
  };
  microbatch::async_execute(batcher, Job{2, 1}, record(no_result));
  microbatch::async_execute(batcher, Job{3, 1}, record(thrown));
  io.run();
  io.restart();
  batcher.shutdown();
  microbatch::async_execute(batcher, Job{4, 1}, record(closed));
  CHECK(!closed.called); // posted, not called inside async_execute
  io.run();
  CHECK(holds<microbatch::no_result>(no_result.error));
  CHECK(holds<std::runtime_error>(thrown.error));
  REQUIRE(closed.called);
  CHECK(holds<microbatch::batcher_closed>(closed.error));
}

TEST_CASE("a Result without a default constructor arrives as an optional", "[asio]") {
  struct Named {
    explicit Named(std::uint64_t key) : id(key) {}
    std::uint64_t id;
  };
  auto name = [](std::span<Job> jobs) {
    std::vector<Named> results;
    for (const Job& job : jobs)
      results.emplace_back(job.id);
    return results;
  };
  net::io_context io;
  microbatch::Batcher batcher(name, &Job::id, &Named::id, Options{.max_batch_size = 1});
  std::optional<Named> answer;
  bool called = false;
  microbatch::async_execute(batcher, Job{9, 0},
                            net::bind_executor(io, [&](std::exception_ptr error, std::optional<Named> result) {
                              called = !error;
                              answer = std::move(result);
                            }));
  io.run();
  CHECK(called);
  REQUIRE(answer.has_value());
  CHECK(answer->id == 9);
}

/// A handler with its own allocator and executor (nested types, which Asio's associators find).
struct allocating_handler {
  using allocator_type = counting_allocator<void>;
  using executor_type = net::io_context::executor_type;
  allocator_type allocator;
  executor_type executor;
  outcome* seen;
  allocator_type get_allocator() const noexcept { return allocator; }
  executor_type get_executor() const noexcept { return executor; }
  void operator()(std::exception_ptr error, Result result) const {
    *seen = {error, result, std::this_thread::get_id(), true};
  }
};

TEST_CASE("the operation allocates with the handler's associated allocator", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, held()); // the job waits until the flush
  std::atomic<int> allocations{0};
  outcome seen;
  microbatch::async_execute(batcher, Job{1, 1},
                            allocating_handler{counting_allocator<void>(&allocations), io.get_executor(), &seen});
  CHECK(allocations.load() == 1); // the job's node, before anything ran
  batcher.flush();
  io.run();
  REQUIRE(seen.called);
  CHECK(seen.result.value == 2);
  CHECK(allocations.load() == 2); // and the completion, queued in the io_context with the same allocator
}

#if TEST_ASIO_TOKENS
/// A handler bound to `io` and to `signal`'s slot that records its outcome into `seen`.
auto recorded_with_slot(net::io_context& io, net::cancellation_signal& signal, outcome& seen) {
  return net::bind_cancellation_slot(signal.slot(),
                                     net::bind_executor(io, [&seen](std::exception_ptr error, Result result) {
                                       seen = {error, result, std::this_thread::get_id(), true};
                                     }));
}

TEST_CASE("terminal cancellation takes a queued job out; other types are ignored", "[asio]") {
  batch_log log;
  auto logged = [&](std::span<Job> jobs) {
    log.record(jobs);
    return doubled(jobs);
  };
  net::io_context io;
  microbatch::Batcher batcher(logged, &Job::id, &Result::id, held());
  net::cancellation_signal signal;
  outcome seen;
  microbatch::async_execute(batcher, Job{1, 1}, recorded_with_slot(io, signal, seen));
  // Emitted from the io_context, as Asio requires (the handler's executor).
  net::post(io, [&] {
    signal.emit(net::cancellation_type::partial); // not supported: ignored
    signal.emit(net::cancellation_type::terminal);
  });
  io.run();
  REQUIRE(seen.called);
  CHECK(holds<microbatch::cancelled>(seen.error));
  const microbatch::Stats stats = batcher.stats();
  CHECK(stats.jobs_cancelled == 1);
  CHECK(stats.pending_jobs == 0);
  batcher.shutdown();
  CHECK(!log.saw(1)); // it left the queue: never processed
}

TEST_CASE("a refused operation is not cancelled afterwards: one completion, with the refusal", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id);
  batcher.shutdown();
  net::cancellation_signal signal;
  int calls = 0;
  std::exception_ptr seen;
  microbatch::async_execute(
      batcher, Job{1, 1},
      net::bind_cancellation_slot(signal.slot(), net::bind_executor(io, [&](std::exception_ptr error, Result) {
                                    ++calls;
                                    seen = error;
                                  })));
  signal.emit(net::cancellation_type::terminal); // the refusal is queued, not yet run: nothing to cancel
  io.run();
  CHECK(calls == 1);
  CHECK(holds<microbatch::batcher_closed>(seen));
  CHECK(batcher.stats().jobs_cancelled == 0);
}

TEST_CASE("a cancellable operation's node does not come from the handler's allocator", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, held());
  std::atomic<int> allocations{0};
  outcome seen;
  net::cancellation_signal signal;
  microbatch::async_execute(
      batcher, Job{1, 1},
      net::bind_cancellation_slot(
          signal.slot(), allocating_handler{counting_allocator<void>(&allocations), io.get_executor(), &seen}));
  CHECK(allocations.load() == 0); // the batcher may hold the node after the handler ran
  net::post(io, [&] { signal.emit(net::cancellation_type::terminal); });
  io.run();
  REQUIRE(seen.called);
  CHECK(holds<microbatch::cancelled>(seen.error));
  CHECK(allocations.load() == 1); // the completion, queued with the handler's allocator
}

TEST_CASE("awaitable_operators: the timer wins, the queued job is cancelled", "[asio]") {
  using namespace net::experimental::awaitable_operators;
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, held());
  std::size_t winner = 99;
  net::co_spawn(
      io,
      [&]() -> net::awaitable<void> {
        net::steady_timer timer(io, std::chrono::milliseconds(1)); // the job is held for an hour
        auto either = co_await (microbatch::async_execute(batcher, Job{1, 1}, net::use_awaitable) ||
                                timer.async_wait(net::use_awaitable));
        winner = either.index();
      },
      net::detached);
  io.run();
  CHECK(winner == 1);
  CHECK(batcher.stats().jobs_cancelled == 1);
}

TEST_CASE("a job cancelled inside the processor runs on; its result is discarded", "[asio]") {
  gate inside;
  batch_log log;
  auto held_processor = [&](std::span<Job> jobs) {
    log.record(jobs);
    inside.enter();
    return doubled(jobs);
  };
  net::io_context io;
  microbatch::Batcher batcher(held_processor, &Job::id, &Result::id, Options{.max_batch_size = 1});
  net::cancellation_signal signal;
  outcome seen;
  microbatch::async_execute(batcher, Job{1, 1}, recorded_with_slot(io, signal, seen));
  inside.await_entered();
  net::post(io, [&] { signal.emit(net::cancellation_type::terminal); });
  io.run();
  REQUIRE(seen.called);
  CHECK(holds<microbatch::cancelled>(seen.error));
  inside.open();
  batcher.shutdown();
  const microbatch::Stats stats = batcher.stats();
  CHECK(stats.jobs_cancelled == 1);
  CHECK(stats.jobs_completed == 0);
  CHECK(log.saw(1));
}

#endif // TEST_ASIO_TOKENS

TEST_CASE("10,000 operations from many coroutines on two threads, every answer checked", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id,
                              Options{.max_batch_size = 64, .max_batch_delay = std::chrono::microseconds(200)});
  constexpr int coroutines = 100;
  constexpr int per_coroutine = 100;
  std::atomic<int> right{0};
  std::atomic<int> wrong{0};
  for (int c = 0; c < coroutines; ++c)
    net::co_spawn(
        net::make_strand(io),
        [&, c]() -> net::awaitable<void> {
          for (int i = 0; i < per_coroutine; ++i) {
            const std::uint64_t id = std::uint64_t(c) * per_coroutine + std::uint64_t(i);
            Result result = co_await microbatch::async_execute(batcher, Job{id, i}, net::use_awaitable);
            (result.id == id && result.value == 2 * i ? right : wrong).fetch_add(1);
          }
        },
        net::detached);
  std::thread second([&] { io.run(); });
  io.run();
  second.join();
  CHECK(wrong.load() == 0);
  CHECK(right.load() == coroutines * per_coroutine);
  CHECK(batcher.stats().jobs_completed == std::uint64_t(coroutines * per_coroutine));
}

TEST_CASE("shutdown(cancel) ends queued operations with batcher_closed on their executor", "[asio]") {
  net::io_context io;
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, held());
  constexpr int operations = 10;
  std::atomic<int> closed{0};
  for (int i = 0; i < operations; ++i)
    microbatch::async_execute(batcher, Job{std::uint64_t(i), i},
                              net::bind_executor(io, [&](std::exception_ptr error, Result) {
                                if (holds<microbatch::batcher_closed>(error)) closed.fetch_add(1);
                              }));
  batcher.shutdown(microbatch::Shutdown::cancel);
  io.run();
  CHECK(closed.load() == operations);
}

TEST_CASE("an io_context destroyed with completions pending frees them without calling", "[asio]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 1});
  auto called = std::make_shared<std::atomic<int>>(0);
  {
    net::io_context io;
    microbatch::async_execute(batcher, Job{1, 1},
                              net::bind_executor(io, [called](std::exception_ptr, Result) { called->fetch_add(1); }));
    batcher.shutdown(); // the job ends; its completion waits in the io_context, which never runs
    CHECK(batcher.stats().jobs_completed == 1);
  } // ~io_context destroys the pending completion: no leak (ASan), no call
  CHECK(called->load() == 0);
}

TEST_CASE("async_execute accepts a KeyedBatcher: the job goes to its key's batch", "[asio][keyed]") {
  net::io_context io;
  auto process = [](const std::uint64_t& key, std::span<Job> jobs) {
    std::vector<Result> results;
    for (const Job& job : jobs)
      results.push_back({job.id, job.value + int(key)});
    return results;
  };
  microbatch::KeyedBatcher<std::uint64_t, Job, Result, decltype(process)> batcher(
      process, [](const Job& job) { return job.id % 2; }, &Job::id, &Result::id,
      microbatch::KeyedOptions<std::uint64_t>{.batching = {.max_batch_size = 2}});
  outcome odd, even;
  microbatch::async_execute(batcher, Job{1, 10}, net::bind_executor(io, [&](std::exception_ptr error, Result result) {
                              odd = {error, result, std::this_thread::get_id(), true};
                            }));
  microbatch::async_execute(batcher, Job{2, 20}, net::bind_executor(io, [&](std::exception_ptr error, Result result) {
                              even = {error, result, std::this_thread::get_id(), true};
                            }));
  batcher.flush();
  io.run();
  REQUIRE(odd.called);
  REQUIRE(even.called);
  CHECK(odd.result.value == 11);
  CHECK(even.result.value == 20);
  batcher.shutdown();
  outcome refused;
  microbatch::async_execute(batcher, Job{3, 1}, net::bind_executor(io, [&](std::exception_ptr error, Result result) {
                              refused = {error, result, std::this_thread::get_id(), true};
                            }));
  CHECK_FALSE(refused.called); // never inline in the initiating call
  io.restart();
  io.run();
  REQUIRE(refused.called);
  CHECK(holds<microbatch::batcher_closed>(refused.error));
}

#if TEST_ASIO_TOKENS
TEST_CASE("terminal cancellation takes a queued job out of its key's queue", "[asio][keyed]") {
  net::io_context io;
  auto process = [](const std::uint64_t&, std::span<Job> jobs) { return doubled(jobs); };
  microbatch::KeyedBatcher<std::uint64_t, Job, Result, decltype(process)> batcher(
      process, [](const Job& job) { return job.id; }, &Job::id, &Result::id,
      microbatch::KeyedOptions<std::uint64_t>{
          .batching = {.max_batch_size = 10, .max_batch_delay = std::chrono::hours(1)}});
  net::cancellation_signal signal;
  outcome seen;
  microbatch::async_execute(batcher, Job{1, 1}, recorded_with_slot(io, signal, seen));
  net::post(io, [&] { signal.emit(net::cancellation_type::terminal); });
  io.run();
  REQUIRE(seen.called);
  CHECK(holds<microbatch::cancelled>(seen.error));
  batcher.shutdown();
  CHECK(batcher.stats().jobs_cancelled == 1);
  CHECK(batcher.active_keys() == 0);
}
#endif
