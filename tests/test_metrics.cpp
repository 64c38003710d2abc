// Metrics: Stats in the Prometheus text format (metrics.hpp) and, when built with prometheus-cpp
// (MICROBATCH_TEST_PROMETHEUS_CPP), the Collectable adapter (prometheus.hpp) behind a real Exposer.
#include <catch2/catch.hpp>

#include <microbatch/metrics.hpp>

#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "support.hpp"

using namespace test;
using microbatch::Options;
using microbatch::Stats;

namespace {

// Whether Stats carries what exact summaries need (see NEEDS_CORE_PATCH.md): then _sum, _count and
// the batch size's quantiles must be exported, else they must be absent.
template <class S> constexpr bool has_summary_sums = requires(const S& s) {
  s.batches_processed;
  s.jobs_processed;
  s.batch_size_p50;
  s.batch_size_p99;
  s.queue_wait.sum;
  s.processing_time.sum;
};
constexpr bool sums = has_summary_sums<Stats>;

/// An exposition, checked line by line against the text format's rules that a scrape would enforce:
/// every sample belongs to the family of the last TYPE line, HELP and TYPE appear once per family
/// (HELP right before TYPE), no series appears twice. `value` maps "name{labels}" to the value text.
struct exposition {
  std::map<std::string, std::string> value;
  std::vector<std::string> families; // in order
  std::map<std::string, std::string> type;

  explicit exposition(const std::string& text) {
    std::istringstream in(text);
    std::string line, family, helped;
    std::set<std::string> seen_help, seen_type;
    REQUIRE((text.empty() || text.back() == '\n'));
    while (std::getline(in, line)) {
      INFO(line);
      REQUIRE_FALSE(line.empty());
      if (line.starts_with("# HELP ")) {
        const std::string name = line.substr(7, line.find(' ', 7) - 7);
        REQUIRE(seen_help.insert(name).second); // HELP once per family
        helped = name;
      } else if (line.starts_with("# TYPE ")) {
        std::istringstream words(line.substr(7));
        std::string name, kind;
        words >> name >> kind;
        REQUIRE(name == helped);
        REQUIRE(seen_type.insert(name).second); // TYPE once per family
        REQUIRE((kind == "counter" || kind == "gauge" || kind == "summary"));
        family = name;
        families.push_back(name);
        type[name] = kind;
      } else {
        REQUIRE(line[0] != '#');
        const auto space = line.rfind(' ');
        REQUIRE(space != std::string::npos);
        const std::string series = line.substr(0, space);
        const std::string name = series.substr(0, series.find('{'));
        const bool own =
            name == family || (type[family] == "summary" && (name == family + "_sum" || name == family + "_count"));
        REQUIRE(own);                                                  // a sample after its own family's TYPE line
        REQUIRE(value.emplace(series, line.substr(space + 1)).second); // no series twice
      }
    }
  }

  [[nodiscard]] std::string at(const std::string& series) const {
    INFO(series);
    const auto it = value.find(series);
    REQUIRE(it != value.end());
    return it->second;
  }
  [[nodiscard]] bool has(const std::string& series) const { return value.contains(series); }
};

std::string number(double value) {
  std::string out;
  microbatch::detail::append_number(out, value);
  return out;
}
std::string seconds(std::chrono::nanoseconds d) {
  return number(double(d.count()) / 1e9);
}

/// A Stats with a distinct value in every field, so that a swapped field shows.
Stats distinct_stats() {
  Stats s;
  s.jobs_submitted = 1000;
  s.jobs_completed = 900;
  s.jobs_failed = 60;
  s.jobs_expired = 20;
  s.jobs_cancelled = 15;
  s.jobs_rejected = 7;
  s.callback_errors = 3;
  s.observer_errors = 2;
  s.jobs_coalesced = 11;
  s.uncorrelated_results = 5;
  s.pending_jobs = 40;
  s.batches_full = 30;
  s.batches_timed_out = 12;
  s.batches_flushed = 4;
  s.batches_idle = 9;
  s.batches_weight = 6;
  s.batches = 61;
  s.queue_wait = {std::chrono::microseconds(250), std::chrono::milliseconds(3), std::chrono::milliseconds(4)};
  s.processing_time = {std::chrono::microseconds(800), std::chrono::microseconds(1900), std::chrono::milliseconds(2)};
  return s;
}

/// A processor that takes `step` of the manual clock per call and answers every job but `missing`,
/// adding one result that matches no job.
struct timed_processor {
  microbatch::manual_clock* clock;
  std::chrono::nanoseconds step;
  std::uint64_t missing;
  std::vector<Result> operator()(std::span<Job> jobs) const {
    clock->advance(step);
    std::vector<Result> out;
    for (const Job& job : jobs)
      if (job.id != missing) out.push_back({job.id, job.value});
    out.push_back({1'000'000, 0});
    return out;
  }
};

} // namespace

