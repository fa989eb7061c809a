"""Measures generation of the synthetic consortium: seconds, patients per second,
peak resident memory (bytes).

Usage: python benchmarks/synthetic_generation.py [--patients N] [--hospitals H]
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from clinical import synthetic


def _peak_rss_bytes() -> int:
    # ru_maxrss is kilobytes on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rss_before = _peak_rss_bytes()
    started = time.perf_counter()
    cohort = synthetic.generate(args.patients, args.hospitals, args.seed)
    seconds = time.perf_counter() - started
    rss_peak = _peak_rss_bytes()

    bayes = synthetic.auroc(cohort.label, cohort.p_true)
    sizes = np.bincount(cohort.hospital, minlength=args.hospitals)
    figures = {
        "patients": args.patients,
        "hospitals": args.hospitals,
        "generation_seconds": round(seconds, 3),
        "patients_per_second": round(args.patients / seconds),
        "peak_rss_bytes": rss_peak,
        "peak_rss_bytes_after_imports": rss_before,
        "onset_rate_six_months": round(float(cohort.label.mean()), 5),
        "bayes_auroc_all_patients": round(bayes, 4),
        "hospital_size_min": int(sizes.min()),
        "hospital_size_max": int(sizes.max()),
    }

    width = max(len(k) for k in figures)
    print(f"{'figure':<{width}}  value")
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int)
              else f"{key:<{width}}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
