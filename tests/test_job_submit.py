"""The README's path: a local Ray head with its dashboard, and the whole pipeline sent with `ray job submit`.

The job is stopped with `ray job stop` in the middle of ingest, of the tokenizer, of pretokenize and of the
transformer, its driver is killed (SIGKILL) in the middle of the transformer, and the same command is
submitted again each time; the finished run must hold what an uninterrupted run holds, and its evaluation
every figure with its recipe (`helpers.check_evaluation`). The same for a residual quantization run (RQ
tokenizer, RQ-Transformer), stopped inside its RQ-Transformer stage."""
import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from helpers import EVALUATE_TINY, PRETOKENIZE_TINY, check_evaluation, checkpoint_registered, registered_checkpoint_step
from pipeline.data.shards import iter_samples, list_shards
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri
from job_head import job_status, ray_head, ray_job, stop_job  # noqa: F401 (ray_head: the fixture)

ROOT = Path(__file__).resolve().parents[1]
# Many small shards and pieces and a checkpoint every 10 steps, so each stop lands inside its stage.
TINY = PRETOKENIZE_TINY + [
    "ingest.max_images_per_split=1000", "ingest.shard_size=20", "tokenizer.steps=60",
    "tokenizer.checkpoint_every=10", "pretokenize.piece_images=20",  # a piece per shard: the stop lands mid-stage
    "pretokenize.batch_size=10",  # many small actor calls: pretokenize lasts long enough for a stop to land in it
    "transformer.size=pico", "transformer.steps=400", "transformer.batch_size=32", "transformer.lr=3e-3",
    "transformer.checkpoint_every=40", "transformer.log_every=40",  # a stop and a later kill land mid-stage
    "transformer.warmup_steps=2", "transformer.decay_start=200", "transformer.label_dropout=0.1",
    "transformer.val_images=64",
    "transformer.resources.num_workers=1", *EVALUATE_TINY]


def _pipeline_args(run_dir: Path) -> list[str]:
    return ["--config", "configs/demo.yaml", "--run-dir", str(run_dir)] + [a for o in TINY for a in ("--set", o)]


def _submit_and_stop_when(head: dict, run_dir: Path, job_id: str, reached, what: str,
                          kill_driver: bool = False) -> None:
    """Submit the pipeline, wait until `reached()`, then `ray job stop` it (or SIGKILL its driver)."""
    submitted = ray_job(head, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
                         "--", "python", "jobs/full_pipeline.py", *_pipeline_args(run_dir))
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.time() + 400
    while not reached():
        assert job_status(head, job_id) in ("PENDING", "RUNNING"), f"the job ended before {what}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.05)
    if kill_driver:
        drivers = [p for p in psutil.process_iter(["cmdline"])
                   if "jobs/full_pipeline.py" in " ".join(p.info["cmdline"] or []) and
                   str(run_dir) in " ".join(p.info["cmdline"] or [])]
        assert drivers, "no driver process found"
        for driver in drivers:
            driver.send_signal(signal.SIGKILL)
    else:
        stop_job(head, job_id)
    deadline = time.time() + 120
    while job_status(head, job_id) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline, f"job {job_id} did not stop"
        time.sleep(0.5)


def _committed(run_dir: Path, folder: str) -> bool:
    return Manifest.read(RunDir(str(run_dir)), folder) is not None


def _shard_keys(run_dir: Path, split: str) -> list[str]:
    return [s["key"] for url in list_shards(str(run_dir / "shards" / split)) for s in iter_samples(url, False)]