TEST_CASE("every family is named, typed and documented once; counters equal the Stats", "[metrics]") {
  const Stats s = distinct_stats();
  const exposition e(microbatch::to_prometheus(s, "lookups"));
  std::vector<std::string> expected{"microbatch_jobs_submitted_total",  "microbatch_jobs_completed_total",
                                    "microbatch_jobs_failed_total",     "microbatch_jobs_rejected_total",
                                    "microbatch_jobs_coalesced_total",  "microbatch_batches_total",
                                    "microbatch_pending_jobs",          "microbatch_uncorrelated_results_total",
                                    "microbatch_callback_errors_total", "microbatch_observer_errors_total"};
  if (sums) expected.push_back("microbatch_batch_size"); // nothing exact to say about it otherwise
  expected.push_back("microbatch_queue_wait_seconds");
  expected.push_back("microbatch_processing_seconds");
  CHECK(e.families == expected);
  CHECK(e.type.at("microbatch_pending_jobs") == "gauge");
  CHECK(e.type.at("microbatch_queue_wait_seconds") == "summary");
  CHECK(e.type.at("microbatch_jobs_failed_total") == "counter");

  const std::string b = "batcher=\"lookups\"";
  CHECK(e.at("microbatch_jobs_submitted_total{" + b + "}") == "1000");
  CHECK(e.at("microbatch_jobs_completed_total{" + b + "}") == "900");
  CHECK(e.at("microbatch_jobs_failed_total{" + b + ",reason=\"expired\"}") == "20");
  CHECK(e.at("microbatch_jobs_failed_total{" + b + ",reason=\"cancelled\"}") == "15");
  CHECK(e.at("microbatch_jobs_failed_total{" + b + ",reason=\"other\"}") == "25"); // 60 - 20 - 15
  CHECK(e.at("microbatch_jobs_rejected_total{" + b + "}") == "7");
  CHECK(e.at("microbatch_jobs_coalesced_total{" + b + "}") == "11");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"size\"}") == "30");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"delay\"}") == "12");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"flush\"}") == "4");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"idle\"}") == "9");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"weight\"}") == "6");
  CHECK(e.at("microbatch_pending_jobs{" + b + "}") == "40");
  CHECK(e.at("microbatch_uncorrelated_results_total{" + b + "}") == "5");
  CHECK(e.at("microbatch_callback_errors_total{" + b + "}") == "3");
  CHECK(e.at("microbatch_observer_errors_total{" + b + "}") == "2");
  CHECK(e.at("microbatch_queue_wait_seconds{" + b + ",quantile=\"0.5\"}") == "0.00025");
  CHECK(e.at("microbatch_queue_wait_seconds{" + b + ",quantile=\"0.99\"}") == "0.003");
  CHECK(e.at("microbatch_processing_seconds{" + b + ",quantile=\"0.5\"}") == "8e-04"); // shortest round trip
  CHECK(e.at("microbatch_processing_seconds{" + b + ",quantile=\"0.99\"}") == "0.0019");
  CHECK(e.has("microbatch_queue_wait_seconds_sum{" + b + "}") == sums);
  CHECK(e.has("microbatch_queue_wait_seconds_count{" + b + "}") == sums);
  // 3 + 5 reason/trigger series over the 8 single ones, 2 quantiles per duration summary, and per
  // summary _sum and _count plus the batch size's 2 quantiles when Stats has them.
  CHECK(e.value.size() == 8 + 3 + 5 + 2 * 2 + (sums ? 2 * 2 + 4 : 0));
}

