// microbatch::detail::collector: the collector thread's loop, the batcher's clock.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include "../errors.hpp"
#include "../options.hpp"
#include "batch_forming.hpp"
#include "batch_queue.hpp"
#include "collector_clock.hpp"
#include "counters.hpp"
#include "job_node.hpp"
#include "ready_queue.hpp"

namespace microbatch::detail {

/// The batcher's clock: the loop of its collector thread. Each round it takes new jobs from the inbox
/// (dispatching batches they fill), drops expired and cancelled jobs, dispatches the forming batch
/// when its delay passed or on flush or shutdown, serves flush tickets, and sleeps until the next batch
/// is due or the next deadline, whichever comes first (`collector_clock`). Deadlines of queued batches
/// hold while every worker is busy: it takes expired jobs out of the ready queue too.
///
/// Shutdown: on `Shutdown::drain` it dispatches what is left and keeps running, enforcing deadlines,
/// until the last queued batch has been taken; on `Shutdown::cancel` it ends every job still forming or
/// queued with `batcher_closed`. Either way it then finishes the ready queue (idle workers exit) and
/// `run` returns.
///
/// `Host` (the batcher) gives it `dispatch(job_list<Node>, Trigger)`, called with the forming mutex
/// held, and `end_job(Node*, std::exception_ptr, failure)`, called with no lock held. Threads: `run` on
/// the collector thread only (or `round` on the pool's clock thread); `request_sweep` from any thread.
template <class Node, class Host> class collector {
public:
  using time_point = std::chrono::steady_clock::time_point;

  collector(Host& host, batch_forming<Node>& forming, ready_queue<Node>& ready, collector_clock& clock) noexcept
      : host_(host), forming_(forming), ready_(ready), clock_(clock) {}
  collector(const collector&) = delete;
  collector& operator=(const collector&) = delete;

  /// A queued job was cancelled by its caller: the next round drops it from the queue now rather than
  /// when its batch is dispatched. Any thread.
  void request_sweep() noexcept {
    sweep_requested_.store(true, std::memory_order_release);
    clock_.wake();
  }

  /// What a round asks for next.
  enum class next_round {
    again,    ///< another round now, without sleeping
    planned,  ///< sleep until the clock's plan or a wake-up
    finished, ///< shutdown is over: no more rounds
  };

  /// The collector thread's body (a batcher with its own threads); returns when shutdown is finished.
  void run() {
#if defined(__linux__)
    // Timer slack (50 us by default) would be added to every batch delay; 1 ns makes timers exact.
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
#endif
    for (;;) {
      const next_round next = round();
      if (next == next_round::finished) return;
      if (next == next_round::planned) clock_.sleep();
    }
  }

  /// One round of the clock: on the batcher's collector thread, or on its pool's clock thread (one
  /// round at a time either way).
  next_round round() {
    const auto requests = clock_.begin_round();
    const time_point now_time = clock_.now();
    const std::uint64_t deadline_pushes = forming_.deadline_pushes(); // before this round takes the inbox
    const bool stopping = requests.shutdown.has_value();
    const bool cancelling = stopping && *requests.shutdown == Shutdown::cancel;
    batch leaving; // expired or cancelled jobs, ended below, outside every lock
    bool finished = false;
    {
      std::lock_guard lock(forming_.mutex());
      if (cancelling) {
        forming_.take_arrivals(
            now_time, [&](batch full) { leaving.append(full); }, true);
        leaving.append(forming_.cut());
        ready_.remove_if([](Node*) { return true; }, leaving);
        finished = true;
      } else {
        auto full = [&](batch formed) { host_.dispatch(formed, formed.trigger); };
        forming_.take_arrivals(now_time, full, stopping);
        // Expired and cancelled jobs leave first, so that no batch is dispatched with them.
        // (A load before the exchange: its cache line is also one that every submit writes to.)
        if ((sweep_requested_.load(std::memory_order_relaxed) &&
             sweep_requested_.exchange(false, std::memory_order_acq_rel)) ||
            forming_.earliest_deadline() <= now_time)
          expire(now_time, leaving);
        const bool flush_wanted = requests.flush_ticket > flushes_served_;
        if (!forming_.empty() && (stopping || flush_wanted || forming_.due() <= now_time)) {
          const bool timed_out = forming_.due() <= now_time; // the delay's, even if a flush came too
          host_.dispatch(forming_.cut(), timed_out ? Trigger::delay : stopping ? Trigger::shutdown : Trigger::flush);
          forming_.take_arrivals(now_time, full, stopping); // re-arms the size threshold
        }
        // Draining: the clock runs until the last queued batch is taken, so deadlines hold meanwhile.
        finished = stopping && forming_.empty() && ready_.empty();
      }
      if (finished) ready_.finish();
      // While jobs keep coming, the clock looks again within one delay even with nothing forming, so
      // that the next batch's first job finds the plan early enough and need not wake it: a wake-up
      // costs that submitter a system call, and in W1co the collector, woken by a batch's first job,
      // often found that batch already gone, planned "never" again, and was woken again by the next
      // (up to 20 times per ms). A round that sees no new job plans as usual (an idle batcher sleeps).
      // Real time only: with a manual clock a timer stays a batch delay or a deadline, as
      // `manual_clock::await_timers` promises tests, and a wake-up costs nothing to speak of.
      time_point wake_at = std::min(forming_.due(), forming_.earliest_deadline());
      const std::uint64_t arrivals = forming_.arrivals();
      if (arrivals != arrivals_seen_ && clock_.real_time() && forming_.delay().count() > 0)
        wake_at = std::min(wake_at, saturating_add(now_time, forming_.delay()));
      arrivals_seen_ = arrivals;
      clock_.plan(wake_at);
    }
    jobs_left_ = leaving.size;
    leaving.for_each([&](Node* job) {
      if (cancelling) {
        host_.end_job(job, make_error<batcher_closed>([] {
                        return "microbatch::Batcher: shutdown(Shutdown::cancel) began before the job was processed";
                      }),
                      failure::other);
      } else {
        host_.end_job(job, expired_error(), failure::expired); // a cancelled job is only abandoned
      }
    });
    if (finished) {
      clock_.flushed(requests.flush_ticket, true);
      return next_round::finished;
    }
    if (requests.flush_ticket > flushes_served_) {
      flushes_served_ = requests.flush_ticket;
      clock_.flushed(flushes_served_);
    }
    // A job published after the plan was visible sees it and wakes the collector if it must. One
    // published during this round, after its pass took the inbox, may have been judged by the older
    // plan, which this round may have moved later (the inbox is closed once stopping):
    //  - for its deadline, if any job with a deadline came meanwhile, another round takes it now;
    //  - for the delay of a batch it may start, the plan is at most this round's start plus the delay
    //    (its arrival is later, unless its thread stalled between stamping and publishing it).
    // Going round again for every such job would chase busy submitters: the rounds would fight them
    // for the forming batch's mutex (in W1co, the worker slept on it several times per 100 batches).
    if (!stopping && !forming_.inbox_empty()) {
      // (With a manual clock, always again: a test's `await_timers` then means the jobs were taken.)
      if (!clock_.real_time() || forming_.deadline_pushes() != deadline_pushes) return next_round::again;
      const std::chrono::nanoseconds delay = forming_.delay();
      if (delay.count() > 0) clock_.lower_plan(saturating_add(now_time, delay));
    }
    if (clock_.planned() <= now_time) return next_round::again; // already due (a job taken late in this round)
    return next_round::planned;
  }

  /// Jobs that the last round took out of the queue (expired, cancelled, or failed by shutdown).
  [[nodiscard]] std::size_t jobs_left() const noexcept {
    return jobs_left_;
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  using batch = job_list<Node>;

  /// (forming mutex held) Takes expired and cancelled jobs out of the forming batch and the queued
  /// batches into `leaving`; records the earliest deadline left.
  void expire(time_point now_time, batch& leaving) {
    time_point earliest = time_point::max();
    auto leaves = [&](Node* job) {
      if (job->claimed() || job->deadline <= now_time) return true;
      earliest = std::min(earliest, job->deadline);
      return false;
    };
    forming_.remove_if(leaves, leaving);
    ready_.remove_if(leaves, leaving);
    forming_.set_earliest_deadline(earliest);
    forming_.take_arrivals(now_time, [&](batch full) { host_.dispatch(full, full.trigger); }); // re-arms
  }

  Host& host_;
  batch_forming<Node>& forming_;
  ready_queue<Node>& ready_;
  collector_clock& clock_;
  std::atomic<bool> sweep_requested_{false};
  std::uint64_t flushes_served_ = 0; // only the round touches these (one round at a time)
  std::uint64_t arrivals_seen_ = 0;  // jobs counted when the last round planned
  std::size_t jobs_left_ = 0;        // leaving.size of the last round
};

} // namespace microbatch::detail
