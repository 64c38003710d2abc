// co_await batcher.async_execute_job(job): yields the result or throws, resumes on a batcher thread.
#include <catch2/catch.hpp>

#include <coroutine>
#include <latch>

#include "support.hpp"

using namespace test;
using microbatch::Options;

namespace {

template <class B> detached ask(B& batcher, Job job, std::promise<Result>& answer, std::thread::id& resumed_on) {
  try {
    Result result = co_await batcher.async_execute_job(job);
    resumed_on = std::this_thread::get_id();
    answer.set_value(result);
  } catch (...) {
    resumed_on = std::this_thread::get_id();
    answer.set_exception(std::current_exception());
  }
}

template <class B>
detached ask_many(B& batcher, std::uint64_t first, int count, std::atomic<int>& wrong, std::latch& done) {
  for (int i = 0; i < count; ++i) {
    const std::uint64_t id = first + std::uint64_t(i);
    Result result = co_await batcher.async_execute_job({id, i});
    if (result.id != id || result.value != 2 * i) wrong.fetch_add(1);
  }
  done.count_down();
}
} // namespace

TEST_CASE("co_await yields the result and resumes on a batcher thread", "[coroutines]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 1});
  std::promise<Result> answer;
  std::thread::id resumed_on;
  ask(batcher, {5, 21}, answer, resumed_on);
  CHECK(answer.get_future().get().value == 42);
  CHECK(resumed_on != std::this_thread::get_id());
}

TEST_CASE("co_await throws the job's error, or batcher_closed after shutdown", "[coroutines]") {
  auto failing = [](std::span<Job>) -> std::vector<Result> { throw std::out_of_range("no such row"); };
  microbatch::Batcher batcher(failing, &Job::id, &Result::id, Options{.max_batch_size = 1});
  {
    std::promise<Result> answer;
    std::thread::id resumed_on;
    ask(batcher, {1, 1}, answer, resumed_on);
    CHECK_THROWS_AS(answer.get_future().get(), std::out_of_range);
  }
  batcher.shutdown();
  std::promise<Result> answer;
  std::thread::id resumed_on;
  ask(batcher, {2, 2}, answer, resumed_on); // not accepted: resumes at once, on this thread
  CHECK_THROWS_AS(answer.get_future().get(), microbatch::batcher_closed);
  CHECK(resumed_on == std::this_thread::get_id());
}

TEST_CASE("thousands of coroutines from two threads share one batcher", "[coroutines]") {
  microbatch::Batcher batcher(doubled, &Job::id, &Result::id, Options{.max_batch_size = 64, .max_batch_delay = 200us});
  constexpr int coroutines = 2000, jobs_each = 5;
  std::atomic<int> wrong{0};
  std::latch done(coroutines);
  auto start_half = [&](int from) {
    for (int c = from; c < coroutines; c += 2)
      ask_many(batcher, std::uint64_t(c) * 100, jobs_each, wrong, done);
  };
  std::thread a(start_half, 0), b(start_half, 1);
  a.join();
  b.join();
  done.wait();
  CHECK(wrong.load() == 0);
  CHECK(batcher.stats().jobs_completed == coroutines * jobs_each);
}

namespace {
struct Lookup { // an aggregate that owns memory: the case g++ 11/12 got wrong with braced temporaries
  std::string key;
  std::string padding;
};
struct Found {
  std::string key;
  std::size_t length = 0;
};
std::vector<Found> look_up(std::span<Lookup> lookups) {
  std::vector<Found> found;
  for (auto& l : lookups)
    found.push_back({l.key, l.key.size() + l.padding.size()});
  return found;
}

template <class B> detached every_form(B& batcher, std::promise<std::vector<std::size_t>>& lengths) {
  std::vector<std::size_t> seen;
  try {
    const std::string long_key(40, 'k'); // beyond the small-string buffer: a double free would show
    Found braced = co_await batcher.async_execute_job({long_key + "1", std::string(50, 'p')});
    seen.push_back(braced.length);
    Lookup named{long_key + "2", std::string(60, 'p')};
    Found by_name = co_await batcher.async_execute_job(named);
    seen.push_back(by_name.length);
    Found moved = co_await batcher.async_execute_job(std::move(named));
    seen.push_back(moved.length);
    Found empty_braced = co_await batcher.async_execute_job({});
    seen.push_back(empty_braced.length);
    lengths.set_value(seen);
  } catch (...) {
    lengths.set_exception(std::current_exception());
  }
}
} // namespace

TEST_CASE("co_await with braced, named and moved jobs that own memory (g++ 11/12 under ASan)", "[coroutines]") {
  microbatch::Batcher batcher(look_up, &Lookup::key, &Found::key, Options{.max_batch_size = 1});
  std::promise<std::vector<std::size_t>> lengths;
  auto answer = lengths.get_future();
  every_form(batcher, lengths);
  CHECK(answer.get() == std::vector<std::size_t>{41 + 50, 41 + 60, 41 + 60, 0});
}
