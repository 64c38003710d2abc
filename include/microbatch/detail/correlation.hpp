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
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace microbatch::detail {

inline constexpr std::size_t no_match = std::numeric_limits<std::size_t>::max();

/// Job and Result of a processor `std::vector<Result>(std::span<Job>)`, for the deduction guides: a
/// function (pointer, `noexcept` or not), a `std::reference_wrapper` to a processor, or a class with
/// one non-template `operator()` (a non-generic lambda). For anything else (a generic lambda, an
/// overloaded `operator()`) the traits are empty, so a guide that needs them drops out quietly and the
/// others (member-pointer IDs) still apply.
template <class Signature> struct processor_signature {};
template <class Result, class Job> struct processor_signature<std::vector<Result>(std::span<Job>)> {
  using job = Job;
  using result = Result;
};
template <class Result, class Job>
struct processor_signature<std::vector<Result>(std::span<Job>) noexcept>
    : processor_signature<std::vector<Result>(std::span<Job>)> {};
template <class Signature> struct processor_signature<Signature*> : processor_signature<Signature> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>)>
    : processor_signature<std::vector<Result>(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>) const>
    : processor_signature<std::vector<Result>(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>) noexcept>
    : processor_signature<std::vector<Result>(std::span<Job>)> {};
template <class Class, class Result, class Job>
struct processor_signature<std::vector<Result> (Class::*)(std::span<Job>) const noexcept>
    : processor_signature<std::vector<Result>(std::span<Job>)> {};

template <class Processor> struct processor_traits : processor_signature<Processor> {};
template <class Processor>
requires requires {
  &Processor::operator();
}
struct processor_traits<Processor> : processor_signature<decltype(&Processor::operator())> {};
template <class Processor>
struct processor_traits<std::reference_wrapper<Processor>> : processor_traits<std::remove_cv_t<Processor>> {};

template <class T> inline constexpr bool is_reference_wrapper_v = false;
template <class T> inline constexpr bool is_reference_wrapper_v<std::reference_wrapper<T>> = true;

template <class Processor> using processor_job_t = typename processor_traits<Processor>::job;
template <class Processor> using processor_result_t = typename processor_traits<Processor>::result;

/// A correlation policy has, per worker thread (no member is shared between threads):
///   void begin(std::size_t capacity)          before a batch, capacity = jobs offered
///   std::size_t admit(const Job&)             no_match if its ID is new (then it is admitted), else the
///                                             index of the admitted job with the same ID; may throw
///                                             (the extractor's error), then nothing was admitted
///   std::size_t match(const Result&, std::size_t position, std::size_t admitted)
///                                             index of the admitted job it answers, or no_match
///   std::string describe_id(std::size_t index) " (ID x)" for error messages, or "" if IDs cannot be printed

/// Result i answers admitted job i.
struct positional_correlation {
  void begin(std::size_t) noexcept {}
  template <class Job> std::size_t admit(const Job&) noexcept { return no_match; }
  template <class Result>
  [[nodiscard]] std::size_t match(const Result&, std::size_t position, std::size_t admitted) const noexcept {
    return position < admitted ? position : no_match;
  }
  [[nodiscard]] std::string describe_id(std::size_t) const { return {}; }
};

template <class T>
concept printable = requires(std::ostream& out, const T& value) {
  out << value;
};

/// Jobs and results carry IDs; a per-batch open-addressing table (reused from batch to batch, so no
/// allocation in steady state) maps an ID to the index of the admitted job that has it.
template <class T> struct owning_key { using type = T; };
template <class Char, class Traits> struct owning_key<std::basic_string_view<Char, Traits>> {
  using type = std::basic_string<Char, Traits>;
};

/// The ID type a batch stores for each admitted job: what `job_id` returns, by value, except that a
/// `std::basic_string_view` is stored as the `std::basic_string` it views (it may point into a
/// temporary the extractor returned, or into a job the processor moves from).
template <class T> using owning_key_t = typename owning_key<T>::type;

template <class A, class B>
concept have_common_type = requires {
  typename std::common_type_t<A, B>;
};

/// Jobs and results carry IDs; a per-batch open-addressing table (reused from batch to batch, so no
/// allocation in steady state) maps an ID to the index of the admitted job that has it. Stored keys
/// own their data (`owning_key_t`); lookups hash and compare in the common type of the job's and the
/// result's ID types (`std::hash` of a `std::string` and of a `std::string_view` agree).
template <class Job, class Result, class JobId, class ResultId> class keyed_correlation {
public:
  static_assert(std::is_invocable_v<const JobId&, const Job&>,
                "microbatch: the job ID extractor must be callable with const Job& (a member pointer such as "
                "&Job::id, a function or a lambda)");
  static_assert(std::is_invocable_v<const ResultId&, const Result&>,
                "microbatch: the result ID extractor must be callable with const Result& (a member pointer such "
                "as &Result::id, a function or a lambda)");
  using job_key = std::decay_t<std::invoke_result_t<const JobId&, const Job&>>;
  using result_key = std::decay_t<std::invoke_result_t<const ResultId&, const Result&>>;
  static_assert(have_common_type<job_key, result_key>,
                "microbatch: the job ID and the result ID must have a common type (e.g. both integers, or "
                "std::string and std::string_view) so that results can be matched to jobs");
  using stored_key = owning_key_t<job_key>;
  using key_type = std::common_type_t<job_key, result_key>; // what lookups hash and compare
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
    stored_key key(std::invoke(job_id_, job)); // owns its data before anything else happens
    if (const std::size_t earlier = find(as_lookup(key)); earlier != no_match) return earlier;
    std::size_t slot = home(as_lookup(key));
    while (slots_[slot] != 0)
      slot = (slot + 1) & mask_;
    keys_.push_back(std::move(key));
    slots_[slot] = static_cast<std::uint32_t>(keys_.size());
    return no_match;
  }

  [[nodiscard]] std::size_t match(const Result& result, std::size_t position, std::size_t) const noexcept {
    try {
      const result_key key = std::invoke(result_id_, result); // alive while the lookup uses it
      // Many processors answer in the jobs' order: then the job at the result's position has its ID
      // (IDs in keys_ are unique), and no hashing is needed.
      const key_type& lookup = as_lookup(key);
      if (position < keys_.size() && as_lookup(keys_[position]) == lookup) return position;
      return find(lookup);
    } catch (...) { // a result whose ID cannot be read (or hashed) answers no job
      return no_match;
    }
  }

  /// " (ID x)" for an admitted job whose ID can be printed, else "".
  [[nodiscard]] std::string describe_id(std::size_t index) const {
    if constexpr (printable<stored_key>) {
      std::ostringstream out;
      out << " (ID " << keys_[index] << ")";
      return out.str();
    } else {
      return {};
    }
  }

private:
  /// A key seen as the lookup type: itself when it already is one (no copy), else converted.
  template <class Key> static decltype(auto) as_lookup(const Key& key) {
    if constexpr (std::is_same_v<Key, key_type>) {
      return (key);
    } else {
      return key_type(key);
    }
  }

  [[nodiscard]] std::size_t find(const key_type& key) const {
    for (std::size_t slot = home(key); slots_[slot] != 0; slot = (slot + 1) & mask_) {
      if (as_lookup(keys_[slots_[slot] - 1]) == key) return slots_[slot] - 1;
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
  std::vector<stored_key> keys_;     // keys of the admitted jobs, by index
  std::vector<std::uint32_t> slots_; // 0 = empty, else index + 1 into keys_
  std::size_t mask_ = 0;
  int shift_ = 63;
};

} // namespace microbatch::detail
