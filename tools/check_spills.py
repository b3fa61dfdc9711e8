#!/usr/bin/env python3
"""Spill gate (issue 4: no spills in the kernels): reads the ptxas -v reports that
tools/nvcc_report.sh keeps next to every CUDA object of a build (<object>.ptxas.txt) and fails
when a kernel spills registers to local memory, unless tools/spill_baseline.txt lists it with at
least as many spill bytes (known spills, each an open defect; the baseline only ever shrinks).

  python3 tools/check_spills.py BUILD_DIR [--baseline tools/spill_baseline.txt]

Exit 0: no spill beyond the baseline (the known ones are listed). Exit 1: a new or larger spill,
or no report at all (a CUDA build always has some: the gate cannot pass by seeing nothing).
Baseline entries that no longer spill are reported so the baseline can be trimmed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

PROPS = re.compile(r"Function properties for (\S+)")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def read_reports(build_dir: str):
    """{function: (spill store bytes, spill load bytes)}, the maximum over the objects."""
    found, files = {}, 0
    for root, _, names in os.walk(build_dir):
        for n in names:
            if not n.endswith(".ptxas.txt"):
                continue
            files += 1
            fn = None
            with open(os.path.join(root, n), errors="replace") as f:
                for line in f:
                    m = PROPS.search(line)
                    if m:
                        fn = m.group(1)
                        continue
                    m = SPILL.search(line)
                    if m and fn:
                        st, ld = int(m.group(1)), int(m.group(2))
                        old = found.get(fn, (0, 0))
                        found[fn] = (max(old[0], st), max(old[1], ld))
                        fn = None
    return found, files


def read_baseline(path: str):
    base = {}
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, st, ld = line.split()
            base[name] = (int(st), int(ld))
    return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build_dir")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--baseline", default=os.path.join(here, "spill_baseline.txt"))
    a = ap.parse_args()
    found, files = read_reports(a.build_dir)
    if not found:
        print(f"check_spills: FAILED: no ptxas report in {a.build_dir} ({files} report files); "
              "configure with MAMBA3_ENABLE_CUDA=ON (the launcher tools/nvcc_report.sh keeps them)")
        return 1
    base = read_baseline(a.baseline)
    bad, known = [], []
    for fn, (st, ld) in sorted(found.items()):
        if st == 0 and ld == 0:
            continue
        b = base.get(fn)
        if b is None or st > b[0] or ld > b[1]:
            bad.append(f"  {fn}: {st} bytes spill stores, {ld} bytes spill loads"
                       + (f" (baseline {b[0]}, {b[1]})" if b else " (new)"))
        else:
            known.append(f"  {fn}: {st} / {ld} bytes (baseline {b[0]} / {b[1]})")
    gone = [fn for fn in base if found.get(fn, (0, 0)) == (0, 0)]  # spill-free or gone
    print(f"check_spills: {len(found)} functions in {files} ptxas reports")
    if known:
        print("known spills (open defects, tools/spill_baseline.txt):\n" + "\n".join(known))
    if gone:
        print("baseline entries that no longer spill (remove them):\n  " + "\n  ".join(gone))
    if bad:
        print("FAILED: spills beyond the baseline:\n" + "\n".join(bad))
        return 1
    print("check_spills: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
