#!/usr/bin/env bash
# Where the step's GPU time goes (profile_step.py), at the default and the paper's shape, with
# and without AuxK, and the default shape's step under XLA's command-buffer settings. Writes
# JSON lines under ${OUT:-gpu_profile}/; wheels in .whl/ are installed as in run_gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_profile}; mkdir -p "$OUT"
. experiments/benchmarks/gpu_env.sh
P="timeout ${PART_TIMEOUT:-90} $PY experiments/benchmarks/profile_step.py"
quiet() { grep '^{' ; }
$P --tag=default_xla 2>&1 | quiet | tee "$OUT/default.jsonl"
$P --tag=default_xla_auxk --dead_fraction=0.25 2>&1 | quiet | tee -a "$OUT/default.jsonl"
$P --tag=default_pallas_auxk --kernels=pallas --dead_fraction=0.25 2>&1 | quiet | tee -a "$OUT/default.jsonl"
$P --tag=paper_pallas_bf16 --d_in=2048 --d_sae=32768 --batch=32768 --compute_dtype=bfloat16 \
  --kernels=pallas --steps=10 2>&1 | quiet | tee "$OUT/paper.jsonl"
$P --tag=paper_pallas_bf16_auxk --d_in=2048 --d_sae=32768 --batch=32768 --compute_dtype=bfloat16 \
  --kernels=pallas --steps=10 --dead_fraction=0.25 2>&1 | quiet | tee -a "$OUT/paper.jsonl"
# The default shape is launch-bound: does XLA's command buffer (CUDA graphs) change it?
for cb in "" "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; do
  for dead in 0 0.25; do
    XLA_FLAGS="--xla_gpu_enable_command_buffer=$cb" $P --tag="command_buffer=$cb" --traced=0 \
      --dead_fraction=$dead --steps=50 2>&1 | quiet | tee -a "$OUT/command_buffer.jsonl"
  done
done
