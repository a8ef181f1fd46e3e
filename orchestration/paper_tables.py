"""The paper's Table 4 (lookup dimension, l2 normalisation) and Table 1 (ViT vs CNN at equal training time) as
Ray Tune sweeps through `orchestration.sweep`, on CIFAR-10 or any image folder; `jobs/paper_tables.py` is its
command line.

Layout under the output folder:
    images/              the archive, extracted once (not with --images)
    data/                ingest, run once for every sweep, and the one evaluation network (recon_eval/)
    table4/              sweep: lookup dims x l2 on/off, each trial to the tokenizer, then its reconstruction
                         evaluation (orchestration/recon_eval.py)
    table1-calibration/  sweep: each architecture trained briefly, alone, to measure its training throughput
    table1/              sweep: ViT and CNN, each with the steps that fill the same training seconds
    paper_tables.md/.json, table4.png, table1.png, mlflow.db, plan.json

Every sweep's base/ links data/'s ingest, so all trials read the same shards and are graded against the same
reference statistics. Re-running the same command resumes: ingest and the evaluation network are reused,
the sweeps restore their Tune experiments and skip committed stages, the calibration is read again from its
trials' MLflow runs (so the same steps), and a trial's reconstruction record is reused when its key matches.
"""
from __future__ import annotations

import json
import os
import statistics
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import ConfigError, PipelineConfig, build_config, load_yaml_file
from pipeline.storage import Manifest, RunDir
from orchestration.errors import PipelineError
from orchestration.recon_eval import ReconstructionEvaluation, train_shared_classifier
from orchestration.sweep import SweepSpec, link_shared_stages, run_sweep, sweep_tracking_uri, validate

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "paper-tables.yaml"
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ARCHITECTURES = ("vit", "cnn")
TABLE1_WORKERS = 2  # Table 1's trials run alone on the machine (their speed is a result), 2 workers x 0.5 CPU
CALIBRATION_WINDOW = 2  # steps per throughput window of a calibration trial
VAL_SPLIT_NAMES = ("test", "val")


@dataclass(frozen=True)
class Size:
    """How much the command runs. `overrides` are `--set`s on the preset; `leaves_out` is said in the output."""

    name: str
    dims: tuple[int, ...]                 # Table 4's lookup dims, each with and without l2 normalisation
    steps: int                            # Table 4: training steps of every trial
    table1_seconds: float                 # Table 1: training seconds of each architecture
    calibration_steps: int                # Table 1: steps of each architecture's throughput measurement
    overrides: tuple[str, ...] = ()
    leaves_out: str = ""


SIZES: dict[str, Size] = {
    "default": Size(
        "default", dims=(4, 8, 16, 32, 64, 128), steps=200, table1_seconds=120.0, calibration_steps=30,
        overrides=("ingest.max_images_per_split=20000",),
        leaves_out="the paper's 256 row (the mini encoder is 128 wide; S, the next preset, trains ~14x slower "
                   "here), its discriminator and perceptual loss, and its scale (ImageNet at 256 px, 500k steps)"),
    "quick": Size(
        "quick", dims=(4, 32, 128), steps=60, table1_seconds=25.0, calibration_steps=12,
        overrides=("ingest.max_images_per_split=3000", "tokenizer.val_images=256", "evaluate.recon_images=300",
                   "evaluate.reference_images=600", "evaluate.samples_per_class=30",
                   "evaluate.domain_train_images=2000", "evaluate.domain_epochs=2"),
        leaves_out="against the default size: lookup dims 8, 16 and 64; 140 of the 200 training steps per "
                   "Table 4 trial; 95 of the 120 training seconds per Table 1 architecture and 18 of the 30 "
                   "calibration steps; 17k of the 20k train images and 7k of the 10k val images ingested; 700 of "
                   "the 1000 reconstructed and 1400 of the 2000 reference val images; 3000 of the 5000 train images "
                   "and 1 of the 3 epochs of the evaluation network; 768 of the 1024 val images of the tokenizer "
                   "stage's own final figures. And what the default leaves out"),
    "tiny": Size(
        "tiny", dims=(4,), steps=6, table1_seconds=2.0, calibration_steps=6,
        overrides=("ingest.resolution=16", "ingest.shard_size=64", "tokenizer.image_size=16",
                   "tokenizer.encoder=tiny", "tokenizer.decoder=tiny", "tokenizer.codebook_size=64",
                   "tokenizer.batch_size=16", "tokenizer.warmup_steps=2", "tokenizer.val_images=32",
                   "tokenizer.log_every=2", "evaluate.recon_images=16",
                   "evaluate.reference_images=32", "evaluate.samples_per_class=4", "evaluate.domain_train_images=64",
                   "evaluate.domain_epochs=1", "evaluate.batch_size=32"),
        leaves_out="everything but the machinery: a path check for tests, on a few images at 16 px"),
}


