#!/usr/bin/env python3
"""Per-source-line totals of one kernel's Nsight Compute SASS table.

Joins `ncu -i REP --page source --csv --print-source sass` (per-instruction executions and
warp-stall samples, runtime addresses) with `nvdisasm -gi` of the same binary's cubin built with
-lineinfo (instruction offsets with their source lines and inlining chains), by the instruction's
offset from the kernel's first instruction, and prints the lines with the most executed warp
instructions: by innermost line and by the kernel-level line the code was inlined into.

    usage: ncu_lines.py SASS_CSV NVDISASM_TXT KERNEL_SUBSTRING [N]

NVDISASM_TXT: `cuobjdump -xelf all OBJ.cu.o` then `nvdisasm -gi OBJ.sm_90a.cubin` (both from
`pip download nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`), OBJ from the same -lineinfo build as
the profiled binary (-lineinfo leaves the SASS unchanged).
"""
import collections
import re
import sys

from ncu_table import SassTable

LINE = re.compile(r'//## File "([^"]+)", line (\d+)(.*)')
INLINED = re.compile(r'inlined at "([^"]+)", line (\d+)')
INSN = re.compile(r'/\*([0-9a-f]+)\*/\s+(\S.*?)\s*;?\s*$')


def short(path: str) -> str:
    return path.split("/src/")[-1] if "/src/" in path else path.rsplit("/", 1)[-1]


def disasm_lines(path: str, kernel: str):
    """offset -> (innermost, outermost, one level below the outermost) 'file:line' for the
    kernel's .text section. nvdisasm -gi writes one '//## File' line per inlining level before an
    instruction, innermost first."""
    out, inside, cur, pending = {}, False, (None, None, None), []
    with open(path) as f:
        for raw in f:
            if raw.startswith(".text."):
                inside = kernel in raw
                continue
            if not inside:
                continue
            m = LINE.search(raw)
            if m:
                pending.append(f"{short(m.group(1))}:{m.group(2)}")
                continue
            m = INSN.search(raw)
            if m:
                if pending:
                    cur = (pending[0], pending[-1], pending[-2] if len(pending) > 1 else pending[-1])
                    pending = []
                out[int(m.group(1), 16)] = cur
    return out


def main() -> int:
    csv_path, dis_path, kernel = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    t = SassTable(csv_path)
    if not t.rows:
        print("no source table in", csv_path)
        return 1
    rows, num = t.rows, t.num
    addr_c, exec_c = t.col("Address"), t.col("Instructions Executed")
    samp_c = t.col("Warp Stall Sampling", "All") or t.col("Sampling")
    if addr_c is None or exec_c is None:
        print("missing Address or Instructions Executed column; columns:", t.cols)
        return 1

    addrs = [int(r[addr_c], 16) for r in rows]
    base = min(addrs)
    where = disasm_lines(dis_path, kernel)
    if not where:
        print("kernel", kernel, "not found in", dis_path)
        return 1
    inner, outer, mid = collections.Counter(), collections.Counter(), collections.Counter()
    inner_s, outer_s, mid_s = collections.Counter(), collections.Counter(), collections.Counter()
    total_e = total_s = 0.0
    unmapped = 0
    for r, a in zip(rows, addrs):
        e, s = num(r[exec_c]), num(r[samp_c]) if samp_c else 0.0
        total_e += e
        total_s += s
        loc = where.get(a - base)
        if loc is None or loc[0] is None:
            unmapped += e
            continue
        inner[loc[0]] += e
        outer[loc[1]] += e
        mid[loc[2]] += e
        inner_s[loc[0]] += s
        outer_s[loc[1]] += s
        mid_s[loc[2]] += s
    print(f"{len(rows)} instructions, {total_e:.4g} warp instructions executed, "
          f"{total_s:.0f} stall samples; unmapped executions {unmapped:.4g}")
    for title, cnt, smp in (("kernel-level line (inlined into)", outer, outer_s),
                            ("line one level below the kernel", mid, mid_s),
                            ("innermost line", inner, inner_s)):
        print(f"\nby {title}: % of executed, % of stall samples")
        for loc, e in cnt.most_common(n):
            print(f"  {100 * e / total_e:5.1f}%  {100 * smp[loc] / (total_s or 1):5.1f}%  {loc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
