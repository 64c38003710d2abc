// microbatch::detail::admission: whether a job may enter the batcher (open/closed, max_pending_jobs).
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <version>

#if defined(__cpp_lib_jthread)
#include <stop_token>
#endif

#include "../errors.hpp"
#include "../options.hpp"

namespace microbatch::detail {

/// Stands in for a stop token where the caller has none (and where the standard library has no
/// `std::stop_token`): never stops.
struct never_stops {
  [[nodiscard]] static constexpr bool stop_requested() noexcept { return false; }
};

/// The gate in front of the batcher. It knows two things: whether the batcher still accepts jobs
/// (`close` ends that for good), and how many accepted jobs have not ended yet, against
/// `Options::max_pending_jobs` (0 = unbounded: then it neither counts nor blocks).
///
/// The bound may change at any time (`set_limit`). A job counts against the bound only if `reserve`
/// said it took a place (true); its `release` passes that answer back, so a job accepted while
/// unbounded never gives back a place it did not take, whatever the bound is by then.
///
/// Threads: `reserve` runs on submitting threads, `release` on whichever thread ends a job, `close` on
/// the thread that begins shutdown, `set_limit` on a reconfiguring thread. All members are thread-safe.
class admission {
public:
  admission(std::size_t max_pending_jobs, Overflow overflow) : max_pending_(max_pending_jobs), overflow_(overflow) {}

  /// A new bound and overflow policy, for the jobs submitted from now on; blocked submitters look again.
  void set_limit(std::size_t max_pending_jobs, Overflow overflow) {
    overflow_.store(overflow, std::memory_order_relaxed);
    max_pending_.store(max_pending_jobs, std::memory_order_seq_cst);
    { std::lock_guard lock(mutex_); } // a blocked submitter is either before its check or waiting
    room_.notify_all();
  }
  admission(const admission&) = delete;
  admission& operator=(const admission&) = delete;

  /// Throws `batcher_closed` once `close` was called. Never blocks.
  void throw_if_closed() const {
    if (closed_.load(std::memory_order_acquire)) [[unlikely]]
      throw_closed();
  }

  [[nodiscard]] bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }

  /// Takes one of the `max_pending_jobs` places, as `Overflow` says: `reject` throws `queue_full` (and
  /// counts it in `rejected`); `block` waits for room, and ends with `batcher_closed` if shutdown begins
  /// or `cancelled` if `stop` is requested meanwhile. `beyond_bound_allowed` (a submit from one of the
  /// batcher's own threads, which alone could make room) takes a place beyond the bound instead of
  /// waiting. Returns whether a place was taken (false: unbounded); pass it to `release`. Thread-safe.
  template <class StopToken = never_stops>
  [[nodiscard]] bool reserve(std::atomic<std::uint64_t>& rejected, bool beyond_bound_allowed,
                             const StopToken& stop = {}) {
    // Unbounded, the common case, is one load here on the submit path; the rest stays out of line.
    if (max_pending_.load(std::memory_order_relaxed) == 0) return false;
    return reserve_bounded(rejected, beyond_bound_allowed, stop);
  }

  /// Gives back the place of a job that ended (or was not accepted after all), if `reserve` took one
  /// (`counted`). Wakes blocked submitters only when there are any. Never blocks for long. Thread-safe.
  void release(bool counted) noexcept {
    if (!counted) return;
    pending_.fetch_sub(1, std::memory_order_seq_cst);
    if (blocked_.load(std::memory_order_seq_cst) != 0) {
      { std::lock_guard lock(mutex_); } // a blocked submitter is either before its check or waiting
      room_.notify_all();
    }
  }

  /// Stops accepting jobs for good and releases every blocked submitter (with `batcher_closed`).
  /// Idempotent. Thread-safe.
  void close() noexcept {
    closed_.store(true, std::memory_order_release);
    { std::lock_guard lock(mutex_); }
    room_.notify_all();
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  enum class place { counted, uncounted, none };

  [[noreturn, gnu::noinline, gnu::cold]] static void throw_closed() {
    throw batcher_closed("microbatch::Batcher: the batcher is shut down; no new jobs are accepted");
  }

  template <class StopToken>
  [[gnu::noinline]] bool reserve_bounded(std::atomic<std::uint64_t>& rejected, bool beyond_bound_allowed,
                                         const StopToken& stop) {
    const std::size_t bound = max_pending_.load(std::memory_order_relaxed);
    if (bound == 0) return false; // lifted meanwhile
    if (const place taken = try_take(); taken != place::none) return taken == place::counted;
    if (overflow_.load(std::memory_order_relaxed) == Overflow::reject) {
      rejected.fetch_add(1, std::memory_order_relaxed);
      throw queue_full("microbatch::Batcher::submit: max_pending_jobs (" + std::to_string(bound) +
                       ") jobs are pending");
    }
    if (beyond_bound_allowed) {
      pending_.fetch_add(1, std::memory_order_seq_cst);
      return true;
    }
    return wait_for_room(stop);
  }

  template <class StopToken> bool wait_for_room(const StopToken& stop) {
    std::unique_lock lock(mutex_);
    blocked_.fetch_add(1, std::memory_order_seq_cst);
    struct unblock {
      std::atomic<std::size_t>& count;
      ~unblock() { count.fetch_sub(1, std::memory_order_relaxed); }
    } unblock_on_exit{blocked_};
    auto room_or_closed = [&] {
      const std::size_t bound = max_pending_.load(std::memory_order_seq_cst);
      return closed_.load(std::memory_order_acquire) || bound == 0 || pending_.load(std::memory_order_seq_cst) < bound;
    };
    for (;;) {
      if (closed_.load(std::memory_order_acquire))
        throw batcher_closed("microbatch::Batcher::submit: shutdown began while waiting for room (max_pending_jobs)");
      if (const place taken = try_take(); taken != place::none) return taken == place::counted;
#if defined(__cpp_lib_jthread)
      if constexpr (std::is_same_v<StopToken, std::stop_token>) {
        if (!room_.wait(lock, stop, room_or_closed))
          throw cancelled(
              "microbatch::Batcher::execute_job: stop was requested while waiting for room (max_pending_jobs)");
        continue;
      }
#endif
      (void)stop;
      room_.wait(lock, room_or_closed);
    }
  }

  place try_take() noexcept {
    std::size_t pending = pending_.load(std::memory_order_relaxed);
    for (;;) {
      const std::size_t bound = max_pending_.load(std::memory_order_seq_cst);
      if (bound == 0) return place::uncounted; // the bound was lifted meanwhile
      if (pending >= bound) return place::none;
      if (pending_.compare_exchange_weak(pending, pending + 1, std::memory_order_seq_cst)) return place::counted;
    }
  }

  std::atomic<std::size_t> max_pending_;
  std::atomic<Overflow> overflow_;
  std::atomic<bool> closed_{false};
  alignas(64) std::atomic<std::size_t> pending_{0}; // places taken by jobs that have not ended
  std::atomic<std::size_t> blocked_{0};             // submitters inside wait_for_room
  std::mutex mutex_;                                // pairs room_ with the checks above
  std::condition_variable_any room_;
};

} // namespace microbatch::detail
