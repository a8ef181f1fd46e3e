"""Run the pipeline: every stage in order, skipping what is committed, resuming what is not.

    ray job submit --working-dir . -- python jobs/full_pipeline.py --config configs/demo.yaml --run-dir runs/demo
"""
import argparse
import sys

import _bootstrap  # noqa: F401  (puts the project on sys.path)

from pipeline.config import load_config
from stages import STAGE_NAMES
from orchestration.runner import run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset, e.g. configs/demo.yaml")
    parser.add_argument("--run-dir", required=True, help="local path or a pyarrow.fs URI (gs://, s3://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, help="run this stage and all after it")
    group.add_argument("--only", choices=STAGE_NAMES, help="run just this stage")
    parser.add_argument("--to", dest="to_stage", choices=STAGE_NAMES, help="stop after this stage")
    parser.add_argument("--force", action="append", default=[], choices=STAGE_NAMES,
                        help="rerun this stage even when it is committed and current")
    parser.add_argument("--verify", action="store_true",
                        help="also compare checksums (not only sizes) of the committed files stages read or skip")
    args = parser.parse_args(argv)
    # load_config raises every config error before any Ray work
    return run_job(lambda: load_config(args.config, args.overrides), args.run_dir, args.from_stage, args.only,
                   args.to_stage, tuple(args.force), verify=args.verify)


if __name__ == "__main__":
    sys.exit(main())
