"""A local Ray head with its dashboard for tests that go through `ray job submit` (the README's path), and the
`ray job` helpers they share (`test_job_submit.py`, `test_sweep_demo.py`). A test module uses the head by
importing the `ray_head` fixture; each such module gets a head of its own."""
import json
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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head of our own, in its own process group: `ray stop` would kill every Ray process here."""
    temp = tempfile.mkdtemp(prefix="vimhead-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                             # the session cluster of the other tests holds Ray's default agent ports
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}",
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
    yield {"dashboard": url, "env": env, "gcs": f"127.0.0.1:{port}"}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # it rarely exits on SIGTERM alone; waiting longer only costs CI time
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    for process in psutil.process_iter(["cmdline"]):  # what left the group: only this head's, by its dir
        if any(temp in part for part in process.info["cmdline"] or []):
            process.kill()


def ray_job(head: dict, *args: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", *args[:1], "--address", head["dashboard"], *args[1:]]
    for _ in range(10):  # a fresh head answers before its job agent is up; a busy one may miss a connection
        result = subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=900)
        if not any(busy in result.stderr + result.stdout for busy in ("No available agent", "Failed to connect")):
            return result
        time.sleep(3)
    return result


def job_status(head: dict, job_id: str) -> str:
    with urllib.request.urlopen(f"{head['dashboard']}/api/jobs/{job_id}", timeout=10) as response:
        return json.loads(response.read())["status"]


def stop_job(head: dict, job_id: str) -> None:
    """`ray job stop`'s own request to the dashboard, sent without the seconds a `ray` CLI takes to start on
    2 cores, so that the stop lands inside the stage the test waited for."""
    request = urllib.request.Request(f"{head['dashboard']}/api/jobs/{job_id}/stop", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read()).get("stopped"), f"job {job_id} was not stopped"
