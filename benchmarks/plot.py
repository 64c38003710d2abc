#!/usr/bin/env python3
"""Draws benchmarks/compare's table as grouped bars: one panel per kind of metric (throughput,
latency, memory, context switches), microbatch beside the baseline for every workload.

Usage: benchmarks/plot.py TABLE.txt OUT.svg|OUT.png   (TABLE.txt: what benchmarks/compare printed)
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("throughput (higher is better)", lambda m: m in ("jobs/s", "loads/s"), "per second", True),
    ("latency (lower is better)", lambda m: m.endswith(" us") and m != "jobs below delay", "microseconds", True),
    ("memory (lower is better)", lambda m: m in ("peak RSS MiB", "peak heap bytes/pending job", "peak heap MiB"), "", True),
    ("context switches per batch (lower is better)", lambda m: m == "ctx switches/batch", "", True),
]


def read_table(path):
    rows = []
    started = False
    for line in open(path, encoding="utf-8"):
        if line.startswith("workload") and "ratio" in line:
            started = True
            continue
        if not started:
            continue
        if not line.strip() or line.startswith("(") or len(line) < 90:
            break
        workload, metric = line[:24].strip(), line[25:53].strip()
        baseline, ours = float(line[54:68]), float(line[69:83])
        rows.append((workload, metric, baseline, ours))
    return rows


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = read_table(sys.argv[1])
    if not rows:
        sys.exit("plot.py: no table found in " + sys.argv[1])
    panels = [(title, [r for r in rows if pick(r[1]) and r[2] > 0 and r[3] > 0], unit, log)
              for title, pick, unit, log in PANELS]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.4 * len(panels)))
    if len(panels) == 1:
        axes = [axes]
    for axis, (title, chosen, unit, log) in zip(axes, panels):
        labels = [f"{w}\n{m}" for w, m, _, _ in chosen]
        xs = range(len(chosen))
        width = 0.38
        axis.bar([x - width / 2 for x in xs], [r[2] for r in chosen], width, label="baseline", color="#9e9e9e")
        axis.bar([x + width / 2 for x in xs], [r[3] for r in chosen], width, label="microbatch", color="#1f77b4")
        axis.set_xticks(list(xs))
        axis.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        axis.set_title(title)
        if unit:
            axis.set_ylabel(unit)
        if log:
            axis.set_yscale("log")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
