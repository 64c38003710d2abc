// microbatch::async_execute: submit a job from Asio code, with any completion token.
// SPDX-License-Identifier: Apache-2.0
//
// Not included by microbatch.hpp: include this header where you use Asio. Standalone Asio (1.22 or
// later) by default; define MICROBATCH_BOOST_ASIO before including it to use Boost.Asio instead.
#pragma once

#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#if defined(MICROBATCH_BOOST_ASIO)
#include <boost/asio/version.hpp>
#define MICROBATCH_ASIO_VERSION BOOST_ASIO_VERSION
#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#if BOOST_ASIO_VERSION >= 101900
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/cancellation_type.hpp>
#endif
#else
#include <asio/version.hpp>
#define MICROBATCH_ASIO_VERSION ASIO_VERSION
#include <asio/associated_allocator.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/dispatch.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/post.hpp>
#if ASIO_VERSION >= 101900
#include <asio/associated_cancellation_slot.hpp>
#include <asio/cancellation_type.hpp>
#endif
#endif

// Per-operation cancellation (cancellation slots) came with Asio 1.19 (Boost 1.77). Older versions,
// such as Boost 1.74's Asio 1.18 (Debian 12's libboost-dev), get async_execute without it.
#if MICROBATCH_ASIO_VERSION >= 101900
#define MICROBATCH_ASIO_CANCELLATION 1
#else
#define MICROBATCH_ASIO_CANCELLATION 0
#endif

#include "microbatch.hpp"

namespace microbatch {
namespace detail {

#if defined(MICROBATCH_BOOST_ASIO)
namespace net = ::boost::asio;
#else
namespace net = ::asio;
#endif

/// What the handler receives after the exception_ptr: the Result itself (default-constructed when
/// there is an error), or, for a Result that cannot be default-constructed, an optional.
template <class Result>
using asio_result_t = std::conditional_t<std::is_default_constructible_v<Result>, Result, std::optional<Result>>;

/// The Batcher's private parts that the Asio binding needs: admission, and counting a cancellation.
struct operation_access {
  template <class Batcher, class Node> static void admit(Batcher& batcher, Node* node) {
    batcher.admission_.throw_if_closed();
    batcher.admit_and_enqueue(node);
  }
  template <class Batcher, class Node> static void cancelled_by_caller(Batcher& batcher, Node* node) noexcept {
    batcher.cancelled_by_caller(node);
  }
  /// Starts `job` on the queue of its key: the operation lives on that key's Batcher, which its job's
  /// hold keeps while the job is queued (so a cancellation finds it). A job no key can take (the keyed
  /// batcher is shut down) completes with that error, posted to the handler's executor.
  template <class Operation, class Keyed, class Handler, class Job>
  static void start_keyed(Keyed& keyed, Handler&& handler, Job&& job);
  template <class Keyed, class Handler, class Job>
  static void start_keyed_operation(Keyed& keyed, Handler&& handler, Job&& job);
};

/// One `async_execute` operation: the job's node, the handler, and a hold on the handler's executor
/// (work, so that an io_context does not run out of work while the job is queued).
///
/// Ownership: allocated with the handler's associated allocator, and shared (detail::shared_node) by
/// the batcher and the operation's side, because a cancelled job completes while the batcher may still
/// hold the node. Whoever ends the job (a batcher thread in `finish`, the cancellation slot's handler
/// in `cancel`, the initiating call when admission throws) stores the outcome and sends `completion`
/// to the handler's executor: `dispatch` from a batcher thread (inline only if that thread is in the
/// executor's context, e.g. `system_executor`), `post` otherwise, so the handler never runs inside
/// the initiating function or inside the cancellation signal's `emit`. The completion clears the
/// cancellation slot (on the handler's executor, where Asio requires emits to happen, so the two cannot
/// race), destroys its copy of the handler, drops the operation's reference and calls the handler.
/// A batcher thread that ends the job drops its own reference before it queues the completion, so the
/// node is freed by the completion, before the upcall as Asio asks, and never later on a batcher thread
/// (the io_context may be gone by then). Only a cancelled job's node can outlive its completion, in the
/// batcher (queued, or in the processor); by then it holds no handler and no executor, and it was not
/// allocated from the handler's allocator (whose memory may be gone after the upcall): an operation
/// with a connected cancellation slot takes its node from `operator new`.
template <class Job, class Result, class Processor, class Handler>
class asio_operation final : public shared_node<Job, Result> {
public:
  using batcher_type = Batcher<Job, Result, Processor>;
  using executor_type = net::associated_executor_t<Handler>;
  using handler_allocator = net::associated_allocator_t<Handler>;
  using allocator_type = typename std::allocator_traits<handler_allocator>::template rebind_alloc<asio_operation>;

