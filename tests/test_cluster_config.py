"""cluster.yaml passes Ray's own autoscaler schema (the check `ray up` makes before touching a cloud), its node types
say what the stages need (a CPU head, GPU workers, TPU VM workers with the tpu extra), and neither it nor the KubeRay
manifest runs an open cluster: every node starts in token mode with a token that is never in the files, the dashboard
stays on loopback, and only the cluster's own nodes reach the head's Ray ports.

What the scripts hand to `ray` and `gcloud` is read from a stand-in of each on PATH that writes down its mode and
arguments (no cloud here); a real head started by cluster.yaml's own command is in test_ray_head.py."""
import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray._private.accelerators import TPUAcceleratorManager, tpu
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
HEAD_SCRIPT = ROOT / "scripts" / "ray_head.sh"
NETWORK_SCRIPT = ROOT / "deploy" / "gcp-network.sh"
KUBERAY = ROOT / "deploy" / "kuberay-raycluster.yaml"
CHECKOUT = "cd ~/vim && "  # where cluster.yaml's file_mounts put this checkout on every node

RECORDER = """#!/usr/bin/env bash
{ echo "RAY_AUTH_MODE=${RAY_AUTH_MODE:-}"; printf '%s\\n' "$@"; echo "--end--"; } >> "$RECORD"
"""


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _recorded(tool: str, command: list[str], tmp_path: Path, token: bool = True, **env: str):
    """Runs `command` with a stand-in `tool` on PATH; returns the process and, per call of the tool, its
    RAY_AUTH_MODE and arguments."""
    bin_dir, home, record = tmp_path / "bin", tmp_path / "home", tmp_path / f"{tool}.calls"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / tool).write_text(RECORDER)
    (bin_dir / tool).chmod(0o755)
    if token:
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        (home / ".ray" / "auth_token").write_text("f" * 64)
    record.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_TOKEN", "RAY_HEAD", "RAY_DASH"))}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home),
                               "RECORD": str(record), "RAY_AUTH_MODE": "disabled", **env})
    calls = []
    for block in (record.read_text().split("--end--\n")[:-1] if record.exists() else []):
        mode, *args = block.splitlines()
        calls.append((mode.removeprefix("RAY_AUTH_MODE="), args))
    return done, calls


def _start_command(commands: list[str]) -> str:
    """The one command of a start list that starts Ray (after `ray stop`), without the `cd` into the checkout."""
    assert commands[0] == "ray stop" and len(commands) == 2 and commands[1].startswith(CHECKOUT), commands
    return commands[1].removeprefix(CHECKOUT)


