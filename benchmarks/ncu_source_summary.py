"""Summarize an `ncu --page source --csv --print-source sass` dump: where a kernel's warps stall.

Prints the columns found, the instructions with the most warp-stall samples (with their
per-reason breakdown), and the samples summed by opcode. Column names differ between Nsight
Compute versions, so they are matched loosely ("Sampling" + "All" for the total).

Usage: python benchmarks/ncu_source_summary.py gemm_source.csv [--top 40]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path


def to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", type=Path)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    lines = args.csv.read_text(errors="replace").splitlines()
    header_at = next((i for i, line in enumerate(lines) if "Source" in line and "," in line), None)
    if header_at is None:
        print(f"{args.csv}: no header row with a 'Source' column; first lines:")
        print("\n".join(lines[:10]))
        return 1
    rows = list(csv.reader(lines[header_at:]))
    header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    print(f"{len(body)} instructions; columns: {header}")
    source_col = header.index("Source")
    total_cols = [i for i, h in enumerate(header) if "Sampling" in h and "All" in h]
    if not total_cols:
        print("no stall-sampling column")
        return 1
    total_col = total_cols[0]
    reason_cols = [i for i, h in enumerate(header) if h.lower().startswith("stall") or "stall_" in h.lower()]
    samples = [(to_number(r[total_col]) or 0.0, r) for r in body]
    grand = sum(s for s, _ in samples) or 1.0
    print(f"total samples ({header[total_col]}): {grand:.0f}")

    print(f"\ntop {args.top} instructions by samples:")
    for s, r in sorted(samples, key=lambda x: -x[0])[: args.top]:
        reasons = sorted(((to_number(r[i]) or 0.0, header[i]) for i in reason_cols), reverse=True)[:3]
        why = ", ".join(f"{name} {v:.0f}" for v, name in reasons if v > 0)
        print(f"{100 * s / grand:5.1f}%  {r[source_col][:70]:<70}  {why}")

    by_opcode: Counter[str] = Counter()
    for s, r in samples:
        text = r[source_col].strip()
        if text.startswith("@"):
            text = text.split(None, 1)[1] if " " in text else text
        by_opcode[text.split(" ")[0] if text else "?"] += s
    print("\nsamples by opcode:")
    for op, s in by_opcode.most_common(25):
        print(f"{100 * s / grand:5.1f}%  {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
