// Randomized fault injection: many producers using every submission style against a processor that
// throws, drops, duplicates, invents, reorders and stalls; random options, reconfigured at random
// moments, flushes, deadlines, cancellations and shutdowns (both modes) at random moments. Invariants: every accepted
// job ends exactly once with the right value or an allowed error, the counters add up, nothing is pending after
// shutdown, and nothing hangs (a watchdog aborts with the seed).
//
//   MICROBATCH_STRESS_SEED=<n>     replay one seed
//   MICROBATCH_SOAK_SECONDS=<s>    keep running rounds for s seconds (the long soak) and print totals
#include <catch2/catch.hpp>

#include <condition_variable>
#include <coroutine>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <random>

#include "support.hpp"

using namespace test;
using microbatch::Options;

#if defined(__cpp_lib_jthread)
using stop_source = std::stop_source;
#else
struct stop_source { // libc++ before 20 has no std::stop_token: style 3 runs without cancellation
  void request_stop() noexcept {}
};
#endif

namespace {

struct processor_fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct StressJob {
  std::uint64_t id;
  std::uint64_t payload;
};
struct StressResult {
  std::uint64_t id;
  std::uint64_t value;
};
std::uint64_t expected_value(std::uint64_t payload) {
  return payload * 3 + 1;
}

struct totals {
  std::uint64_t rounds = 0, jobs = 0, values = 0, errors = 0, faults = 0, not_accepted = 0;
};

/// The processor: fault plans drawn per batch from a seeded generator (guarded: up to 3 workers).
class chaos_processor {
public:
  explicit chaos_processor(std::uint64_t seed) : random_(seed) {}

  std::vector<StressResult> operator()(std::span<StressJob> jobs) {
    calls_.fetch_add(1);
    jobs_seen_.fetch_add(jobs.size());
    int fault;
    std::uint64_t stray_ids, stall_us;
    {
      std::lock_guard lock(mutex_);
      fault = std::uniform_int_distribution<int>(0, 9)(random_);
      stray_ids = random_();
      stall_us = std::uniform_int_distribution<std::uint64_t>(0, 300)(random_);
    }
    std::vector<StressResult> results;
    for (const StressJob& job : jobs)
      results.push_back({job.id, expected_value(job.payload)});
    switch (fault) {
    case 0: // throw
      faults_.fetch_add(1);
      throw processor_fault("injected processor failure");
    case 1: // drop one result
      if (!results.empty()) {
        results.erase(results.begin() + std::ptrdiff_t(stray_ids % results.size()));
        faults_.fetch_add(1);
      }
      break;
    case 2: // a second, wrong answer for one job: must be dropped as uncorrelated
      if (!results.empty()) {
        results.push_back({results[stray_ids % results.size()].id, 0});
        injected_uncorrelated_.fetch_add(1);
        faults_.fetch_add(1);
      }
      break;
    case 3: // a result for an ID no job in this batch has (stress IDs are < 2^20)
      results.push_back({(stray_ids | (1ull << 40)), 0});
      injected_uncorrelated_.fetch_add(1);
      faults_.fetch_add(1);
      break;
    case 4: // reorder
      std::reverse(results.begin(), results.end());
      faults_.fetch_add(1);
      break;
    case 5: // stall (a slow dependency; not synchronisation)
      std::this_thread::sleep_for(std::chrono::microseconds(stall_us));
      faults_.fetch_add(1);
      break;
    default:
      break;
    }
    return results;
  }

  std::atomic<std::uint64_t> faults_{0};
  std::atomic<std::uint64_t> calls_{0};     // processor calls
  std::atomic<std::uint64_t> jobs_seen_{0}; // jobs handed to it
  std::atomic<std::uint64_t> injected_uncorrelated_{0};

private:
  std::mutex mutex_;
  std::mt19937_64 random_;
};

using stress_batcher = microbatch::Batcher<StressJob, StressResult, std::reference_wrapper<chaos_processor>>;

/// What one producer saw.
struct tally {
  std::uint64_t values = 0, wrong_values = 0, processor_errors = 0, no_result = 0, duplicates = 0, expired = 0,
                cancelled = 0, closed = 0, rejected = 0, other = 0, unexpected_cancel = 0, unexpected_expiry = 0;