TEST_CASE("failure reasons are clamped to partition jobs_failed when a snapshot runs ahead", "[metrics]") {
  Stats s;
  s.jobs_submitted = 10;
  s.jobs_failed = 4;
  s.jobs_expired = 3;   // read after jobs_failed: one expiry more than jobs_failed has counted yet
  s.jobs_cancelled = 2; // ... and one cancellation
  const exposition e(microbatch::to_prometheus(s, "x"));
  const auto expired = std::stoull(e.at("microbatch_jobs_failed_total{batcher=\"x\",reason=\"expired\"}"));
  const auto cancelled = std::stoull(e.at("microbatch_jobs_failed_total{batcher=\"x\",reason=\"cancelled\"}"));
  const auto other = e.at("microbatch_jobs_failed_total{batcher=\"x\",reason=\"other\"}");
  CHECK(expired == 3);
  CHECK(cancelled == 1);
  CHECK(other == "0"); // never negative (it would be -1 unclamped, printed as 2^64 - 1)
  CHECK(expired + cancelled + std::stoull(other) == s.jobs_failed);
}

TEST_CASE("a batcher with no batches yet exports zeros and zero quantiles", "[metrics]") {
  microbatch::manual_clock clock;
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 0, .max_batch_delay = 0s, .clock = &clock});
  const exposition e(microbatch::to_prometheus(batcher.stats(), "idle"));
  for (const auto& [series, value] : e.value) {
    INFO(series);
    CHECK(value == "0");
  }
  CHECK(e.at("microbatch_queue_wait_seconds{batcher=\"idle\",quantile=\"0.99\"}") == "0");
  CHECK(e.at("microbatch_processing_seconds{batcher=\"idle\",quantile=\"0.5\"}") == "0");
  CHECK(e.at("microbatch_batches_total{batcher=\"idle\",trigger=\"flush\"}") == "0");
  CHECK(e.has("microbatch_batch_size{batcher=\"idle\",quantile=\"0.5\"}") == sums);
}

TEST_CASE("a real batcher's exposition equals its stats(), quantiles from its histograms", "[metrics][clock]") {
  microbatch::manual_clock clock;
  microbatch::Batcher batcher(timed_processor{&clock, 3ms, 99}, &Job::id, &Result::id,
                              Options{.max_batch_size = 0, .max_batch_delay = 0s, .clock = &clock});
  // Batch 1 (flush): jobs 1, 2 and 99, submitted 2 ms before the flush; the processor takes 3 ms, answers
  // no 99 (no_result: a failure of reason other) and returns one result that matches no job.
  auto one = batcher.submit({1, 1});
  auto two = batcher.submit({2, 2});
  auto unanswered = batcher.submit({99, 9});
  clock.advance(2ms);
  batcher.flush();
  CHECK(one.get().value == 1);
  CHECK(two.get().value == 2);
  CHECK_THROWS_AS(unanswered.get(), microbatch::no_result);
  // Job 5 expires in the forming batch: never dispatched.
  auto doomed = batcher.submit({5, 5}, clock.now() + 1ms);
  clock.await_timers(1);
  clock.advance(1ms);
  CHECK_THROWS_AS(doomed.get(), microbatch::deadline_exceeded);
  // Batch 2 (shutdown): job 6, dispatched at once, 3 ms in the processor.
  auto six = batcher.submit({6, 6});
  batcher.shutdown(); // every batch's figures are counted once shutdown has joined the workers
  CHECK(six.get().value == 6);

  const Stats s = batcher.stats();
  REQUIRE(s.jobs_submitted == 5);
  REQUIRE(s.jobs_completed == 3);
  REQUIRE(s.jobs_failed == 2);
  REQUIRE(s.jobs_expired == 1);
  REQUIRE(s.batches_flushed == 2);
  REQUIRE(s.uncorrelated_results == 2);
  const exposition e(microbatch::to_prometheus(s, "real", {{"region", "eu"}}));
  const std::string b = "batcher=\"real\",region=\"eu\"";
  CHECK(e.at("microbatch_jobs_submitted_total{" + b + "}") == std::to_string(s.jobs_submitted));
  CHECK(e.at("microbatch_jobs_completed_total{" + b + "}") == std::to_string(s.jobs_completed));
  CHECK(e.at("microbatch_jobs_failed_total{" + b + ",reason=\"expired\"}") == "1");
  CHECK(e.at("microbatch_jobs_failed_total{" + b + ",reason=\"cancelled\"}") == "0");
  CHECK(e.at("microbatch_jobs_failed_total{" + b + ",reason=\"other\"}") == "1");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"flush\"}") == "2");
  CHECK(e.at("microbatch_batches_total{" + b + ",trigger=\"size\"}") == "0");
  CHECK(e.at("microbatch_pending_jobs{" + b + "}") == "0");
  CHECK(e.at("microbatch_uncorrelated_results_total{" + b + "}") == "2");
  // The quantiles are the histograms' (Stats::queue_wait, Stats::processing_time), in seconds ...
  CHECK(e.at("microbatch_queue_wait_seconds{" + b + ",quantile=\"0.99\"}") == seconds(s.queue_wait.p99));
  CHECK(e.at("microbatch_queue_wait_seconds{" + b + ",quantile=\"0.5\"}") == seconds(s.queue_wait.p50));
  CHECK(e.at("microbatch_processing_seconds{" + b + ",quantile=\"0.5\"}") == seconds(s.processing_time.p50));
  CHECK(e.at("microbatch_processing_seconds{" + b + ",quantile=\"0.99\"}") == seconds(s.processing_time.p99));
  // ... which measured what happened: waits of 2 ms and 0 ms, 3 ms per call, within a bucket (1/64).
  CHECK(std::abs(s.queue_wait.p99.count() - 2'000'000) <= 2'000'000 / 64);
  CHECK(s.queue_wait.p50 == 0ns);
  CHECK(std::abs(s.processing_time.p50.count() - 3'000'000) <= 3'000'000 / 64);
  if constexpr (sums) {
    CHECK(e.at("microbatch_processing_seconds_count{" + b + "}") == "2");
    CHECK(e.at("microbatch_processing_seconds_sum{" + b + "}") == "0.006");
    CHECK(e.at("microbatch_queue_wait_seconds_sum{" + b + "}") == "0.002");
    CHECK(e.at("microbatch_batch_size_count{" + b + "}") == "2");
    CHECK(e.at("microbatch_batch_size_sum{" + b + "}") == "4"); // 3 + 1 jobs handed to the processor
    CHECK(e.at("microbatch_batch_size{" + b + ",quantile=\"0.99\"}") == "3");
    CHECK(e.at("microbatch_batch_size{" + b + ",quantile=\"0.5\"}") == "1");
  }
}

