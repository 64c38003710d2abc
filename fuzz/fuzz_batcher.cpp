// libFuzzer target: decodes the input into options and a sequence of operations (submits with and
// without deadlines, flushes, time steps on a manual clock, processor fault modes, reconfigure with
// new limits, weights and duplicate policy, shutdown in either mode), runs them against a Batcher,
// and checks the invariants: every accepted job's future is ready after shutdown, holding the right
// value (with coalescing: the value of a job with the same ID) or an allowed error, and the counters
// add up.
#include <microbatch/microbatch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <map>
#include <set>
#include <span>
#include <vector>

namespace {

struct Job {
  std::uint64_t id;
  std::uint64_t payload;
};
struct Result {
  std::uint64_t id;
  std::uint64_t value;
};
struct processor_fault {};

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

class input {
public:
  input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  bool more() const { return at_ < size_; }
  std::uint8_t byte() { return at_ < size_ ? data_[at_++] : 0; }

private:
  const std::uint8_t* data_;
  std::size_t size_, at_ = 0;
};

struct faulty_processor {
  std::atomic<int>* mode;
  std::size_t weight(const Job& job) const { return 1 + job.payload % 8; }
  std::vector<Result> operator()(std::span<Job> jobs) const {
    std::vector<Result> results;
    for (const Job& job : jobs)
      results.push_back({job.id, job.payload + 1});
    switch (mode->load()) {
    case 1:
      throw processor_fault{};
    case 2:
      if (!results.empty()) results.pop_back();
      break; // a missing result
    case 3:
      if (!results.empty()) results.push_back({results[0].id, 0});
      break; // a second answer
    case 4:
      results.push_back({1000, 0});
      break; // an unknown ID
    case 5:
      std::reverse(results.begin(), results.end());
      break;
    default:
      break;
    }
    return results;
  }
};

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace std::chrono_literals;
  input in(data, size);
  microbatch::manual_clock clock;
  std::atomic<int> fault_mode{0};
  microbatch::Options options;
  // The limits, decoded at the start and again for every reconfigure.
  auto decode_limits = [&in](microbatch::Options& o) {
    o.max_batch_size = in.byte() % 17;
    o.max_batch_delay = std::chrono::microseconds(in.byte() % 3 == 0 ? 0 : 1 + in.byte() % 50);
    o.max_concurrent_batches = 1 + in.byte() % 3;
    o.max_pending_jobs = 0;
    if (in.byte() % 4 == 0) {
      o.max_pending_jobs = std::max<std::size_t>(o.max_batch_size, 1) * (1 + in.byte() % 3);
      o.overflow = microbatch::Overflow::reject; // a single-threaded driver must never block
    }
    o.dispatch_when_idle = in.byte() % 2 == 0;
    o.max_batch_weight = in.byte() % 3 == 0 ? 4 + in.byte() % 16 : 0; // jobs weigh 1 to 8
    o.duplicate_ids = in.byte() % 3 == 0 ? microbatch::DuplicateIds::coalesce : microbatch::DuplicateIds::reject;
  };
  decode_limits(options);
  options.clock = &clock;
  std::atomic<std::uint64_t> observed_jobs{0};
  options.on_batch = [&observed_jobs](const microbatch::BatchInfo& info) {
    if (info.size == 0) std::abort(); // only batches that reached the processor are reported
    observed_jobs.fetch_add(info.size);
  };

