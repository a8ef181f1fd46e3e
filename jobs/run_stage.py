"""Run one stage on an existing run directory, with the config its last pipeline run used.

    ray job submit --working-dir . -- python jobs/run_stage.py evaluate --run-dir runs/demo \\
        --set evaluate.guidance_scale=2.0

The stage reruns when its config or inputs changed (or with --force); its upstream stages must be
committed. Stages after it are left as they are: rerun them with full_pipeline.py --from STAGE.
"""
import argparse
import os
import sys

import _bootstrap  # noqa: F401  (puts the project on sys.path)

from pipeline.config import PipelineConfig, build_config, load_config
from pipeline.storage import is_uri
from stages import STAGE_NAMES
from orchestration.errors import PipelineError
from orchestration.runner import run_job, stored_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGE_NAMES)
    parser.add_argument("--run-dir", required=True, help="an existing run directory (local path or URI)")
    parser.add_argument("--config", help="YAML preset to use instead of the run directory's stored config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="rerun even when committed and current")
    parser.add_argument("--verify", action="store_true",
                        help="also compare checksums (not only sizes) of the committed files it reads or skips")
    args = parser.parse_args(argv)

    def make_config() -> PipelineConfig:
        # RunDir() creates its folder: look before anything opens one, so a mistyped path is refused, not made
        if not _run_dir_exists(args.run_dir):
            raise PipelineError(f"run directory {args.run_dir} does not exist; run jobs/full_pipeline.py there "
                                f"first (run_stage.py works on an existing run directory)")
        if args.config:
            return load_config(args.config, args.overrides)
        stored = stored_config(args.run_dir)
        if stored is None:
            raise PipelineError(f"{args.run_dir} has no stored config (no pipeline ran there); "
                                f"pass --config or run jobs/full_pipeline.py first")
        return build_config(stored, args.overrides)

    return run_job(make_config, args.run_dir, only=args.stage, force=(args.stage,) if args.force else (),
                   verify=args.verify)


def _run_dir_exists(location: str) -> bool:
    """Whether the run directory is there, without creating it (a local folder or a bucket prefix)."""
    if not is_uri(location):
        return os.path.isdir(os.path.expanduser(location))
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(location.rstrip("/"))
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise PipelineError(f"run directory {location} cannot be read: {error}".replace("\n", " ")) from None


if __name__ == "__main__":
    sys.exit(main())
