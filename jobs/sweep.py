"""A Ray Tune sweep over config keys; each trial runs the pipeline from the first swept stage to --last-stage.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/demo.yaml \\
        --sweep-dir $PWD/runs/sweep-dim --grid tokenizer.codebook_dim=4,8,16,32,64 \\
        --last-stage tokenizer --metric tokenizer.val_usage_per_256 --mode max

Search: --grid (every value), --choice (random pick), --uniform / --loguniform LOW,HIGH; random keys draw
--num-samples times per grid point. --scheduler asha stops trials early on a metric the training stages
log as they go (tokenizer.val_psnr, transformer.val_bits_per_token, transformer.val_loss_nats), by step.
Stages before the first swept one run once and are shared. Re-running the same command resumes a killed sweep. Writes comparison.csv/.md and one plot per swept key.
"""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (puts the project on sys.path)

from pipeline.config import ConfigError, build_config, load_yaml_file
from pipeline.storage import check_run_dir
from pipeline.tracking import runs_page
from stages import STAGE_NAMES
from orchestration.errors import PipelineError
from orchestration.runner import connect_ray
from orchestration.sweep import SCHEDULERS, SEARCH_KINDS, SweepSpec, parse_search, run_sweep, sweep_tracking_uri, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset the trials start from")
    parser.add_argument("--sweep-dir", required=True, help="local folder for the shared stages, trials and tables")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    for kind in SEARCH_KINDS:
        parser.add_argument(f"--{kind}", action="append", default=[], metavar="SECTION.KEY=V1,V2")
    parser.add_argument("--last-stage", default="evaluate", choices=STAGE_NAMES)
    parser.add_argument("--metric", help="<stage>.<metric> Tune ranks trials by, e.g. evaluate.rfid_domain")
    parser.add_argument("--mode", default="max", choices=("max", "min"))
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-concurrent", type=int, help="default: as many trials as the cluster fits, each "
                        "holding its busiest stage (workers or actors plus a read task); more is refused")
    parser.add_argument("--scheduler", default="fifo", choices=SCHEDULERS, help="asha: early stopping on --metric")
    parser.add_argument("--grace-period", type=int, help="ASHA: training steps before a first cut (default: 1/4)")
    parser.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/this at each rung")
    parser.add_argument("--column", dest="columns", action="append", default=[], metavar="STAGE.METRIC",
                        help="a figure for comparison.md and the plots, after --metric (repeatable; every figure "
                        "is in comparison.csv)")
    args = parser.parse_args(argv)
    try:
        space = dict(parse_search(kind, text) for kind in SEARCH_KINDS for text in getattr(args, kind))
        if not space:
            raise ConfigError("nothing to sweep: give at least one --grid/--choice/--uniform/--loguniform")
        check_run_dir(args.sweep_dir)
        if args.config and not Path(args.config).is_file():
            raise ConfigError(f"config file not found: {args.config}")
        base = (load_yaml_file(args.config) or {}) if args.config else {}
        spec = SweepSpec(base=base, space=space, last_stage=args.last_stage, metric=args.metric, mode=args.mode,
                         num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                         extra_overrides=args.overrides, scheduler=args.scheduler, grace_period=args.grace_period,
                         reduction_factor=args.reduction_factor, columns=tuple(args.columns))
        points = validate(spec)  # every trial's config, before Ray starts
        print(f"sweep: {len(points)} grid point(s) x {args.num_samples} sample(s), stages "
              f"{spec.first_stage} -> {spec.last_stage}")
        connect_ray(build_config(base, args.overrides), sweep_tracking_uri(args.sweep_dir))
        summary = run_sweep(spec, args.sweep_dir)
    except (ConfigError, PipelineError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(open(f"{summary['root']}/comparison.md").read())
    need = ", ".join(f"{value:g} {key}" for key, value in sorted(summary["trial_resources"].items()))
    print(f"sweep directory: {summary['root']} ({len(summary['rows'])} trials, {summary['concurrency']} at a time, "
          f"{need} each)")
    print(f"browse: mlflow ui --backend-store-uri sqlite:///{summary['root']}/mlflow.db --host 127.0.0.1 --port 5000")
    print(f"then open {runs_page(summary['experiment_id'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