  struct submitted {
    std::future<Result> future;
    std::uint64_t id;
    std::uint64_t payload;
    bool had_deadline;
  };
  std::vector<submitted> futures;
  std::map<std::uint64_t, std::set<std::uint64_t>> payloads_of_id; // what a coalesced copy may carry
  bool coalesced_ever = options.duplicate_ids == microbatch::DuplicateIds::coalesce;
  std::size_t weight_limit = options.max_batch_weight;
  std::uint64_t rejected = 0;
  auto shutdown_mode = microbatch::Shutdown::drain;
  {
    microbatch::Batcher<Job, Result, faulty_processor> batcher(faulty_processor{&fault_mode}, &Job::id, &Result::id,
                                                               options);
    bool closed = false;
    while (in.more()) {
      const std::uint8_t op = in.byte() % 9;
      Job job{0, 0};
      try {
        switch (op) {
        case 0:
        case 1: {
          job = Job{in.byte() % 16u, in.byte()};
          futures.push_back({batcher.submit(job), job.id, job.payload, false});
          payloads_of_id[job.id].insert(job.payload);
          check(!closed, "submit after shutdown was accepted");
          break;
        }
        case 2: {
          job = Job{in.byte() % 16u, in.byte()};
          const auto deadline = clock.now() + std::chrono::microseconds(in.byte() % 64);
          futures.push_back({batcher.submit(job, deadline), job.id, job.payload, true});
          payloads_of_id[job.id].insert(job.payload);
          check(!closed, "submit after shutdown was accepted");
          break;
        }
        case 7: {
          microbatch::Options next = batcher.options();
          decode_limits(next);
          batcher.reconfigure(next);
          check(batcher.options().max_batch_size == next.max_batch_size, "options() after reconfigure");
          coalesced_ever = coalesced_ever || next.duplicate_ids == microbatch::DuplicateIds::coalesce;
          weight_limit = next.max_batch_weight;
          break;
        }
        case 3:
          batcher.flush();
          break;
        case 4:
          clock.advance(std::chrono::microseconds(in.byte() % 64));
          break;
        case 5:
          fault_mode = in.byte() % 6;
          break;
        case 6: {
          std::stop_source stop;
          stop.request_stop();
          try {
            (void)batcher.execute_job({0, 0}, stop.get_token());
            check(false, "execute_job with a stop already requested returned");
          } catch (const microbatch::cancelled&) {
          }
          break;
        }
        default: {
          const auto how = in.byte() % 2 == 0 ? microbatch::Shutdown::drain : microbatch::Shutdown::cancel;
          batcher.shutdown(how); // a second shutdown changes nothing
          if (!closed) shutdown_mode = how;
          closed = true;
          break;
        }
        }
      } catch (const microbatch::queue_full&) {
        ++rejected;
      } catch (const microbatch::batcher_closed&) {
        check(closed, "batcher_closed before shutdown");
      } catch (const microbatch::deadline_exceeded&) {
        // a deadline already past at submit
      } catch (const microbatch::oversized_job&) {
        check(weight_limit != 0 && faulty_processor{}.weight(job) > weight_limit, "oversized_job within the limit");
      }
    }
    batcher.shutdown(shutdown_mode);

    std::uint64_t values = 0, expired = 0, failed = 0;
    for (auto& s : futures) {
      check(s.future.wait_for(0s) == std::future_status::ready, "a future is not ready after shutdown");
      try {
        const Result result = s.future.get();
        check(result.value == s.payload + 1 ||
                  (coalesced_ever && result.id == s.id && payloads_of_id[s.id].count(result.value - 1) != 0),
              "a job got another job's result");
        ++values;
      } catch (const microbatch::deadline_exceeded&) {
        check(s.had_deadline, "deadline_exceeded without a deadline");
        ++expired, ++failed;
      } catch (const microbatch::batcher_closed&) {
        check(shutdown_mode == microbatch::Shutdown::cancel, "batcher_closed from a draining shutdown");
        ++failed;
      } catch (const microbatch::no_result&) {
        ++failed;
      } catch (const microbatch::duplicate_id&) {
        ++failed;
      } catch (const processor_fault&) {
        ++failed;
      }
    }
    const microbatch::Stats stats = batcher.stats();
    check(stats.jobs_submitted == futures.size(), "jobs_submitted differs from the accepted submits");
    check(stats.jobs_completed == values, "jobs_completed differs from the values delivered");
    check(stats.jobs_failed == failed, "jobs_failed differs from the errors delivered");
    check(stats.jobs_expired == expired, "jobs_expired differs");
    check(stats.pending_jobs == 0, "jobs pending after shutdown");
    check(stats.jobs_rejected == rejected, "jobs_rejected differs from the queue_full throws");
  }
  return 0;
}
