"""The head cluster.yaml starts, started here by cluster.yaml's own command (`scripts/ray_head.sh cluster-head`):
it requires Ray's auth token (RAY_AUTH_MODE=token) from every client, whatever that client's own mode; a driver,
`ray job submit`, `ray status` or a node without the token is refused, a worker started by cluster.yaml's worker
command joins and runs tasks, the dashboard listens on 127.0.0.1 only, a job sent through `scripts/submit.sh` with
the token runs (Ray Data included), and a job that does not succeed makes `submit.sh` fail. `make ray-up`'s local
head (`ray_head.sh start`) differs only in writing a token when there is none and in its CPU count.

Why a token and not loopback: Ray 2.60 cannot bind a head to loopback. `ray start` rewrites --node-ip-address
127.0.0.1 to the machine's address (services.resolve_ip_for_localhost), and GCS, raylet and the agents' gRPC
servers listen on all interfaces (measured: gcs_server, raylet and DashboardAgent on '::', metrics on 0.0.0.0,
the runtime-env and dashboard agents on the machine's address). Only the dashboard keeps to 127.0.0.1.

The head runs on free ports with its own temp dir (another Ray cluster may run on this machine) and its own HOME
(the token goes to $HOME/.ray/auth_token, not the user's), and is stopped by killing only its own processes,
never with `ray stop`. The cluster command's --autoscaling-config is left out: it names the GCP provider."""
import json
import os
import shlex
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
import yaml

from job_head import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD = ROOT / "scripts" / "ray_head.sh"
SUBMIT = ROOT / "scripts" / "submit.sh"
CLUSTER = ROOT / "cluster.yaml"
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _cluster_command(key: str) -> list[str]:
    """cluster.yaml's command that starts Ray on a node (after `ray stop`), run from the checkout as there."""
    commands = yaml.safe_load(CLUSTER.read_text())[key]
    assert commands[0] == "ray stop" and commands[1].startswith("cd ~/vim && "), commands
    return shlex.split(commands[1].removeprefix("cd ~/vim && "))


def _head_processes(temp: str) -> list[psutil.Process]:
    """The processes naming `temp` in their command line (the head's and its worker node's), and their children."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and any(temp in part for part in process.info["cmdline"] or []):
                found[process.pid] = process
                for child in process.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    return list(found.values())


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def _node_ports() -> list[str]:
    """Free ports for what a node opens besides GCS: the other tests' clusters hold Ray's default agent ports."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@pytest.fixture(scope="module")
def script_head():
    temp = tempfile.mkdtemp(prefix="vimlo-", dir="/tmp")  # short: Ray keeps unix sockets there
    home = tempfile.mkdtemp(prefix="vimlo-home-")
    ports = {"gcs": free_port(), "dashboard": free_port()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_HEAD_PORT": str(ports["gcs"]),
           "RAY_DASHBOARD_PORT": str(ports["dashboard"]), "HOME": home, "RAY_AUTH_MODE": "token"}
    for name in TOKEN_ENV:
        env.pop(name, None)
    # the caller's RAY_AUTH_MODE (disabled here, as for the in-process test clusters) must not turn auth off
    caller = {**env, "RAY_AUTH_MODE": "disabled"}
    token = subprocess.run(["bash", str(HEAD), "token"], env=caller, capture_output=True, text=True, timeout=30)
    command = [word for word in _cluster_command("head_start_ray_commands")
               if not word.startswith("--autoscaling-config=")]
    started = subprocess.run(
        [*command, f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}",
         f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", *_node_ports()],
        cwd=ROOT, env=caller, capture_output=True, text=True, timeout=180)
    try:
        assert token.returncode == 0, token.stdout + token.stderr
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"temp": temp, "ports": ports, "env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
               "gcs": f"127.0.0.1:{ports['gcs']}", "token_file": Path(home) / ".ray" / "auth_token",
               "token_output": token.stdout}
    finally:
        _kill(_head_processes(temp))
        _kill(_head_processes(temp))  # what the first round's parents started meanwhile
        shutil.rmtree(home, ignore_errors=True)  # the token
        for folder in (temp, f"{temp}-worker", f"{temp}-bare"):
            shutil.rmtree(folder, ignore_errors=True)


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