def _flags(args: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a mapping; a flag given twice keeps its last value, as `ray start` does."""
    return dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)


@pytest.fixture
def head_start(cluster, tmp_path) -> dict[str, str]:
    """The flags cluster.yaml's head command hands to `ray start` (with a token in place)."""
    done, calls = _recorded("ray", ["bash", "-c", _start_command(cluster["head_start_ray_commands"])], tmp_path)
    assert done.returncode == 0 and len(calls) == 1, done.stderr
    mode, args = calls[0]
    assert args[:2] == ["start", "--head"] and mode == "token", calls
    return _flags(args)


def test_cluster_yaml_passes_the_autoscaler_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["max_wokers"] = 2
    with pytest.raises(ValidationError, match="max_wokers"):
        validate_config(prepare_config(broken))


def test_node_types_match_the_stages(cluster):
    types = cluster["available_node_types"]
    assert cluster["provider"]["type"] == "gcp"
    assert "GPU" not in types[cluster["head_node_type"]]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["gpu_worker"]["node_config"]["guestAccelerators"][0]["acceleratorCount"] == 1
    # A TPU VM node: no machineType, a valid accelerator type, and the chip count Ray will detect.
    tpu_node = types["tpu_worker"]["node_config"]
    assert "machineType" not in tpu_node and tpu_node["runtimeVersion"]
    accelerator = tpu_node["acceleratorType"]
    assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(accelerator)
    chips = int(accelerator.split("-")[1]) // tpu.get_tpu_cores_per_chip(accelerator)
    assert types["tpu_worker"]["resources"]["TPU"] == chips
    assert any('".[tpu]"' in command for command in types["tpu_worker"]["worker_setup_commands"])


def test_every_node_starts_in_token_mode_with_the_dashboard_on_loopback(cluster, head_start, tmp_path):
    """Head and workers start through scripts/ray_head.sh, which runs `ray start` in token mode whatever the
    caller's shell says, and refuses to start a node at all without a token; the token comes from the machine
    that ran `ray up` (file_mounts), not from the checkout."""
    assert head_start["dashboard-host"] == "127.0.0.1" and head_start["port"] == "6379"
    assert head_start["autoscaling-config"] == "~/ray_bootstrap_config.yaml"

    worker = _start_command(cluster["worker_start_ray_commands"])
    done, calls = _recorded("ray", ["bash", "-c", worker], tmp_path, RAY_HEAD_IP="10.64.0.2")
    assert done.returncode == 0 and len(calls) == 1, done.stderr
    mode, args = calls[0]
    assert mode == "token" and args[0] == "start" and _flags(args)["address"] == "10.64.0.2:6379", calls

    for command in (_start_command(cluster["head_start_ray_commands"]), worker):
        done, calls = _recorded("ray", ["bash", "-c", command], tmp_path / "bare", token=False,
                                RAY_HEAD_IP="10.64.0.2")
        assert done.returncode == 2 and calls == [] and "no Ray auth token" in done.stderr, (command, done.stderr)

    # The shells of `ray exec` and `ray attach` agree with the nodes; nothing in the file turns auth off.
    assert "grep -qx 'export RAY_AUTH_MODE=token' ~/.bashrc || echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" \
        in cluster["setup_commands"]
    modes = re.findall(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?(\w+)", (ROOT / "cluster.yaml").read_text())
    assert modes and set(modes) == {"token"}, modes
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not Path(os.path.expanduser("~/.ray/auth_token")).resolve().is_relative_to(ROOT)


def _gcloud_calls(tmp_path: Path) -> list[list[str]]:
    """deploy/gcp-network.sh's gcloud commands, each without the project and --quiet it always passes."""
    done, calls = _recorded("gcloud", ["bash", str(NETWORK_SCRIPT), "my-project", "203.0.113.7/32"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert all(args[:2] == ["--project=my-project", "--quiet"] for _, args in calls), calls
    return [args[2:] for _, args in calls]


def test_the_firewall_lets_only_the_cluster_reach_the_heads_ray_ports(cluster, head_start, tmp_path):
    calls = _gcloud_calls(tmp_path)
    assert calls[0] == ["compute", "networks", "create", "vim-ray", "--subnet-mode=custom"]
    rules = {args[3]: _flags(args) for args in calls if args[:3] == ["compute", "firewall-rules", "create"]}
    # The head rule opens exactly the ports the head command starts Ray on, to the cluster's tagged nodes.
    head_ports = (f"tcp:{head_start['port']},tcp:{head_start['node-manager-port']},"
                  f"tcp:{head_start['object-manager-port']},"
                  f"tcp:{head_start['min-worker-port']}-{head_start['max-worker-port']}")
    assert rules["vim-ray-head"]["allow"] == head_ports
    assert rules["vim-ray-ssh"] == {"network": "vim-ray", "direction": "INGRESS", "allow": "tcp:22",
                                    "source-ranges": "203.0.113.7/32", "target-tags": "vim-ray"}
    for name, target in (("vim-ray-head", "vim-ray-head"), ("vim-ray-workers", "vim-ray-worker")):
        assert rules[name]["source-tags"] == "vim-ray" and rules[name]["target-tags"] == target
        assert "source-ranges" not in rules[name] and rules[name]["network"] == "vim-ray"
        assert rules[name]["direction"] == "INGRESS"
    assert set(rules) == {"vim-ray-ssh", "vim-ray-head", "vim-ray-workers"}

    # Every node is in that network, tagged for the rule meant for it.
    region = cluster["provider"]["region"]
    subnet = f"projects/{cluster['provider']['project_id']}/regions/{region}/subnetworks/vim-ray"
    for name, node_type in cluster["available_node_types"].items():
        config, role = node_type["node_config"], "head" if name == cluster["head_node_type"] else "worker"
        if "acceleratorType" in config and "machineType" not in config:  # a TPU VM: its own field names
            assert config["networkConfig"]["subnetwork"] == subnet, name
            assert config["networkConfig"]["network"].endswith("/global/networks/vim-ray"), name
            tags = config["tags"]
        else:
            assert [interface["subnetwork"] for interface in config["networkInterfaces"]] == [subnet], name
            tags = config["tags"]["items"]
        assert sorted(tags) == ["vim-ray", f"vim-ray-{role}"], name


def test_kuberay_runs_token_auth_and_only_its_own_pods_reach_it(head_start):
    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    assert sorted(d["kind"] for d in documents) == ["NetworkPolicy", "NetworkPolicy", "RayCluster"]
    raycluster = next(d for d in documents if d["kind"] == "RayCluster")
    spec, name = raycluster["spec"], raycluster["metadata"]["name"]
    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), container["name"]
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params["dashboard-host"] == "127.0.0.1"
    port_flags = ("node-manager-port", "object-manager-port", "min-worker-port", "max-worker-port")
    assert {flag: head_params[flag] for flag in port_flags} == {flag: head_start[flag] for flag in port_flags}

    policies = {tuple(sorted(d["spec"]["podSelector"]["matchLabels"].items())): d["spec"]
                for d in documents if d["kind"] == "NetworkPolicy"}
    cluster_label = ("ray.io/cluster", name)
    head = policies[(cluster_label, ("ray.io/node-type", "head"))]
    workers = policies[(cluster_label, ("ray.io/node-type", "worker"))]
    for policy in (head, workers):
        assert policy["policyTypes"] == ["Ingress"]
        sources = [source for rule in policy["ingress"] for source in rule["from"]]
        assert sources == [{"podSelector": {"matchLabels": dict([cluster_label])}}] * len(policy["ingress"])
    head_ports = {(p["port"], p.get("endPort", p["port"])) for rule in head["ingress"] for p in rule["ports"]}
    assert head_ports == {(int(head_start["port"]),) * 2, (int(head_start["node-manager-port"]),) * 2,
                          (int(head_start["object-manager-port"]),) * 2,
                          (int(head_start["min-worker-port"]), int(head_start["max-worker-port"]))}


TOKEN_LIKE = re.compile(r"\b[0-9a-fA-F]{32,}\b|[A-Za-z0-9+/]{40,}={0,2}")


def test_no_token_is_written_in_the_deploy_files(tmp_path):
    """No file that configures a cluster carries a token: none of the tokens scripts/ray_head.sh makes, no
    RAY_AUTH_TOKEN value, no Secret with data."""
    made = tmp_path / "auth_token"
    subprocess.run(["bash", str(HEAD_SCRIPT), "token"], env={**os.environ, "RAY_AUTH_TOKEN_PATH": str(made)},
                   check=True, capture_output=True)
    assert TOKEN_LIKE.fullmatch(made.read_text())  # the pattern catches what the script writes
    for path in (ROOT / "cluster.yaml", KUBERAY, NETWORK_SCRIPT, HEAD_SCRIPT):
        text = path.read_text()
        assert not TOKEN_LIKE.search(text), (path, TOKEN_LIKE.search(text))
        assert not re.search(r"RAY_AUTH_TOKEN\s*(=|:\s)\s*\S", text) and "kind: Secret" not in text, path