@dataclass
class Plan:
    """What one run of the command does; stored as plan.json so a rerun in the same folder resumes it."""

    size: str
    out: str
    images: str                            # the image folder ingested: <root>/train/<class>, <root>/<val>/<class>
    val_split: str                         # its held-out folder: test or val
    dims: list[int]
    overrides: list[str] = field(default_factory=list)  # the size's, then the command line's

    @property
    def spec(self) -> Size:
        return SIZES[self.size]

    def config_data(self) -> tuple[dict[str, Any], list[str]]:
        """The preset as data, and every override on it (image folder, size, command line)."""
        base = load_yaml_file(PRESET) or {}
        located = [f"ingest.root={json.dumps(self.images)}",
                   f"ingest.splits={json.dumps({'train': 'train', 'val': self.val_split})}"]
        return base, located + list(self.spec.overrides) + list(self.overrides)

    def config(self, extra: list[str] = ()) -> PipelineConfig:
        base, overrides = self.config_data()
        return build_config(base, overrides + list(extra))


# ---------------------------------------------------------------------------------------------
# The images


def image_folder_splits(root: Path) -> str:
    """The held-out split's folder name of an image folder (`test` or `val`), after checking that it and
    `train` hold class folders. A one-line ConfigError otherwise, before any work."""
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}")
    missing = [name for name in ("train",) if not (root / name).is_dir()]
    val = next((name for name in VAL_SPLIT_NAMES if (root / name).is_dir()), None)
    if missing or val is None:
        raise ConfigError(f"{root} must hold train/<class>/ and test/<class>/ (or val/<class>/) image folders; "
                          f"found: {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'nothing'}")
    for split in ("train", val):
        if not any(p.is_dir() and not p.name.startswith(".") for p in (root / split).iterdir()):
            raise ConfigError(f"{root / split} has no class folders")
    return val


def check_archive(archive: Path) -> None:
    if not archive.is_file():
        raise ConfigError(f"CIFAR-10 archive not found: {archive}; pass --archive PATH (a .tar.gz of "
                          f"cifar10/train/<class>/ and cifar10/test/<class>/ JPEG folders) or --images DIR")