def test_token_is_private_and_the_head_requires_it(script_head):
    token_file = script_head["token_file"]
    assert token_file.is_file() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert f"Generated a Ray auth token in {token_file}" in script_head["token_output"]
    url = f"{script_head['dashboard']}/api/jobs/"
    assert (_get(url, None), _get(url, "not-the-token"), _get(url, token)) == (401, 403, 200)
    # a second `token` keeps the token the head uses; `start` finds the running head and starts no other
    again = subprocess.run(["bash", str(HEAD), "token"], env=script_head["env"], capture_output=True, text=True,
                           timeout=30)
    start = subprocess.run(["bash", str(HEAD), "start"], env=script_head["env"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stdout == "" and token_file.read_text() == token
    assert start.returncode == 0 and "Ray head already running" in start.stdout, start.stdout + start.stderr
    assert "accepts requests without a token" not in start.stderr, start.stderr


def test_the_dashboard_alone_listens_on_loopback(script_head):
    listening = {}
    for process in _head_processes(script_head["temp"]):
        try:
            for connection in process.net_connections("tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    listening.setdefault(connection.laddr.port, set()).add(connection.laddr.ip)
        except psutil.Error:
            pass
    assert listening[script_head["ports"]["dashboard"]] == {"127.0.0.1"}, listening
    assert listening[script_head["ports"]["gcs"]] - {"127.0.0.1"}, listening  # why the token is needed


def test_a_client_without_the_token_is_refused(script_head, tmp_path):
    """`ray job submit`, `ray status`, a `ray.init` driver and a joining node with no token anywhere (empty HOME,
    no token variables, the mode unset), and a driver with a wrong token, fail with Ray's authentication error,
    each within 90 s."""
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    bare = {k: v for k, v in script_head["env"].items() if k not in TOKEN_ENV + ("RAY_AUTH_MODE",)}
    bare["HOME"] = str(empty_home)
    wrong = {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    driver = f"import ray; ray.init(address={script_head['gcs']!r}); print('CONNECTED')"
    refused = "Authentication token is missing or incorrect"
    clients = {  # name: (command, env, what the refusal says)
        "job submit": ([str(BIN / "ray"), "job", "submit", "--address", script_head["dashboard"], "--",
                        "echo", "ran"], bare, "Missing authentication token"),
        "status": ([str(BIN / "ray"), "status", "--address", script_head["gcs"]], bare, "InvalidAuthToken"),
        "ray.init": ([sys.executable, "-c", driver], bare, refused),
        "ray.init, wrong token": ([sys.executable, "-c", driver], wrong, refused),
        "node": ([str(BIN / "ray"), "start", f"--address={script_head['gcs']}", "--num-cpus=0",
                  f"--temp-dir={script_head['temp']}-bare", *_node_ports()], bare, refused),
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


NODES_JOB = """
import ray, sys
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init(address=sys.argv[1], logging_level="ERROR")
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
where = ray.remote(lambda: ray.get_runtime_context().get_node_id())
print("nodes", len(alive), "ran on", sorted(ray.get([where.options(scheduling_strategy=On(n, soft=False)).remote()
                                                     for n in alive])) == sorted(alive))
"""


def test_a_worker_started_as_cluster_yaml_starts_it_joins_and_runs_tasks(script_head):
    """cluster.yaml's worker command, with the head's token in its HOME and a caller's mode of `disabled`."""
    temp = f"{script_head['temp']}-worker"  # named after the head's: the fixture's cleanup finds it
    command = [word.replace("$RAY_HEAD_IP", "127.0.0.1") for word in _cluster_command("worker_start_ray_commands")]
    joined = subprocess.run([*command, "--num-cpus=1", f"--temp-dir={temp}", *_node_ports()], cwd=ROOT,
                            env={**script_head["env"], "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                            text=True, timeout=180)
    try:
        assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
        ran = subprocess.run([sys.executable, "-c", NODES_JOB, script_head["gcs"]], env=script_head["env"],
                             capture_output=True, text=True, timeout=180)
        assert "nodes 2 ran on True" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-3000:]
    finally:
        _kill(_head_processes(temp))


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
