// microbatch::detail::inbox: where submitters leave jobs until a forming pass takes them.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <cstdint>

namespace microbatch::detail {

/// An intrusive multi-producer, single-consumer stack of nodes with a `next` member. Submitters push
/// with one compare-exchange and no lock; a forming pass (one at a time: the batcher serialises them
/// with a mutex) takes everything at once with one exchange and reverses it into arrival order.
/// Because the consumer only ever takes the whole list, there is no ABA problem. `close` makes every later push fail,
/// which is how shutdown stops accepting jobs without a lock and without losing a job that raced with it.
template <class Node> class inbox {
public:
  enum class push_result { first, appended, closed };

  /// Publishes `node` unless the inbox is closed. `on_first` runs (before publishing) when the node
  /// will be the first in an empty inbox; the batcher uses it to stamp the arrival time. Thread-safe.
  template <class OnFirst> push_result push(Node* node, OnFirst&& on_first) noexcept {
    Node* head = head_.load(std::memory_order_relaxed);
    bool stamped = false;
    do {
      if (head == closed_marker()) return push_result::closed;
      if (head == nullptr && !stamped) {
        on_first(node);
        stamped = true;
      }
      node->next = head;
    } while (!head_.compare_exchange_weak(head, node, std::memory_order_seq_cst, std::memory_order_relaxed));
    return head == nullptr ? push_result::first : push_result::appended;
  }

  /// True if nothing is published. Sequentially consistent with `push`, so that the collector's
  /// "publish my plan, then look" pairs with a submitter's "push, then read the plan". Thread-safe.
  [[nodiscard]] bool empty() const noexcept { return head_.load(std::memory_order_seq_cst) == nullptr; }

  /// Takes every published node, oldest first; nothing once closed. Callers of `take_all` and `close`
  /// must be serialised (the batcher holds the forming batch's mutex); pushes may run concurrently.
  Node* take_all() noexcept {
    if (head_.load(std::memory_order_relaxed) == closed_marker()) return nullptr; // only `close` sets it
    return reversed(head_.exchange(nullptr, std::memory_order_acquire));
  }

  /// Takes every published node, oldest first, and fails every later push. Serialised with `take_all`.
  Node* close() noexcept {
    Node* head = head_.exchange(closed_marker(), std::memory_order_acquire);
    return head == closed_marker() ? nullptr : reversed(head);
  }

private:
  static Node* closed_marker() noexcept {
    // A marker that is never dereferenced.
    return reinterpret_cast<Node*>(std::uintptr_t{1}); // NOLINT(performance-no-int-to-ptr)
  }

  static Node* reversed(Node* head) noexcept {
    Node* oldest_first = nullptr;
    while (head != nullptr) {
      Node* next = head->next;
      head->next = oldest_first;
      oldest_first = head;
      head = next;
    }
    return oldest_first;
  }

  alignas(64) std::atomic<Node*> head_{nullptr};
};

} // namespace microbatch::detail
