"""A reconstruction-only evaluation of a sweep trial's tokenizer, run by the trial after its pipeline.

It is part 2 of the evaluate stage (`stages/evaluate/reconstruction.py`) on the trial's run directory, without
the pretokenize and transformer stages that the full evaluate stage needs: PSNR, SSIM, codebook usage per 256
images and perplexity of the reconstructed val set, and rFID in the evaluation network's feature space. The
evaluation network (the domain classifier of `stages/evaluate/feature_networks.py`) is trained once, in the
driver, before any trial (`train_shared_classifier`), and every trial loads that same file: with the same
ingest (shared by the sweep) and the same evaluate settings, every trial reconstructs the same val images and
is compared with the same reference statistics (each record carries their digest to show it).

Outputs, in `<trial>/recon_eval/`: `metrics.json` (figures, recipes, the key it was made for) and
`reconstructions.png`; an MLflow run `recon_eval` under the trial's pipeline run. A record whose key (the
tokenizer's manifest, the evaluate settings and the classifier file) matches is reused, so a resumed sweep
does not evaluate a trial twice.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import PipelineConfig, stable_hash
from pipeline.stage import StageContext, StageSpec
from pipeline.storage import Manifest, RunDir
from stages import folders as stage_folders, spec as stage_spec
from orchestration.errors import PipelineError

FOLDER = "recon_eval"
RECORD = "metrics.json"
CLASSIFIER_FILE = "evaluation_network.pt"
SPEC = StageSpec(name=FOLDER, folder=FOLDER, upstream=("ingest", "tokenizer"), entry="orchestration.recon_eval:evaluate_trial")
COLUMNS = ("rfid_domain", "recon_psnr", "recon_ssim", "recon_usage_per_256", "recon_perplexity")


def _manifest(run_dir: RunDir, stage: str) -> Manifest:
    folder = stage_spec(stage).folder
    manifest = Manifest.read(run_dir, folder)
    if manifest is None:
        raise PipelineError(f"the reconstruction evaluation needs a committed {stage} stage in {run_dir.location}")
    return manifest


def _context(run_dir: RunDir, cfg: PipelineConfig, stages: tuple[str, ...], key: str,
             tracker: tracking.Tracker | None = None) -> StageContext:
    return StageContext(SPEC, cfg, run_dir, key, {name: _manifest(run_dir, name) for name in stages}, tracker,
                        folders=stage_folders())


def _setup(ctx: StageContext, cfg: PipelineConfig):
    from stages.datasets import held_out_split
    from stages.evaluate.common import Setup, check_set_sizes

    num_classes = int(ctx.inputs["ingest"].details.get("num_classes", 1))
    check_set_sizes(cfg.evaluate, num_classes)
    return Setup(ecfg=cfg.evaluate, num_classes=num_classes, image_size=cfg.tokenizer.image_size,
                 val_split=held_out_split(ctx), codebook_size=cfg.tokenizer.codebook_size,
                 code_depth=cfg.tokenizer.code_depth, shared_codebook=cfg.tokenizer.rq_shared_codebook)


def train_shared_classifier(data_dir: str, cfg: PipelineConfig) -> Path:
    """The evaluation network of the data ingested in `data_dir`, trained in this process (or reused from the
    evaluate stage's cache there) and written to `data_dir/recon_eval/evaluation_network.pt`: the one file
    every trial grades with."""
    import torch

    from stages.evaluate.feature_networks import domain_classifier

    run_dir = RunDir(data_dir)
    ctx = _context(run_dir, cfg, ("ingest",), key="shared-classifier")
    classifier = domain_classifier(ctx, _setup(ctx, cfg), first=0, seed=cfg.evaluate.seed)
    buffer = io.BytesIO()
    torch.save({"state": classifier.state, "info": classifier.info}, buffer)
    if not run_dir.exists(FOLDER, CLASSIFIER_FILE) or run_dir.read_bytes(FOLDER, CLASSIFIER_FILE) != buffer.getvalue():
        run_dir.write_bytes(buffer.getvalue(), FOLDER, CLASSIFIER_FILE)
    return Path(run_dir.path(FOLDER, CLASSIFIER_FILE))


def reference_digest(mu: np.ndarray, sigma: np.ndarray) -> str:
    """A short digest of reference statistics, rounded so that float noise in the last bits does not count."""
    data = np.concatenate([np.round(mu.astype(np.float64), 5).ravel(), np.round(sigma.astype(np.float64), 5).ravel()])
    return hashlib.sha256((data + 0.0).tobytes()).hexdigest()[:16]  # + 0.0: -0.0 and 0.0 hash alike


def evaluate_trial(trial_dir: Path, cfg: PipelineConfig, classifier_file: str) -> dict[str, float]:
    """The reconstruction figures of the tokenizer committed in `trial_dir`, graded by `classifier_file`."""
    import torch

    from stages.evaluate.feature_networks import Classifier, FeatureNetworks
    from stages.evaluate.reconstruction import reconstruction

    run_dir = RunDir(str(trial_dir))
    tokenizer = _manifest(run_dir, "tokenizer")
    classifier_bytes = Path(classifier_file).read_bytes()
    key = stable_hash({"tokenizer_manifest": tokenizer.sha256, "evaluate": cfg.evaluate.hash(),
                       "classifier": hashlib.sha256(classifier_bytes).hexdigest()})
    if run_dir.exists(FOLDER, RECORD):
        record = run_dir.read_json(FOLDER, RECORD)
        if record.get("key") == key:
            return record["metrics"]
    tracker = _mlflow_run(run_dir, cfg, key)
    try:
        ctx = _context(run_dir, cfg, ("ingest", "tokenizer"), key, tracker)
        stored = torch.load(io.BytesIO(classifier_bytes), weights_only=True)
        nets = FeatureNetworks(evaluation=Classifier(stored["state"], stored["info"]))
        result = reconstruction(ctx, _setup(ctx, cfg), nets)
        metrics = {**result.metrics, "domain_classifier_val_top1": float(stored["info"]["val_top1"])}
        record = {"key": key, "metrics": metrics, "how": result.how, "seconds": result.seconds,
                  "counts": result.counts, "classifier": {"file": str(classifier_file), **stored["info"]},
                  "reference_stats_digest": reference_digest(result.domain.reference.mu, result.domain.reference.sigma),
                  "tokenizer_manifest_sha256": tokenizer.sha256, "tokenizer_mlflow_run_id": tokenizer.mlflow_run_id,
                  "mlflow_run_id": tracker.run_id}
        for name, data in result.files.items():
            run_dir.write_bytes(data, FOLDER, name)
            tracker.log_artifact_bytes(data, name)
        tracker.log_metrics(metrics)
        tracker.set_tags({"vim.reference_stats_digest": record["reference_stats_digest"],
                          **{f"vim.how.{k}": v[:4900] for k, v in result.how.items()}})
        tracker.log_dict(json.loads(json.dumps(record, default=str)), RECORD)
        run_dir.write_json(record, FOLDER, RECORD)  # last: the record is what a resumed trial reuses
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return metrics


def _mlflow_run(run_dir: RunDir, cfg: PipelineConfig, key: str) -> tracking.Tracker:
    """A child of the trial's pipeline run (reopened when an interrupted evaluation with this key left one)."""
    parent = run_dir.read_json(tracking.PIPELINE_RUN_FILE)
    uri, parent_id, experiment_id = parent["tracking_uri"], parent["run_id"], parent["experiment_id"]
    tracker = tracking.find_unfinished_child(uri, experiment_id, parent_id, key)
    if tracker is None:
        tracker = tracking.start_run(uri, experiment_id, FOLDER, {
            "vim.kind": "trial_evaluation", "vim.stage": FOLDER, "vim.fingerprint": key,
            "vim.git_commit": tracking.git_commit()}, parent_run_id=parent_id)
        tracker.log_params({"evaluate": cfg.evaluate.output_affecting()})
    return tracker


@dataclass(frozen=True)
class ReconstructionEvaluation:
    """The sweep's follow-up (`orchestration.sweep.TrialFollowUp`): each trial's reconstruction figures, graded
    by the one evaluation network in `classifier_file`. Its actor pool is sized by the evaluate section."""

    classifier_file: str
    name: str = FOLDER
    section: str = "evaluate"
    columns: tuple[str, ...] = COLUMNS

    def __call__(self, trial_dir: Path, cfg: PipelineConfig) -> dict[str, float]:
        return evaluate_trial(Path(trial_dir), cfg, self.classifier_file)
