"""The tokenizer stage on a real local Ray: 2 CPU workers, checkpoints, a killed worker resumes at the
checkpointed step and then trains exactly as an uninterrupted run does, and the exported files load on
their own. A stopped driver (`ray job stop`, then the
same submission) is tested with the whole pipeline in test_job_submit.py."""
import shutil
import threading
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from helpers import assert_resume_follows_uninterrupted, kill_a_train_worker_after_checkpoint
from pipeline.config import load_config
from pipeline.models.tokenizer import load_tokenizer
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri
from orchestration.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["ingest.max_images_per_split=256", "ingest.shard_size=128", "ingest.resolution=16",
        "ingest.cpus_per_task=0.5", "tokenizer.image_size=16", "tokenizer.codebook_size=64",
        "tokenizer.steps=160", "tokenizer.batch_size=16", "tokenizer.checkpoint_every=10",
        "tokenizer.log_every=10", "tokenizer.image_every=80", "tokenizer.disc_start=20",
        "tokenizer.adversarial_weight=0.1", "tokenizer.logit_laplace_weight=0.1",  # the paper's objective, whole
        "tokenizer.val_images=64", "tokenizer.resources.num_workers=2",
        "tokenizer.resources.cpus_per_worker=0.5"]


def _history(run_dir: Path, run_id: str, key: str) -> list:
    return MlflowClient(default_tracking_uri(str(run_dir))).get_metric_history(run_id, key)


def _check_finished(run_dir: Path) -> Manifest:
    manifest = Manifest.read(RunDir(str(run_dir)), "tokenizer")
    assert manifest is not None and manifest.counts["steps"] == 160
    tokenizer = load_tokenizer(run_dir / "tokenizer")  # needs nothing but the two files
    images = torch.rand(3, 3, 16, 16)
    codes = tokenizer.encode(images)
    assert codes.shape == (3, 4, 4) and codes.max() < 64
    assert tokenizer.decode(codes).shape == (3, 3, 16, 16)
    logged = sorted({m.step for m in _history(run_dir, manifest.mlflow_run_id, "train_loss")})
    assert logged == list(range(10, 161, 10))  # every logging step once or more: none skipped
    assert manifest.metrics["val_psnr"] > 5 and 0 < manifest.metrics["val_usage_per_256"] <= 1
    assert 0 < manifest.metrics["val_ssim"] <= 1
    # Both of the paper's loss terms that the demo leaves off ran: the discriminator from disc_start on.
    assert min(m.step for m in _history(run_dir, manifest.mlflow_run_id, "train_disc")) >= 20
    assert _history(run_dir, manifest.mlflow_run_id, "train_logit_laplace")
    return manifest


def test_killed_worker_restarts_from_its_checkpoint(ray_cluster, tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY)
    run_dir = tmp_path / "run"
    killed = []

    started = time.time()

    killer = threading.Thread(target=kill_a_train_worker_after_checkpoint,
                              args=(run_dir / "tokenizer", started, killed), daemon=True)
    killer.start()
    run_pipeline(cfg, str(run_dir), to_stage="tokenizer")
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    manifest = _check_finished(run_dir)
    resumed = _history(run_dir, manifest.mlflow_run_id, "resumed_from_step")
    assert resumed and all(m.value % 10 == 0 and 10 <= m.value < 160 for m in resumed), [m.value for m in resumed]

    # The same configuration without a kill, on the same shards, logs the same losses after the resume.
    reference = tmp_path / "reference"
    shutil.copytree(run_dir / "shards", reference / "shards")
    run_pipeline(cfg, str(reference), only="tokenizer")
    for key in ("train_loss", "train_l2", "grad_norm"):
        assert_resume_follows_uninterrupted(run_dir, reference, "tokenizer", key)