TEST_CASE("label values are escaped: backslash, double quote, line feed", "[metrics]") {
  const std::string text = microbatch::to_prometheus(Stats{}, "a\"b\\c\nd", {{"path", "/x\"y\\\n"}, {"z", "é"}});
  const exposition e(text);
  CHECK(e.at(R"(microbatch_pending_jobs{batcher="a\"b\\c\nd",path="/x\"y\\\n",z="é"})") == "0");
  CHECK(text.find("c\nd") == std::string::npos); // no raw line feed inside a value
}

TEST_CASE("invalid label names and values throw std::invalid_argument naming the label", "[metrics]") {
  using microbatch::to_prometheus;
  const Stats s;
  auto throws_naming = [&](const microbatch::metric_labels& labels, const std::string& name) {
    INFO(name);
    CHECK_THROWS_AS(to_prometheus(s, "b", labels), std::invalid_argument);
    CHECK_THROWS_WITH(to_prometheus(s, "b", labels), Catch::Contains(name));
  };
  throws_naming({{"1abc", "v"}}, "\"1abc\"");
  throws_naming({{"a-b", "v"}}, "\"a-b\"");
  throws_naming({{"__reserved", "v"}}, "\"__reserved\"");
  throws_naming({{"", "v"}}, "\"\"");
  throws_naming({{"sp ace", "v"}}, "\"sp ace\"");
  throws_naming({{"batcher", "v"}}, "\"batcher\"");
  throws_naming({{"quantile", "v"}}, "\"quantile\"");
  throws_naming({{"reason", "v"}}, "\"reason\"");
  throws_naming({{"trigger", "v"}}, "\"trigger\"");
  throws_naming({{"zone", "a"}, {"zone", "b"}}, "\"zone\" appears twice");
  throws_naming({{"zone", "\xff"}}, "\"zone\" is not valid UTF-8");
  throws_naming({{"zone", "\xc0\xaf"}}, "\"zone\" is not valid UTF-8"); // an overlong '/'
  CHECK_THROWS_WITH(to_prometheus(s, ""), Catch::Contains("batcher name is empty"));
  CHECK_THROWS_WITH(to_prometheus(s, "\xed\xa0\x80"), Catch::Contains("batcher name is not valid UTF-8"));
  CHECK_NOTHROW(to_prometheus(s, "b", {{"_ok9", "any \"text\""}, {"Zone", ""}}));
}

