// microbatch: a batcher's Stats in the Prometheus text exposition format (0.0.4), with no dependency.
// SPDX-License-Identifier: Apache-2.0
#pragma once

// Not included by microbatch.hpp: only programs that export metrics pay for <string> formatting here.
//
// Which to use:
// - One batcher: `to_prometheus(batcher.stats(), "lookups")` is a complete exposition; serve it as
//   `text/plain; version=0.0.4`.
// - Several batchers behind one endpoint: `prometheus_exposition`, adding each batcher once, then
//   `str()`. Do not concatenate `to_prometheus` texts: each carries the HELP and TYPE lines of every
//   family, and a repeated HELP or TYPE line makes the whole exposition invalid (Prometheus drops the
//   scrape).
//
// What is exported (every series labelled batcher="<name>" plus the caller's labels):
//   microbatch_jobs_submitted_total          counter  Stats::jobs_submitted
//   microbatch_jobs_completed_total          counter  Stats::jobs_completed
//   microbatch_jobs_failed_total{reason}     counter  expired, cancelled, other: they sum to jobs_failed
//   microbatch_jobs_rejected_total           counter  Stats::jobs_rejected (never accepted: not failures)
//   microbatch_jobs_coalesced_total          counter  Stats::jobs_coalesced
//   microbatch_batches_total{trigger}        counter  size, delay, flush, idle, weight: they sum to batches
//   microbatch_pending_jobs                  gauge    Stats::pending_jobs
//   microbatch_uncorrelated_results_total    counter  Stats::uncorrelated_results
//   microbatch_callback_errors_total         counter  Stats::callback_errors
//   microbatch_observer_errors_total         counter  Stats::observer_errors
//   microbatch_batch_size                    summary  jobs per processor call
//   microbatch_queue_wait_seconds            summary  per batch: its oldest job's wait (Stats::queue_wait)
//   microbatch_processing_seconds            summary  per batch: the processor call (Stats::processing_time)
// The summaries' quantiles (0.5, 0.99) come from the batcher's life-long histograms (within about 3%).
// A summary's _sum and _count, and the batch size's quantiles, are exported when `Stats` carries them
// (`Percentiles::sum`, `Stats::batches_processed`, `Stats::jobs_processed`, `Stats::batch_size_p50` and
// `_p99`); a summary with nothing to report is left out. A batcher with no batches yet exports zeros.
//
// Consistency: `Stats` is read counter by counter while the batcher runs, so one scrape may disagree
// with itself by the jobs in flight at that instant. The failure reasons are therefore clamped so that
// each is >= 0 and they always sum to the scrape's `jobs_failed`; a job that fails as a scrape reads
// the counters may be counted under `other` in that scrape and under its real reason in the next.

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "options.hpp"

namespace microbatch {

/// Extra labels for every series of a batcher, e.g. `{{"region", "eu"}}`, in the order given.
using metric_labels = std::vector<std::pair<std::string, std::string>>;

/// Several batchers' figures as one valid exposition: each family's HELP and TYPE lines appear once,
/// followed by every batcher's series of it. Add each batcher (name and labels) once.
class prometheus_exposition {
public:
  /// Adds one batcher's series. Throws `std::invalid_argument` naming the offender for: an empty
  /// `batcher` name; a label name that is not [a-zA-Z_][a-zA-Z0-9_]*, starts with "__", is one the
  /// exporter sets itself (batcher, reason, trigger, quantile) or appears twice; a label value (or
  /// the batcher name) that is not UTF-8; a batcher name and labels already added (their series would
  /// be duplicates). After such a throw nothing was added. Not thread-safe (one object, one thread at a time).
  prometheus_exposition& add(const Stats& stats, std::string_view batcher, const metric_labels& labels = {});

