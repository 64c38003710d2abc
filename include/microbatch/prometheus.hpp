// microbatch: batchers' Stats as a prometheus-cpp Collectable, read only when scraped.
// SPDX-License-Identifier: Apache-2.0
#pragma once

// Needs prometheus-cpp (Debian: prometheus-cpp-dev; link prometheus-cpp::core, and ::pull for the
// Exposer). Not included by microbatch.hpp.
//
//   prometheus::Exposer exposer{"127.0.0.1:9464"};
//   auto registry = std::make_shared<prometheus::Registry>();       // the program's own metrics
//   exposer.RegisterCollectable(registry);
//   microbatch::prometheus_registration metrics(exposer);           // declared after the batchers
//   metrics.add(batcher, "lookups", {{"region", "eu"}});
//
// Why not inside the Registry: prometheus-cpp's Registry holds only its own Counter, Gauge, Histogram
// and Summary families (each updated as things happen); a value computed at scrape time is a
// Collectable of its own, registered beside the Registry with whatever serves the Registry (the
// Exposer). The series are the same as `to_prometheus` renders (see metrics.hpp), with one
// difference forced by prometheus-cpp, which writes a summary's _sum and _count whatever they hold: a
// summary for which `Stats` has no sum and count is exported as a gauge of its quantile series, the
// same series under the same names, rather than with a false _count of 0.

#include <prometheus/client_metric.h>
#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/metric_type.h>

#include <array>
#include <concepts>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "metrics.hpp"
#include "options.hpp"

namespace microbatch {

/// A `prometheus::Collectable` over the `Stats` of one or more batchers: every `Collect()` (one per
/// scrape) calls each source's `stats()`, and nothing is done per job. All batchers share the families,
/// so each family's HELP and TYPE appear once in the scrape.
///
/// Lifetime: the registrar (an Exposer) keeps only a weak_ptr, but a scrape in progress holds the
/// collector, so it may outlive what it reads. `detach()` makes that safe: it waits for a `Collect`
/// in progress and from then on `Collect` returns nothing. `prometheus_registration` calls it before
/// its batchers go; use that rather than this class directly.
class prometheus_collector final : public ::prometheus::Collectable {
public:
  /// Adds a batcher: `stats` is called on every Collect (under this collector's lock) until `detach`.
  /// Throws `std::invalid_argument` as `prometheus_exposition::add` does (bad label names, non-UTF-8
  /// values, a name and labels already added). Thread-safe.
  void add(std::function<Stats()> stats, std::string batcher, metric_labels labels = {}) {
    detail::check_labels("microbatch::prometheus_collector::add", batcher, labels);
    std::string key = batcher;
    for (const auto& [name, value] : labels)
      key.append(1, '\0').append(name).append(1, '\0').append(value);
    std::lock_guard lock(mutex_);
    if (!keys_.insert(key).second)
      throw std::invalid_argument("microbatch::prometheus_collector::add: batcher \"" + batcher +
                                  "\" with these labels was already added (its series would be duplicates)");
    sources_.push_back({std::move(stats), std::move(batcher), std::move(labels)});
  }

  /// Every added batcher's figures now, one MetricFamily per family with series. Called by the
  /// registrar at each scrape. Thread-safe.
  [[nodiscard]] std::vector<::prometheus::MetricFamily> Collect() const override {
    std::array<::prometheus::MetricFamily, detail::metric_families.size()> families;
    std::lock_guard lock(mutex_);
    for (const source& from : sources_)
      append(families, from);
    std::vector<::prometheus::MetricFamily> out;
    for (auto& family : families)
      if (!family.metric.empty()) out.push_back(std::move(family));
    return out;
  }

  /// Forgets every batcher, after a `Collect` in progress returns; `Collect` then returns nothing.
  /// Thread-safe.
  void detach() noexcept {
    std::lock_guard lock(mutex_);
    sources_.clear();
  }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  struct source {
    std::function<Stats()> stats;
    std::string batcher;
    metric_labels labels;
  };