TEST_CASE("several batchers in one exposition: each family's HELP and TYPE once, every series", "[metrics]") {
  Stats first = distinct_stats();
  Stats second;
  second.jobs_submitted = 3;
  second.jobs_completed = 3;
  microbatch::prometheus_exposition all;
  all.add(first, "reads", {{"shard", "1"}}).add(first, "reads", {{"shard", "2"}}).add(second, "writes");
  const exposition e(all.str()); // its checks: one HELP and TYPE per family, series after their family
  CHECK(e.families.size() == microbatch::detail::metric_families.size() - (sums ? 0 : 1));
  CHECK(e.at("microbatch_jobs_submitted_total{batcher=\"reads\",shard=\"1\"}") == "1000");
  CHECK(e.at("microbatch_jobs_submitted_total{batcher=\"reads\",shard=\"2\"}") == "1000");
  CHECK(e.at("microbatch_jobs_submitted_total{batcher=\"writes\"}") == "3");
  CHECK(e.at("microbatch_queue_wait_seconds{batcher=\"writes\",quantile=\"0.5\"}") == "0");
  CHECK(e.value.size() == 3 * exposition(microbatch::to_prometheus(second, "w")).value.size());
  // The same batcher and labels twice would be duplicate series: refused, and nothing was added.
  CHECK_THROWS_WITH(all.add(second, "writes"), Catch::Contains("\"writes\" with these labels was already added"));
  CHECK(exposition(all.str()).value.size() == e.value.size());
  // Concatenating single expositions instead repeats HELP and TYPE: what the builder is for.
  const std::string both = microbatch::to_prometheus(first, "a") + microbatch::to_prometheus(second, "b");
  CHECK(both.find("# TYPE microbatch_pending_jobs gauge") != both.rfind("# TYPE microbatch_pending_jobs gauge"));
}

#if defined(MICROBATCH_TEST_PROMETHEUS_CPP)
#include <microbatch/prometheus.hpp>

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace {

/// GET http://127.0.0.1:<port>/metrics, the whole response (HTTP/1.0: the server closes after it).
std::string scrape(unsigned short port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  const std::string request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  REQUIRE(::send(fd, request.data(), request.size(), 0) == ssize_t(request.size()));
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = ::recv(fd, buffer, sizeof buffer, 0)) > 0;)
    response.append(buffer, std::size_t(n));
  ::close(fd);
  return response;
}

std::string body(const std::string& response) {
  const auto end = response.find("\r\n\r\n");
  REQUIRE(end != std::string::npos);
  return response.substr(end + 4);
}

} // namespace