  /// Creates the operation and hands its job to `batcher`. Never calls the handler inline.
  template <class H> static void start(batcher_type& batcher, H&& handler, Job&& job) {
    const bool cancellable = connected_slot(handler);
    allocator_type allocator(net::get_associated_allocator(handler));
    void* memory = cancellable ? static_cast<void*>(std::allocator<asio_operation>{}.allocate(1))
                               : static_cast<void*>(std::allocator_traits<allocator_type>::allocate(allocator, 1));
    asio_operation* operation = nullptr;
    try {
      operation =
          ::new (memory) asio_operation(batcher, std::forward<H>(handler), std::move(job), allocator, cancellable);
    } catch (...) {
      free_memory(memory, allocator, cancellable);
      throw;
    }
    operation->begin();
  }

  template <class H>
  asio_operation(batcher_type& batcher, H&& handler, Job&& submitted, const allocator_type& allocator, bool cancellable)
      : shared_node<Job, Result>(std::move(submitted)), batcher_(batcher), handler_(std::forward<H>(handler)),
        work_(std::in_place, net::get_associated_executor(*handler_)), allocator_(allocator),
        cancellable_(cancellable) {}

  void finish(Result&& result) noexcept override {
    try {
      value_.emplace(std::move(result));
    } catch (...) { // Result's move constructor threw
      error_ = std::current_exception();
    }
    this->release(); // the batcher's reference (first: the node's last release is the completion's)
    complete(false);
  }
  void finish(std::exception_ptr failure) noexcept override {
    error_ = std::move(failure);
    this->release();
    complete(false);
  }
  void deliver(std::exception_ptr failure) noexcept override {
    error_ = std::move(failure);
    complete(true);
  }

private:
  /// The function that Asio runs on the handler's executor. Holds the operation's reference: if the
  /// executor destroys it without running it (an io_context destroyed with work pending), the
  /// operation is freed without calling the handler, as Asio does with its own operations.
  class completion {
  public:
    using allocator_type = typename asio_operation::allocator_type;
    explicit completion(asio_operation* operation) noexcept : operation_(operation) {}
    completion(completion&& other) noexcept : operation_(std::exchange(other.operation_, nullptr)) {}
    completion& operator=(completion&&) = delete;
    ~completion() {
      if (operation_ != nullptr) operation_->drop_handler();
    }
    [[nodiscard]] allocator_type get_allocator() const noexcept { return operation_->allocator_; }
    void operator()() { std::exchange(operation_, nullptr)->upcall(); }

  private:
    asio_operation* operation_;
  };

#if MICROBATCH_ASIO_CANCELLATION
  /// The cancellation slot's handler (runs inside `emit`, on the handler's executor).
  struct cancel_on_signal {
    asio_operation* operation;
    void operator()(net::cancellation_type_t type) const noexcept {
      if ((type & net::cancellation_type::terminal) != net::cancellation_type::none) operation->cancel();
    }
  };
#endif

  /// Whether the operation can be cancelled: a connected cancellation slot, and an executor on which
  /// the slot's `emit` and the completion's `clear` are serialised. A handler without an executor of
  /// its own (`system_executor`) completes inline on a batcher thread, where clearing the slot would
  /// race with an emit from any other thread: its slot is ignored.
  template <class H> static bool connected_slot([[maybe_unused]] const H& handler) noexcept {
#if MICROBATCH_ASIO_CANCELLATION
    if constexpr (std::is_same_v<executor_type, net::system_executor>) {
      return false;
    } else {
      return net::get_associated_cancellation_slot(handler).is_connected();
    }
#else
    return false;
#endif
  }

  static void free_memory(void* memory, allocator_type allocator, bool cancellable) noexcept {
    if (cancellable) {
      std::allocator<asio_operation>{}.deallocate(static_cast<asio_operation*>(memory), 1);
    } else {
      std::allocator_traits<allocator_type>::deallocate(allocator, static_cast<asio_operation*>(memory), 1);
    }
  }

