"""The evaluate stage on a real local Ray over a tiny trained run: metrics.json says how each figure was
computed, grids and raw samples exist, samples are class-balanced, and MLflow holds all of it."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import PRETOKENIZE_TINY
from pipeline.config import load_config
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri
from stages.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = PRETOKENIZE_TINY + [
    "transformer.size=pico", "transformer.steps=20", "transformer.batch_size=32", "transformer.lr=3e-3",
    "transformer.warmup_steps=2", "transformer.label_dropout=0.1", "transformer.val_images=64",
    "transformer.resources.num_workers=1",
    "evaluate.samples_per_class=4", "evaluate.rejection_acceptance=0.5", "evaluate.recon_images=64",
    "evaluate.inception_images=8", "evaluate.domain_train_images=256", "evaluate.domain_epochs=1",
    "evaluate.probe_train_images=192", "evaluate.probe_val_images=64", "evaluate.batch_size=20",
    "evaluate.cpus_per_actor=0.5", "evaluate.guidance_scale=1.5", "evaluate.fid_method=eigh"]


def test_evaluate_writes_every_figure_with_its_method(coded_run, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    for folder in ("shards", "tokenizer", "codes"):
        shutil.copytree(coded_run / folder, run_dir / folder, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY)
    outcomes = run_pipeline(cfg, str(run_dir), from_stage="transformer")
    assert [(o.name, o.status) for o in outcomes] == [("transformer", "ran"), ("evaluate", "ran")]

    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    metrics, how = report["metrics"], report["how"]
    for key in ("recon_psnr", "recon_ssim", "recon_usage_per_256", "rfid_domain", "fid_domain", "is_domain",
                "probe_top1_best", "probe_top1_pixels", "acceptance_rate", "domain_classifier_val_top1"):
        assert np.isfinite(metrics[key]), key
    assert metrics["acceptance_rate"] == 0.5 and metrics["samples"] == 40
    assert 1 <= metrics["is_domain"] <= 10 and metrics["fid_domain"] >= 0
    assert all(f"probe_top1_block_{b}" in metrics for b in (0, 1))  # pico has 2 blocks
    assert metrics["probe_top1_pixels"] > 0.3  # Fashion-MNIST pixels are linearly quite separable
    # Inception FID from the offline TF-Inception file, named as such, with its recipe; IS says why not.
    assert metrics["fid_inception"] >= 0 and metrics["rfid_inception"] >= 0
    assert "TF-Inception pool3" in how["fid_inception"] and how["is_inception"].startswith("unavailable")
    assert "is_inception" not in metrics
    assert (run_dir / "eval" / "ref_stats_val.npz").exists()
    print("evaluate seconds:", report["seconds"])

    samples = np.load(run_dir / "eval" / "samples.npz")
    assert samples["images"].shape == (40, 16, 16, 3) and samples["codes"].shape == (40, 16)
    assert np.bincount(samples["labels"]).tolist() == [4] * 10
    grid = Image.open(io.BytesIO((run_dir / "eval" / "samples_grid.png").read_bytes()))
    assert grid.size[1] == (10 * (16 + 2) + 2) * 4  # one row per class; 16 px + 2 px padding, scaled x4
    for name in ("reconstructions.png", "probe_accuracy_per_block.png"):
        assert (run_dir / "eval" / name).stat().st_size > 0

    manifest = Manifest.read(RunDir(str(run_dir)), "eval")
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    artifacts = {a.path for a in client.list_artifacts(manifest.mlflow_run_id)}
    assert {"metrics.json", "samples_grid.png", "probe_accuracy_per_block.png"} <= artifacts
    logged = client.get_run(manifest.mlflow_run_id).data.metrics
    assert logged["fid_domain"] == metrics["fid_domain"]
