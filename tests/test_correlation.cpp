// Matching results to jobs: by ID (any invocable) or by position; duplicates, gaps and strays.
#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <string>

#include "support.hpp"

using namespace test;
using microbatch::Options;

namespace {
const Options three_per_batch{.max_batch_size = 3, .max_batch_delay = 0s};

std::string error_message(std::future<Result>& future) {
  try {
    future.get();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}
} // namespace

TEST_CASE("results in any order reach the job with the same ID", "[correlation]") {
  auto reversed = [](std::span<Job> jobs) {
    auto results = doubled(jobs);
    std::reverse(results.begin(), results.end());
    return results;
  };
  microbatch::Batcher batcher(reversed, &Job::id, &Result::id, three_per_batch);
  auto a = batcher.submit({10, 1});
  auto b = batcher.submit({20, 2});
  auto c = batcher.submit({30, 3});
  CHECK(a.get().value == 2);
  CHECK(b.get().value == 4);
  CHECK(c.get().value == 6);
  CHECK(batcher.stats().uncorrelated_results == 0);
}

TEST_CASE("positional mode: result i answers job i", "[correlation]") {
  auto process = [](std::span<Job> jobs) {
    std::vector<Result> results;
    for (const Job& job : jobs)
      results.push_back({0, job.value + 100}); // IDs ignored
    return results;
  };
  microbatch::Batcher<Job, Result, decltype(process)> batcher(process, three_per_batch);
  auto a = batcher.submit({1, 1});
  auto b = batcher.submit({1, 2}); // same ID is fine: there are no IDs here
  auto c = batcher.submit({1, 3});
  CHECK(a.get().value == 101);
  CHECK(b.get().value == 102);
  CHECK(c.get().value == 103);
}

TEST_CASE("positional mode: missing tail results fail with no_result, extra results are counted", "[correlation]") {
  std::size_t answers = 2;
  auto process = [&](std::span<Job> jobs) {
    std::vector<Result> results;
    for (std::size_t i = 0; i < answers; ++i)
      results.push_back({0, jobs[0].value + int(i)});
    return results;
  };
  microbatch::Batcher<Job, Result, decltype(process)> batcher(process, three_per_batch);
  auto a = batcher.submit({1, 10});
  auto b = batcher.submit({2, 20});
  auto c = batcher.submit({3, 30});
  CHECK(a.get().value == 10);
  CHECK(b.get().value == 11);
  CHECK_THROWS_AS(c.get(), microbatch::no_result);
  batcher.shutdown();
  CHECK(batcher.stats().jobs_failed == 1);

  answers = 5;
  microbatch::Batcher<Job, Result, decltype(process)> second(process, three_per_batch);
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 3; ++id)
    futures.push_back(second.submit({id, 7}));
  for (auto& f : futures)
    f.get();
  second.shutdown();
  CHECK(second.stats().uncorrelated_results == 2);
}

TEST_CASE("a later job with an earlier job's ID fails with duplicate_id and is not processed", "[correlation]") {
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id, three_per_batch);
  auto first = batcher.submit({5, 1});
  auto other = batcher.submit({6, 2});
  auto duplicate = batcher.submit({5, 3});
  CHECK(first.get().value == 2);
  CHECK(other.get().value == 4);
  CHECK_THROWS_AS(duplicate.get(), microbatch::duplicate_id);
  CHECK(log.batches() == std::vector<std::vector<std::uint64_t>>{{5, 6}});
  auto stats = batcher.stats();
  CHECK(stats.jobs_completed == 2);
  CHECK(stats.jobs_failed == 1);
}

TEST_CASE("a job without a result fails with no_result naming its ID", "[correlation]") {
  auto drop_seven = [](std::span<Job> jobs) {
    auto results = doubled(jobs);
    std::erase_if(results, [](const Result& r) { return r.id == 7; });
    return results;
  };
  microbatch::Batcher batcher(drop_seven, &Job::id, &Result::id, three_per_batch);
  auto a = batcher.submit({6, 1});
  auto b = batcher.submit({7, 1});
  auto c = batcher.submit({8, 1});
  CHECK(a.get().value == 2);
  CHECK(c.get().value == 2);
  auto message = error_message(b);
  CHECK_THAT(message, Catch::Contains("no result") && Catch::Contains("ID 7"));
  auto d = batcher.submit({9, 1});
  batcher.flush();
  CHECK(d.get().value == 2);
}

TEST_CASE("stray and second results are dropped and counted - the first answer wins", "[correlation]") {
  auto noisy = [](std::span<Job> jobs) {
    std::vector<Result> results;
    for (const Job& job : jobs) {
      results.push_back({job.id, job.value});
      results.push_back({job.id, -1}); // a second answer for the same job
    }
    results.push_back({999, 0}); // answers nobody
    return results;
  };
  microbatch::Batcher batcher(noisy, &Job::id, &Result::id, three_per_batch);
  std::vector<std::future<Result>> futures;
  for (std::uint64_t id = 1; id <= 3; ++id)
    futures.push_back(batcher.submit({id, int(id)}));
  for (std::uint64_t id = 1; id <= 3; ++id)
    CHECK(futures[id - 1].get().value == int(id));
  batcher.shutdown();
  CHECK(batcher.stats().uncorrelated_results == 4);
}