TEST_CASE("prometheus-cpp: Collect reads stats() when called, as the text exposition has it", "[metrics][prometheus]") {
  microbatch::manual_clock clock;
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher batcher(process, &Job::id, &Result::id,
                              Options{.max_batch_size = 0, .max_batch_delay = 0s, .clock = &clock});
  // A registrar needs only RegisterCollectable and RemoveCollectable: this one records the calls.
  struct recording_registrar {
    std::vector<std::weak_ptr<prometheus::Collectable>> registered;
    int removed = 0;
    void RegisterCollectable(const std::weak_ptr<prometheus::Collectable>& c) { registered.push_back(c); }
    void RemoveCollectable(const std::weak_ptr<prometheus::Collectable>&) { ++removed; }
  } registrar;
  std::shared_ptr<prometheus::Collectable> held; // as a scrape in progress would hold it
  {
    microbatch::prometheus_registration metrics(registrar);
    metrics.add(batcher, "lookups", {{"region", "e\"u"}});
    REQUIRE(registrar.registered.size() == 1);
    held = registrar.registered.front().lock();
    REQUIRE(held == metrics.collector());

    auto before = held->Collect(); // nothing submitted yet
    auto job = batcher.submit({1, 1});
    batcher.flush();
    CHECK(job.get().value == 2);
    batcher.shutdown();
    const Stats s = batcher.stats();
    const auto families = held->Collect(); // read now: the new figures
    REQUIRE(families.size() == before.size());
    std::map<std::string, const prometheus::MetricFamily*> by_name;
    for (const auto& f : families)
      by_name[f.name] = &f;
    const auto& submitted = *by_name.at("microbatch_jobs_submitted_total");
    CHECK(submitted.type == prometheus::MetricType::Counter);
    REQUIRE(submitted.metric.size() == 1);
    CHECK(submitted.metric[0].counter.value == double(s.jobs_submitted));
    CHECK(submitted.metric[0].label ==
          std::vector<prometheus::ClientMetric::Label>{{"batcher", "lookups"}, {"region", "e\"u"}});
    CHECK(before[0].metric[0].counter.value == 0);
    const auto& batches = *by_name.at("microbatch_batches_total");
    REQUIRE(batches.metric.size() == 5);
    CHECK(batches.metric[2].label.back() == prometheus::ClientMetric::Label{"trigger", "flush"});
    REQUIRE(s.batches_flushed == 1); // the flush (shutdown found nothing left to dispatch)
    CHECK(batches.metric[2].counter.value == double(s.batches_flushed));
    CHECK(by_name.at("microbatch_pending_jobs")->type == prometheus::MetricType::Gauge);
    const auto& wait = *by_name.at("microbatch_queue_wait_seconds");
    if constexpr (sums) {
      CHECK(wait.type == prometheus::MetricType::Summary);
      CHECK(wait.metric[0].summary.sample_count == 1);
    } else {
      CHECK(wait.type == prometheus::MetricType::Gauge); // quantile series only: no false _count
      REQUIRE(wait.metric.size() == 2);
      CHECK(wait.metric[1].label.back() == prometheus::ClientMetric::Label{"quantile", "0.99"});
    }
    CHECK(registrar.removed == 0);
  }
  // The registration is gone: removed from the registrar and detached, so the collector a scrape still
  // holds reads nothing (the batcher could be gone by now).
  CHECK(registrar.removed == 1);
  CHECK(held->Collect().empty());
}

TEST_CASE("prometheus-cpp: a live Exposer serves the batchers beside the program's Registry", "[metrics][prometheus]") {
  microbatch::manual_clock clock;
  batch_log log;
  auto process = logged(log);
  microbatch::Batcher reads(process, &Job::id, &Result::id,
                            Options{.max_batch_size = 2, .max_batch_delay = 0s, .clock = &clock});
  microbatch::Batcher writes(process, &Job::id, &Result::id,
                             Options{.max_batch_size = 2, .max_batch_delay = 0s, .clock = &clock});
  prometheus::Exposer exposer{"127.0.0.1:0"};
  const auto ports = exposer.GetListeningPorts();
  REQUIRE(ports.size() == 1);
  auto registry = std::make_shared<prometheus::Registry>();
  prometheus::BuildCounter()
      .Name("app_requests_total")
      .Help("The program's own.")
      .Register(*registry)
      .Add({})
      .Increment(7);
  exposer.RegisterCollectable(registry);
  {
    microbatch::prometheus_registration metrics(exposer);
    metrics.add(reads, "reads");
    metrics.add(writes, "writes");
    auto a = reads.submit({1, 1});
    auto b = reads.submit({2, 2});
    CHECK(a.get().value + b.get().value == 6);
    reads.shutdown(); // its batch's figures are all counted
    const std::string response = scrape(ports[0]);
    CHECK((response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")));
    const exposition e(body(response)); // one HELP and TYPE per family across both batchers
    CHECK(e.at("app_requests_total") == "7");
    CHECK(e.at("microbatch_jobs_completed_total{batcher=\"reads\"}") == "2");
    CHECK(e.at("microbatch_jobs_completed_total{batcher=\"writes\"}") == "0");
    CHECK(e.at("microbatch_batches_total{batcher=\"reads\",trigger=\"size\"}") == "1");
    CHECK_THROWS_AS(metrics.add(reads, "reads"), std::invalid_argument);
  }
  const exposition after(body(scrape(ports[0])));
  CHECK(after.at("app_requests_total") == "7");
  for (const auto& [series, value] : after.value)
    CHECK_FALSE(series.starts_with("microbatch_"));
}
#endif
