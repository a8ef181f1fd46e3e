"""Run one stage on an existing run directory, with the config its last pipeline run used.

    ray job submit --working-dir . -- python jobs/run_stage.py evaluate --run-dir runs/demo \\
        --set evaluate.guidance_scale=2.0

The stage reruns when its config or inputs changed (or with --force); its upstream stages must be
committed. Stages after it are left as they are: rerun them with full_pipeline.py --from STAGE.
"""
import argparse
import sys

import _bootstrap  # noqa: F401  (puts the project on sys.path)

from pipeline.config import ConfigError, build_config, load_config
from pipeline.data.sources import SourceError
from pipeline.models.losses import PerceptualWeightsMissing
from pipeline.stage import StageInputError
from pipeline.tracking import default_tracking_uri
from stages import STAGE_NAMES
from stages.report import print_summary
from stages.runner import PipelineError, connect_ray, preflight, run_pipeline, stored_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGE_NAMES)
    parser.add_argument("--run-dir", required=True, help="an existing run directory (local path or URI)")
    parser.add_argument("--config", help="YAML preset to use instead of the run directory's stored config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="rerun even when committed and current")
    args = parser.parse_args(argv)
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            stored = stored_config(args.run_dir)
            if stored is None:
                raise PipelineError(f"{args.run_dir} has no stored config (no pipeline ran there); "
                                    f"pass --config or run jobs/full_pipeline.py first")
            cfg = build_config(stored, args.overrides)
        preflight(cfg, None, args.stage, None)
        connect_ray(cfg, default_tracking_uri(args.run_dir))
        outcomes = run_pipeline(cfg, args.run_dir, only=args.stage, force=(args.stage,) if args.force else ())
    except (ConfigError, PipelineError, SourceError, PerceptualWeightsMissing, StageInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(outcomes, args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
