// microbatch::detail: batches as intrusive lists of job nodes, and the queue of formed batches.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <cstdint>

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

  /// Sets `last` and `size` by walking from `first`: a batch that `batch_queue::pop` hands over
  /// carries only its first node (its owner measures it outside the queue's lock).
  void measure() noexcept {
    last = nullptr;
    size = 0;
    for (Node* node = first; node != nullptr; node = node->next) {
      last = node;
      ++size;
    }
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
/// links them through `Node::next_batch` and keeps the batch's `trigger` in its first node
/// (`batch_trigger`), so it needs no memory of its own. It does not keep `last` and `size`: every node
/// would carry two more fields for them, while the worker that takes a batch walks it anyway
/// (`job_list::measure`, after `pop`). The first node's `arrival` holds the batch's start (its oldest
/// job's arrival) and moves with it. Not thread-safe: its owner guards it.
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
    first->batch_trigger = static_cast<std::uint8_t>(batch.trigger);
    if (tail_ != nullptr) {
      tail_->next_batch = first;
    } else {
      head_ = first;
    }
    tail_ = first;
  }

  /// The oldest batch: its `first` and `trigger` only; `measure` it before use.
  job_list<Node> pop() noexcept {
    Node* first = head_;
    head_ = first->next_batch;
    if (head_ == nullptr) tail_ = nullptr;
    return {first, nullptr, 0, static_cast<Trigger>(first->batch_trigger)};
  }

  /// Applies `job_list::remove_if` to every batch; batches left empty leave the queue.
  template <class Remove> void remove_if(Remove&& remove, job_list<Node>& removed) noexcept {
    Node** link = &head_;
    Node* previous_first = nullptr;
    while (*link != nullptr) {
      Node* first = *link;
      Node* next_batch = first->next_batch;
      // remove_if needs only `first`: last and size are rebuilt as it goes
      job_list<Node> batch{first, nullptr, 0, static_cast<Trigger>(first->batch_trigger)};
      const auto started = first->arrival; // the batch's start, kept in its first node
      batch.remove_if(remove, removed);
      if (batch.empty()) {
        *link = next_batch;
        continue;
      }
      batch.first->next_batch = next_batch;
      batch.first->batch_trigger = static_cast<std::uint8_t>(batch.trigger);
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
