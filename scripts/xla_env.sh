#!/usr/bin/env bash
# Builds the torch_xla environment for the XLA checks on torch_xla's CPU device (tests/test_xla.py,
# `make xla-check`): torch 2.9.0 + torch_xla 2.9.0, which cannot share the main environment's torch.
#   bash scripts/xla_env.sh [VENV] [WHEELS]      (defaults: .venv-tpu .xla-wheels)
# The exact wheels of scripts/xla_cpu_wheels.txt are downloaded once into WHEELS, a git-ignored folder of the
# clone, and installed from there without an index: rebuilding the environment downloads nothing. TPU hosts
# install the `tpu` extra instead (cluster.yaml), with libtpu.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-tpu}
wheels=${2:-.xla-wheels}
list=scripts/xla_cpu_wheels.txt

rm -rf "$venv"
python3 -m venv "$venv"
# The list itself marks a complete download: a changed list downloads what it adds.
if ! cmp -s "$list" "$wheels/.downloaded"; then
  "$venv/bin/pip" download -q --no-cache-dir --no-deps --only-binary=:all: --dest "$wheels" -r "$list"
  cp "$list" "$wheels/.downloaded"
fi
"$venv/bin/pip" install -q --no-index --no-deps --find-links "$wheels" -r "$list"
PJRT_DEVICE=CPU "$venv/bin/python" -c "import torch, torch_xla; print('ready: torch', torch.__version__, 'torch_xla', torch_xla.__version__)"
