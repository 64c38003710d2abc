// microbatch::detail::slot_pool: recycled memory for nodes that the batcher owns (callback submits).
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>

namespace microbatch::detail {

/// Fixed-size slots handed out and returned by any thread without a lock (but for a large batch's
/// slots given back together, which take a mutex once, see `release_gathered`): a Treiber stack
/// whose head packs a 32-bit slot index with a 32-bit tag (bumped on every change) into one 64-bit
/// atomic, which defeats ABA. Slots live in slabs that are freed only with the pool, so reading a
/// slot that another thread has just taken is harmless (the tag makes that compare-exchange fail).
/// Allocates only when it grows (one slab of `slab_slots` at a time, under a mutex); past
/// `max_slabs` slabs it falls back to plain operator new. All members thread-safe; the destructor
/// requires every slot returned (resting ones count as returned).
template <std::size_t Size, std::size_t Align> class slot_pool {
  struct slot;

public:
  slot_pool() = default;
  slot_pool(const slot_pool&) = delete;
  slot_pool& operator=(const slot_pool&) = delete;
  ~slot_pool() {
    for (auto& slab : slabs_)
      delete[] slab.load(std::memory_order_relaxed);
  }

  static constexpr std::size_t slots_per_slab = 256; // the pool grows by this many slots at a time

  /// Memory for one object of up to Size bytes; `pooled` says whether to give it back to the pool.
  struct lease {
    void* memory;
    bool pooled;
  };

  lease acquire() {
    std::uint64_t head = head_.load(std::memory_order_acquire);
    for (;;) {
      const auto index_plus_one = static_cast<std::uint32_t>(head);
      if (index_plus_one == 0) return grow();
      slot& taken = at(index_plus_one - 1);
      const std::uint64_t next = retagged(head, taken.next_free.load(std::memory_order_relaxed));
      if (head_.compare_exchange_weak(head, next, std::memory_order_acquire, std::memory_order_acquire)) {
        prefetch_for_write(static_cast<std::uint32_t>(next));
        return {taken.bytes, true};
      }
    }
  }

  void release(lease given) noexcept {
    if (!given.pooled) {
      ::operator delete (given.memory, std::align_val_t{Align});
      return;
    }
    slot* returned = slot_of(given.memory);
    push(returned, returned);
  }

  /// Slots that one thread gathers (`gather`) and then gives back together (`release_gathered`), with
  /// one compare-exchange: a thread that ends a batch of nodes would otherwise contend with the
  /// submitters for the head once per node. Owned by that thread; empty when released.
  class gathered {
  public:
    [[nodiscard]] bool empty() const noexcept { return first_ == nullptr; }

  private:
    friend slot_pool;
    slot* first_ = nullptr;
    slot* last_ = nullptr;
    std::size_t count_ = 0;
  };

  /// Adds `given` to `slots` (or frees it now if it was not pooled). No atomic read-modify-write.
  void gather(lease given, gathered& slots) noexcept {
    if (!given.pooled) {
      release(given);
      return;
    }
    slot* returned = slot_of(given.memory);
    returned->next_free.store(slots.first_ == nullptr ? 0 : slots.first_->index + 1, std::memory_order_relaxed);
    slots.first_ = returned;
    if (slots.last_ == nullptr) slots.last_ = returned;
    ++slots.count_;
  }

  /// Gives every gathered slot back; `slots` is empty afterwards. A chain of at least
  /// `min_resting_slots()` (a large batch's) rests first, and its slots are free again once the
  /// large chains given back after it hold more than `max_resting_slots()` slots, or once
  /// `resting_chains` of them came back after it (oldest first). Smaller chains, and slots given
  /// back one by one, are free at once and do not count. Why: the thread that gathers a batch's
  /// slots has just written them, so a slot handed out again at once costs its next user, on the
  /// submit path, a cache-line transfer from that thread's core for each of its lines; slots that
  /// rested behind a level-2 cache's worth of newer ones have likely left that cache (W2cb, an
  /// outside thread submitting callbacks in batches of 1000: 20.8 against 14.9 M jobs/s, medians of
  /// 60 alternated runs). The price: the pool holds up to `max_resting_slots()` slots more, plus
  /// the oldest resting chain (any batch size); when large batches stop coming back, the chains
  /// resting then stay out of use until more do, or the pool is destroyed.
  void release_gathered(gathered& slots) noexcept {
    if (slots.empty()) return;
    if (slots.count_ < min_resting_slots()) {
      push(slots.first_, slots.last_);
    } else {
      std::lock_guard lock(resting_mutex_); // once per large batch
      if (resting_count_ == resting_chains) wake_oldest();
      resting_[(resting_oldest_ + resting_count_) % resting_chains] = slots;
      ++resting_count_;
      resting_slots_ += slots.count_;
      while (resting_slots_ - resting_[resting_oldest_].count_ > max_resting_slots())
        wake_oldest();
    }
    slots = gathered{};
  }

  /// How long a large chain rests (see `release_gathered`): behind `resting_bytes` of newer slots
  /// (`max_resting_slots()` of them), and at most `resting_chains` newer chains.
  static constexpr std::size_t resting_bytes = std::size_t{2} << 20;
  static constexpr std::size_t resting_chains = 64;
  static constexpr std::size_t max_resting_slots() noexcept { return resting_bytes / sizeof(slot); }
  /// The smallest chain that rests: `resting_chains` of them fill `max_resting_slots()` (at least 1 slot).
  static constexpr std::size_t min_resting_slots() noexcept {
    return max_resting_slots() / resting_chains > 0 ? max_resting_slots() / resting_chains : 1;
  }

private:
  // The bytes are the slot's first member: the slot starts where they do.
  static slot* slot_of(void* memory) noexcept { return reinterpret_cast<slot*>(memory); }

  /// (resting_mutex_ held) The oldest resting chain's slots become free.
  void wake_oldest() noexcept {
    gathered& oldest = resting_[resting_oldest_];
    push(oldest.first_, oldest.last_);
    resting_slots_ -= oldest.count_;
    oldest = gathered{};
    resting_oldest_ = (resting_oldest_ + 1) % resting_chains;
    --resting_count_;
  }

  /// Pushes the chain first..last (linked through next_free, last's link is overwritten).
  void push(slot* first, slot* last) noexcept {
    std::uint64_t head = head_.load(std::memory_order_relaxed);
    std::uint64_t next;
    do {
      last->next_free.store(static_cast<std::uint32_t>(head), std::memory_order_relaxed);
      next = retagged(head, first->index + 1);
    } while (!head_.compare_exchange_weak(head, next, std::memory_order_release, std::memory_order_relaxed));
  }

  static constexpr std::size_t slab_slots = slots_per_slab;
  static constexpr std::size_t max_slabs = 4096;

  // Standard layout, `bytes` first: a slot starts where its bytes do. The bytes stay raw until used.
  struct slot { // NOLINT(cppcoreguidelines-pro-type-member-init)
    alignas(Align) unsigned char bytes[Size];
    std::atomic<std::uint32_t> next_free{0}; // index + 1 of the next free slot, 0 = none
    std::uint32_t index = 0;
  };

  static std::uint64_t retagged(std::uint64_t head, std::uint32_t index_plus_one) noexcept {
    return (((head >> 32) + 1) << 32) | index_plus_one;
  }

  // The slot the next acquire will likely hand out was last written by the thread that gave it back,
  // often on another core (a worker ending callback nodes). Asking for its cache lines now lets
  // that transfer overlap the caller's work until then, instead of stalling the caller's next
  // publish (W2cb: the submitter's compare-exchange waited on exactly those lines). Only a hint:
  // another thread may take that slot first.
  void prefetch_for_write([[maybe_unused]] std::uint32_t index_plus_one) noexcept {
#if defined(__GNUC__) || defined(__clang__)
    if (index_plus_one == 0) return;
    // Every line the slot touches: a slot is only Align-aligned, so it may start inside a line.
    const auto first = reinterpret_cast<std::uintptr_t>(&at(index_plus_one - 1));
    for (std::uintptr_t line = first & ~std::uintptr_t{63}; line < first + sizeof(slot); line += 64)
      // NOLINTNEXTLINE(performance-no-int-to-ptr): an address to prefetch, never dereferenced
      __builtin_prefetch(reinterpret_cast<const void*>(line), 1);
#endif
  }

  slot& at(std::uint32_t index) noexcept {
    return slabs_[index / slab_slots].load(std::memory_order_acquire)[index % slab_slots];
  }

  lease grow() {
    std::lock_guard lock(grow_mutex_);
    const std::size_t count = slab_count_.load(std::memory_order_relaxed);
    if (count == max_slabs) return {::operator new (Size, std::align_val_t{Align}), false};
    auto* slab = new slot[slab_slots];
    for (std::size_t i = 0; i < slab_slots; ++i)
      slab[i].index = static_cast<std::uint32_t>(count * slab_slots + i);
    slabs_[count].store(slab, std::memory_order_release);
    slab_count_.store(count + 1, std::memory_order_release);
    for (std::size_t i = 1; i < slab_slots; ++i)
      push(&slab[i], &slab[i]);
    return {slab[0].bytes, true};
  }

  alignas(64) std::atomic<std::uint64_t> head_{0};
  std::atomic<std::size_t> slab_count_{0};
  std::mutex grow_mutex_;
  std::mutex resting_mutex_;
  std::array<gathered, resting_chains> resting_{}; // guarded by resting_mutex_; a ring, oldest first
  std::size_t resting_oldest_ = 0;                 // guarded by resting_mutex_
  std::size_t resting_count_ = 0;                  // guarded by resting_mutex_; chains resting
  std::size_t resting_slots_ = 0;                  // guarded by resting_mutex_; their slots
  std::array<std::atomic<slot*>, max_slabs> slabs_{};
};

} // namespace microbatch::detail