namespace {
struct Named {
  std::string name;
  const std::string& key() const { return name; }
};
struct Greeting {
  std::string name, text;
};
std::string greeting_name(const Greeting& g) {
  return g.name;
}
} // namespace

TEST_CASE("ID extractors: member functions, free functions, lambdas - keys compared after decay", "[correlation]") {
  auto greet = [](std::span<Named> jobs) {
    std::vector<Greeting> results;
    for (const Named& job : jobs)
      results.push_back({job.name, "hello " + job.name});
    return results;
  };
  microbatch::Batcher<Named, Greeting, decltype(greet)> batcher(greet, &Named::key, &greeting_name, three_per_batch);
  auto a = batcher.submit({"ann"});
  auto b = batcher.submit({"bob"});
  auto c = batcher.submit({"cy"});
  CHECK(a.get().text == "hello ann");
  CHECK(b.get().text == "hello bob");
  CHECK(c.get().text == "hello cy");

  auto by_lambda = [](const Named& n) -> const std::string& { return n.name; };
  microbatch::Batcher<Named, Greeting, decltype(greet)> second(greet, by_lambda, &Greeting::name, three_per_batch);
  auto d = second.submit({"dee"});
  second.flush();
  CHECK(d.get().text == "hello dee");
}

namespace {
struct MoveOnlyJob {
  std::uint64_t id;
  std::unique_ptr<int> payload;
};
class MoveOnlyResult { // no default constructor
public:
  MoveOnlyResult(std::uint64_t id, std::unique_ptr<int> payload) : id_(id), payload_(std::move(payload)) {}
  std::uint64_t id() const { return id_; }
  int value() const { return *payload_; }

private:
  std::uint64_t id_;
  std::unique_ptr<int> payload_;
};
} // namespace

TEST_CASE("move-only jobs and results without a default constructor", "[correlation]") {
  auto process = [](std::span<MoveOnlyJob> jobs) {
    std::vector<MoveOnlyResult> results;
    for (MoveOnlyJob& job : jobs)
      results.emplace_back(job.id, std::move(job.payload));
    return results;
  };
  microbatch::Batcher<MoveOnlyJob, MoveOnlyResult, decltype(process)> batcher(process, &MoveOnlyJob::id,
                                                                              &MoveOnlyResult::id, three_per_batch);
  auto a = batcher.submit({1, std::make_unique<int>(11)});
  auto b = batcher.submit({2, std::make_unique<int>(22)});
  auto c = std::async(std::launch::async, [&] { return batcher.execute_job({3, std::make_unique<int>(33)}); });
  CHECK(a.get().value() == 11);
  CHECK(b.get().value() == 22);
  CHECK(c.get().value() == 33);
}

TEST_CASE("a throwing job ID extractor fails only that job", "[correlation]") {
  auto id_of = [](const Job& job) {
    if (job.value < 0) throw std::domain_error("bad job id");
    return job.id;
  };
  microbatch::Batcher<Job, Result, decltype(&doubled)> batcher(&doubled, id_of, &Result::id, three_per_batch);
  auto a = batcher.submit({1, 1});
  auto bad = batcher.submit({2, -1});
  auto c = batcher.submit({3, 3});
  CHECK(a.get().value == 2);
  CHECK_THROWS_AS(bad.get(), std::domain_error);
  CHECK(c.get().value == 6);
}

namespace {
std::vector<Result> tripled(std::span<Job> jobs) {
  std::vector<Result> results;
  for (const Job& job : jobs)
    results.push_back({job.id, 3 * job.value});
  return results;
}
} // namespace

TEST_CASE("Job and Result are deduced from the processor's signature", "[correlation]") {
  auto positional = [](std::span<Job> jobs) { return doubled(jobs); };
  microbatch::Batcher by_lambda(positional, Options{.max_batch_size = 1});
  STATIC_REQUIRE(std::is_same_v<decltype(by_lambda), microbatch::Batcher<Job, Result, decltype(positional)>>);
  CHECK(by_lambda.execute_job({1, 4}).value == 8);

  auto id_of = [](const Job& job) { return job.id; };
  microbatch::Batcher by_function(tripled, id_of, &Result::id, Options{.max_batch_size = 1});
  STATIC_REQUIRE(std::is_same_v<decltype(by_function), microbatch::Batcher<Job, Result, decltype(&tripled)>>);
  CHECK(by_function.execute_job({2, 4}).value == 12);

  microbatch::Batcher defaults(tripled); // positional, default options
  auto f = defaults.submit({3, 1});
  defaults.flush();
  CHECK(f.get().value == 3);
}

