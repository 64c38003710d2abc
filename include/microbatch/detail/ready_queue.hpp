// microbatch::detail::ready_queue: formed batches waiting for a worker, and where idle workers sleep.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <type_traits>

#include "batch_queue.hpp"

namespace microbatch::detail {

/// Who takes the batches of a batcher on a `WorkerPool`: the pool, told whenever a batch can be taken.
class ready_listener {
public:
  /// A queued batch can be taken now (a slot is free). Called with no lock of the queue held.
  virtual void batch_ready() noexcept = 0;
  /// Pool threads asleep now (for dispatch when idle). Lock-free.
  [[nodiscard]] virtual std::size_t idle_threads() const noexcept = 0;

protected:
  ~ready_listener() = default;
};

/// Batches that are formed and not yet taken by a worker, first in first out, plus the workers' one
/// wake-up path. A worker that finishes a batch takes the next one without sleeping if there is one;
/// `push` wakes a worker only if one is asleep (a signal to a thread that is not asleep costs nothing,
/// not even a system call).
///
/// Processor slots: at most `slots` workers (and borrowing callers) hold a batch at once
/// (`Options::max_concurrent_batches`, which `set_slots` changes while running: a worker beyond the new number finishes
/// its batch, and then only as many as there are slots take the next ones). A worker tells `pop` when it comes back
/// from a batch (`returning`), so counting costs no extra lock.
///
/// A caller that would otherwise block for its job (dispatch when idle) may borrow a free slot and run
/// a batch on its own thread: `try_borrow_slot`, then `return_slot` when the processor returned, then
/// `end_borrow` as its last touch of the batcher; shutdown waits for that (`await_borrows`).
///
/// On a pool (`serve_by`) the batcher has no workers of its own: the pool is told when a batch can be
/// taken (`batch_ready`), its threads take one with `try_take` and give the slot back with
/// `give_back_slot`; shutdown waits with `await_drained` until nothing runs.
///
/// Threads: `push` from whichever thread formed the batch (a submitter that filled it, a flusher, the
/// collector); `pop` from worker threads; `remove_if`, `take_all`, `finish` and `hold` from the
/// collector and shutdown; `set_slots` from a reconfiguring thread; the borrowing members from callers.
/// All members are thread-safe. Lock order: the forming batch's mutex before this one (a forming pass
/// pushes while holding it).
template <class Node> class ready_queue {
public:
  explicit ready_queue(std::size_t slots = 1) : slots_(slots) {}

  /// The batches are taken by a pool's threads, which `listener` stands for. Before any batch.
  void serve_by(ready_listener* listener) noexcept { listener_ = listener; }

  /// A new number of processor slots. More: sleeping workers look again at once.
  void set_slots(std::size_t slots) {
    bool takeable = false;
    {
      std::lock_guard lock(mutex_);
      slots_ = slots;
      takeable = can_take();
    }
    changed_.notify_all();
    if (takeable && listener_ != nullptr) listener_->batch_ready();
  }

  /// Queues `batch` (not empty) and wakes one sleeping worker, if any (on a pool: tells the pool).
  void push(job_list<Node> batch) {
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      batches_.push(batch);
      ++queued_;
      wake = listener_ != nullptr ? can_take() : sleeping_ != 0;
    }
    if (!wake) return;
    if (listener_ != nullptr) {
      listener_->batch_ready();
    } else {
      changed_.notify_one();
    }
  }

  /// (a pool thread) Takes the next batch into `batch` if one is queued and a slot is free, holding
  /// that slot until `give_back_slot`; tells the pool again if another can be taken too. `now_empty`:
  /// this took the last queued batch.
  bool try_take(job_list<Node>& batch, bool& now_empty) {
    bool more = false;
    {
      std::lock_guard lock(mutex_);
      if (!can_take()) return false;
      batch = batches_.pop();
      --queued_;
      ++running_;
      now_empty = batches_.empty();
      more = can_take();
    }
    if (more) listener_->batch_ready();
    batch.measure(); // the batch is this thread's now: walked outside the lock
    return true;
  }

