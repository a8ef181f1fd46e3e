#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: the Fashion-MNIST package and a
# virtual environment with the project, its dependencies and the test tools.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the project accepts any torch >= 2.9, this is the tested pair.
"$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$venv/bin/python" -m pip install -q -e ".[dev]"
"$venv/bin/python" -c "import ray, torch, mlflow, webdataset, pyarrow; print('ready: ray', ray.__version__, 'torch', torch.__version__)"
