"""The README's path: a local Ray head with its dashboard, and the pipeline sent with `ray job submit`."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
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
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    for process in psutil.process_iter(["cmdline"]):  # what left the group: only this head's, by its dir
        if any(temp in part for part in process.info["cmdline"] or []):
            process.kill()


def test_demo_ingest_through_ray_job_submit(ray_head, tmp_path):
    run_dir = tmp_path / "demo"
    command = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(ROOT),
               "--", "python", "jobs/full_pipeline.py", "--config", "configs/demo.yaml", "--run-dir", str(run_dir),
               "--set", "ingest.max_images_per_split=200", "--set", "ingest.shard_size=100",
               "--set", "ingest.cpus_per_task=0.5", "--only", "ingest"]
    for _ in range(10):  # a fresh head answers before its job agent is up
        result = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr + result.stdout:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout and "mlflow ui --backend-store-uri" in result.stdout
    manifest = Manifest.read(RunDir(str(run_dir)), "shards")
    assert manifest.counts["train"]["images"] == 200 and manifest.counts["val"]["images"] == 200
    run = MlflowClient(default_tracking_uri(str(run_dir))).get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train_images"] == 200
