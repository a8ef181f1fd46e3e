"""The README's path: a local Ray head with its dashboard, and the whole pipeline sent with `ray job submit`.

The job is stopped with `ray job stop` in the middle of ingest, of the tokenizer and of pretokenize, and the
same command is submitted again each time; the finished run must hold what an uninterrupted run holds,
and its evaluation every figure with its recipe (`helpers.check_evaluation`)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from helpers import PRETOKENIZE_TINY, check_evaluation, checkpoint_registered
from pipeline.data.shards import iter_samples, list_shards
from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Many small shards and pieces and a checkpoint every 10 steps, so each stop lands inside its stage.
TINY = PRETOKENIZE_TINY + [
    "ingest.max_images_per_split=1000", "ingest.shard_size=20", "tokenizer.steps=60",
    "tokenizer.checkpoint_every=10", "pretokenize.piece_images=20",  # a piece per shard: the stop lands mid-stage
    "transformer.size=pico", "transformer.steps=20", "transformer.batch_size=32", "transformer.lr=3e-3",
    "transformer.warmup_steps=2", "transformer.label_dropout=0.1", "transformer.val_images=64",
    "transformer.resources.num_workers=1",
    "evaluate.samples_per_class=4", "evaluate.rejection_acceptance=0.5", "evaluate.recon_images=64",
    "evaluate.reference_images=256", "evaluate.inception_images=8", "evaluate.domain_train_images=256",
    "evaluate.domain_epochs=1", "evaluate.probe_train_images=192", "evaluate.probe_val_images=64",
    "evaluate.batch_size=20", "evaluate.cpus_per_actor=0.5", "evaluate.guidance_scale=1.5",
    "evaluate.fid_method=eigh"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head of our own, in its own process group: `ray stop` would kill every Ray process here."""
    temp = tempfile.mkdtemp(prefix="vimhead-", dir="/tmp")
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                             # the session cluster of the other tests holds Ray's default agent ports
                             f"--dashboard-agent-listen-port={_free_port()}",
                             f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                             f"--runtime-env-agent-port={_free_port()}",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head's dashboard did not come up")
    yield {"dashboard": url, "env": env}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # it rarely exits on SIGTERM alone; waiting longer only costs CI time
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    for process in psutil.process_iter(["cmdline"]):  # what left the group: only this head's, by its dir
        if any(temp in part for part in process.info["cmdline"] or []):
            process.kill()


def _pipeline_args(run_dir: Path) -> list[str]:
    return ["--config", "configs/demo.yaml", "--run-dir", str(run_dir)] + [a for o in TINY for a in ("--set", o)]


def _ray_job(head: dict, *args: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", *args[:1], "--address", head["dashboard"], *args[1:]]
    for _ in range(10):  # a fresh head answers before its job agent is up
        result = subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=900)
        if "No available agent" not in result.stderr + result.stdout:
            return result
        time.sleep(3)
    return result


def _job_status(head: dict, job_id: str) -> str:
    with urllib.request.urlopen(f"{head['dashboard']}/api/jobs/{job_id}", timeout=10) as response:
        return json.loads(response.read())["status"]


def _submit_and_stop_when(head: dict, run_dir: Path, job_id: str, reached, what: str) -> None:
    submitted = _ray_job(head, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
                         "--", "python", "jobs/full_pipeline.py", *_pipeline_args(run_dir))
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.time() + 400
    while not reached():
        assert _job_status(head, job_id) in ("PENDING", "RUNNING"), f"the job ended before {what}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.05)
    stopped = _ray_job(head, "stop", job_id)
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    deadline = time.time() + 120
    while _job_status(head, job_id) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline, f"job {job_id} did not stop"
        time.sleep(0.5)


def _committed(run_dir: Path, folder: str) -> bool:
    return Manifest.read(RunDir(str(run_dir)), folder) is not None


def _shard_keys(run_dir: Path, split: str) -> list[str]:
    return [s["key"] for url in list_shards(str(run_dir / "shards" / split)) for s in iter_samples(url, False)]


def test_a_pipeline_stopped_in_three_stages_finishes_like_an_uninterrupted_one(ray_head, tmp_path):
    run_dir = tmp_path / "stopped"
    # Stop ingest once some shards are written, the tokenizer once it has a checkpoint, pretokenize after a piece.
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

    final = _ray_job(ray_head, "submit", "--submission-id", "finish", "--working-dir", str(ROOT),
                     "--", "python", "jobs/full_pipeline.py", *_pipeline_args(run_dir))
    assert final.returncode == 0 and "succeeded" in final.stdout, final.stdout[-3000:] + final.stderr[-3000:]
    # Committed stages were skipped, the rest ran; one results table and the MLflow command at the end.
    statuses = dict(re.findall(r"^(ingest|tokenizer|pretokenize|transformer|evaluate) +(ran|skipped) ",
                               final.stdout, re.MULTILINE))
    assert statuses == {"ingest": "skipped", "tokenizer": "skipped", "pretokenize": "ran", "transformer": "ran",
                        "evaluate": "ran"}, final.stdout[-3000:]
    assert "probe_top1_best=" in final.stdout and "mlflow ui --backend-store-uri" in final.stdout

    # Shards: the same keys as an uninterrupted ingest, none twice.
    clean = tmp_path / "clean"
    uninterrupted = _ray_job(ray_head, "submit", "--submission-id", "clean-ingest", "--working-dir", str(ROOT), "--",
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
