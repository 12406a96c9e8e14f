#!/usr/bin/env bash
# Every GPU benchmark of the step in one go, for a short rented (or lent) GPU session.
# Writes JSON lines under ${OUT:-gpu_results}/. Needs: jax with CUDA, torch with CUDA and
# eai-sparsify in the same python (the peer runs in a subprocess of that python); wheels of
# anything missing may be put in .whl/ (installed with --no-deps into /tmp/site).
# Order: the headline (bfloat16, as sparsify's autocast runs) first, each part under a timeout.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
. experiments/benchmarks/gpu_env.sh
# JAX preallocates 75 % of the GPU by default; the peer (PyTorch) needs room beside it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
B=experiments/benchmarks/sae_step.py
T=${PART_TIMEOUT:-170}
# Which parts (default: all, in this order): PARTS="step default kernels pallas f32 models pipeline".
PARTS=" ${PARTS:-step kernels pallas f32 models pipeline} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
# 1. The step, XLA and Pallas kernels, AuxK on a quarter of the latents, beside sparsify.
part step && timeout $T $PY $B --peer_python=$PY --paper_shape --paper_batch=32768 --steps=10 \
  --compute_dtype=bfloat16 --kernels=xla,pallas | tee "$OUT/sae_step_bf16.jsonl"
# 1b. The default shape alone (d_in 512, 8,192 latents, k 32, 4,096 tokens), AuxK included.
part default && timeout $T $PY $B --peer_python=$PY --steps=20 --compute_dtype=bfloat16 \
  --kernels=xla,pallas | tee "$OUT/sae_step_default_bf16.jsonl"
# 2. Each sparse op, XLA vs Pallas (decode, its backward, the encoder weight gradient).
part kernels && timeout $T $PY experiments/benchmarks/sparse_kernels.py | tee "$OUT/kernels.jsonl"
# 3. The Pallas kernels compiled for the GPU against the XLA path (tests).
part pallas && JAX_PLATFORMS=cuda,cpu timeout $T $PY -m pytest -q -p no:cacheprovider \
  tests/test_pallas_kernels.py 2>&1 | tail -15 | tee "$OUT/pallas_tests.txt"
# 4. float32 inputs (TF32 matmuls), XLA kernels.
part f32 && timeout $T $PY $B --default_shape=false --paper_shape --paper_batch=32768 --steps=10 \
  | tee "$OUT/sae_step_f32.jsonl"
# 5. The Flax NNX ports on the GPU against Hugging Face PyTorch (the parity tests; the mesh tests
# need 8 devices and stay on the CPU).
part models && JAX_PLATFORMS=cuda,cpu timeout $T $PY -m pytest -q -p no:cacheprovider \
  tests/test_models.py -k "match_hf or padding or bfloat16 or nnx_module" 2>&1 | tail -15 | tee "$OUT/models_tests.txt"
# 6. Text -> SAE steps on the device against the bare forward (one GPU: a 1x1 mesh).
part pipeline && timeout $T $PY experiments/benchmarks/pipeline.py --d_model=1024 --n_layers=8 \
  --batch=64 --sae_batch=8192 --docs=4000 --cache=false | tee "$OUT/pipeline.jsonl"
