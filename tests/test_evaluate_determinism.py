"""Same evaluate configuration, same numbers (issue #22, item 13).

The evaluate stage takes subsets of Ray Data streams (the domain classifier's train and val images, the
reference and reconstruction set, the probe's code rows and pixels) and collects actor-pool outputs whose
row order feeds sums, covariances and rejection ties. Read unordered, which rows come first depends on task
timing. Here two fresh evaluations of one tiny committed run (4 shards per split, several Parquet files per
split, limits that cut inside a shard) must agree exactly, and a third with only the guidance scale changed
must agree on every figure that does not depend on sampling."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import PRETOKENIZE_TINY
from pipeline.config import load_config
from orchestration.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMER_TINY = [
    "transformer.size=pico", "transformer.steps=4", "transformer.batch_size=16", "transformer.warmup_steps=1",
    "transformer.decay_start=2", "transformer.dropout=0", "transformer.label_dropout=0.1",
    "transformer.checkpoint_every=4", "transformer.log_every=2", "transformer.eval_every=4",
    "transformer.val_images=32", "transformer.resources.num_workers=1", "transformer.resources.cpus_per_worker=1"]
# Limits that end inside a shard (64 images each) or a Parquet file (100 rows), so that an unordered read
# would pick rows by which read task finished first.
EVALUATE_TINY = [
    "evaluate.samples_per_class=2", "evaluate.rejection_acceptance=0.5", "evaluate.guidance_scale=1.5",
    "evaluate.recon_images=40", "evaluate.reference_images=100", "evaluate.inception_fid=false",
    "evaluate.domain_train_images=150", "evaluate.domain_epochs=1", "evaluate.domain_width=4",
    "evaluate.probe_train_images=150", "evaluate.probe_val_images=90", "evaluate.batch_size=20",
    "evaluate.cpus_per_actor=1.5", "evaluate.cpus_per_task=0.25", "evaluate.fid_method=eigh"]  # the demo's pool
# Figures of the real images, the tokenizer, the domain classifier and the probe: none depends on sampling.
NOT_SAMPLING = ("domain_classifier_val_top1", "rejection_classifier_val_top1", "recon_psnr", "recon_ssim",
                "recon_images", "recon_usage_per_256", "recon_perplexity", "rfid_domain", "rfid_domain_floor",
                "fid_domain_floor", "is_domain_real", "precision_domain_real", "recall_domain_real",
                "probe_top1_best", "probe_best_block", "probe_top1_pixels", "probe_top1_block_0", "probe_top1_block_1")


@pytest.fixture(scope="module")
def trained_run(coded_run, tmp_path_factory):
    """The shared tiny run plus a pico transformer of a few steps (guidance needs label_dropout > 0)."""
    run_dir = tmp_path_factory.mktemp("evaluate-determinism") / "base"
    for folder in ("shards", "tokenizer", "codes"):
        shutil.copytree(coded_run / folder, run_dir / folder, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = load_config(ROOT / "configs" / "demo.yaml", PRETOKENIZE_TINY + TRANSFORMER_TINY + EVALUATE_TINY)
    assert [(o.name, o.status) for o in run_pipeline(cfg, str(run_dir), only="transformer")] == [
        ("transformer", "ran")]
    shutil.rmtree(run_dir / "transformer" / "checkpoints", ignore_errors=True)
    return run_dir


def _evaluate(base: Path, run_dir: Path, overrides: list[str]) -> tuple[dict, dict]:
    """A fresh copy of the committed upstream (no evaluate cache), evaluated; its metrics and samples."""
    if not run_dir.exists():
        shutil.copytree(base, run_dir)
    cfg = load_config(ROOT / "configs" / "demo.yaml", PRETOKENIZE_TINY + TRANSFORMER_TINY + EVALUATE_TINY + overrides)
    assert [(o.name, o.status) for o in run_pipeline(cfg, str(run_dir), only="evaluate")] == [("evaluate", "ran")]
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    with np.load(run_dir / "eval" / "samples.npz") as samples:
        return report["metrics"], {name: samples[name] for name in samples.files}


def test_the_same_config_gives_the_same_metrics(trained_run, tmp_path):
    first, first_samples = _evaluate(trained_run, tmp_path / "first", [])
    second, second_samples = _evaluate(trained_run, tmp_path / "second", [])
    for key in NOT_SAMPLING + ("fid_domain", "is_domain", "sample_class_agreement_domain", "acceptance_rate",
                               "fid_domain_accepted", "precision_domain", "recall_domain_accepted"):
        assert key in first, key
    assert first["recon_images"] == 40 and first["samples"] == 20
    # Exact: on the CPU every step is deterministic once the same rows arrive in the same order (the domain
    # classifier trains in the driver from a fixed seed; L-BFGS, Frechet distances and IS are plain float64).
    differing = {k: (first[k], second.get(k)) for k in first if first[k] != second.get(k)}
    assert not differing and first.keys() == second.keys(), differing
    for name in ("images", "labels", "codes", "accepted"):
        np.testing.assert_array_equal(first_samples[name], second_samples[name], err_msg=name)
    # Fashion-MNIST is grey: samples and the stage's image grids have R = G = B exactly (no colour cast).
    assert first_samples["images"].shape[-1] == 3
    assert int(np.ptp(first_samples["images"].astype(np.int16), axis=-1).max()) == 0
    for name in ("reconstructions.png", "samples_grid.png"):
        pixels = np.asarray(Image.open(tmp_path / "first" / "eval" / name).convert("RGB")).astype(np.int16)
        assert int(np.ptp(pixels, axis=-1).max()) == 0, name

    # Only the guidance scale changed, in the first run's directory (its cached domain classifier is reused:
    # its figures were compared fresh above): the sampling figures may move, nothing else does.
    guided, guided_samples = _evaluate(trained_run, tmp_path / "first", ["evaluate.guidance_scale=3.0"])
    moved = {k: (first[k], guided[k]) for k in NOT_SAMPLING if first[k] != guided[k]}
    assert not moved, moved
    assert not np.array_equal(first_samples["images"], guided_samples["images"])  # guidance did change sampling