  /// The exposition: every family with at least one series, in a fixed order. Not thread-safe.
  [[nodiscard]] std::string str() const;

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  std::array<std::string, 13> series_; // per family, its sample lines (see detail::metric_families)
  std::set<std::string> added_;        // the label sets added so far, rendered
};

/// One batcher's `Stats` as a complete exposition. Equivalent to
/// `prometheus_exposition().add(stats, batcher, labels).str()`; throws as `add` does. Thread-safe.
[[nodiscard]] std::string to_prometheus(const Stats& stats, std::string_view batcher,
                                        const std::vector<std::pair<std::string, std::string>>& labels = {});

// ---------------------------------------------------------------------------------------------
// Implementation details follow.

namespace detail {

enum class metric_kind { counter, gauge, summary };

struct metric_family {
  std::string_view name;
  std::string_view help;
  metric_kind kind;
};

// The families in exposition order; prometheus_exposition::series_ and the adapter index this table.
inline constexpr std::array<metric_family, 13> metric_families{{
    {"microbatch_jobs_submitted_total", "Jobs accepted by submit or execute_job.", metric_kind::counter},
    {"microbatch_jobs_completed_total", "Jobs that ended with a result.", metric_kind::counter},
    {"microbatch_jobs_failed_total",
     "Jobs that ended with an error, by reason: expired (deadline_exceeded), cancelled, other.", metric_kind::counter},
    {"microbatch_jobs_rejected_total", "Submits refused with queue_full (never accepted).", metric_kind::counter},
    {"microbatch_jobs_coalesced_total", "Jobs that shared an equal-ID job's result (DuplicateIds::coalesce).",
     metric_kind::counter},
    {"microbatch_batches_total",
     "Batches dispatched, by trigger: size, delay, flush (flush() or shutdown()), idle, weight.", metric_kind::counter},
    {"microbatch_pending_jobs", "Jobs submitted and not yet ended.", metric_kind::gauge},
    {"microbatch_uncorrelated_results_total", "Results that matched no job of their batch (dropped).",
     metric_kind::counter},
    {"microbatch_callback_errors_total", "Exceptions that escaped a job's completion callback (contained).",
     metric_kind::counter},
    {"microbatch_observer_errors_total", "Exceptions that escaped Options::on_batch (contained).",
     metric_kind::counter},
    {"microbatch_batch_size", "Jobs per processor call.", metric_kind::summary},
    {"microbatch_queue_wait_seconds", "Per batch, its oldest job's wait from submit to the processor call.",
     metric_kind::summary},
    {"microbatch_processing_seconds", "Per batch, the processor call.", metric_kind::summary},
}};

/// One series of a counter or gauge family (with at most one label of its own, e.g. reason="expired"),
/// or one batcher's summary.
struct metric_point {
  std::string_view label_name{}; // empty: none
  std::string_view label_value{};
  std::uint64_t value = 0; // counter, gauge
  // summary
  std::optional<double> p50{}, p99{};
  std::optional<double> sum{};
  std::optional<std::uint64_t> count{};
};

using metric_points = std::array<std::vector<metric_point>, metric_families.size()>;

inline double seconds(std::chrono::nanoseconds duration) {
  return double(duration.count()) / 1e9;
}

/// What a `Stats` says, per family. A template so that the fields `Stats` may gain (sums, the batch
/// size's quantiles) are exported as soon as it has them, and the rest is unchanged until then.
template <class S> metric_points points_of(const S& s) {
  metric_points out;
  auto single = [&](std::size_t family, std::uint64_t value) { out[family].push_back({.value = value}); };
  single(0, s.jobs_submitted);
  single(1, s.jobs_completed);
  // The reasons partition the failures read: each counter is read on its own, so expired + cancelled
  // may run ahead of jobs_failed by a failure in flight; clamping keeps them >= 0 and summing to it.
  const std::uint64_t expired = std::min(s.jobs_expired, s.jobs_failed);
  const std::uint64_t cancelled = std::min(s.jobs_cancelled, s.jobs_failed - expired);
  out[2].push_back({.label_name = "reason", .label_value = "expired", .value = expired});
  out[2].push_back({.label_name = "reason", .label_value = "cancelled", .value = cancelled});
  out[2].push_back({.label_name = "reason", .label_value = "other", .value = s.jobs_failed - expired - cancelled});
  single(3, s.jobs_rejected);
  single(4, s.jobs_coalesced);
  // Stats::batches is by construction the sum of these five (a shutdown dispatch counts as flushed).
  out[5].push_back({.label_name = "trigger", .label_value = "size", .value = s.batches_full});
  out[5].push_back({.label_name = "trigger", .label_value = "delay", .value = s.batches_timed_out});
  out[5].push_back({.label_name = "trigger", .label_value = "flush", .value = s.batches_flushed});
  out[5].push_back({.label_name = "trigger", .label_value = "idle", .value = s.batches_idle});
  out[5].push_back({.label_name = "trigger", .label_value = "weight", .value = s.batches_weight});
  single(6, s.pending_jobs);
  single(7, s.uncorrelated_results);
  single(8, s.callback_errors);
  single(9, s.observer_errors);

  std::optional<std::uint64_t> calls;
  if constexpr (requires { s.batches_processed; }) calls = s.batches_processed;
  metric_point size;
  if constexpr (requires {
                  s.batch_size_p50;
                  s.batch_size_p99;
                }) {
    size.p50 = double(s.batch_size_p50);
    size.p99 = double(s.batch_size_p99);
  }
  if constexpr (requires { s.jobs_processed; }) {
    if (calls) {
      size.sum = double(s.jobs_processed);
      size.count = calls;
    }
  }
  if (size.p50 || size.sum) out[10].push_back(size);
  auto duration = [&](std::size_t family, const auto& percentiles) {
    metric_point p{.p50 = seconds(percentiles.p50), .p99 = seconds(percentiles.p99)};
    if constexpr (requires { percentiles.sum; }) {
      if (calls) {
        p.sum = seconds(percentiles.sum);
        p.count = calls;
      }
    }
    out[family].push_back(p);
  };
  duration(11, s.queue_wait);
  duration(12, s.processing_time);
  return out;
}

/// Whether `text` is well-formed UTF-8 (the exposition format requires it of label values).
inline bool valid_utf8(std::string_view text) noexcept {
  for (std::size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    std::size_t length = 0;
    std::uint32_t code = 0;
    if (lead < 0x80) {
      ++i;
      continue;
    }
    if ((lead & 0xE0) == 0xC0)
      length = 2, code = lead & 0x1Fu;
    else if ((lead & 0xF0) == 0xE0)
      length = 3, code = lead & 0x0Fu;
    else if ((lead & 0xF8) == 0xF0)
      length = 4, code = lead & 0x07u;
    else
      return false;
    if (i + length > text.size()) return false;
    for (std::size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3Fu);
    }
    static constexpr std::array<std::uint32_t, 5> smallest{0, 0, 0x80, 0x800, 0x10000}; // no overlong forms
    if (code < smallest[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

inline bool valid_label_name(std::string_view name) noexcept {
  auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; };
  if (name.empty() || !letter(name[0]) || name.starts_with("__")) return false;
  for (char c : name)
    if (!letter(c) && !(c >= '0' && c <= '9')) return false;
  return true;
}

/// Checks a batcher's name and labels as `prometheus_exposition::add` documents. `who` names the caller.
inline void check_labels(std::string_view who, std::string_view batcher, const metric_labels& labels) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(std::string(who) + ": " + what); };
  if (batcher.empty()) fail("the batcher name is empty (a label with an empty value is no label)");
  if (!valid_utf8(batcher)) fail("the batcher name is not valid UTF-8");
  std::set<std::string_view> seen;
  for (const auto& [name, value] : labels) {
    if (!valid_label_name(name))
      fail("label name \"" + name + "\" is invalid (wants [a-zA-Z_][a-zA-Z0-9_]*, not starting with __)");
    if (name == "batcher" || name == "reason" || name == "trigger" || name == "quantile")
      fail("label name \"" + name + "\" is set by the exporter itself");
    if (!seen.insert(name).second) fail("label name \"" + name + "\" appears twice");
    if (!valid_utf8(value)) fail("the value of label \"" + name + "\" is not valid UTF-8");
  }
}

/// `value` as a label value: backslash, double quote and line feed escaped, as the format requires.
inline void append_escaped(std::string& out, std::string_view value) {
  for (char c : value) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
}

inline void append_number(std::string& out, double value) {
  std::array<char, 32> buffer{};
  const auto [end, error] = std::to_chars(buffer.data(), buffer.data() + buffer.size(), value); // shortest exact
  (void)error; // 32 characters hold any double
  out.append(buffer.data(), end);
}

} // namespace detail

inline prometheus_exposition& prometheus_exposition::add(const Stats& stats, std::string_view batcher,
                                                         const metric_labels& labels) {
  detail::check_labels("microbatch::prometheus_exposition::add", batcher, labels);
  std::string common = "batcher=\""; // the labels every series of this batcher starts with
  detail::append_escaped(common, batcher);
  common += '"';
  for (const auto& [name, value] : labels) {
    common += ',';
    common += name;
    common += "=\"";
    detail::append_escaped(common, value);
    common += '"';
  }
  if (added_.contains(common))
    throw std::invalid_argument("microbatch::prometheus_exposition::add: batcher \"" + std::string(batcher) +
                                "\" with these labels was already added (its series would be duplicates)");

  const detail::metric_points points = detail::points_of(stats);
  auto line = [&](std::string& out, std::string_view name, std::string_view suffix, std::string_view label_name,
                  std::string_view label_value) {
    out += name;
    out += suffix;
    out += '{';
    out += common;
    if (!label_name.empty()) {
      out += ',';
      out += label_name;
      out += "=\"";
      out += label_value; // ours: nothing to escape
      out += '"';
    }
    out += "} ";
  };
  std::array<std::string, detail::metric_families.size()> rendered;
  for (std::size_t f = 0; f < detail::metric_families.size(); ++f) {
    const detail::metric_family& family = detail::metric_families[f];
    std::string& out = rendered[f];
    for (const detail::metric_point& p : points[f]) {
      if (family.kind != detail::metric_kind::summary) {
        line(out, family.name, "", p.label_name, p.label_value);
        out += std::to_string(p.value);
        out += '\n';
        continue;
      }
      if (p.p50) {
        line(out, family.name, "", "quantile", "0.5");
        detail::append_number(out, *p.p50);
        out += '\n';
      }
      if (p.p99) {
        line(out, family.name, "", "quantile", "0.99");
        detail::append_number(out, *p.p99);
        out += '\n';
      }
      if (p.sum && p.count) {
        line(out, family.name, "_sum", {}, {});
        detail::append_number(out, *p.sum);
        out += '\n';
        line(out, family.name, "_count", {}, {});
        out += std::to_string(*p.count);
        out += '\n';
      }
    }
  }
  added_.insert(std::move(common)); // past the last throw but this one's allocation: then nothing was added
  for (std::size_t f = 0; f < rendered.size(); ++f)
    series_[f] += rendered[f];
  return *this;
}

inline std::string prometheus_exposition::str() const {
  std::string out;
  for (std::size_t f = 0; f < detail::metric_families.size(); ++f) {
    if (series_[f].empty()) continue;
    const detail::metric_family& family = detail::metric_families[f];
    out += "# HELP ";
    out += family.name;
    out += ' ';
    out += family.help; // ours: no backslash or line feed to escape
    out += "\n# TYPE ";
    out += family.name;
    out += family.kind == detail::metric_kind::counter ? " counter\n"
           : family.kind == detail::metric_kind::gauge ? " gauge\n"
                                                       : " summary\n";
    out += series_[f];
  }
  return out;
}

inline std::string to_prometheus(const Stats& stats, std::string_view batcher,
                                 const std::vector<std::pair<std::string, std::string>>& labels) {
  return prometheus_exposition().add(stats, batcher, labels).str();
}

} // namespace microbatch
