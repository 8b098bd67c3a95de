#!/usr/bin/env bash
# One prepared script for a lent GPU machine (JAX with CUDA, torch and transformers already
# installed there, no network): the GPU test run and the offline benchmark, results in $OUT.
#
#   bash tools/gpu_check.sh            # on the device machine, from the repository root
#
# Python packages missing there (flax, tokenizers, ...) come from ./wheelhouse, made here
# beforehand with tools/make_wheelhouse.sh and carried along.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/inferflux-gpu}"
mkdir -p "$OUT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"

{
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
    python --version
    python -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

if [ -d wheelhouse ]; then
    python -m pip install -q --no-index --find-links wheelhouse -e . 2>&1 | tail -3
else
    python -m pip install -q --no-deps -e . 2>&1 | tail -3
fi

# Tests: model families, generation, engine and sampling on the GPU (float32, highest precision
# as conftest sets it). The CPU-only scheduler/tokenizer tests add nothing here.
timeout 420 python -m pytest -q -x -p no:cacheprovider \
    tests/test_attention.py tests/test_models.py tests/test_generation.py \
    tests/test_engine.py tests/test_sampling.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"

# Benchmark: the ~60M Llama shape against transformers on the same GPU.
timeout 300 python tools/bench_offline.py --json "$OUT/bench_gpu.json" 2>&1 | tail -8 | tee "$OUT/bench.txt"