TEST_CASE("duplicate_id names the later job, not the earlier one, also when IDs cannot be printed", "[correlation]") {
  microbatch::Batcher printable(doubled, &Job::id, &Result::id, three_per_batch);
  auto first = printable.submit({5, 1});
  auto other = printable.submit({6, 2});
  auto again = printable.submit({5, 3});
  CHECK(first.get().value == 2);
  CHECK(other.get().value == 4);
  CHECK_THAT(error_message(again), Catch::Contains("job at position 2") && Catch::Contains("ID 5") &&
                                       Catch::Contains("earlier job at position 0"));

  // std::vector<bool> is hashable and comparable, but has no operator<<: no ID in the message.
  auto bits = [](std::uint64_t id) { return std::vector<bool>{(id & 1) != 0, (id & 2) != 0}; };
  microbatch::Batcher<Job, Result, decltype(&doubled)> opaque(
      &doubled, [&](const Job& j) { return bits(j.id); }, [&](const Result& r) { return bits(r.id); }, three_per_batch);
  auto one = opaque.submit({1, 1});
  auto two = opaque.submit({2, 2});
  auto one_again = opaque.submit({1, 3});
  CHECK(one.get().value == 2);
  CHECK(two.get().value == 4);
  const std::string message = error_message(one_again);
  CHECK_THAT(message,
             Catch::Contains("job at position 2 of its batch has the same ID as the earlier job at position 0"));
}

TEST_CASE("error messages give the job's position in its batch, also after jobs left out before it", "[correlation]") {
  // The processor answers every job but ID 3. Positions count every job dispatched in the batch, also
  // those left out before the processor (here the duplicates), which an admitted job's index does not.
  auto all_but_three = [](std::span<Job> jobs) {
    std::vector<Result> results;
    for (const Job& job : jobs)
      if (job.id != 3) results.push_back({job.id, 2 * job.value});
    return results;
  };
  microbatch::Batcher batcher(all_but_three, &Job::id, &Result::id,
                              Options{.max_batch_size = 5, .max_batch_delay = 0s});
  auto first = batcher.submit({1, 1});
  auto first_again = batcher.submit({1, 2}); // position 1: left out, a duplicate
  auto second = batcher.submit({2, 3});
  auto second_again = batcher.submit({2, 4}); // position 3: a duplicate of position 2, admitted index 1
  auto unanswered = batcher.submit({3, 5});   // position 4, admitted index 2
  CHECK(first.get().value == 2);
  CHECK(second.get().value == 6);
  CHECK_THAT(error_message(first_again), Catch::Contains("job at position 1 of its batch (ID 1) has the same ID as "
                                                         "the earlier job at position 0"));
  CHECK_THAT(error_message(second_again), Catch::Contains("job at position 3 of its batch (ID 2) has the same ID as "
                                                          "the earlier job at position 2"));
  CHECK_THAT(error_message(unanswered), Catch::Contains("no result for the job at position 4 of its batch (ID 3)"));

  // The first job left out (its ID cannot be read): every later position is one past its index.
  auto id_of = [](const Job& job) {
    if (job.value < 0) throw std::domain_error("bad job id");
    return job.id;
  };
  microbatch::Batcher<Job, Result, decltype(all_but_three)> unreadable_first(
      all_but_three, id_of, &Result::id, Options{.max_batch_size = 4, .max_batch_delay = 0s});
  auto bad = unreadable_first.submit({9, -1}); // position 0: left out
  auto five = unreadable_first.submit({5, 1});
  auto five_again = unreadable_first.submit({5, 2}); // position 2: a duplicate of position 1
  auto three = unreadable_first.submit({3, 3});      // position 3: no result
  CHECK_THROWS_AS(bad.get(), std::domain_error);
  CHECK(five.get().value == 2);
  CHECK_THAT(error_message(five_again), Catch::Contains("job at position 2 of its batch (ID 5) has the same ID as "
                                                        "the earlier job at position 1"));
  CHECK_THAT(error_message(three), Catch::Contains("no result for the job at position 3 of its batch (ID 3)"));
}

TEST_CASE("a string_view result ID against a by-value string job ID never dangles", "[correlation]") {
  struct Named {
    std::string name;
  };
  struct Greeting {
    std::string name;
    std::string text;
  };
  auto greet = [](std::span<Named> people) {
    std::vector<Greeting> out;
    for (auto& p : people)
      out.push_back({p.name, "hello " + p.name});
    return out;
  };
  // The job ID is a fresh std::string (a temporary); the result ID a view. Keys used to be stored as
  // the common type, std::string_view, pointing into the destroyed temporary (ASan: use after free).
  auto job_id = [](const Named& n) { return n.name + std::string(40, '!'); };
  auto result_id = [](const Greeting& g) {
    thread_local std::string scratch;
    scratch = g.name + std::string(40, '!');
    return std::string_view(scratch);
  };
  microbatch::Batcher<Named, Greeting, decltype(greet)> batcher(greet, job_id, result_id,
                                                                Options{.max_batch_size = 2, .max_batch_delay = 0s});
  auto a = batcher.submit({"ada"});
  auto b = batcher.submit({"grace"});
  CHECK(a.get().text == "hello ada");
  CHECK(b.get().text == "hello grace");
}
