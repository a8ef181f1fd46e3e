"""The Transformer stage on a real local Ray: 2 CPU workers over the Parquet codes of a tiny run; a killed
worker resumes at its checkpointed step and then trains exactly as an uninterrupted run does, every logging
step is present, the export loads on its own. `ray job stop` and a killed driver: tests/test_job_submit.py."""
import math
import shutil
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from helpers import (PRETOKENIZE_TINY, assert_resume_follows_uninterrupted, kill_a_train_worker_after_checkpoint,
                     mlflow_at)
from pipeline.config import load_config
from pipeline.mlflow_models import registered_name
from pipeline.models.transformer import load_transformer
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri
from orchestration.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = PRETOKENIZE_TINY + [
    "transformer.size=pico", "transformer.steps=60", "transformer.batch_size=16", "transformer.grad_accum=2",
    "transformer.lr=3e-3", "transformer.warmup_steps=5", "transformer.decay_start=30", "transformer.dropout=0",
    "transformer.label_dropout=0.1", "transformer.checkpoint_every=10", "transformer.log_every=10",
    "transformer.eval_every=30", "transformer.val_images=128", "transformer.resources.num_workers=2",
    "transformer.resources.cpus_per_worker=0.5"]


def _copy_upstream(coded_run: Path, run_dir: Path) -> None:
    for folder in ("shards", "tokenizer", "codes"):
        shutil.copytree(coded_run / folder, run_dir / folder, ignore=shutil.ignore_patterns("checkpoints"))


def test_two_workers_train_survive_a_kill_and_export(coded_run, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    _copy_upstream(coded_run, run_dir)
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY)
    killed, started = [], time.time()

    killer = threading.Thread(target=kill_a_train_worker_after_checkpoint,
                              args=(run_dir / "transformer", started, killed), daemon=True)
    killer.start()
    outcomes = run_pipeline(cfg, str(run_dir), only="transformer")
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert [(o.name, o.status) for o in outcomes] == [("transformer", "ran")]

    manifest = Manifest.read(RunDir(str(run_dir)), "transformer")
    assert manifest.counts["steps"] == 60
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    resumed = client.get_metric_history(manifest.mlflow_run_id, "resumed_from_step")
    assert resumed and all(m.value % 10 == 0 and 10 <= m.value < 60 for m in resumed), [m.value for m in resumed]
    logged = sorted({m.step for m in client.get_metric_history(manifest.mlflow_run_id, "train_loss_nats")})
    assert logged == list(range(10, 61, 10))  # none skipped by the restart
    for key in ("tokens_per_second", "mfu", "data_wait_fraction", "train_bits_per_token", "val_loss_nats"):
        assert client.get_metric_history(manifest.mlflow_run_id, key), key
    mfu = client.get_metric_history(manifest.mlflow_run_id, "mfu")[-1].value
    assert 0 < mfu < 1
    # The loss falls below a uniform guess over the codebook.
    assert manifest.metrics["val_loss_nats"] < math.log(64)

    model = load_transformer(run_dir / "transformer")  # needs nothing but the two files
    assert model.settings.vocab_size == 64 and model.settings.grid == (4, 4) and model.settings.num_classes == 10
    tokens = torch.randint(0, 64, (2, 16))
    assert model(tokens, torch.tensor([1, model.settings.null_class])).shape == (2, 16, 64)
    # Registered in MLflow with the run's tokenizer: it samples codes, and pictures through that tokenizer.
    experiment = client.get_experiment(client.get_run(manifest.mlflow_run_id).info.experiment_id).name
    with mlflow_at(default_tracking_uri(str(run_dir))):  # the registry follows it
        registered = mlflow.pyfunc.load_model(f"models:/{registered_name(experiment, 'transformer')}/1")
    labels = np.array([1, 2, 3])
    codes = registered.predict(labels, params={"seed": 5})
    assert codes.shape == (3, 4, 4) and codes.min() >= 0 and codes.max() < 64
    assert np.array_equal(codes, registered.predict(labels, params={"seed": 5}))  # the seed decides
    pictures = registered.predict(labels, params={"seed": 5, "output": "images"})
    assert pictures.shape == (3, 16, 16, 3) and pictures.dtype == np.uint8
    # Committed and current: the same command skips it.
    assert run_pipeline(cfg, str(run_dir), only="transformer")[0].status == "skipped"

    # The same configuration without a kill logs the same losses after the resume.
    reference = tmp_path / "reference"
    _copy_upstream(coded_run, reference)
    run_pipeline(cfg, str(reference), only="transformer")
    for key in ("train_loss_nats", "grad_norm", "val_loss_nats"):
        assert_resume_follows_uninterrupted(run_dir, reference, "transformer", key)
