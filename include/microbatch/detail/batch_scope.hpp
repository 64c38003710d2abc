// microbatch::detail::batch_scope: what a thread running one batch saves up until the batch is over.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <cstdint>
#include <utility>

namespace microbatch::detail {

/// The scope of one batch on the thread that runs it (a worker, or a caller that borrowed a processor
/// slot). Instead of one atomic operation per job, that thread saves up, for the batcher it runs the
/// batch for:
///  - the slots of the callback nodes it ends, given back to the pool together at the end (submitters
///    on another core would otherwise fight over the pool's head for each: W2cb);
///  - the count of its own `enqueue` calls that returned (the coroutines it resumes and the callbacks
///    it runs submit the next jobs on this thread: W1co, W4co), added to the batcher's count once.
/// Any other thread, and this one for another batcher's jobs, gives slots back and counts at once.
///
/// Scopes nest (a callback may run another batcher's batch): only the innermost saves. The batcher
/// must read what a scope adds only after the scope ended; `shutdown` reads the returned enqueues
/// after every worker was joined and every borrowed slot given back. One thread only.
template <class SlotPool> class batch_scope {
public:
  struct savings {
    const SlotPool* owner; // the batcher's callback slot pool: one per batcher, and typed
    typename SlotPool::gathered slots;
    std::uint64_t enqueues_returned = 0;
  };

  /// A batch of the batcher that owns `slots` (its callback slot pool) and `enqueues_returned`.
  batch_scope(SlotPool& slots, std::atomic<std::uint64_t>& enqueues_returned) noexcept
      : slots_(slots), enqueues_returned_(enqueues_returned), mine_{&slots, {}},
        previous_(std::exchange(current(), &mine_)) {}
  batch_scope(const batch_scope&) = delete;
  batch_scope& operator=(const batch_scope&) = delete;
  ~batch_scope() {
    current() = previous_;
    slots_.release_gathered(mine_.slots);
    if (mine_.enqueues_returned != 0) enqueues_returned_.fetch_add(mine_.enqueues_returned, std::memory_order_release);
  }

  /// This thread's savings if it is running a batch of the batcher whose callback slot pool is `owner`
  /// (innermost scope only), else null. Keyed by the pool, not the batcher: two live pools never share
  /// an address, while a batcher could share one with a member of another.
  [[nodiscard]] static savings* of_thread(const SlotPool* owner) noexcept {
    savings* running = current();
    return running != nullptr && running->owner == owner ? running : nullptr;
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  static savings*& current() noexcept {
    thread_local savings* running = nullptr;
    return running;
  }

  SlotPool& slots_;
  std::atomic<std::uint64_t>& enqueues_returned_;
  savings mine_;
  savings* previous_;
};

} // namespace microbatch::detail
