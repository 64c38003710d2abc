// microbatch: the errors a job can end with.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <stdexcept>
#include <string>

namespace microbatch {

/// The base of every exception microbatch itself throws or stores in a job's future.
/// Exceptions thrown by the user's processor or ID extractors reach the job unchanged.
class error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

/// The processor returned no result for this job (keyed mode: no result carried the job's ID;
/// positional mode: the result vector was shorter than the batch).
class no_result : public error {
public:
  using error::error;
};

/// An earlier job of the same batch has the same correlation ID. The earlier job proceeds; this one
/// is never passed to the processor.
class duplicate_id : public error {
public:
  using error::error;
};

/// The job was submitted after shutdown began, a blocked `submit` was released by shutdown, or
/// (with `Shutdown::cancel`) the job was still queued when shutdown began.
class batcher_closed : public error {
public:
  using error::error;
};

/// `max_pending_jobs` was reached and `Options::overflow` is `Overflow::reject`. Thrown by `submit`.
class queue_full : public error {
public:
  using error::error;
};

/// The job's deadline passed before it was handed to the processor. It never reached the processor.
class deadline_exceeded : public error {
public:
  using error::error;
};

/// The job's weight alone exceeds `Options::max_batch_weight`, so no batch could ever hold it. Thrown
/// by `submit` / `execute_job`; the job is not accepted. The message names the weight and the limit.
class oversized_job : public error {
public:
  using error::error;
};

/// The caller's `std::stop_token` was triggered before the job completed. A job already in the
/// processor still runs; its result is discarded.
class cancelled : public error {
public:
  using error::error;
};

} // namespace microbatch
