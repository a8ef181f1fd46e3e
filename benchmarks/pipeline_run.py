"""A finished pipeline run as a benchmark result: each stage's wall seconds and every figure of its manifest,
with the machine, the command that made the run, the commit and the date. The README's demo table cites one:

    make demo
    python benchmarks/pipeline_run.py runs/demo --made-by "make demo" --out benchmarks/results/demo.json
"""
from __future__ import annotations

import argparse

from common import write_report
from pipeline.storage import Manifest, RunDir
from orchestration.runner import stored_config
from stages import names, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory whose stages are committed")
    parser.add_argument("--made-by", required=True, help="the command that produced the run")
    parser.add_argument("--total-seconds", type=float, help="the made-by command's wall time, if measured")
    parser.add_argument("--out")
    args = parser.parse_args()
    run_dir = RunDir(args.run_dir)
    stages = {}
    tokens = (stored_config(args.run_dir) or {}).get("tokens", "vq")  # the graph the run was made with
    for name in names(tokens):
        manifest = Manifest.read(run_dir, spec(name).folder)
        if manifest is None:
            raise SystemExit(f"stage {name} is not committed in {run_dir.location}")
        stages[name] = {"wall_seconds": round(manifest.wall_seconds, 1), "created": manifest.created,
                        "config_hash": manifest.config_hash, "metrics": manifest.metrics}
    write_report(args.out, "pipeline_run", {"made_by": args.made_by, "total_seconds": args.total_seconds,
                                            "run_dir": run_dir.location, "stages": stages})


if __name__ == "__main__":
    main()
