#!/usr/bin/env python3
"""Hot instructions of one kernel from `ncu -i REP --page source --csv --print-source sass`.

Prints the columns ncu gave, the warp-stall samples summed by opcode, and the N instructions
with the most samples (address, SASS, samples, executions).
    usage: ncu_hot.py SASS_CSV [N]
"""
import collections
import sys

from ncu_table import SassTable


def main() -> int:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    t = SassTable(path)
    if not t.rows:
        print("no source table in", path)
        print("\n".join(t.head))
        return 1
    rows, cols, col = t.rows, t.cols, t.col
    print("columns:", " | ".join(cols))

    samp = col("Warp Stall Sampling", "All") or col("Sampling")
    execd = col("Instructions Executed")
    src = col("Source")
    addr = col("Address") or cols[0]
    if samp is None or src is None:
        print("missing sampling or source column")
        return 1
    num = t.num

    total = sum(num(r[samp]) for r in rows) or 1.0
    by_op = collections.Counter()
    for r in rows:
        op = r[src].split()[0] if r[src].split() else "?"
        if op.startswith("@"):
            op = r[src].split()[1] if len(r[src].split()) > 1 else op
        by_op[op.split(".")[0]] += num(r[samp])
    print(f"\n{len(rows)} instructions, {total:.0f} stall samples; by opcode:")
    for op, v in by_op.most_common(15):
        print(f"  {op:10s} {100 * v / total:5.1f}%")
    # Per-reason columns (stall_barrier, stall_long_sb, ...), all samples (not "Not Issued").
    reasons = [c for c in cols if c.startswith("stall_") and "Not Issued" not in c]
    if reasons:
        by_reason = {c: sum(num(r[c]) for r in rows) for c in reasons}
        rtotal = sum(by_reason.values()) or 1.0
        print("\nstall reasons (all samples):")
        for c, v in sorted(by_reason.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {c[6:]:18s} {100 * v / rtotal:5.1f}%")
    print(f"\ntop {n} instructions by samples ({samp}), with their top stall reasons:")
    for r in sorted(rows, key=lambda r: -num(r[samp]))[:n]:
        top = sorted(((num(r[c]), c[6:]) for c in reasons), reverse=True)[:3]
        more = " ".join(f"{name}={v:.0f}" for v, name in top if v)
        print(f"  {r[addr][-5:]:>5s} {100 * num(r[samp]) / total:5.1f}% exec={r.get(execd, '')} "
              f"{r[src].strip()[:60]:60s} {more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
