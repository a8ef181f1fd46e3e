"""The TPU code path (torch_xla SPMD through `pipeline.device` and `pipeline/train/xla_spmd.py`) on 4 of torch_xla's
CPU devices, run by `scripts/xla_cpu_loop.py` in the separate torch_xla environment (`make tpu-env`, which
`make test` builds; torch_xla pins its own torch, so it cannot share the main environment)."""
import json
import math
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from pipeline.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"
DEVICES, STEPS = 4, 30
# Plain PyTorch on the CPU against XLA over 4 devices: the same maths, summed in another order. One AdamW step
# moves a weight by up to lr = 3e-3, so a gradient whose sign came out wrong would show as ~6e-3.
PARAMETER_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5

needs_tpu_env = pytest.mark.skipif(not TPU_PYTHON.exists(),
                                   reason="no .venv-tpu: `make tpu-env` builds it (`make test` does)")


def run_loop(report: Path, *args: str) -> dict:
    result = subprocess.run(
        [str(TPU_PYTHON), str(ROOT / "scripts" / "xla_cpu_loop.py"), "--report", str(report), *args], cwd=ROOT,
        env={**os.environ, "PJRT_DEVICE": "CPU", "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
        timeout=600)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("xla-ddp")
    return run_loop(folder / "report.json", "--devices", str(DEVICES), "--parallelism", "ddp",
                    "--steps", str(STEPS), "--decode-check")


@pytest.fixture(scope="module")
def fully_sharded(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("xla-fsdp")
    report = run_loop(folder / "report.json", "--devices", str(DEVICES), "--parallelism", "fsdp",
                      "--steps", str(STEPS), "--save", str(folder / "checkpoint"))
    return report, folder / "checkpoint"


def fsdp_local_shape(shape: list[int], devices: int) -> tuple[int, ...]:
    """FSDPv2's share of a parameter: its largest dimension split over the devices."""
    largest = shape.index(max(shape))
    return tuple(math.ceil(size / devices) if axis == largest else size for axis, size in enumerate(shape))


def test_the_cpu_wheel_list_pins_the_tpu_extra():
    """The XLA CPU environment and TPU hosts run the same torch and torch_xla releases."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tpu"]
    wheels = (ROOT / "scripts" / "xla_cpu_wheels.txt").read_text()
    for package in ("torch", "torch_xla"):
        pinned = [re.sub(r"\[.*\]", "", spec) for spec in extra if re.match(rf"{package}(\[.*\])?==", spec)]
        assert pinned and re.search(rf"^{re.escape(pinned[0])}$", wheels, re.MULTILINE), package


TPU_HOSTS = ["transformer.resources.tpu_hosts=true", "transformer.resources.tpu_chips_per_host=8"]


def test_a_tpu_host_batch_must_split_over_its_chips():
    assert build_config({}, [*TPU_HOSTS, "transformer.batch_size=64"]).transformer.resources.tpu_hosts
    with pytest.raises(ConfigError, match=r"transformer.batch_size 60 .*tpu_chips_per_host 8"):
        build_config({}, [*TPU_HOSTS, "transformer.batch_size=60"])


def test_tpu_hosts_refuse_gpu_settings_and_the_tokenizer():
    with pytest.raises(ConfigError, match=r"transformer.resources.*use_gpu must be false"):
        build_config({}, [*TPU_HOSTS, "transformer.resources.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"train the Transformer only"):
        build_config({}, ["tokenizer.resources.tpu_hosts=true"])


@needs_tpu_env
def test_a_data_parallel_step_on_four_devices_equals_one_device(data_parallel):
    assert data_parallel["devices"] == DEVICES and data_parallel["autocast"] == "None"
    assert data_parallel["two_workers_refused"]  # workers whose chips are not in one mesh do not start
    # Each micro-batch of 16 sequences of 16 tokens is split over the 4 devices...
    assert data_parallel["batch_local_shapes"] == [[16 // DEVICES, 16]] * DEVICES
    # ...while every device holds every parameter whole.
    for name, entry in data_parallel["shards"].items():
        assert entry["local_shapes"] == [entry["shape"]] * DEVICES, name
    for step in (1, 2):
        assert data_parallel[f"param_max_abs_diff_after_step_{step}"] < PARAMETER_TOLERANCE
    assert data_parallel["losses"][:2] == pytest.approx(data_parallel["reference_losses"], abs=LOSS_TOLERANCE)


@needs_tpu_env
def test_the_loss_falls_over_a_few_dozen_steps(data_parallel):
    losses = data_parallel["losses"]
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(math.log(64), abs=0.2)  # a fresh model: about uniform over 64 codes
    assert max(losses[-5:]) < 0.2 * losses[0]
    # The lr changed at every step of the warm-up and the decay, without a new program after the first steps
    # (a recompilation per step would stall a TPU).
    assert 0 < data_parallel["compilations_after_3_steps"] == data_parallel["compilations_at_the_end"]


@needs_tpu_env
def test_a_resumed_model_takes_the_same_next_step(data_parallel):
    assert data_parallel["resumed_next_loss_same_devices"] == pytest.approx(data_parallel["next_loss"],
                                                                             abs=LOSS_TOLERANCE)


@needs_tpu_env
def test_kv_cache_decoding_matches_the_full_forward(data_parallel):
    assert data_parallel["decode_max_abs_diff"] < 1e-4


@needs_tpu_env
def test_fully_sharded_parameters_and_moments_are_split_over_the_devices(fully_sharded):
    report, _ = fully_sharded
    assert len(report["shards"]) > 10
    for name, entry in report["shards"].items():
        expected = [list(fsdp_local_shape(entry["shape"], DEVICES))] * DEVICES
        assert entry["local_shapes"] == expected, name
        assert math.prod(expected[0]) * DEVICES == math.prod(entry["shape"]), name  # no device holds it all
        assert set(entry["moments"]) == {"exp_avg", "exp_avg_sq"}, name
        for moment in entry["moments"].values():
            assert moment["local_shapes"] == expected, name
    for step in (1, 2):
        assert report[f"param_max_abs_diff_after_step_{step}"] < PARAMETER_TOLERANCE
    assert max(report["losses"][-5:]) < 0.2 * report["losses"][0]


@needs_tpu_env
def test_a_fully_sharded_checkpoint_resumes_on_two_devices(fully_sharded, tmp_path):
    report, checkpoint = fully_sharded
    assert report["resumed_next_loss_same_devices"] == pytest.approx(report["next_loss"], abs=LOSS_TOLERANCE)
    resumed = run_loop(tmp_path / "resumed.json", "--devices", "2", "--parallelism", "fsdp",
                       "--resume", str(checkpoint))
    assert resumed["devices"] == 2 and resumed["resumed_step"] == STEPS
    assert resumed["resumed_next_loss"] == pytest.approx(report["next_loss"], abs=LOSS_TOLERANCE)
    for name, entry in resumed["shards"].items():  # loaded, then sharded again: now in halves
        expected = [list(fsdp_local_shape(entry["shape"], 2))] * 2
        assert entry["local_shapes"] == expected, name
        assert [moment["local_shapes"] for moment in entry["moments"].values()] == [expected] * 2, name


@needs_tpu_env
def test_noble_branches_train_fully_sharded_on_four_devices_as_on_one(tmp_path):
    """NOBLE's branches (pipeline/models/noble.py) on the XLA path: sharded with the rest of the model, and a
    step over 4 devices equals the CPU's."""
    report = run_loop(tmp_path / "report.json", "--devices", str(DEVICES), "--parallelism", "fsdp", "--steps", "3",
                      "--noble-rank", "4")
    branches = {name: entry for name, entry in report["shards"].items() if ".noble." in name}
    assert branches and all(entry["local_shapes"] == [list(fsdp_local_shape(entry["shape"], DEVICES))] * DEVICES
                            for entry in branches.values())
    for step in (1, 2):
        assert report[f"param_max_abs_diff_after_step_{step}"] < PARAMETER_TOLERANCE
    assert report["losses"][:2] == pytest.approx(report["reference_losses"], abs=LOSS_TOLERANCE)
