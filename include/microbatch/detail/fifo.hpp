// microbatch::detail::fifo: a first-in first-out queue that stops allocating once it has grown.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <span>
#include <utility>
#include <vector>

namespace microbatch::detail {

/// A vector with a read position. Unlike std::deque, which frees and allocates a chunk every few
/// dozen push/pop pairs, it reuses its capacity, so steady-state traffic never allocates. Popped
/// elements are moved-from slots until the queue empties (or is mostly consumed) and is compacted.
/// Not thread-safe: its owner guards it.
template <class T>
class fifo {
 public:
  [[nodiscard]] bool empty() const noexcept { return head_ == items_.size(); }
  void push(T item) { items_.push_back(std::move(item)); }

  T pop() {
    T item = std::move(items_[head_++]);
    if (head_ == items_.size()) {
      items_.clear();
      head_ = 0;
    } else if (head_ >= 64 && head_ * 2 >= items_.size()) {  // a backlog that never drains
      items_.erase(items_.begin(), items_.begin() + static_cast<std::ptrdiff_t>(head_));
      head_ = 0;
    }
    return item;
  }

  /// The queued elements, oldest first.
  std::span<T> queued() noexcept { return std::span<T>(items_).subspan(head_); }

  void clear() noexcept {
    items_.clear();
    head_ = 0;
  }

 private:
  std::vector<T> items_;
  std::size_t head_ = 0;
};

}  // namespace microbatch::detail