  // (mutex_ held) One batcher's series, appended to `families`.
  static void append(std::array<::prometheus::MetricFamily, detail::metric_families.size()>& families,
                     const source& from) {
    const detail::metric_points points = detail::points_of(from.stats());
    std::vector<::prometheus::ClientMetric::Label> common{{"batcher", from.batcher}};
    for (const auto& [name, value] : from.labels)
      common.push_back({name, value});
    for (std::size_t f = 0; f < families.size(); ++f) {
      const detail::metric_family& def = detail::metric_families[f];
      ::prometheus::MetricFamily& family = families[f];
      for (const detail::metric_point& p : points[f]) {
        ::prometheus::ClientMetric metric;
        metric.label = common;
        if (def.kind == detail::metric_kind::summary && p.sum && p.count) {
          set_type(family, def, ::prometheus::MetricType::Summary);
          metric.summary.sample_count = *p.count;
          metric.summary.sample_sum = *p.sum;
          if (p.p50) metric.summary.quantile.push_back({0.5, *p.p50});
          if (p.p99) metric.summary.quantile.push_back({0.99, *p.p99});
          family.metric.push_back(std::move(metric));
        } else if (def.kind == detail::metric_kind::summary) { // no sum and count: the quantiles as gauges
          set_type(family, def, ::prometheus::MetricType::Gauge);
          for (const auto& [quantile, value] : {std::pair{"0.5", p.p50}, std::pair{"0.99", p.p99}}) {
            if (!value) continue;
            ::prometheus::ClientMetric one;
            one.label = common;
            one.label.push_back({"quantile", quantile});
            one.gauge.value = *value;
            family.metric.push_back(std::move(one));
          }
        } else {
          const bool counter = def.kind == detail::metric_kind::counter;
          set_type(family, def, counter ? ::prometheus::MetricType::Counter : ::prometheus::MetricType::Gauge);
          if (!p.label_name.empty()) metric.label.push_back({std::string(p.label_name), std::string(p.label_value)});
          (counter ? metric.counter.value : metric.gauge.value) = double(p.value);
          family.metric.push_back(std::move(metric));
        }
      }
    }
  }

  static void set_type(::prometheus::MetricFamily& family, const detail::metric_family& def,
                       ::prometheus::MetricType type) {
    family.name = std::string(def.name); // prometheus-cpp 1.0 writes counters' names as given (with _total)
    family.help = std::string(def.help);
    family.type = type;
  }

  mutable std::mutex mutex_;    // held by Collect while it reads the sources, so detach waits for it
  std::vector<source> sources_; // guarded by mutex_
  std::set<std::string> keys_;  // guarded by mutex_; the batcher names and labels added
};

/// A `prometheus_collector` registered with `registrar` (a `prometheus::Exposer`, or anything with
/// `RegisterCollectable(std::weak_ptr<Collectable>)` and `RemoveCollectable(...)`) for this object's
/// life. `add` takes any object with `Stats stats() const`: a Batcher, a KeyedBatcher, or a lambda
/// wrapper of your own.
///
/// Lifetime rule: every batcher added, and the registrar, must outlive this object; declare it after
/// them, so that it is destroyed first. The destructor removes the collector from the registrar, then
/// waits for a scrape in progress and detaches the collector, so no scrape can reach a batcher after
/// the destructor returns (a scrape that still holds the collector gets no families).
/// Non-copyable, non-movable.
template <class Registrar> class prometheus_registration {
public:
  /// Registers an empty collector with `registrar`. Thread-safe as far as the registrar's registration
  /// is (the Exposer's is).
  explicit prometheus_registration(Registrar& registrar)
      : registrar_(registrar), collector_(std::make_shared<prometheus_collector>()) {
    registrar_.RegisterCollectable(collector_);
  }
  prometheus_registration(const prometheus_registration&) = delete;
  prometheus_registration& operator=(const prometheus_registration&) = delete;

  ~prometheus_registration() {
    registrar_.RemoveCollectable(collector_);
    collector_->detach();
  }

  /// Exports `batcher` (which must outlive this object) as `name` with `labels`. Throws like
  /// `prometheus_collector::add`. Thread-safe.
  template <class Source>
  requires requires(const Source& s) {
    { s.stats() } -> std::convertible_to<Stats>;
  }
  void add(const Source& batcher, const std::string& name, const metric_labels& labels = {}) {
    collector_->add([&batcher] { return Stats(batcher.stats()); }, name, labels);
  }

  /// The collector (e.g. to call Collect in a test). Thread-safe.
  [[nodiscard]] const std::shared_ptr<prometheus_collector>& collector() const noexcept { return collector_; }

  // ---------------------------------------------------------------------------------------------
  // Implementation details follow.
private:
  Registrar& registrar_;
  std::shared_ptr<prometheus_collector> collector_;
};

} // namespace microbatch
