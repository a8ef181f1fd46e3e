"""The Transformer training loop on torch_xla's CPU device, in the separate `tpu` environment
(`make tpu-env`; torch_xla pins its own torch, so it cannot share the main environment)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"


@pytest.mark.skipif(not TPU_PYTHON.exists(),
                    reason="no .venv-tpu: build it with `make tpu-env` (several GB of downloads) to run this")
def test_training_loop_on_the_cpu_xla_device():
    result = subprocess.run([str(TPU_PYTHON), str(ROOT / "scripts" / "xla_cpu_loop.py")], cwd=ROOT,
                            env={**os.environ, "PJRT_DEVICE": "CPU"}, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    assert "XLA loop OK" in result.stdout
