// microbatch::detail::histogram: durations recorded without a lock or an allocation, read as percentiles.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../options.hpp"

namespace microbatch::detail {

/// A log-linear histogram of non-negative durations: each power of two is split into 32 equal
/// buckets, so a percentile read from it is off by at most 1/32 (about 3%) of the true value; the
/// maximum is kept exactly. 2,048 atomic counters (16 KiB), fixed: recording is one relaxed
/// fetch-add plus a compare-exchange only when a new maximum appears. Thread-safe.
class histogram {
public:
  void record(std::chrono::nanoseconds duration) noexcept {
    const auto value = static_cast<std::uint64_t>(duration.count() < 0 ? 0 : duration.count());
    counts_[index(value)].fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(value, std::memory_order_relaxed);
    std::uint64_t seen = max_.load(std::memory_order_relaxed);
    while (value > seen && !max_.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
    }
  }

  /// p50, p99, max and sum over everything recorded so far; all zero before the first record.
  [[nodiscard]] Percentiles percentiles() const noexcept {
    std::array<std::uint64_t, buckets> snapshot{};
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < buckets; ++i)
      total += snapshot[i] = counts_[i].load(std::memory_order_relaxed);
    const std::uint64_t max = max_.load(std::memory_order_relaxed);
    if (total == 0) return {};
    auto at = [&](double fraction) {
      // Nearest rank: the smallest value with at least `fraction` of the records at or below it.
      const auto wanted = std::ceil(fraction * double(total));
      const std::uint64_t rank = wanted < 1.0 ? 1 : static_cast<std::uint64_t>(wanted);
      std::uint64_t seen = 0;
      for (std::size_t i = 0; i < buckets; ++i) {
        seen += snapshot[i];
        if (seen >= rank) return std::chrono::nanoseconds(static_cast<std::int64_t>(std::min(middle(i), max)));
      }
      return std::chrono::nanoseconds(static_cast<std::int64_t>(max));
    };
    return {at(0.50), at(0.99), std::chrono::nanoseconds(static_cast<std::int64_t>(max)),
            std::chrono::nanoseconds(static_cast<std::int64_t>(sum_.load(std::memory_order_relaxed)))};
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  static constexpr unsigned sub_bits = 5; // 32 buckets per power of two
  static constexpr std::size_t sub_buckets = std::size_t{1} << sub_bits;
  static constexpr std::size_t buckets = 64 * sub_buckets;

  // Values below 32 have a bucket each; above, the top 6 bits of the exponent and the 5 bits below
  // the leading one pick the bucket.
  static std::size_t index(std::uint64_t value) noexcept {
    if (value < sub_buckets) return static_cast<std::size_t>(value);
    const unsigned exponent = 63u - static_cast<unsigned>(std::countl_zero(value)); // >= sub_bits
    const auto mantissa = static_cast<std::size_t>((value >> (exponent - sub_bits)) & (sub_buckets - 1));
    return (exponent - sub_bits + 1) * sub_buckets + mantissa;
  }

  // The middle of bucket i: within half a bucket's width (at most 1/64 of the value) of anything in it.
  static std::uint64_t middle(std::size_t i) noexcept {
    if (i < sub_buckets) return i;
    const std::size_t exponent = i / sub_buckets + sub_bits - 1;
    const std::uint64_t mantissa = i % sub_buckets;
    const std::uint64_t low = (std::uint64_t{1} << exponent) | (mantissa << (exponent - sub_bits));
    return low + (std::uint64_t{1} << (exponent - sub_bits)) / 2;
  }

  std::array<std::atomic<std::uint64_t>, buckets> counts_{};
  std::atomic<std::uint64_t> max_{0};
  std::atomic<std::uint64_t> sum_{0};
};

} // namespace microbatch::detail
