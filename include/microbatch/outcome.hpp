// microbatch::Outcome: how one job ended, handed to a completion callback.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <exception>
#include <utility>
#include <variant>

namespace microbatch {

/// The end of one job: its result, or the error it failed with (see `Batcher`'s numbered errors).
/// Passed as `Outcome<Result>&&` to the callback of `Batcher::submit(job, on_complete)`.
template <class Result> class Outcome {
public:
  explicit Outcome(Result&& value) : state_(std::in_place_index<0>, std::move(value)) {}
  explicit Outcome(std::exception_ptr error) : state_(std::in_place_index<1>, std::move(error)) {}

  /// True if the job ended with a result.
  [[nodiscard]] bool has_value() const noexcept { return state_.index() == 0; }

  /// The result; rethrows the job's error when there is none. Move from it freely
  /// (`std::move(outcome).value()` moves it out). Not [[nodiscard]]: `outcome.value();` is a fair way to
  /// rethrow the error.
  Result& value() & {
    throw_if_error();
    return std::get<0>(state_);
  }
  const Result& value() const& { // NOLINT(modernize-use-nodiscard): see above
    throw_if_error();
    return std::get<0>(state_);
  }
  Result&& value() && {
    throw_if_error();
    return std::get<0>(std::move(state_));
  }

  /// The job's error, or nullptr when it has a result.
  [[nodiscard]] std::exception_ptr error() const noexcept { return has_value() ? nullptr : std::get<1>(state_); }

private:
  void throw_if_error() const {
    if (!has_value()) std::rethrow_exception(std::get<1>(state_));
  }

  std::variant<Result, std::exception_ptr> state_;
};

} // namespace microbatch
