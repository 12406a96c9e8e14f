#!/usr/bin/env bash
# Every GPU benchmark of the step in one go, for a short rented (or lent) GPU session.
# Writes JSON lines under ${OUT:-gpu_results}/. Needs: jax with CUDA, torch with CUDA and
# eai-sparsify in the same python (the peer runs in a subprocess of that python); wheels of
# anything missing may be put in .whl/ (installed with --no-deps into /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# JAX preallocates 75 % of the GPU by default; the peer (PyTorch) needs room beside it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
B=experiments/benchmarks/sae_step.py
# float32 (TF32 matmuls, JAX's default precision) and bfloat16 compute, with the peer.
$PY $B --peer_python=$PY --paper_shape --paper_batch=32768 --steps=20 | tee "$OUT/sae_step_f32.jsonl"
$PY $B --peer_python=$PY --paper_shape --paper_batch=32768 --steps=20 --compute_dtype=bfloat16 \
  | tee "$OUT/sae_step_bf16.jsonl"
# How the encoder's chunk size moves the paper-shape step.
for mb in 64 1024 4096; do
  $PY $B --default_shape=false --paper_shape --paper_batch=32768 --dead_fraction=0 --steps=20 \
    --compute_dtype=bfloat16 --accelerator_chunk_mb=$mb | tee -a "$OUT/sae_step_chunks.jsonl"
done