  /// (a pool thread) The slot `try_take` gave is free again.
  void give_back_slot() {
    bool takeable = false;
    {
      std::lock_guard lock(mutex_);
      --running_;
      takeable = can_take();
      if (finished_ && running_ == 0) drained_.notify_all();
    }
    if (takeable) listener_->batch_ready();
  }

  /// (shutdown, on a pool) Waits until `finish` was called and no slot is held.
  void await_drained() {
    std::unique_lock lock(mutex_);
    drained_.wait(lock, [&] { return finished_ && running_ == 0; });
  }

  /// What `pop` gives a worker.
  enum class taken {
    batch,     ///< a batch, in `batch`
    form_idle, ///< nothing queued but jobs are waiting: the worker is idle, so it forms a batch itself
    finished,  ///< `finish` was called and nothing is left: the worker exits
  };

  /// Waits for a batch and a free slot and takes the batch into `batch`; `returning`: the caller comes
  /// back from a batch (its slot is free again). `now_empty` says whether this pop emptied the queue
  /// (shutdown waits for that). Waits while `hold` is in force. With `jobs_waiting` (dispatch when
  /// idle), a worker about to sleep with a slot free first counts itself idle, then asks
  /// `jobs_waiting()`: if jobs wait it returns `form_idle` (holding a slot) instead of sleeping. A
  /// submitter that publishes a job and then finds a worker idle (`idle()`) dispatches for it; in
  /// sequentially consistent order one of the two sees the other, so a job never waits while a slot
  /// sleeps. A `form_idle` worker that finds nothing to run gives its slot back with `returning`.
  template <class JobsWaiting>
  taken pop(job_list<Node>& batch, bool& now_empty, bool returning, JobsWaiting&& jobs_waiting) {
    std::unique_lock lock(mutex_);
    if (returning) --running_;
    for (;;) {
      const bool slot_free = running_ < slots_;
      if (!held_ && !batches_.empty() && slot_free) {
        batch = batches_.pop();
        --queued_;
        ++running_;
        now_empty = batches_.empty();
        lock.unlock();
        batch.measure(); // the batch is this worker's now: walked outside the lock
        return taken::batch;
      }
      // Finished: exit once nothing is left for this worker (with no slot free, the workers holding
      // the slots come back for what is queued).
      if (finished_ && (batches_.empty() || held_ || !slot_free)) return taken::finished;
      bool idle_counted = false;
      if constexpr (!std::is_same_v<std::decay_t<JobsWaiting>, std::nullptr_t>) {
        if (!held_ && slot_free) {
          idle_.fetch_add(1, std::memory_order_seq_cst);
          idle_counted = true;
          lock.unlock();
          const bool waiting = jobs_waiting(); // takes the forming batch's mutex: not under ours
          lock.lock();
          if (waiting || !batches_.empty() || finished_ || running_ >= slots_) {
            idle_.fetch_sub(1, std::memory_order_seq_cst);
            if (waiting && !held_ && batches_.empty() && !finished_ && running_ < slots_) {
              ++running_;
              return taken::form_idle;
            }
            continue;
          }
        }
      }
      ++sleeping_;
      if (!idle_counted) ++sleeping_uncounted_;
      changed_.wait(lock);
      --sleeping_;
      if (!idle_counted) --sleeping_uncounted_;
      if (idle_counted) idle_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  /// A caller takes a free slot to run a batch itself, unless a queued batch waits for that slot (or
  /// workers are held, or finished). True: the slot is the caller's until `return_slot`.
  bool try_borrow_slot() {
    std::lock_guard lock(mutex_);
    if (held_ || finished_ || !batches_.empty() || running_ >= slots_) return false;
    ++running_;
    ++borrowed_;
    return true;
  }

  /// The borrowed slot is free again. A worker that went to sleep while it was taken (a queued batch
  /// came, or the worker could not count itself idle) is woken to look again, as a worker coming back
  /// from a batch would look itself.
  void return_slot() {
    bool wake = false, wake_all = false, takeable = false;
    {
      std::lock_guard lock(mutex_);
      --running_;
      takeable = listener_ != nullptr && can_take();
      if (finished_ && running_ == 0) drained_.notify_all();
      // Every uncounted sleeper: notify_one might pick a counted one again and again.
      wake_all = sleeping_uncounted_ != 0;
      wake = sleeping_ != 0 && !batches_.empty();
    }
    if (wake_all) {
      changed_.notify_all();
    } else if (wake) {
      changed_.notify_one();
    }
    if (takeable) listener_->batch_ready();
  }

  /// The borrowing caller's last touch of the batcher (after `return_slot`).
  void end_borrow() {
    std::lock_guard lock(mutex_); // notified under the lock: shutdown may destroy us once it is released
    if (--borrowed_ == 0) borrows_ended_.notify_all();
  }

  /// Waits until no caller holds or still uses a borrowed slot (shutdown).
  void await_borrows() {
    std::unique_lock lock(mutex_);
    borrows_ended_.wait(lock, [&] { return borrowed_ == 0; });
  }

  /// `pop` without dispatch when idle: true with a batch, false once finished.
  bool pop(job_list<Node>& batch, bool& now_empty, bool returning = false) {
    return pop(batch, now_empty, returning, nullptr) == taken::batch;
  }

  /// Workers idle now (dispatch when idle only; on a pool: its threads asleep). Lock-free.
  [[nodiscard]] std::size_t idle() const noexcept {
    return listener_ != nullptr ? listener_->idle_threads() : idle_.load(std::memory_order_seq_cst);
  }

  /// Idle workers with a free slot that no queued batch will occupy: how many batches may go out for
  /// idleness now.
  [[nodiscard]] std::size_t idle_capacity() const {
    std::lock_guard lock(mutex_);
    const std::size_t free_slots = running_ < slots_ ? slots_ - running_ : 0;
    const std::size_t idle_workers = std::min(idle(), free_slots);
    return idle_workers > queued_ ? idle_workers - queued_ : 0;
  }

  [[nodiscard]] bool empty() const {
    std::lock_guard lock(mutex_);
    return batches_.empty();
  }

  /// Unlinks, from every queued batch, the jobs for which `leaves(job)` is true (into `removed`);
  /// batches left empty leave the queue.
  template <class Leaves> void remove_if(Leaves&& leaves, job_list<Node>& removed) {
    std::lock_guard lock(mutex_);
    batches_.remove_if(leaves, removed);
    queued_ = batches_.count();
  }

  /// Workers stop taking batches until `finish` (Shutdown::cancel: what is queued is failed instead).
  void hold() {
    std::lock_guard lock(mutex_);
    held_ = true;
  }

  /// No more batches will come: workers exit once the queue is empty (or at once, if held).
  void finish() {
    {
      std::lock_guard lock(mutex_);
      finished_ = true;
      if (running_ == 0) drained_.notify_all();
    }
    changed_.notify_all();
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  /// (mutex_ held) A queued batch may be taken now.
  [[nodiscard]] bool can_take() const noexcept { return !held_ && !batches_.empty() && running_ < slots_; }

  ready_listener* listener_ = nullptr; // set before any batch, then only read
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  batch_queue<Node> batches_;                    // guarded by mutex_
  std::size_t queued_ = 0;                       // guarded by mutex_; batches in batches_
  alignas(64) std::atomic<std::size_t> idle_{0}; // workers counted idle by pop (dispatch when idle)
  std::size_t sleeping_ = 0;                     // guarded by mutex_; workers inside changed_.wait
  std::size_t sleeping_uncounted_ = 0;           // guarded by mutex_; of those, not counted in idle_
  std::size_t borrowed_ = 0;                     // guarded by mutex_; callers between borrow and end_borrow
  std::condition_variable borrows_ended_;        // borrowed_ fell to 0
  std::condition_variable drained_;              // finished_ and no slot held (on a pool)
  std::size_t slots_;                            // guarded by mutex_; Options::max_concurrent_batches
  std::size_t running_ = 0;                      // guarded by mutex_; slots held by workers and borrowers
  bool held_ = false;                            // guarded by mutex_
  bool finished_ = false;                        // guarded by mutex_
};

} // namespace microbatch::detail