def test_a_pipeline_stopped_in_four_stages_finishes_like_an_uninterrupted_one(ray_head, tmp_path):
    run_dir = tmp_path / "stopped"
    # Stop ingest once some shards are written, the tokenizer once it has a checkpoint, pretokenize after a
    # piece, the transformer after a checkpoint; then kill the transformer's driver after a later one.
    _submit_and_stop_when(ray_head, run_dir, "stop-ingest",
                          lambda: len(list((run_dir / "shards" / "_progress").glob("train-*.json"))) >= 2,
                          "ingest wrote two shards")
    assert not _committed(run_dir, "shards")
    _submit_and_stop_when(ray_head, run_dir, "stop-tokenizer",
                          lambda: checkpoint_registered(run_dir / "tokenizer"), "a tokenizer checkpoint")
    assert _committed(run_dir, "shards") and not _committed(run_dir, "tokenizer")
    _submit_and_stop_when(ray_head, run_dir, "stop-pretokenize",
                          lambda: (run_dir / "codes" / "_progress" / "train-00000.json").exists(),
                          "the first pretokenize piece")
    assert _committed(run_dir, "tokenizer") and not _committed(run_dir, "codes")
    _submit_and_stop_when(ray_head, run_dir, "stop-transformer",
                          lambda: checkpoint_registered(run_dir / "transformer"), "a transformer checkpoint")
    assert _committed(run_dir, "codes") and not _committed(run_dir, "transformer")
    stopped_at = registered_checkpoint_step(run_dir / "transformer")
    _submit_and_stop_when(ray_head, run_dir, "kill-transformer",
                          lambda: registered_checkpoint_step(run_dir / "transformer") > stopped_at,
                          "a later transformer checkpoint", kill_driver=True)
    assert not _committed(run_dir, "transformer")

    final = ray_job(ray_head, "submit", "--submission-id", "finish", "--working-dir", str(ROOT),
                     "--", "python", "jobs/full_pipeline.py", *_pipeline_args(run_dir))
    assert final.returncode == 0 and "succeeded" in final.stdout, final.stdout[-3000:] + final.stderr[-3000:]
    # Committed stages were skipped, the rest ran; one results table and the MLflow command at the end.
    statuses = dict(re.findall(r"^(ingest|tokenizer|pretokenize|transformer|evaluate) +(ran|skipped) ",
                               final.stdout, re.MULTILINE))
    assert statuses == {"ingest": "skipped", "tokenizer": "skipped", "pretokenize": "skipped", "transformer": "ran",
                        "evaluate": "ran"}, final.stdout[-3000:]
    assert "probe_top1_best=" in final.stdout and "mlflow ui --backend-store-uri" in final.stdout

    # Shards: the same keys as an uninterrupted ingest, none twice.
    clean = tmp_path / "clean"
    uninterrupted = ray_job(ray_head, "submit", "--submission-id", "clean-ingest", "--working-dir", str(ROOT), "--",
                             "python", "jobs/full_pipeline.py", *_pipeline_args(clean), "--only", "ingest")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:] + uninterrupted.stderr[-3000:]
    for split in ("train", "val"):
        keys = _shard_keys(run_dir, split)
        assert len(keys) == len(set(keys)) == 1000 and sorted(keys) == sorted(_shard_keys(clean, split))

    # Tokenizer: resumed from its checkpoint and trained to the configured step count.
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    tokenizer = Manifest.read(RunDir(str(run_dir)), "tokenizer")
    assert tokenizer.counts["steps"] == 60
    resumed = client.get_metric_history(tokenizer.mlflow_run_id, "resumed_from_step")
    assert resumed and all(m.value % 10 == 0 and 10 <= m.value < 60 for m in resumed), [m.value for m in resumed]

    # Transformer: resumed after the stop and after the driver kill, each time from a checkpoint, and every
    # logged step is there.
    transformer = Manifest.read(RunDir(str(run_dir)), "transformer")
    assert transformer.counts["steps"] == 400
    resumed = sorted(m.value for m in client.get_metric_history(transformer.mlflow_run_id, "resumed_from_step"))
    assert len(resumed) >= 2 and all(v % 40 == 0 and 40 <= v < 400 for v in resumed) and resumed[0] < resumed[-1], \
        resumed
    logged = sorted({m.step for m in client.get_metric_history(transformer.mlflow_run_id, "train_loss_nats")})
    assert logged == list(range(40, 401, 40))

    # Codes: every (key, view) of the shards exactly once.
    codes = Manifest.read(RunDir(str(run_dir)), "codes")
    for split in ("train", "val"):
        tables = [pq.read_table(run_dir / "codes" / name, columns=["key", "view"])
                  for name in codes.outputs["codes"][split]]
        rows = [row for t in tables for row in zip(t["key"].to_pylist(), t["view"].to_pylist())]
        assert len(rows) == len(set(rows)) and {k for k, _ in rows} == set(_shard_keys(run_dir, split))
        assert len(rows) == 2 * 1000  # plain and hflip

    check_evaluation(run_dir)

    # Every stage is a child of a pipeline run in the run directory's experiment.
    for folder in ("shards", "tokenizer", "codes", "transformer", "eval"):
        run = client.get_run(Manifest.read(RunDir(str(run_dir)), folder).mlflow_run_id)
        assert run.info.status == "FINISHED" and "mlflow.parentRunId" in run.data.tags, folder