def extract_archive(archive: Path, target: Path) -> Path:
    """The archive's image folder under `target`, extracted once (a marker file says it is complete)."""
    marker = target / ".extracted.json"
    stamp = {"archive": str(archive.resolve()), "size": archive.stat().st_size}
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        target.mkdir(parents=True, exist_ok=True)
        print(f"paper tables: extracting {archive} to {target}", flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        marker.write_text(json.dumps(stamp))
    candidates = [target] + sorted(p for p in target.iterdir() if p.is_dir())
    root = next((c for c in candidates if (c / "train").is_dir()), None)
    if root is None:
        raise ConfigError(f"{archive} holds no train/ folder (looked in {target} and its folders)")
    return root


# ---------------------------------------------------------------------------------------------
# The sweeps


def table4_spec(plan: Plan, follow_up: ReconstructionEvaluation | None) -> SweepSpec:
    base, overrides = plan.config_data()
    return SweepSpec(base=base, space={"tokenizer.codebook_dim": ("grid", list(plan.dims)),
                                       "tokenizer.l2_normalize": ("grid", [True, False])},
                     last_stage="tokenizer", metric="tokenizer.val_usage_per_256", mode="max",
                     extra_overrides=overrides + [f"tokenizer.steps={plan.spec.steps}"], follow_up=follow_up)


def global_batch(plan: Plan) -> int:
    """Images per training step of every trial (Table 4's batch x workers; Table 1 splits it over its workers)."""
    tokenizer = plan.config().tokenizer
    return tokenizer.batch_size * tokenizer.resources.num_workers


def table1_overrides(plan: Plan) -> list[str]:
    """Table 1's trials: the same global batch on TABLE1_WORKERS workers, each trial alone on the machine (its
    need, 2 x 0.5 CPU + a read task, leaves no room for a second on 2 cores; max_concurrent=1 elsewhere)."""
    return [f"tokenizer.resources.num_workers={TABLE1_WORKERS}",
            f"tokenizer.batch_size={max(1, global_batch(plan) // TABLE1_WORKERS)}"]


def calibration_spec(plan: Plan) -> SweepSpec:
    base, overrides = plan.config_data()
    steps = plan.spec.calibration_steps
    return SweepSpec(base=base, space={"tokenizer.architecture": ("grid", list(ARCHITECTURES))},
                     last_stage="tokenizer", max_concurrent=1,
                     extra_overrides=overrides + table1_overrides(plan) + [
                         f"tokenizer.steps={steps}", f"tokenizer.log_every={CALIBRATION_WINDOW}",
                         f"tokenizer.checkpoint_every={steps}", f"tokenizer.image_every={steps}",
                         "tokenizer.val_images=32"])


def table1_spec(plan: Plan, steps: dict[str, int], follow_up: ReconstructionEvaluation | None) -> SweepSpec:
    base, overrides = plan.config_data()
    return SweepSpec(base=base, space={"tokenizer.architecture": ("grid", list(ARCHITECTURES))},
                     last_stage="tokenizer", extra_overrides=overrides + table1_overrides(plan),
                     follow_up=follow_up, max_concurrent=1,
                     value_overrides={"tokenizer.architecture": {
                         arch: [f"tokenizer.steps={n}"] for arch, n in steps.items()}})


def window_rates(tracking_uri: str, run_id: str) -> list[float]:
    """A tokenizer stage run's images/s per logging window, by step (the stage logs one every log_every)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "images_per_second")
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    return [latest[step] for step in sorted(latest)]


def steady_rate(tracking_uri: str, manifest: Manifest) -> float:
    """Training images/s once running: the median of the windows after the first (which holds the workers'
    start and the first reads); the whole run's average where there are too few windows."""
    rates = window_rates(tracking_uri, manifest.mlflow_run_id)[1:]
    return float(statistics.median(rates)) if rates else float(manifest.metrics["train_images_per_second_overall"])


def trial_manifests(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Manifest]]:
    out = []
    for row in rows:
        manifest = Manifest.read(RunDir(row["trial_dir"]), "tokenizer")
        if manifest is None:
            raise PipelineError(f"trial {row['trial_dir']} has no committed tokenizer")
        out.append((row, manifest))
    return out


