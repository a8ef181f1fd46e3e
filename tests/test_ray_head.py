"""`scripts/ray_head.sh` and `scripts/submit.sh`: the local head requires Ray's auth token (RAY_AUTH_MODE=token),
a job sent through `submit.sh` with the token runs (Ray Data included), a client without it is refused, and a
job that does not succeed makes `submit.sh` fail.

Why a token and not loopback: Ray 2.60 cannot bind a head to loopback. `ray start` rewrites --node-ip-address
127.0.0.1 to the machine's address (services.resolve_ip_for_localhost), and GCS, raylet and the agents' gRPC
servers listen on all interfaces (measured: gcs_server, raylet and DashboardAgent on '::', metrics on 0.0.0.0,
the runtime-env and dashboard agents on the machine's address). Only the dashboard keeps to 127.0.0.1.

The head is started through the script on free ports with its own temp dir (another Ray cluster may run on
this machine) and its own HOME (the token goes to $HOME/.ray/auth_token, not the user's), and stopped by
killing only its own processes, never with `ray stop`."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from job_head import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD = ROOT / "scripts" / "ray_head.sh"
SUBMIT = ROOT / "scripts" / "submit.sh"
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _head_processes(temp: str) -> list[psutil.Process]:
    """The head's processes: those naming its temp dir, and all their children (agents, workers)."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in part for part in process.info["cmdline"] or []):
                found[process.pid] = process
                for child in process.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    return list(found.values())


@pytest.fixture(scope="module")
def script_head():
    temp = tempfile.mkdtemp(prefix="vimlo-", dir="/tmp")  # short: Ray keeps unix sockets there
    home = tempfile.mkdtemp(prefix="vimlo-home-")
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port(), "agent": free_port(),
             "agent_grpc": free_port(), "metrics": free_port(), "runtime_env": free_port()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_HEAD_PORT": str(ports["gcs"]),
           "RAY_DASHBOARD_PORT": str(ports["dashboard"]), "HOME": home, "RAY_AUTH_MODE": "token"}
    for name in TOKEN_ENV:
        env.pop(name, None)
    # the other tests' clusters hold Ray's default agent and client ports; the caller's RAY_AUTH_MODE
    # (disabled here, as for the in-process test clusters) must not turn the script's token auth off
    started = subprocess.run(
        ["bash", str(HEAD), "start", f"--temp-dir={temp}", f"--ray-client-server-port={ports['client']}",
         f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
         f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['runtime_env']}"],
        env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        token_file = Path(home) / ".ray" / "auth_token"
        yield {"temp": temp, "ports": ports, "env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
               "gcs": f"127.0.0.1:{ports['gcs']}", "token_file": token_file, "start_output": started.stdout}
    finally:
        processes = _head_processes(temp)
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(processes, timeout=5)
        for process in alive + _head_processes(temp):
            try:
                process.kill()
            except psutil.Error:
                pass
        shutil.rmtree(home, ignore_errors=True)  # the token


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _jobs(head: dict) -> list[dict]:
    request = urllib.request.Request(f"{head['dashboard']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {head['token_file'].read_text()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_start_writes_a_private_token_the_head_requires(script_head):
    token_file = script_head["token_file"]
    assert token_file.is_file() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text()
    assert len(token) == 64 and f"Generated a Ray auth token in {token_file}" in script_head["start_output"]
    url = f"{script_head['dashboard']}/api/jobs/"
    assert (_get(url, None), _get(url, "not-the-token"), _get(url, token)) == (401, 403, 200)


def test_a_client_without_the_token_is_refused(script_head, tmp_path):
    """`ray job submit` and `ray status` with no token anywhere (empty HOME, no token variables, the mode
    unset), and a driver with a wrong token, fail with Ray's authentication error, each within 90 s."""
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    bare = {k: v for k, v in script_head["env"].items() if k not in TOKEN_ENV + ("RAY_AUTH_MODE",)}
    bare["HOME"] = str(empty_home)
    wrong = {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    driver = f"import ray; ray.init(address={script_head['gcs']!r}); print('CONNECTED')"
    clients = {  # name: (command, env, what the refusal says)
        "job submit": ([str(BIN / "ray"), "job", "submit", "--address", script_head["dashboard"], "--",
                        "echo", "ran"], bare, "Missing authentication token"),
        "status": ([str(BIN / "ray"), "status", "--address", script_head["gcs"]], bare, "InvalidAuthToken"),
        "ray.init": ([sys.executable, "-c", driver], wrong, "Authentication token is missing or incorrect"),
    }
    started = time.time()
    running = {name: subprocess.Popen(["timeout", "90", *command], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
               for name, (command, env, _) in clients.items()}
    outputs = {name: process.communicate(timeout=120)[0] for name, process in running.items()}
    for name, process in running.items():
        output = outputs[name]
        assert process.returncode not in (0, 124), f"{name}: exit {process.returncode}\n{output[-3000:]}"
        assert clients[name][2] in output and "CONNECTED" not in output, f"{name}:\n{output[-3000:]}"
    print(f"refused in {time.time() - started:.0f} s")


# A job that asks the head for a Ray Data task: it hangs where the driver's auth mode differs from the head's.
DATA_JOB = ("import os, ray; ray.init(); ray.data.DataContext.get_current().enable_progress_bars = False; "
            "print('auth mode', os.environ.get('RAY_AUTH_MODE')); "
            "print('data sum', ray.data.range(10).map_batches(lambda b: {'id': b['id'] * 2}).sum('id'))")


def test_submit_sh_runs_a_data_job_with_the_token_and_fails_for_a_stopped_one(script_head, tmp_path):
    env = script_head["env"]
    done = subprocess.run(["bash", str(SUBMIT), "python", "-c", DATA_JOB], cwd=tmp_path,
                          env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "auth mode token" in done.stdout and "data sum 90" in done.stdout, done.stdout[-3000:]

    long = subprocess.Popen(["bash", str(SUBMIT), "python", "-c", "import time; time.sleep(300)"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (running := [j for j in _jobs(script_head) if j["status"] == "RUNNING"]):
            assert time.time() < deadline and long.poll() is None, "the long job never ran"
            time.sleep(0.5)
        stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", script_head["dashboard"],
                               running[0]["submission_id"]], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
        output, _ = long.communicate(timeout=120)
    finally:
        if long.poll() is None:
            long.kill()
    assert long.returncode != 0 and "STOPPED" in output, output[-3000:]


FAKE_RAY = """#!/usr/bin/env bash
# `ray job submit` as Ray 2.60 ends it: exit 1 for FAILED, 0 for SUCCEEDED and for STOPPED
case "$FAKE_JOB_END" in
  SUCCEEDED) echo "Job 'x' succeeded"; exit 0 ;;
  STOPPED) echo "Job 'x' was stopped"; exit 0 ;;
  FAILED) echo "Job 'x' failed"; exit 1 ;;
esac
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$FAKE_JOB_END"
"""


@pytest.mark.parametrize("end,code", [("SUCCEEDED", 0), ("STOPPED", 1), ("FAILED", 1)])
def test_submit_sh_exit_status_follows_the_job_end(tmp_path, end, code):
    """Without a cluster: a `ray` and a `python` that report the job's end as Ray 2.60 does."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("ray", FAKE_RAY), ("python", FAKE_PYTHON)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    result = subprocess.run(["bash", str(SUBMIT), "python", "job.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30,
                            env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_JOB_END": end})
    assert result.returncode == code, result.stdout + result.stderr
