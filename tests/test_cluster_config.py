"""cluster.yaml passes Ray's own autoscaler schema (the check `ray up` makes before touching a cloud), and
its node types say what the stages need: a CPU head, GPU workers, TPU VM workers with the tpu extra."""
import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray._private.accelerators import TPUAcceleratorManager, tpu
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


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
    # The dashboard stays on the head's loopback: reached only through `ray dashboard` (an SSH tunnel).
    assert all("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"] if "--head" in c)


def test_kuberay_manifest_is_a_raycluster():
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay-raycluster.yaml").read_text())
    assert manifest["kind"] == "RayCluster" and manifest["spec"]["rayVersion"].startswith("2.60")
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