def calibrate(plan: Plan, summary: dict[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Each architecture's training throughput, measured by the calibration sweep's trials (the stage, workers
    and data path of its Table 1 trial, alone on the machine), and the steps that make it train for
    `table1_seconds`."""
    batch = global_batch(plan)
    seconds = plan.spec.table1_seconds
    measured = {}
    for row, manifest in trial_manifests(summary["rows"]):
        rate = steady_rate(tracking_uri, manifest)
        measured[row["tokenizer.architecture"]] = {
            "images_per_second": rate, "seconds_per_step": batch / rate,
            "windows": window_rates(tracking_uri, manifest.mlflow_run_id), "steps": max(1, round(seconds * rate / batch)),
            "mlflow_run_id": manifest.mlflow_run_id, "trial_dir": row["trial_dir"]}
    return {"training_seconds": seconds, "global_batch": batch, "architectures": measured,
            "how": f"each architecture trained {plan.spec.calibration_steps} steps in the calibration sweep, through the "
                   f"same stage, workers and data path as its Table 1 trial; its images/s is the median of the "
                   f"stage's MLflow throughput windows after the first; steps = round({seconds:g} s x images/s / "
                   f"{batch} images per step)"}


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Outcome:
    plan: Plan
    tracking_uri: str
    table4: dict[str, Any]
    calibration: dict[str, Any]
    table1: dict[str, Any]
    data: dict[str, Any]
    classifier: dict[str, Any]
    seconds: dict[str, float]


def check_plan(plan: Plan) -> None:
    """A folder holds one plan: a rerun with another size, dims or overrides would mix trials of both."""
    stored = Path(plan.out) / "plan.json"
    if stored.is_file():
        previous = json.loads(stored.read_text())
        if previous != asdict(plan):
            changed = sorted(k for k in {*previous, *asdict(plan)} if previous.get(k) != asdict(plan).get(k))
            raise ConfigError(f"{plan.out} holds a paper-tables run of another plan (different {', '.join(changed)}); "
                              f"use another --out, or delete {plan.out} to start over")


def validate_plan(plan: Plan) -> None:
    """Every trial's config of the three sweeps, before any work (Table 1 with placeholder steps)."""
    validate(table4_spec(plan, None))
    validate(calibration_spec(plan))
    validate(table1_spec(plan, {arch: 1 for arch in ARCHITECTURES}, None))


def preflight_plan(plan: Plan) -> None:
    """The stages' own input checks (the image folder's splits, the tokenizer's weights), before Ray starts."""
    from orchestration.runner import preflight

    preflight(plan.config(), to_stage="tokenizer")


def run(plan: Plan) -> Outcome:
    """Both tables' sweeps, after `validate_plan` and with Ray connected. Writes plan.json first."""
    from orchestration.runner import run_pipeline

    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    cfg = plan.config([f"run.experiment={json.dumps(experiment_name(out))}"])
    data_dir = out / "data"
    (ingest,) = run_pipeline(cfg, str(data_dir), to_stage="ingest")
    seconds["ingest"] = time.perf_counter() - clock
    clock = time.perf_counter()
    classifier_file = train_shared_classifier(str(data_dir), cfg)
    seconds["evaluation_network"] = time.perf_counter() - clock
    follow_up = ReconstructionEvaluation(str(classifier_file))

    def sweep(name: str, spec: SweepSpec) -> dict[str, Any]:
        started = time.perf_counter()
        link_shared_stages(data_dir, out / name / "base", first_stage="tokenizer")  # the one ingest
        summary = run_sweep(spec, str(out / name))
        seconds[name] = time.perf_counter() - started
        return summary

    table4 = sweep("table4", table4_spec(plan, follow_up))
    calibrated = calibrate(plan, sweep("table1-calibration", calibration_spec(plan)), tracking_uri)
    steps = {arch: figures["steps"] for arch, figures in calibrated["architectures"].items()}
    table1 = sweep("table1", table1_spec(plan, steps, follow_up))
    import torch

    info = torch.load(classifier_file, weights_only=True)["info"]
    counts = ingest.manifest.counts
    return Outcome(plan, tracking_uri, table4, calibrated, table1,
                   data={"run_dir": str(data_dir), "images": {split: counts[split]["images"] for split in counts},
                         "num_classes": ingest.manifest.details.get("num_classes")},
                   classifier={"file": str(classifier_file), **info}, seconds=seconds)


def experiment_name(out: Path) -> str:
    return tracking.experiment_name(str(out), "vim paper tables")


def default_tracking_uri(out: str) -> str:
    return sweep_tracking_uri(out)
