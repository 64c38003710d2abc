// microbatch::detail::completion_flag: a one-shot "done" signal whose signaller never touches the
// flag's memory after the waiter may have seen it set.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <cstdint>
#include <thread> // IWYU pragma: keep (non-Linux fallback)

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace microbatch::detail {

/// Lives in the waiter's frame (execute_job keeps its job node on its own stack). The problem it solves:
/// with `std::atomic::notify_one` the signaller calls a member of an object that the waiter may already
/// have destroyed (it can see the value change before the notify). Here the signaller's last access is
/// one atomic exchange; on Linux the wake-up afterwards passes only the address to the kernel (a futex
/// wake on memory that was reused is a harmless spurious wake-up, which futex waiters tolerate).
/// Elsewhere the signaller finishes with a second store that the waiter spins for.
///
/// One thread calls `wait`, and one thread calls `signal`, once (it may be the waiter itself, before it
/// waits: a caller that ran its own batch).
class completion_flag {
public:
  /// Marks done and wakes the waiter. After it returns the flag may be gone. Never blocks.
  void signal() noexcept {
#if defined(__linux__)
    if (state_.exchange(done, std::memory_order_acq_rel) == sleeping) {
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&state_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    }
#else
    state_.store(signalling, std::memory_order_release);
    state_.notify_one();
    state_.store(done, std::memory_order_release);
#endif
  }

  /// Blocks until `signal` was called. No spinning before sleeping: with many more waiting callers than
  /// cores (the closed-loop benchmark W1 with 64 producers on 2 cores) spinning only takes the CPU away
  /// from the worker that would signal (measured there: 111k jobs/s with a 256-pause spin, 166k without).
  void wait() noexcept {
#if defined(__linux__)
    for (;;) {
      std::uint32_t seen = awake;
      if (state_.compare_exchange_strong(seen, sleeping, std::memory_order_acq_rel) || seen == sleeping) {
        ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&state_), FUTEX_WAIT_PRIVATE, sleeping, nullptr, nullptr,
                  0);
      }
      if (state_.load(std::memory_order_acquire) == done) return;
    }
#else
    state_.wait(awake, std::memory_order_acquire);
    while (state_.load(std::memory_order_acquire) != done)
      std::this_thread::yield();
#endif
  }

  /// True once `signal` was called (and, off Linux, has finished). Never blocks.
  [[nodiscard]] bool is_done() const noexcept {
    return state_.load(std::memory_order_acquire) == done;
  }

private:
  static constexpr std::uint32_t awake = 0;    // not done; the waiter is not asleep
  static constexpr std::uint32_t sleeping = 1; // not done; the waiter is (about to be) in futex wait
  static constexpr std::uint32_t done = 2;
  [[maybe_unused]] static constexpr std::uint32_t signalling = 3; // non-Linux: notify in progress

  std::atomic<std::uint32_t> state_{awake};
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
};

} // namespace microbatch::detail
