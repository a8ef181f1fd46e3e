"""Small helpers shared by the stage tests: tiny configs, checkpoint waits, the evaluation check."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri

PRETOKENIZE_TINY = ["ingest.max_images_per_split=256", "ingest.shard_size=64", "ingest.resolution=16",
                    "ingest.cpus_per_task=0.5", "tokenizer.image_size=16", "tokenizer.codebook_size=64",
                    "tokenizer.steps=30", "tokenizer.batch_size=16", "tokenizer.adversarial_weight=0",
                    "tokenizer.val_images=64", "tokenizer.log_every=10", "tokenizer.resources.num_workers=1",
                    "pretokenize.views=[plain,hflip]", "pretokenize.rows_per_file=100", "pretokenize.piece_images=128",
                    "pretokenize.batch_size=64", "pretokenize.cpus_per_actor=0.5", "pretokenize.cpus_per_task=0.5"]

# The evaluation of a tiny run, with every part on: rejection, Inception on a few images, the probe.
EVALUATE_TINY = ["evaluate.samples_per_class=4", "evaluate.rejection_acceptance=0.3", "evaluate.recon_images=64",
                 "evaluate.reference_images=256", "evaluate.inception_images=10", "evaluate.domain_train_images=256",
                 "evaluate.domain_epochs=1", "evaluate.probe_train_images=192", "evaluate.probe_val_images=64",
                 "evaluate.batch_size=20", "evaluate.cpus_per_actor=0.5", "evaluate.guidance_scale=1.5",
                 "evaluate.fid_method=eigh"]


def registered_checkpoint_step(stage_folder: Path) -> int:
    """The step of the latest checkpoint the Train controller has registered (its snapshot names it), 0 if
    none. A worker killed between a checkpoint's upload and its registration rightly restarts before it."""
    latest = 0
    for snapshot in (stage_folder / "checkpoints").glob("*/checkpoint_manager_snapshot.json"):
        try:
            result = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being rewritten
            continue
        latest = max(latest, int(result.get("metrics", {}).get("step", 0)))
    return latest


def checkpoint_registered(stage_folder: Path) -> bool:
    return registered_checkpoint_step(stage_folder) > 0


def wait_for_checkpoint(stage_folder: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not checkpoint_registered(stage_folder):
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint appeared under {stage_folder}")
        time.sleep(0.05)


def kill_a_train_worker_after_checkpoint(stage_folder: Path, started: float, killed: list[int]) -> None:
    """Once the stage has a registered checkpoint, SIGKILL the newest Ray Train worker started after `started`:
    one of this stage's group (an earlier stage's worker process may still be exiting)."""
    wait_for_checkpoint(stage_folder)
    workers = [process for process in psutil.process_iter(["cmdline", "create_time"])
               if " ".join(process.info["cmdline"] or []).startswith("ray::RayTrainWorker")
               and process.info["create_time"] >= started]
    if workers:
        newest = max(workers, key=lambda process: process.info["create_time"])
        newest.send_signal(signal.SIGKILL)
        killed.append(newest.pid)


def latest_by_step(run_dir: Path, run_id: str, key: str) -> dict[int, float]:
    """A metric's last value logged at each step: after a resume, the resumed run's value."""
    history = MlflowClient(default_tracking_uri(str(run_dir))).get_metric_history(run_id, key)
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def assert_resume_follows_uninterrupted(resumed_run: Path, reference_run: Path, folder: str, key: str) -> None:
    """The steps logged after the last resume carry the values an uninterrupted run logged at those steps."""
    resumed, reference = (Manifest.read(RunDir(str(run)), folder) for run in (resumed_run, reference_run))
    resume_step = max(latest_by_step(resumed_run, resumed.mlflow_run_id, "resumed_from_step").values())
    after = latest_by_step(resumed_run, resumed.mlflow_run_id, key)
    expected = latest_by_step(reference_run, reference.mlflow_run_id, key)
    steps = [step for step in sorted(after) if step > resume_step]
    assert steps, f"nothing logged after the resume at step {resume_step}"
    got, want = [after[step] for step in steps], [expected[step] for step in steps]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-7), list(zip(steps, got, want))


