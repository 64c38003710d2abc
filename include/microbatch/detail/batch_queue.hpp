// microbatch::detail: batches as intrusive lists of job nodes, and the queue of formed batches.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>

#include "../options.hpp"

namespace microbatch::detail {

/// A batch: job nodes linked through their `next` member, oldest first. Holds no memory of its own,
/// so forming, queueing and handing over batches never allocates. Not thread-safe: its owner guards it.
template <class Node> struct job_list {
  Node* first = nullptr;
  Node* last = nullptr;
  std::size_t size = 0;
  Trigger trigger = Trigger::size; // why the batch was dispatched (once it is one)

  [[nodiscard]] bool empty() const noexcept { return size == 0; }

  void push_back(Node* node) noexcept {
    node->next = nullptr;
    if (last != nullptr) {
      last->next = node;
    } else {
      first = node;
    }
    last = node;
    ++size;
  }

  /// Moves every node of `other` to the end of this list, leaving `other` empty.
  void append(job_list other) noexcept {
    if (other.empty()) return;
    if (last != nullptr) {
      last->next = other.first;
    } else {
      first = other.first;
    }
    last = other.last;
    size += other.size;
  }

  /// Unlinks, in order, the nodes for which `remove(node)` is true, appending them to `removed`.
  template <class Remove> void remove_if(Remove&& remove, job_list& removed) noexcept {
    job_list kept;
    kept.trigger = trigger;
    for (Node* node = first; node != nullptr;) {
      Node* next = node->next;
      if (remove(node)) {
        removed.push_back(node);
      } else {
        kept.push_back(node);
      }
      node = next;
    }
    *this = kept;
  }

  /// Calls `visit(node)` on every node, reading each `next` before the visit (which may end the job).
  template <class Visit> void for_each(Visit&& visit) {
    for (Node* node = first; node != nullptr;) {
      Node* next = node->next;
      visit(node);
      node = next;
    }
  }
};

/// The formed batches waiting for a worker, first in first out. Each batch is a job_list; the queue
/// links them through `Node::next_batch` and keeps the batch's `last`, `size` and `trigger` in its
/// first node (`batch_last`, `batch_size`, `batch_trigger`), so it needs no memory of its own. The
/// first node's `arrival` holds the batch's start (its oldest job's arrival) and moves with it. Not thread-safe: its
/// owner guards it.
template <class Node> class batch_queue {
public:
  [[nodiscard]] bool empty() const noexcept { return head_ == nullptr; }

  /// Batches queued (walks the queue).
  [[nodiscard]] std::size_t count() const noexcept {
    std::size_t batches = 0;
    for (Node* first = head_; first != nullptr; first = first->next_batch)
      ++batches;
    return batches;
  }

  void push(job_list<Node> batch) noexcept {
    Node* first = batch.first;
    first->next_batch = nullptr;
    first->batch_last = batch.last;
    first->batch_size = batch.size;
    first->batch_trigger = batch.trigger;
    if (tail_ != nullptr) {
      tail_->next_batch = first;
    } else {
      head_ = first;
    }
    tail_ = first;
  }

  job_list<Node> pop() noexcept {
    Node* first = head_;
    head_ = first->next_batch;
    if (head_ == nullptr) tail_ = nullptr;
    return {first, first->batch_last, first->batch_size, first->batch_trigger};
  }

  /// Applies `job_list::remove_if` to every batch; batches left empty leave the queue.
  template <class Remove> void remove_if(Remove&& remove, job_list<Node>& removed) noexcept {
    Node** link = &head_;
    Node* previous_first = nullptr;
    while (*link != nullptr) {
      Node* first = *link;
      Node* next_batch = first->next_batch;
      job_list<Node> batch{first, first->batch_last, first->batch_size, first->batch_trigger};
      const auto started = first->arrival; // the batch's start, kept in its first node
      batch.remove_if(remove, removed);
      if (batch.empty()) {
        *link = next_batch;
        continue;
      }
      batch.first->next_batch = next_batch;
      batch.first->batch_last = batch.last;
      batch.first->batch_size = batch.size;
      batch.first->batch_trigger = batch.trigger;
      batch.first->arrival = started;
      *link = batch.first;
      previous_first = batch.first;
      link = &batch.first->next_batch;
    }
    tail_ = previous_first;
  }

private:
  Node* head_ = nullptr;
  Node* tail_ = nullptr; // first node of the newest batch
};

} // namespace microbatch::detail