# Residual quantization end to end: stacks of 2 codes per position on the 4 x 4 grid, the RQ-Transformer on the
# paper's soft labels, per-depth sampling temperatures; stopped inside the RQ-Transformer stage and resubmitted.
RQ_TINY = PRETOKENIZE_TINY + [
    "ingest.max_images_per_split=600",  # the evaluation and the rejection network each train on 256
    "tokenizer.quantizer=rq", "tokenizer.rq_depth=2", "tokenizer.checkpoint_every=10",
    "transformer.kind=rq", "transformer.rq_size=pico", "transformer.soft_label_temperature=0.5",
    "transformer.steps=100", "transformer.batch_size=32", "transformer.lr=3e-3", "transformer.warmup_steps=2",
    "transformer.decay_start=50", "transformer.label_dropout=0.1", "transformer.checkpoint_every=20",
    "transformer.log_every=20", "transformer.val_images=64", "transformer.resources.num_workers=1",
    "evaluate.temperature=[1.0,0.9]"] + [o for o in TINY if o.startswith("evaluate.")]


def test_a_residual_quantization_pipeline_stopped_in_its_rq_transformer_stage_resumes(ray_head, tmp_path):
    run_dir = tmp_path / "rq"
    args = ["--config", "configs/demo.yaml", "--run-dir", str(run_dir)] + [a for o in RQ_TINY for a in ("--set", o)]
    submitted = ray_job(ray_head, "submit", "--no-wait", "--submission-id", "rq-stop", "--working-dir", str(ROOT),
                        "--", "python", "jobs/full_pipeline.py", *args)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.time() + 400
    while not checkpoint_registered(run_dir / "transformer"):
        assert job_status(ray_head, "rq-stop") in ("PENDING", "RUNNING"), "the job ended before an RQ checkpoint"
        assert time.time() < deadline, "the RQ-Transformer never checkpointed"
        time.sleep(0.05)
    stop_job(ray_head, "rq-stop")
    while job_status(ray_head, "rq-stop") not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(0.5)
    assert _committed(run_dir, "codes") and not _committed(run_dir, "transformer")

    final = ray_job(ray_head, "submit", "--submission-id", "rq-finish", "--working-dir", str(ROOT),
                    "--", "python", "jobs/full_pipeline.py", *args)
    assert final.returncode == 0 and "succeeded" in final.stdout, final.stdout[-3000:] + final.stderr[-3000:]

    run = RunDir(str(run_dir))
    client = MlflowClient(default_tracking_uri(str(run_dir)))
    # The tokenizer: residual codes, figures per depth.
    tokenizer = Manifest.read(run, "tokenizer")
    assert tokenizer.outputs["depth"] == 2
    assert {"val_usage_per_256_depth0", "val_usage_per_256_depth1"} <= set(tokenizer.metrics)
    train_logged = client.get_run(tokenizer.mlflow_run_id).data.metrics
    assert train_logged["train_quantization_error_depth1"] <= train_logged["train_quantization_error_depth0"]
    # The codes: stacks of 2 per position, said by the manifest and by every file's schema.
    codes = Manifest.read(run, "codes")
    assert (codes.outputs["depth"], codes.outputs["length"]) == (2, 4 * 4 * 2)
    for name in codes.outputs["codes"]["train"]:
        schema = pq.read_schema(run_dir / "codes" / name)
        assert schema.field("codes").type.list_size == 32 and b'"depth": 2' in schema.metadata[b"vim.codes"]
    assert "train_perplexity_depth1" in codes.metrics
    # The RQ-Transformer: resumed from its checkpoint, trained to the end, a loss per depth.
    transformer = Manifest.read(run, "transformer")
    assert transformer.outputs["settings"]["code_depth"] == 2 and transformer.counts["steps"] == 100
    resumed = [m.value for m in client.get_metric_history(transformer.mlflow_run_id, "resumed_from_step")]
    assert resumed and all(v % 20 == 0 and 20 <= v < 100 for v in resumed), resumed
    logged = sorted({m.step for m in client.get_metric_history(transformer.mlflow_run_id, "train_loss_nats")})
    assert logged == list(range(20, 101, 20))
    uniform = np.log(64)
    assert all(transformer.metrics[f"val_loss_nats_depth{d}"] < uniform for d in (0, 1)), transformer.metrics
    # Evaluate, unchanged: every figure, samples of 16 positions x 2 codes, the probe on the spatial blocks.
    check_evaluation(run_dir, tokens=32)
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert report["metrics"]["recon_usage_per_256_depth1"] > 0 and report["sampling"]["temperature"] == [1.0, 0.9]