def check_evaluation(run_dir: Path, per_class: int = 4, acceptance: float = 0.3, side: int = 16,
                     tokens: int = 16) -> None:
    """The evaluate stage's outputs on a tiny Fashion-MNIST run (pico: 2 blocks; 10 classes, rejection at
    `acceptance`): every figure finite and explained, class-balanced sample sets with and without rejection, two
    different classifiers, the grids, and the same figures in MLflow."""
    import torch

    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    metrics, how = report["metrics"], report["how"]
    for key in ("recon_psnr", "recon_ssim", "recon_usage_per_256", "rfid_domain", "rfid_domain_floor",
                "probe_top1_best", "probe_top1_pixels", "acceptance_rate", "domain_classifier_val_top1",
                "rejection_classifier_val_top1", "is_domain_real"):
        assert np.isfinite(metrics[key]), key
    for suffix in ("", "_accepted"):
        assert 1 <= metrics[f"is_domain{suffix}"] <= 10 and metrics[f"fid_domain{suffix}"] >= 0
        for key in ("precision_domain", "recall_domain", "precision_inception", "recall_inception",
                    "sample_class_agreement_domain"):
            assert 0 <= metrics[key + suffix] <= 1, key + suffix
    assert metrics["fid_domain_floor"] >= 0 and 0 <= metrics["precision_domain_real"] <= 1
    assert all(f"probe_top1_block_{b}" in metrics for b in (0, 1))  # pico has 2 blocks
    assert metrics["probe_top1_pixels"] > 0.3  # Fashion-MNIST pixels are linearly quite separable
    # Inception FID from the offline TF-Inception file, named as such, with its recipe; IS says why not.
    assert metrics["fid_inception"] >= 0 and metrics["rfid_inception"] >= 0 and metrics["fid_inception_accepted"] >= 0
    assert "TF-Inception pool3" in how["fid_inception"] and how["is_inception"].startswith("unavailable")
    assert "is_inception" not in metrics
    assert (run_dir / "eval" / "ref_stats_val.npz").exists()

    # Measured acceptance: what was kept of what was drawn, each class drawn ceil(per_class / acceptance)
    # times (per_class 4 at 0.3: 4 of 14, not the configured 0.3).
    samples = np.load(run_dir / "eval" / "samples.npz")
    drawn = 10 * int(np.ceil(per_class / acceptance))
    assert samples["images"].shape == (drawn, side, side, 3) and samples["codes"].shape == (drawn, tokens)
    assert metrics["acceptance_rate"] == samples["accepted"].sum() / len(samples["labels"])
    for chosen in (samples["accepted"], samples["first_per_class"]):
        assert np.bincount(samples["labels"][chosen], minlength=10).tolist() == [per_class] * 10
    assert metrics["samples"] == 10 * per_class
    # The rejection network is not the evaluation network: other train images, other seed, other weights.
    networks = [torch.load(path, weights_only=True) for path in sorted((run_dir / "_cache").glob("domain-*.pt"))]
    assert len(networks) == 2, "expected the evaluation and the rejection network"
    first, second = (network["info"] for network in networks)
    assert first["seed"] != second["seed"] and first["first_train_image"] != second["first_train_image"]
    assert any(not torch.equal(networks[0]["state"]["weights"][name], networks[1]["state"]["weights"][name])
               for name in networks[0]["state"]["weights"])
    assert "rejection network" in how["rejection"] and "evaluation network" in how["rejection"]
    grid = Image.open(io.BytesIO((run_dir / "eval" / "samples_grid.png").read_bytes()))
    assert grid.size[1] == (10 * (side + 2) + 2) * 4  # one row per class; 2 px padding, scaled x4
    for name in ("reconstructions.png", "probe_accuracy_per_block.png", "metrics.md"):
        assert (run_dir / "eval" / name).stat().st_size > 0

    manifest = Manifest.read(RunDir(str(run_dir)), "eval")
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    artifacts = {a.path for a in client.list_artifacts(manifest.mlflow_run_id)}
    assert {"metrics.json", "metrics.md", "samples_grid.png", "probe_accuracy_per_block.png"} <= artifacts
    logged = client.get_run(manifest.mlflow_run_id).data.metrics
    assert logged["fid_domain"] == metrics["fid_domain"]


def logits_through_the_cache(model, tokens, labels):
    """The VIM Transformer's logits at every position, decoded one token at a time through its KV cache:
    what the full forward pass must equal."""
    import torch

    cache = model.new_cache(tokens.shape[0])
    steps = [model.prefill(labels, cache)]
    for t in range(tokens.shape[1] - 1):
        steps.append(model.decode_step(tokens[:, t], cache))
    return torch.stack(steps, 1)


@contextlib.contextmanager
def mlflow_at(uri: str):
    """MLflow's global tracking (and registry) URI set to `uri` for `models:/` loads, then unset as before:
    `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI, which later stage runs in this process would follow."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets the variable too
