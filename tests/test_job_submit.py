"""The README's path: a local Ray head with its dashboard, and the pipeline sent with `ray job submit`."""
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.storage import Manifest, RunDir
from pipeline.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="vimhead-", dir="/tmp")
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                    f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                    f"--temp-dir={temp}"], check=True, env=env, capture_output=True)
    yield {"dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_demo_ingest_through_ray_job_submit(ray_head, tmp_path):
    run_dir = tmp_path / "demo"
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(ROOT),
               "--", "python", "jobs/full_pipeline.py", "--config", "configs/demo.yaml", "--run-dir", str(run_dir),
               "--set", "ingest.max_images_per_split=200", "--set", "ingest.shard_size=100",
               "--set", "ingest.cpus_per_task=0.5"]
    result = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    manifest = Manifest.read(RunDir(str(run_dir)), "shards")
    assert manifest.counts["train"]["images"] == 200 and manifest.counts["val"]["images"] == 200
    run = MlflowClient(default_tracking_uri(str(run_dir))).get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train_images"] == 200
