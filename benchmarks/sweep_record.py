"""A finished sweep as a benchmark result: its comparison table (comparison.md) and every trial's figures
(comparison.csv), with the machine, the command that ran the sweep, the commit and the date.

    make sweep-digit-k
    python benchmarks/sweep_record.py runs/sweep-digit-k --made-by "make sweep-digit-k" \\
        --out benchmarks/results/sweep-digit-k.json
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common import write_report


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep directory holding comparison.md and comparison.csv")
    parser.add_argument("--made-by", required=True, help="the command that ran the sweep")
    parser.add_argument("--wall-seconds", type=float, help="the made-by command's wall time, if measured")
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(args.sweep_dir)
    with open(root / "comparison.csv", newline="") as handle:
        rows = [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    write_report(args.out, "sweep", {"made_by": args.made_by, "wall_seconds": args.wall_seconds,
                                     "sweep_dir": str(root), "comparison_md": (root / "comparison.md").read_text(),
                                     "rows": rows})


if __name__ == "__main__":
    main()
