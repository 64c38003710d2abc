// microbatch::detail: the job node, which carries one job from submit to its end, and its kinds.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <utility>

#include <coroutine>
#include <type_traits>

#include "../errors.hpp"
#include "../options.hpp"
#include "../outcome.hpp"
#include "completion_flag.hpp"

namespace microbatch::detail {

using time_point = std::chrono::steady_clock::time_point;

/// Drops a reference to an exception object that other threads' futures share (a processor's
/// exception goes to every job of its batch). The reference count lives in the C++ runtime, which
/// ThreadSanitizer does not instrument, so it cannot see that the last owner frees the object only after
/// every other owner is done with it. Releasing through this named, never-inlined function lets
/// tests/tsan.supp suppress exactly that false report and nothing else of ours.
[[gnu::noinline]] inline void release_error(std::exception_ptr& error) noexcept {
  error = nullptr;
}

/// An exception_ptr to `Error(message())`; if building the message throws (out of memory), to that
/// exception instead. Either way the job gets an error, and nothing escapes into a batcher thread.
template <class Error, class Message> std::exception_ptr make_error(Message&& message) noexcept {
  try {
    return std::make_exception_ptr(Error(std::string(message())));
  } catch (...) {
    return std::current_exception();
  }
}

/// The error of a job whose deadline passed while it was queued.
inline std::exception_ptr expired_error() noexcept {
  return make_error<deadline_exceeded>(
      [] { return "microbatch::Batcher: the job's deadline passed before it was handed to the processor"; });
}

/// One submitted job. Ownership: the submitting call creates it; from a successful push into the inbox
/// until `finish` or `abandon`, the batcher holds it (collector, then ready queue, then one worker).
/// A node ends exactly once: whoever wins the claim decides the outcome. Only a cancellation (the
/// caller's stop_token, an Asio cancellation slot) races with the batcher for that; everything else happens on the one
/// batcher thread that holds the node at the time.
template <class Job, class Result> class job_node {
public:
  explicit job_node(Job&& submitted, bool cancellable = false) : job(std::move(submitted)), cancellable_(cancellable) {}
  job_node(const job_node&) = delete;
  job_node& operator=(const job_node&) = delete;

  job_node* next = nullptr;               // inbox link, then batch link (detail::job_list)
  job_node* next_batch = nullptr;         // detail::batch_queue, in a queued batch's first node only
  time_point arrival = time_point::min(); // set when this job was the first into an empty inbox; in a
                                          // batch's first node, the batch's start
  time_point deadline = time_point::max();
  std::size_t weight = 1; // Options::max_batch_weight: what Processor::weight said at submit
  Job job;

  /// The batcher's claim: true if the batcher gets to end the job, false if its caller cancelled it
  /// (then the batcher only drops its hold, `abandon`). Only a cancellable node pays for an atomic;
  /// every other node has one owner at a time, the batcher, which ends it once. A claim that meets a
  /// cancellation in progress waits for it (microseconds): until `end_cancel`, the canceller still
  /// uses the batcher, which therefore must not let go of the node and shut down. Batcher threads.
  bool try_claim() noexcept {
    if (!cancellable_) return true;
    claim expected = claim::open;
    if (state_.compare_exchange_strong(expected, claim::ended, std::memory_order_acq_rel)) return true;
    wait_while_cancelling(expected);
    return false;
  }
  /// True if the caller cancelled the job (waits out a cancellation in progress). Batcher threads.
  [[nodiscard]] bool claimed() const noexcept {
    if (!cancellable_) return false;
    claim now = state_.load(std::memory_order_acquire);
    wait_while_cancelling(now);
    return now != claim::open;
  }

  /// The caller's claim, to cancel: true if the job had not ended; then the caller counts the
  /// cancellation with the batcher and calls `end_cancel`, after which it must not touch the batcher.
  /// Any thread.
  bool begin_cancel() noexcept {
    claim expected = claim::open;
    return cancellable_ && state_.compare_exchange_strong(expected, claim::cancelling, std::memory_order_acq_rel);
  }
  void end_cancel() noexcept {
    state_.store(claim::cancelled, std::memory_order_release);
    state_.notify_all();
  }

  /// Delivers the outcome and drops the batcher's hold. Call only after winning `try_claim`.
  /// Afterwards the node may be gone.
  virtual void finish(Result&& value) noexcept = 0;
  virtual void finish(std::exception_ptr error) noexcept = 0;

  /// Drops the batcher's hold on a node that someone else claimed. Afterwards it may be gone.
  virtual void abandon() noexcept {}

protected:
  ~job_node() = default; // never deleted through the base

private:
  enum class claim : unsigned char { open, ended, cancelling, cancelled };
  void wait_while_cancelling(claim& seen) const noexcept {
    while (seen == claim::cancelling) {
      state_.wait(claim::cancelling, std::memory_order_acquire);
      seen = state_.load(std::memory_order_acquire);
    }
  }

  std::atomic<claim> state_{claim::open};
  const bool cancellable_;

public:
  // Next to the flags above: in their padding, so the node does not grow (64 bytes for an 8-byte job:
  // every node kind's fields start on the line after, and a callback node is two lines, W2cb).
  bool admission_counted = false; // took a max_pending_jobs place (detail::admission::reserve)
  bool ends_by_signal = false;    // a blocking execute_job's node: ending it runs no user code
  bool pooled_slot = false;       // callback_node: built in a slot of the batcher's pool
  std::uint8_t batch_trigger = 0; // detail::batch_queue, in a queued batch's first node only: a
                                  // Trigger in one byte (the enum itself takes four)
};

/// `submit(job)`: one heap block holds the node and an arena from which its `std::promise` allocates
/// its shared state and result holder (std::promise's allocator constructor), so a submit costs one
/// allocation instead of three. The block lives until the node is finished and the shared state (which
/// the caller's future may keep long after) has given its memory back: a reference count of one for
/// the node plus one per live arena allocation. Allocations that do not fit (an unusually large
/// `Result`, another standard library's larger state) fall back to the heap.
template <class Job, class Result> class promise_node final : public job_node<Job, Result> {
  struct block;

public:
  template <class T> struct arena_allocator {
    using value_type = T;
    block* home;

    explicit arena_allocator(block* b) noexcept : home(b) {}
    template <class U>
    arena_allocator(const arena_allocator<U>& other) noexcept : home(other.home) {} // NOLINT: rebinding

    T* allocate(std::size_t n) {
      if (void* p = home->bump(n * sizeof(T), alignof(T))) return static_cast<T*>(p);
      return std::allocator<T>{}.allocate(n);
    }
    void deallocate(T* p, std::size_t n) noexcept {
      if (home->owns(p)) {
        home->release();
      } else {
        std::allocator<T>{}.deallocate(p, n);
      }
    }
    template <class U> bool operator==(const arena_allocator<U>& other) const noexcept { return home == other.home; }
  };

  /// A new node holding `job`, with its promise ready. Thread-safe.
  static promise_node* create(Job&& submitted) {
    void* raw = allocate_block();
    auto* home = ::new (raw) block;
    try {
      return ::new (static_cast<void*>(home->node_storage)) promise_node(std::move(submitted), home);
    } catch (...) {
      free_block(raw);
      throw;
    }
  }

  /// Ends a node that was never handed to the batcher (submit threw). Its future sees broken_promise.
  void discard() noexcept { destroy(); }

  std::promise<Result> promise;

  void finish(Result&& value) noexcept override {
    try {
      promise.set_value(std::move(value));
    } catch (...) { // Result's move constructor threw
      promise.set_exception(std::current_exception());
    }
    destroy();
  }
  void finish(std::exception_ptr error) noexcept override {
    promise.set_exception(std::move(error));
    destroy();
  }

private:
#if defined(_LIBCPP_VERSION)
  // libc++ (19) asks for one block: 128 bytes of state (counts, mutex, condition variable, exception)
  // plus the Result. Other versions may ask for more: what does not fit comes from the heap.
  static constexpr std::size_t arena_bytes =
      136 + (sizeof(Result) + 7) / 8 * 8 + (alignof(Result) > 8 ? 2 * alignof(Result) : 0);
#else
  // libstdc++ 12 asks for 56 bytes (the shared state with its control block), then 32 + sizeof(Result)
  // rounded up to 8 (the result holder, which keeps a copy of this allocator). Other libraries may ask
  // for more: what does not fit comes from the heap (test_allocations checks the count here). Both
  // libraries: for an over-aligned Result, room to align each of the two allocations in the arena.
  static constexpr std::size_t arena_bytes =
      88 + (sizeof(Result) + 7) / 8 * 8 + (alignof(Result) > 8 ? 2 * alignof(Result) : 0);
#endif

  promise_node(Job&& submitted, block* home)
      : job_node<Job, Result>(std::move(submitted)), promise(std::allocator_arg, arena_allocator<char>(home)),
        home_(home) {}

  static void* allocate_block() {
    if constexpr (alignof(block) > __STDCPP_DEFAULT_NEW_ALIGNMENT__) {
      return ::operator new (sizeof(block), std::align_val_t{alignof(block)});
    } else {
      return ::operator new(sizeof(block));
    }
  }
  static void free_block(void* raw) noexcept {
    if constexpr (alignof(block) > __STDCPP_DEFAULT_NEW_ALIGNMENT__) {
      ::operator delete (raw, std::align_val_t{alignof(block)});
    } else {
      ::operator delete(raw);
    }
  }

  void destroy() noexcept {
    block* home = home_;
    this->~promise_node(); // drops the promise's hold on the shared state
    home->release();
  }

  // The block this node was built in. A pointer, not an address computed from `this`: the node lives
  // in the block's storage, but a pointer to it may not be used to reach the rest of the block.
  block* const home_;
};

// Raw storage is left uninitialised on purpose: the node and the promise state are built into it.
// The two counts take 4 bytes each and the arena is aligned only as a pointer is (an allocation is
// aligned within it as it asks), so that with an 8-byte job and result the block is 200 bytes, which
// glibc's malloc serves from the same 208-byte chunk as 192 (libstdc++; W2's bytes per pending job).
// NOLINTNEXTLINE(cppcoreguidelines-pro-type-member-init)
template <class Job, class Result> struct promise_node<Job, Result>::block {
  alignas(promise_node) unsigned char node_storage[sizeof(promise_node)];
  std::atomic<std::uint32_t> references{1}; // the node, plus one per live arena allocation (at most 3)
  std::uint32_t used = 0;                   // bytes of arena taken; only the promise's constructor allocates
  alignas(void*) unsigned char arena[arena_bytes];

  void* bump(std::size_t size, std::size_t alignment) noexcept {
    void* start = arena + used;
    std::size_t space = arena_bytes - used;
    if (std::align(alignment, size, start, space) == nullptr) return nullptr;
    used = static_cast<std::uint32_t>(static_cast<unsigned char*>(start) - arena + size);
    references.fetch_add(1, std::memory_order_relaxed);
    return start;
  }
  bool owns(const void* p) const noexcept {
    auto* byte = static_cast<const unsigned char*>(p);
    return byte >= arena && byte < arena + arena_bytes; // NOLINT: pointers into one array
  }
  void release() noexcept {
    if (references.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      this->~block();
      free_block(static_cast<void*>(this));
    }
  }
};

/// `execute_job(job)`: lives on the caller's stack; the caller waits on `done` and owns it throughout.
template <class Job, class Result> class waiting_node final : public job_node<Job, Result> {
public:
  explicit waiting_node(Job&& submitted) : job_node<Job, Result>(std::move(submitted)) { this->ends_by_signal = true; }
  std::optional<Result> value;
  std::exception_ptr error;
  completion_flag done;

  void finish(Result&& result) noexcept override {
    try {
      value.emplace(std::move(result));
    } catch (...) {
      error = std::current_exception();
    }
    done.signal(); // last touch: the caller may return at once
  }
  void finish(std::exception_ptr failure) noexcept override {
    error = std::move(failure);
    done.signal();
  }

  Result take() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};

/// A node its caller may cancel while the batcher holds it, hence shared by the two (two references):
/// the caller ends it early by winning `begin_cancel` and then calling `deliver`, which hands the outcome
/// to the caller without dropping the batcher's reference; the batcher drops that one when it next
/// meets the node (`abandon`) or when it ends the node itself (`finish`). The last `release` destroys
/// the node.
template <class Job, class Result> class shared_node : public job_node<Job, Result> {
public:
  explicit shared_node(Job&& submitted) : job_node<Job, Result>(std::move(submitted), true) {}

  /// Hands `failure` to the caller (a cancellation). Call only after `begin_cancel` won.
  virtual void deliver(std::exception_ptr failure) noexcept = 0;

  void abandon() noexcept override { release(); }

  /// Drops one reference; the last one destroys the node.
  void release() noexcept {
    if (references_.fetch_sub(1, std::memory_order_acq_rel) == 1) destroy();
  }

protected:
  ~shared_node() = default;
  virtual void destroy() noexcept = 0;

private:
  std::atomic<int> references_{2};
};

/// `execute_job(job, stop_token)`: the caller waits on `done`, and its stop callback may cancel.
template <class Job, class Result> class shared_waiting_node final : public shared_node<Job, Result> {
public:
  using shared_node<Job, Result>::shared_node;
  using shared_node<Job, Result>::release;
  std::optional<Result> value;
  std::exception_ptr error;
  completion_flag done;

  void deliver(std::exception_ptr failure) noexcept override {
    error = std::move(failure);
    done.signal();
  }
  void finish(Result&& result) noexcept override {
    try {
      value.emplace(std::move(result));
    } catch (...) {
      error = std::current_exception();
    }
    done.signal();
    release();
  }
  void finish(std::exception_ptr failure) noexcept override {
    deliver(std::move(failure));
    release();
  }

private:
  void destroy() noexcept override { delete this; }
};

/// `submit(job, on_complete)`: lives in a slot of the batcher's slot_pool (no allocation per job once
/// the pool has grown), owns the callable (inline up to `inline_bytes`, else on the heap) and calls it
/// exactly once with the job's Outcome, then destroys itself and gives its slot back.
template <class Job, class Result> class callback_node final : public job_node<Job, Result> {
public:
  /// The batcher's side: counts callbacks that threw, takes slots back. Must outlive every node.
  class home {
  public:
    virtual void callback_threw() noexcept = 0;
    virtual void recycle(void* memory, bool pooled) noexcept = 0;

  protected:
    ~home() = default;
  };

  static constexpr std::size_t inline_bytes = 48;

  /// A node built in `memory` (at least `sizeof(callback_node)` bytes, suitably aligned) from the
  /// owner's pool (`pooled`) or from operator new; when the node ends, it gives that memory back to
  /// `owner`. The only way to make one: a node never lives anywhere else. Throws what moving the job
  /// or moving (copying, for an lvalue) the callable throws, and `std::bad_alloc` for a callable too
  /// big for the node; then no node was made and `memory` is still the caller's.
  template <class F>
  static callback_node* create(void* memory, Job&& submitted, F&& on_complete, home& owner, bool pooled) {
    return ::new (memory) callback_node(std::move(submitted), std::forward<F>(on_complete), owner, pooled);
  }

  void finish(Result&& value) noexcept override {
    try {
      call_back(Outcome<Result>(std::move(value)));
    } catch (...) { // Result's move constructor threw while building the Outcome
      call_back(Outcome<Result>(std::current_exception()));
    }
  }
  void finish(std::exception_ptr error) noexcept override { call_back(Outcome<Result>(std::move(error))); }

  /// Ends the node without calling the callable (the submit that made it failed).
  void discard() noexcept { destroy(); }

private:
  template <class F>
  // NOLINTNEXTLINE(cppcoreguidelines-pro-type-member-init): storage_ stays raw until used
  callback_node(Job&& submitted, F&& on_complete, home& owner, bool pooled)
      : job_node<Job, Result>(std::move(submitted)), owner_(owner) {
    this->pooled_slot = pooled;
    using Callable = std::decay_t<F>;
    if constexpr (sizeof(Callable) <= inline_bytes && alignof(Callable) <= alignof(std::max_align_t) &&
                  std::is_nothrow_move_constructible_v<Callable>) {
      ::new (static_cast<void*>(storage_)) Callable(std::forward<F>(on_complete));
      call_ = [](unsigned char* storage, Outcome<Result>* outcome) {
        auto* callable = std::launder(reinterpret_cast<Callable*>(storage));
        if (outcome != nullptr) {
          (*callable)(std::move(*outcome));
        } else {
          callable->~Callable();
        }
      };
    } else { // too big for the node: the callable on the heap, its address in the storage
      ::new (static_cast<void*>(storage_)) Callable*(new Callable(std::forward<F>(on_complete)));
      call_ = [](unsigned char* storage, Outcome<Result>* outcome) {
        Callable* callable = *std::launder(reinterpret_cast<Callable**>(storage));
        if (outcome != nullptr) {
          (*callable)(std::move(*outcome));
        } else {
          delete callable;
        }
      };
    }
  }

  void call_back(Outcome<Result>&& outcome) noexcept {
    try {
      call_(storage_, &outcome);
    } catch (...) {
      owner_.callback_threw();
    }
    destroy();
  }

  void destroy() noexcept {
    call_(storage_, nullptr); // destroys the callable
    home& owner = owner_;
    void* memory = this; // where the submit built this node
    const bool pooled = this->pooled_slot;
    this->~callback_node();
    owner.recycle(memory, pooled);
  }

  // Few and small: the submitter writes every byte of a node, often in a slot that a worker's core
  // wrote last, so each cache line it spans costs a transfer (W2cb). Whether the slot is pooled sits
  // in job_node's padding (`pooled_slot`).
  home& owner_;
  // Calls the callable with the outcome, or (outcome null) destroys it: one pointer for both.
  void (*call_)(unsigned char* storage, Outcome<Result>* outcome) = nullptr;
  alignas(std::max_align_t) unsigned char storage_[inline_bytes]; // the callable, or its heap address
};

/// `co_await async_execute_job(job)`: lives in the awaiting coroutine's frame (inside the awaiter).
/// Finishing stores the outcome and resumes the coroutine on the finishing batcher thread; that is its
/// last touch, because the coroutine may then destroy the frame.
template <class Job, class Result> class coroutine_node final : public job_node<Job, Result> {
public:
  using job_node<Job, Result>::job_node;
  std::optional<Result> value;
  std::exception_ptr error;
  std::coroutine_handle<> waiting;

  void finish(Result&& result) noexcept override {
    try {
      value.emplace(std::move(result));
    } catch (...) {
      error = std::current_exception();
    }
    std::coroutine_handle<> resume_me = waiting;
    resume_me.resume();
  }
  void finish(std::exception_ptr failure) noexcept override {
    error = std::move(failure);
    std::coroutine_handle<> resume_me = waiting;
    resume_me.resume();
  }
};

} // namespace microbatch::detail