  void begin() {
#if MICROBATCH_ASIO_CANCELLATION
    if (cancellable_) {
      try {
        net::get_associated_cancellation_slot(*handler_).template emplace<cancel_on_signal>(cancel_on_signal{this});
      } catch (...) { // out of memory: not started, nothing to undo but the operation itself
        destroy();
        throw;
      }
    }
#endif
    try {
      operation_access::admit(batcher_, static_cast<job_node<Job, Result>*>(this));
    } catch (...) { // not accepted (closed, queue full, oversized, ...): the handler gets the error
      error_ = std::current_exception();
      (void)this->try_claim(); // ended: a cancellation from now on finds nothing to cancel
      this->release();         // the batcher never held it
      complete(true);
    }
  }

  void cancel() noexcept {
    if (!this->begin_cancel()) return; // it has ended already; its completion is on its way
    operation_access::cancelled_by_caller(batcher_, static_cast<job_node<Job, Result>*>(this));
    this->end_cancel(); // from here the batcher may let go and shut down: do not touch it
    deliver(make_error<cancelled>([] { return "microbatch::async_execute: the operation was cancelled"; }));
  }

  /// Sends the completion to the handler's executor. Does not touch the operation afterwards: the
  /// completion may already have run and freed it.
  void complete(bool post) noexcept {
    // The hold on the executor ends when this call returns, not when the handler runs: from the
    // moment it is queued, the completion itself keeps an io_context's run() going, and a thread
    // that sees run() return may destroy the io_context, which must not happen while this (batcher)
    // thread is still inside post or dispatch.
    net::executor_work_guard<executor_type> work(std::move(*work_));
    work_.reset();
    try {
      if (post) {
        net::post(work.get_executor(), completion(this));
      } else {
        net::dispatch(work.get_executor(), completion(this));
      }
    } catch (...) { // the executor could not take it (out of memory): the handler cannot be called;
      // completion's destructor has dropped it.
    }
  }

  /// On the handler's executor: the last steps of the operation's side.
  void upcall() {
    clear_slot();
    Handler handler(std::move(*handler_));
    handler_.reset();
    std::exception_ptr error = std::move(error_);
    std::optional<asio_result_t<Result>> result;
    try {
      result.emplace(take_result());
    } catch (...) { // Result's move constructor threw: the exception leaves through the executor
      this->release();
      throw;
    }
    this->release(); // the operation side's reference: frees the node unless the batcher still holds it
    std::move(handler)(std::move(error), std::move(*result));
  }

  /// A completion destroyed unrun: free what the operation's side holds, without calling the handler.
  void drop_handler() noexcept {
    clear_slot();
    handler_.reset();
    this->release(); // the operation side's reference: frees the node unless the batcher still holds it
  }

  void clear_slot() noexcept {
#if MICROBATCH_ASIO_CANCELLATION
    if (cancellable_) net::get_associated_cancellation_slot(*handler_).clear();
#endif
  }

  asio_result_t<Result> take_result() {
    if constexpr (std::is_default_constructible_v<Result>) {
      if (value_) return std::move(*value_);
      return Result{};
    } else {
      return std::move(value_);
    }
  }

  void destroy() noexcept override {
    const allocator_type allocator(allocator_);
    const bool cancellable = cancellable_;
    this->~asio_operation();
    free_memory(this, allocator, cancellable);
  }

