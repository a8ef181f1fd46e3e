"""The paper's Table 4 (lookup dim x l2 normalisation) and Table 1 (ViT vs CNN at equal training time) as Ray Tune
sweeps at CPU scale, on CIFAR-10 or any image folder; writes paper_tables.md/.json and plots beside the paper's
numbers, all logged to MLflow.

    python jobs/paper_tables.py                      # default size, ../shared/data/cifar10-jpeg.tar.gz
    python jobs/paper_tables.py --quick              # fewer dims, steps and images
    python jobs/paper_tables.py --images DIR         # DIR/train/<class>/*, DIR/test/<class>/* (or val/)

Re-running the same command resumes it (orchestration/paper_tables.py says how).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (puts the project on sys.path)

from pipeline.config import ConfigError
from pipeline.data.sources import SourceError
from pipeline.storage import check_run_dir
from pipeline.tracking import runs_page
from orchestration.errors import PipelineError
from orchestration.paper_tables import (DEFAULT_ARCHIVE, SIZES, Plan, check_archive, check_plan, default_tracking_uri,
                                        extract_archive, image_folder_splits, preflight_plan, run, validate_plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default: runs/paper-tables, runs/paper-tables-quick with "
                        "--quick)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", default=str(DEFAULT_ARCHIVE), help="CIFAR-10 JPEG archive, extracted once "
                        "under OUT/images (default: %(default)s)")
    source.add_argument("--images", help="an image folder instead: train/<class>/ and test/<class>/ (or val/)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick size (what it leaves out is in the output)")
    size.add_argument("--size", choices=sorted(SIZES), default="default", help="tiny: a path check for tests")
    parser.add_argument("--dims", help="Table 4's lookup dims, comma separated (default: the size's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="on every trial, after the size's settings (e.g. tokenizer.encoder=S)")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else args.size
    out = Path(args.out or f"runs/paper-tables{'' if size_name == 'default' else '-' + size_name}").resolve()
    started = time.perf_counter()
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        check_run_dir(str(out))
        if args.images:
            images = Path(args.images).resolve()
        else:
            check_archive(Path(args.archive))
            images = None
        dims = [int(d) for d in args.dims.split(",")] if args.dims else list(SIZES[size_name].dims)
        plan = Plan(size=size_name, out=str(out), images=str(images or out / "images"), val_split="test",
                    dims=dims, overrides=list(args.overrides))
        if images is not None:
            plan.val_split = image_folder_splits(images)
        validate_plan(plan)  # every trial's config; the archive is extracted after
        if images is None:
            plan.images = str(extract_archive(Path(args.archive), out / "images"))
            plan.val_split = image_folder_splits(Path(plan.images))
        check_plan(plan)
        preflight_plan(plan)
        os.environ["MLFLOW_TRACKING_URI"] = default_tracking_uri(str(out))  # one store for every sweep
        from orchestration.paper_report import write
        from orchestration.runner import connect_ray

        connect_ray(plan.config(), os.environ["MLFLOW_TRACKING_URI"])
        outcome = run(plan)
        report = write(outcome, time.perf_counter() - started)
    except (ConfigError, PipelineError, SourceError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if previous_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_uri
    print((out / "paper_tables.md").read_text())
    print(f"paper tables: {out} in {time.perf_counter() - started:.0f} s")
    print(f"browse: mlflow ui --backend-store-uri {report['mlflow']['tracking_uri']} --host 127.0.0.1 --port 5000")
    print(f"then open {runs_page(_experiment_id(report))}")
    return 0


def _experiment_id(report: dict) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(report["mlflow"]["tracking_uri"])
    return client.get_run(report["mlflow"]["run_id"]).info.experiment_id


if __name__ == "__main__":
    sys.exit(main())
