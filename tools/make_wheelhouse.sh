#!/usr/bin/env bash
# Downloads the wheels that the GPU machine lacks (it has jax, torch and transformers but no
# network) into ./wheelhouse, for tools/gpu_check.sh. Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY_VERSION="${PY_VERSION:-3.12}"
python -m pip download -q -d wheelhouse --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    flax tokenizers sentencepiece safetensors jinja2 pyyaml pydantic tqdm orbax-checkpoint
du -sh wheelhouse