  batcher_type& batcher_;
  // Reset on the handler's executor when the completion runs (or is dropped): a cancelled job's node may
  // live on in the batcher after that, and then after its io_context, so it keeps no executor objects.
  std::optional<Handler> handler_;
  std::optional<net::executor_work_guard<executor_type>> work_; // until the completion is queued
  allocator_type allocator_;
  std::optional<Result> value_;
  std::exception_ptr error_;
  const bool cancellable_; // the slot holds cancel_on_signal (see connected_slot); node from std::allocator
};

template <class Job, class Result, class Processor> struct async_execute_initiation {
  Batcher<Job, Result, Processor>* batcher;

  template <class Handler> void operator()(Handler&& handler, Job job) const {
    asio_operation<Job, Result, Processor, std::decay_t<Handler>>::start(*batcher, std::forward<Handler>(handler),
                                                                         std::move(job));
  }
};

template <class Operation, class Keyed, class Handler, class Job>
void operation_access::start_keyed(Keyed& keyed, Handler&& handler, Job&& job) {
  typename Keyed::key_queue* queue = nullptr;
  std::exception_ptr refused;
  try {
    keyed.parts_.admission_gate.throw_if_closed();
    queue = keyed.hold_queue(std::invoke(keyed.batch_key_, std::as_const(job)), true);
  } catch (...) {
    refused = std::current_exception();
  }
  if (queue == nullptr) {
    using result_type = asio_result_t<typename Keyed::result_type>;
    auto executor = net::get_associated_executor(handler);
    net::post(executor, [handler = std::forward<Handler>(handler), refused]() mutable {
      std::move(handler)(refused, result_type{});
    });
    return;
  }
  struct release_hold {
    Keyed& owner;
    typename Keyed::key_queue& held;
    ~release_hold() { owner.drop_holds(held, 1); }
  } on_exit{keyed, *queue};
  Operation::start(queue->batcher, std::forward<Handler>(handler), std::forward<Job>(job));
}

template <class Keyed, class Handler, class Job>
void operation_access::start_keyed_operation(Keyed& keyed, Handler&& handler, Job&& job) {
  using operation = asio_operation<typename Keyed::job_type, typename Keyed::result_type, typename Keyed::key_processor,
                                   std::decay_t<Handler>>;
  start_keyed<operation>(keyed, std::forward<Handler>(handler), std::forward<Job>(job));
}

template <class Key, class Job, class Result, class Processor> struct keyed_async_execute_initiation {
  KeyedBatcher<Key, Job, Result, Processor>* batcher;

  template <class Handler> void operator()(Handler&& handler, Job job) const {
    operation_access::start_keyed_operation(*batcher, std::forward<Handler>(handler), std::move(job));
  }
};

} // namespace detail

/// Submits `job` to `batcher` as an Asio asynchronous operation: the completion signature is
/// `void(std::exception_ptr, Result)` (`void(std::exception_ptr, std::optional<Result>)` when Result is
/// not default-constructible), with a null exception_ptr on success and otherwise the job's error,
/// exactly as `execute_job` would throw it (`batcher_closed`, `queue_full`, a processor's exception,
/// `no_result`, ...). Works with every completion token: `use_awaitable` (which rethrows the error),
/// `use_future`, a plain callback, `bind_executor`, `experimental::deferred`, `experimental::as_tuple`.
///
/// The handler runs on its associated executor (a coroutine's executor for `use_awaitable`; a plain
/// callback without one runs on a batcher thread, Asio's `system_executor`), never inside this call.
/// The operation allocates one block for the job's node with the handler's associated allocator
/// (with `std::allocator` if it can be cancelled: then the batcher may still hold the node after the
/// handler ran), and holds work on the handler's executor until its completion is queued.
///
/// Cancellation: a `terminal` signal on the handler's cancellation slot (emitted from the handler's
/// executor, as Asio requires) takes a queued job out of the batcher and completes it with
/// `cancelled`; a job already in the processor runs on, its result is discarded, and its Job is
/// destroyed later on a batcher thread. Other cancellation types are ignored, and so is the slot of a
/// handler without an executor of its own (`system_executor`: no executor serialises its emit with
/// the completion). (Asio 1.19 / Boost 1.77 and later: older ones have no cancellation slots.)
///
/// With `Overflow::block` at `max_pending_jobs`, the calling thread blocks until there is room: an
/// io_context thread stops serving other handlers meanwhile, so Asio services usually prefer
/// `Overflow::reject` (the handler then gets `queue_full`).
///
/// Lifetimes: the batcher's threads post completions to the handlers' executors, so, as with any Asio
/// I/O object, shut the batcher down (or destroy it) before the io_context whose executors its
/// operations use is destroyed: declare the io_context first. Completions still queued in an
/// io_context that is destroyed without running them are freed without calling their handlers.
/// Thread-safe.
template <class Job, class Result, class Processor, class CompletionToken>
auto async_execute(Batcher<Job, Result, Processor>& batcher, std::type_identity_t<detail::job_argument<Job>> job,
                   CompletionToken&& token) {
  return detail::net::async_initiate<CompletionToken, void(std::exception_ptr, detail::asio_result_t<Result>)>(
      detail::async_execute_initiation<Job, Result, Processor>{&batcher}, token, detail::take_job<Job>(job));
}

/// As `async_execute(batcher, job, token)`, into the batch of the job's key. Thread-safe.
template <class Key, class Job, class Result, class Processor, class CompletionToken>
auto async_execute(KeyedBatcher<Key, Job, Result, Processor>& batcher,
                   std::type_identity_t<detail::job_argument<Job>> job, CompletionToken&& token) {
  return detail::net::async_initiate<CompletionToken, void(std::exception_ptr, detail::asio_result_t<Result>)>(
      detail::keyed_async_execute_initiation<Key, Job, Result, Processor>{&batcher}, token, detail::take_job<Job>(job));
}

} // namespace microbatch
