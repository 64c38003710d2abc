// microbatch::detail::ready_queue: formed batches waiting for a worker, and where idle workers sleep.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>

#include "batch_queue.hpp"

namespace microbatch::detail {

/// Batches that are formed and not yet taken by a worker, first in first out, plus the workers' one
/// wake-up path. A worker that finishes a batch takes the next one without sleeping if there is one;
/// `push` wakes a worker only if one is asleep (a signal to a thread that is not asleep costs nothing,
/// not even a system call).
///
/// Threads: `push` from whichever thread formed the batch (a submitter that filled it, a flusher, the
/// collector); `pop` from worker threads; `remove_if`, `take_all`, `finish` and `hold` from the
/// collector and shutdown. All members are thread-safe. Lock order: the forming batch's mutex before
/// this one (a forming pass pushes while holding it).
template <class Node> class ready_queue {
public:
  /// Queues `batch` (not empty) and wakes one sleeping worker, if any.
  void push(job_list<Node> batch) {
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      batches_.push(batch);
      wake = sleeping_ != 0;
    }
    if (wake) changed_.notify_one();
  }

  /// Waits for a batch and takes it into `batch`. False once `finish` was called and nothing is left
  /// (the worker then exits). Also waits while `hold` is in force. `now_empty` says whether this pop
  /// emptied the queue (shutdown waits for that).
  bool pop(job_list<Node>& batch, bool& now_empty) {
    std::unique_lock lock(mutex_);
    while (held_ || batches_.empty()) {
      if (finished_ && (held_ || batches_.empty())) return false;
      ++sleeping_;
      changed_.wait(lock);
      --sleeping_;
    }
    batch = batches_.pop();
    now_empty = batches_.empty();
    return true;
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
    }
    changed_.notify_all();
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  batch_queue<Node> batches_; // guarded by mutex_
  std::size_t sleeping_ = 0;  // guarded by mutex_; workers inside changed_.wait
  bool held_ = false;         // guarded by mutex_
  bool finished_ = false;     // guarded by mutex_
};

} // namespace microbatch::detail