  void add(const tally& o) {
    values += o.values, wrong_values += o.wrong_values;
    processor_errors += o.processor_errors, no_result += o.no_result, duplicates += o.duplicates;
    expired += o.expired, cancelled += o.cancelled, closed += o.closed, rejected += o.rejected;
    other += o.other, unexpected_cancel += o.unexpected_cancel, unexpected_expiry += o.unexpected_expiry;
  }
};

/// Classifies how a job ended (or, for execute_job, why it was not accepted). Returns false once the
/// batcher is closed.
template <class Get> bool record_end(tally& t, std::uint64_t payload, bool had_deadline, bool had_stop, Get&& get) {
  try {
    const StressResult result = get();
    ++t.values;
    if (result.value != expected_value(payload)) ++t.wrong_values;
  } catch (const processor_fault&) {
    ++t.processor_errors;
  } catch (const microbatch::no_result&) {
    ++t.no_result;
  } catch (const microbatch::duplicate_id&) {
    ++t.duplicates;
  } catch (const microbatch::deadline_exceeded&) {
    ++t.expired;
    if (!had_deadline) ++t.unexpected_expiry;
  } catch (const microbatch::cancelled&) {
    ++t.cancelled;
    if (!had_stop) ++t.unexpected_cancel;
  } catch (const microbatch::batcher_closed&) {
    ++t.closed; // accepted and cancelled by Shutdown::cancel, or refused after shutdown began
    return false;
  } catch (const microbatch::queue_full&) {
    ++t.rejected; // execute_job at max_pending_jobs: not accepted
  } catch (...) {
    ++t.other;
  }
  return true;
}

/// Outcomes delivered on batcher threads (callbacks, resumed coroutines).
struct shared_tally {
  std::mutex mutex;
  tally counts;                    // guarded by mutex
  std::atomic<int> outstanding{0}; // accepted (or about to be) and not yet ended
};

template <class B> detached await_job(B& batcher, StressJob job, shared_tally& shared) {
  try {
    const StressResult result = co_await batcher.async_execute_job(job);
    std::lock_guard lock(shared.mutex);
    record_end(shared.counts, job.payload, false, false, [&] { return result; });
  } catch (...) { // classify the job's error (or why it was not accepted) by rethrowing it
    std::lock_guard lock(shared.mutex);
    record_end(shared.counts, job.payload, false, false, []() -> StressResult { throw; });
  }
  shared.outstanding.fetch_sub(1);
}

/// Random batching limits (size, delay, slots, backpressure, idle dispatch): for the batcher, and
/// again and again for `reconfigure` while jobs flow.
template <class Pick> void random_limits(Pick& pick, Options& options) {
  options.max_batch_size = pick(0, 24);
  options.max_batch_delay = std::chrono::microseconds(pick(0, 3) == 0 ? 0 : pick(50, 1500));
  if (options.max_batch_size == 0 && options.max_batch_delay.count() == 0) options.max_batch_delay = 200us;
  options.max_concurrent_batches = pick(1, 3);
  options.max_pending_jobs =
      pick(0, 2) == 0 ? std::max<std::size_t>(options.max_batch_size, 1) * pick(1, 4) : std::size_t{0};
  options.overflow = pick(0, 1) == 0 ? microbatch::Overflow::block : microbatch::Overflow::reject;
  options.dispatch_when_idle = pick(0, 2) == 0;
}

totals run_round(std::uint64_t seed, totals& sum) {
  std::mt19937_64 random(seed);
  auto pick = [&](std::uint64_t lo, std::uint64_t hi) {
    return std::uniform_int_distribution<std::uint64_t>(lo, hi)(random);
  };

  Options options;
  random_limits(pick, options);
  std::atomic<std::uint64_t> observed_batches{0}, observed_jobs{0};
  options.on_batch = [&](const microbatch::BatchInfo& info) {
    observed_batches.fetch_add(1);
    observed_jobs.fetch_add(info.size);
  };
  const int producers = int(pick(2, 6));
  const int jobs_each = int(pick(50, 400));
  const std::uint64_t id_space = pick(8, 4096); // small spaces make duplicate IDs in a batch likely
  const bool shutdown_early = pick(0, 1) == 0;
  const auto shutdown_mode = pick(0, 1) == 0 ? microbatch::Shutdown::drain : microbatch::Shutdown::cancel;
  const bool escalate = pick(0, 2) == 0; // an early drain is escalated by a cancel from another thread
  const bool reconfigures = pick(0, 1) == 0;

  chaos_processor processor(seed ^ 0x9e3779b97f4a7c15ull);
  stress_batcher batcher(std::ref(processor), &StressJob::id, &StressResult::id, options);

  std::mutex stops_mutex;
  std::vector<std::shared_ptr<stop_source>> stops; // guarded by stops_mutex
  std::atomic<int> producers_done{0};
  std::vector<tally> tallies(static_cast<std::size_t>(producers));
  std::vector<std::uint64_t> producer_seeds;
  for (int p = 0; p < producers; ++p)
    producer_seeds.push_back(random());

  shared_tally async_outcomes;
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      std::mt19937_64 mine(producer_seeds[std::size_t(p)]);
      auto draw = [&](std::uint64_t lo, std::uint64_t hi) {
        return std::uniform_int_distribution<std::uint64_t>(lo, hi)(mine);
      };
      tally& t = tallies[std::size_t(p)];
      struct pending_future {
        std::future<StressResult> future;
        std::uint64_t payload;
        bool had_deadline;
      };
      std::vector<pending_future> futures;
      for (int i = 0; i < jobs_each; ++i) {
        const StressJob job{draw(0, id_space - 1), draw(0, 1u << 30)};
        const auto style = draw(0, 5);
        bool open = true;
        try {
          if (style == 0) {
            futures.push_back({batcher.submit(job), job.payload, false});
          } else if (style == 1) {
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(draw(0, 3000)) - 200us;
            futures.push_back({batcher.submit(job, deadline), job.payload, true});
          } else if (style == 2) {
            open = record_end(t, job.payload, false, false, [&] { return batcher.execute_job(job); });
          } else if (style == 4) {
            async_outcomes.outstanding.fetch_add(1);
            try {
              batcher.submit(
                  job, [&async_outcomes, payload = job.payload](microbatch::Outcome<StressResult>&& outcome) {
                    std::lock_guard lock(async_outcomes.mutex);
                    record_end(async_outcomes.counts, payload, false, false, [&] { return outcome.value(); });
                    async_outcomes.outstanding.fetch_sub(1);
                  });
            } catch (...) {
              async_outcomes.outstanding.fetch_sub(1);
              throw;
            }
          } else if (style == 5) {
            async_outcomes.outstanding.fetch_add(1);
            await_job(batcher, job, async_outcomes);
          } else {
            auto stop = std::make_shared<stop_source>();
            {
              std::lock_guard lock(stops_mutex);
              stops.push_back(stop);
            }
#if defined(__cpp_lib_jthread)
            open = record_end(t, job.payload, false, true, [&] { return batcher.execute_job(job, stop->get_token()); });
#else
            open = record_end(t, job.payload, false, false, [&] { return batcher.execute_job(job); });
#endif
          }
        } catch (const microbatch::queue_full&) {
          ++t.rejected;
        } catch (const microbatch::batcher_closed&) {
          open = false; // submit after shutdown began: not accepted
        } catch (const microbatch::deadline_exceeded&) {
          // the deadline was already past at submit: not accepted
        } catch (...) {
          ++t.other;
        }
        if (!open) break;
        if (draw(0, 50) == 0) std::this_thread::yield();
      }
      for (auto& f : futures)
        record_end(t, f.payload, f.had_deadline, false, [&] { return f.future.get(); });
      producers_done.fetch_add(1);
    });
  }

  // Chaos: flushes, cancellations and (maybe) an early shutdown, while producers run.
  std::thread drainer;
  std::thread chaos([&] {
    std::mt19937_64 mine(seed + 1);
    auto draw = [&](std::uint64_t lo, std::uint64_t hi) {
      return std::uniform_int_distribution<std::uint64_t>(lo, hi)(mine);
    };
    const std::uint64_t shutdown_after = draw(50, 2000);
    for (std::uint64_t step = 0; producers_done.load() < producers; ++step) {
      const auto action = draw(0, 9);
      if (action == 0) batcher.flush();
      if (action == 9 && reconfigures) { // new limits while jobs flow (on_batch and the rest stay)
        Options next = batcher.options();
        random_limits(draw, next);
        batcher.reconfigure(next);
      }
      if (action <= 3) {
        std::lock_guard lock(stops_mutex);
        if (!stops.empty()) stops[draw(0, stops.size() - 1)]->request_stop();
      }
      if (shutdown_early && step == shutdown_after) {
        if (escalate) {
          drainer = std::thread([&] { batcher.shutdown(microbatch::Shutdown::drain); });
          batcher.shutdown(microbatch::Shutdown::cancel);
        } else {
          batcher.shutdown(shutdown_mode);
        }
      }
      std::this_thread::yield();
    }
  });

  for (auto& t : threads)
    t.join();
  chaos.join();
  if (drainer.joinable()) drainer.join();
  batcher.shutdown(shutdown_mode);

  CHECK(async_outcomes.outstanding.load() == 0); // every callback and coroutine ran before shutdown returned
  tally all;
  for (auto& t : tallies)
    all.add(t);
  all.add(async_outcomes.counts);
  const auto stats = batcher.stats();
  const std::uint64_t injected_uncorrelated = processor.injected_uncorrelated_.load();
  INFO("seed " << seed);
  CHECK(all.other == 0);
  CHECK(all.wrong_values == 0);
  CHECK(all.unexpected_cancel == 0);
  CHECK(all.unexpected_expiry == 0);
  CHECK(stats.pending_jobs == 0);
  CHECK(observed_batches.load() == processor.calls_.load()); // on_batch: once per processor call
  CHECK(observed_jobs.load() == processor.jobs_seen_.load());
  CHECK(stats.jobs_completed == all.values);
  CHECK(stats.jobs_submitted == stats.jobs_completed + stats.jobs_failed);
  CHECK(stats.jobs_expired == all.expired);
  CHECK(stats.jobs_cancelled <= all.cancelled); // the rest were cancelled before they were accepted
  CHECK(stats.jobs_rejected == all.rejected);
  CHECK(stats.uncorrelated_results <= injected_uncorrelated); // only what the processor invented
  // Every accepted job ended exactly once: with a value, or with an error that some caller saw. The
  // accepted jobs that ended with batcher_closed (Shutdown::cancel) are what remains.
  const std::uint64_t seen_errors =
      all.processor_errors + all.no_result + all.duplicates + all.expired + stats.jobs_cancelled;
  REQUIRE(stats.jobs_failed >= seen_errors);
  const std::uint64_t closed_after_accept = stats.jobs_failed - seen_errors;
  CHECK(closed_after_accept <= all.closed);
  const bool cancelled_somewhere = shutdown_mode == microbatch::Shutdown::cancel || (shutdown_early && escalate);
  if (!cancelled_somewhere) CHECK(closed_after_accept == 0);

  totals round;
  round.rounds = 1;
  round.jobs = stats.jobs_submitted;
  round.values = stats.jobs_completed;
  round.errors = stats.jobs_failed;
  round.faults = processor.faults_.load() + stats.jobs_cancelled + stats.jobs_expired;
  round.not_accepted = stats.jobs_rejected;
  sum.rounds += 1, sum.jobs += round.jobs, sum.values += round.values, sum.errors += round.errors;
  sum.faults += round.faults, sum.not_accepted += round.not_accepted;
  return round;
}

} // namespace

