// microbatch::detail: matching results to jobs, positionally or by correlation ID.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace microbatch::detail {

inline constexpr std::size_t no_match = std::numeric_limits<std::size_t>::max();

/// Job and Result of a processor `std::vector<Result>(std::span<Job>)`, for Batcher's deduction guides:
/// a function (pointer) or a class with one non-template operator() (a non-generic lambda).
template <class Signature> struct processor_signature {};
template <class Result, class Job> struct processor_signature<std::vector<Result> (*)(std::span<Job>)> {
  using job = Job;
  using result = Result;
};
template <class Result, class Job>
struct processor_signature<std::vector<Result>(std::span<Job>)>
    : processor_signature<std::vector<Result> (*)(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>)>
    : processor_signature<std::vector<Result> (*)(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>) const>
    : processor_signature<std::vector<Result> (*)(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>) noexcept>
    : processor_signature<std::vector<Result> (*)(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>) const noexcept>
    : processor_signature<std::vector<Result> (*)(std::span<Job>)> {};

template <class Processor> struct processor_traits : processor_signature<decltype(&Processor::operator())> {};
template <class Result, class Job>
struct processor_traits<std::vector<Result> (*)(std::span<Job>)>
    : processor_signature<std::vector<Result> (*)(std::span<Job>)> {};

template <class Processor> using processor_job_t = typename processor_traits<Processor>::job;
template <class Processor> using processor_result_t = typename processor_traits<Processor>::result;

/// A correlation policy has, per worker thread (no member is shared between threads):
///   void begin(std::size_t capacity)          before a batch, capacity = jobs offered
///   std::size_t admit(const Job&)             no_match if its ID is new (then it is admitted), else the
///                                             index of the admitted job with the same ID; may throw
///                                             (the extractor's error), then nothing was admitted
///   std::size_t match(const Result&, std::size_t position, std::size_t admitted)
///                                             index of the admitted job it answers, or no_match
///   std::string describe(std::size_t index)   names the admitted job in error messages

/// Result i answers admitted job i.
struct positional_correlation {
  void begin(std::size_t) noexcept {}
  template <class Job> std::size_t admit(const Job&) noexcept { return no_match; }
  template <class Result> std::size_t match(const Result&, std::size_t position, std::size_t admitted) const noexcept {
    return position < admitted ? position : no_match;
  }
  [[nodiscard]] std::string describe(std::size_t index) const { return "at position " + std::to_string(index); }
};

template <class T>
concept printable = requires(std::ostream& out, const T& value) {
  out << value;
};

/// Jobs and results carry IDs; a per-batch open-addressing table (reused from batch to batch, so no
/// allocation in steady state) maps an ID to the index of the admitted job that has it.
template <class Job, class Result, class JobId, class ResultId> class keyed_correlation {
public:
  using key_type = std::common_type_t<std::decay_t<std::invoke_result_t<const JobId&, const Job&>>,
                                      std::decay_t<std::invoke_result_t<const ResultId&, const Result&>>>;
  static_assert(std::equality_comparable<key_type>, "microbatch: correlation IDs must be equality-comparable");
  static_assert(std::is_default_constructible_v<std::hash<key_type>>,
                "microbatch: correlation IDs must be hashable with std::hash");

  keyed_correlation(JobId job_id, ResultId result_id) : job_id_(std::move(job_id)), result_id_(std::move(result_id)) {}

  void begin(std::size_t capacity) {
    keys_.clear();
    keys_.reserve(capacity);
    std::size_t slots = std::bit_ceil(capacity * 2 + 2);
    if (slots_.size() < slots || slots_.size() > 8 * slots)
      slots_.assign(slots, 0);
    else
      std::fill(slots_.begin(), slots_.end(), 0);
    mask_ = slots_.size() - 1;
    shift_ = 64 - std::countr_zero(slots_.size());
  }

  std::size_t admit(const Job& job) {
    key_type key = std::invoke(job_id_, job);
    if (const std::size_t earlier = find(key); earlier != no_match) return earlier;
    std::size_t slot = home(key);
    while (slots_[slot] != 0)
      slot = (slot + 1) & mask_;
    keys_.push_back(std::move(key));
    slots_[slot] = static_cast<std::uint32_t>(keys_.size());
    return no_match;
  }

  [[nodiscard]] std::size_t match(const Result& result, std::size_t, std::size_t) const noexcept {
    try {
      return find(std::invoke(result_id_, result));
    } catch (...) { // a result whose ID cannot be read (or hashed) answers no job
      return no_match;
    }
  }

  [[nodiscard]] std::string describe(std::size_t index) const {
    if constexpr (printable<key_type>) {
      std::ostringstream out;
      out << "with ID " << keys_[index];
      return out.str();
    } else {
      return "at position " + std::to_string(index);
    }
  }

private:
  [[nodiscard]] std::size_t find(const key_type& key) const {
    for (std::size_t slot = home(key); slots_[slot] != 0; slot = (slot + 1) & mask_) {
      if (keys_[slots_[slot] - 1] == key) return slots_[slot] - 1;
    }
    return no_match;
  }

  [[nodiscard]] std::size_t home(const key_type& key) const {
    // Fibonacci hashing: the top bits of hash * 2^64/phi spread identity hashes (std::hash of an
    // integer is the integer) evenly over the table.
    auto hash = static_cast<std::uint64_t>(std::hash<key_type>{}(key));
    return static_cast<std::size_t>((hash * 0x9E3779B97F4A7C15ull) >> shift_);
  }

  JobId job_id_;
  ResultId result_id_;
  std::vector<key_type> keys_;       // keys of the admitted jobs, by index
  std::vector<std::uint32_t> slots_; // 0 = empty, else index + 1 into keys_
  std::size_t mask_ = 0;
  int shift_ = 63;
};

} // namespace microbatch::detail
