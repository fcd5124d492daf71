#!/usr/bin/env bash
# The CPU benchmark run: every criterion suite, then the peers outside Rust on the same
# machine (JAX's training step on the CPU, numpy's OpenBLAS GEMM), then the results table in
# bench/results/DATE-cpu.md. The peers are installed into .toolchain/py (git-ignored).
# The GPU run is scripts/gpu-check.sh on a machine with a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
py=.toolchain/py
if ! PYTHONPATH=$py python3 -c "import numpy, jax, threadpoolctl" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$py" numpy "jax[cpu]" threadpoolctl
fi
rm -rf target/criterion
cargo bench --bench gemm --bench elementwise --bench train_step --bench parallel -- --warm-up-time 1 --measurement-time 3
peers=target/peers-cpu.jsonl
: > "$peers"
# OPENBLAS_CORETYPE/L2_SIZE are set on some machines for old OpenBLAS builds; they slow a
# current numpy, so the peers run without them (tessera never reads them).
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=$py python3 bench/peers/gemm_numpy.py | tee -a "$peers"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=$py python3 bench/peers/mlp_step.py --framework jax --device cpu | tee -a "$peers"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=$py python3 bench/peers/gpt_step.py --seconds 10 | tee -a "$peers"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=$py python3 bench/peers/transformer_ops.py | tee -a "$peers"
python3 bench/results.py --peers "$peers" --out "bench/results/$(date -u +%Y-%m-%d)-cpu.md" \
  --title "tessera on the CPU: kernels, training and the parallel engine against their peers" --command "scripts/bench.sh"