TEST_CASE("randomized fault injection: every job ends exactly once and the counters add up", "[stress]") {
  const char* seed_env = std::getenv("MICROBATCH_STRESS_SEED");
  const char* soak_env = std::getenv("MICROBATCH_SOAK_SECONDS");
  const std::uint64_t first_seed = seed_env != nullptr ? std::strtoull(seed_env, nullptr, 10) : std::random_device{}();
  const double soak_seconds = soak_env != nullptr ? std::strtod(soak_env, nullptr) : 0;
  std::fprintf(stderr, "stress: first seed %llu (replay with MICROBATCH_STRESS_SEED=%llu)\n",
               static_cast<unsigned long long>(first_seed), static_cast<unsigned long long>(first_seed));

  // Watchdog: a hang is a failure with its seed, not a stuck CI job.
  std::mutex watchdog_mutex;
  std::condition_variable watchdog_cv;
  bool finished = false;
  std::atomic<std::uint64_t> current_seed{first_seed};
  std::atomic<std::uint64_t> progress{0};
  std::thread watchdog([&] {
    std::unique_lock lock(watchdog_mutex);
    std::uint64_t last_progress = progress.load();
    while (!watchdog_cv.wait_for(lock, 45s, [&] { return finished; })) {
      if (progress.load() == last_progress) {
        std::fprintf(stderr, "stress: no round finished in 45 s: hang with seed %llu\n",
                     static_cast<unsigned long long>(current_seed.load()));
        std::abort();
      }
      last_progress = progress.load();
    }
  });

  totals sum;
  const auto start = std::chrono::steady_clock::now();
  const int quick_rounds = seed_env != nullptr ? 1 : 40;
  for (std::uint64_t round = 0;; ++round) {
    const std::uint64_t seed = first_seed + round;
    current_seed = seed;
    run_round(seed, sum);
    progress.fetch_add(1);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (soak_seconds > 0 ? elapsed >= soak_seconds : int(round + 1) >= quick_rounds) break;
  }
  {
    std::lock_guard lock(watchdog_mutex);
    finished = true;
  }
  watchdog_cv.notify_all();
  watchdog.join();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("stress: %llu rounds, %llu jobs accepted (%llu results, %llu errors), %llu faults injected, "
              "%llu rejected by backpressure, jobs lost: 0, %.1f s\n",
              static_cast<unsigned long long>(sum.rounds), static_cast<unsigned long long>(sum.jobs),
              static_cast<unsigned long long>(sum.values), static_cast<unsigned long long>(sum.errors),
              static_cast<unsigned long long>(sum.faults), static_cast<unsigned long long>(sum.not_accepted), elapsed);
}
