#!/usr/bin/env python3
"""Per-kernel GPU time of one ncu log (`ncu --section SpeedOfLight` text output).

Prints each kernel whose signature contains SIGNATURE (e.g. "(BwdParams"), in launch order, with
its number of launches and their summed Duration in microseconds, then the total.
    usage: ncu_durations.py NCU_LOG [SIGNATURE]
"""
import re
import sys

UNIT_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


def main() -> int:
    path = sys.argv[1]
    sig = re.escape(sys.argv[2] if len(sys.argv) > 2 else "(BwdParams")
    header = re.compile(r"\s+(?:void )?(\w+?)(?:<[^(]*>)?" + sig)
    duration = re.compile(r"\s+Duration\s+(\w+)\s+([\d.,]+)")
    name, totals = None, {}  # dicts keep insertion (launch) order
    for line in open(path, errors="replace"):
        m = header.match(line)
        if m:
            name = m.group(1)
            continue
        m = duration.match(line)
        if m and name:
            n, t = totals.get(name, (0, 0.0))
            totals[name] = (n + 1, t + float(m.group(2).replace(",", "")) * UNIT_US[m.group(1)])
            name = None
    for k, (n, t) in totals.items():
        print(f"  {k:32s} {n:3d} {t:10.1f}")
    print(f"  {'total':32s} {sum(n for n, _ in totals.values()):3d} "
          f"{sum(t for _, t in totals.values()):10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
