// microbatch::detail::batcher_parts: what the queues of one batcher share.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <version>

#if defined(__cpp_lib_jthread)
#include <stop_token>
#endif

#include "../options.hpp"
#include "admission.hpp"
#include "batch_runner.hpp"
#include "batch_scope.hpp"
#include "counters.hpp"
#include "job_node.hpp"
#include "slot_pool.hpp"

namespace microbatch::detail {

/// The parts of a batcher that do not belong to one queue of jobs: the gate of `max_pending_jobs`, the
/// counters behind `stats()`, the slots of callback submits' nodes, and the runners that the threads
/// run batches with. A `Batcher` owns its own; the per-key queues of a `KeyedBatcher` all use the
/// keyed batcher's, so a key costs only its queue. Every member is thread-safe.
template <class Job, class Result> struct batcher_parts {
  using callback_node_type = callback_node<Job, Result>;
  using callback_pool = slot_pool<sizeof(callback_node_type), alignof(callback_node_type)>;
  using batch_scope = detail::batch_scope<callback_pool>;

  batcher_parts(std::size_t max_pending_jobs, Overflow overflow) : admission_gate(max_pending_jobs, overflow) {}
  batcher_parts(const batcher_parts&) = delete;
  batcher_parts& operator=(const batcher_parts&) = delete;

  /// Where a callback node of these parts' queues ends: its slot goes back (gathered while a thread
  /// runs a batch of these queues), an exception from its callback is counted.
  struct home final : callback_node_type::home {
    explicit home(batcher_parts& owner) noexcept : parts(owner) {}
    batcher_parts& parts;
    void callback_threw() noexcept override { parts.counts.callback_threw(); }
    void recycle(void* memory, bool pooled) noexcept override {
      if (auto* running = batch_scope::of_thread(&parts.callback_slots)) {
        parts.callback_slots.gather({memory, pooled}, running->slots);
      } else {
        parts.callback_slots.release({memory, pooled});
      }
    }
  };

  admission admission_gate;
  counters counts;
  callback_pool callback_slots; // the batcher owns callback submits' nodes; callers keep nothing
  home callback_home{*this};
  runner_pool<Job, Result> runners; // one per worker, and per borrowed slot or pool thread in a batch
};

/// Picks the constructor of a `Batcher` that is one key's queue of a `KeyedBatcher`.
struct key_queue_tag {};

/// What a queue of a `KeyedBatcher` (one key's `Batcher`) tells its owner: a job comes (it may take
/// the key's place, `max_pending_jobs_per_key`), a job that came was not accepted after all, jobs left
/// the queue, the pool is done with it. Called on the submitting thread, or whichever thread ran the
/// batch or the clock round.
class queue_watch {
public:
  /// A job is about to be admitted: takes its place for the key (throws like `admission::reserve`).
  virtual void admit(bool beyond_bound) = 0;
#if defined(__cpp_lib_jthread)
  virtual void admit(bool beyond_bound, const std::stop_token& stop) = 0;
#endif
  /// The job `admit` took a place for was not accepted (a later check threw).
  virtual void refused() noexcept = 0;
  /// `jobs` left the queue: processed, or failed or dropped by the clock.
  virtual void left(std::size_t jobs) noexcept = 0;
  /// After the queue was retired from its pool: no pool thread is inside it any more.
  virtual void destroy() noexcept = 0;
  /// A pool thread is about to take one of the queue's batches: false if the keyed batcher's cap
  /// (`max_concurrent_batches`, all keys together) is reached; it readies the queue again later.
  virtual bool take_slot() noexcept = 0;
  /// The batch `take_slot` allowed is over.
  virtual void give_slot() noexcept = 0;

protected:
  ~queue_watch() = default;
};

} // namespace microbatch::detail
