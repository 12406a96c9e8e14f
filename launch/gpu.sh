#!/usr/bin/env bash
# Run the trace on GPU nodes. One node: one process drives every local GPU. Several nodes: a
# SLURM batch job with one process per node (srun); JAX reads the SLURM environment
# (--coordinator=auto) and all nodes form one global mesh.
#
#   launch/gpu.sh [--nodes N] [--gpus-per-node G] [--partition P] [--time HH:MM:SS] \
#       [--python PATH] [--dry-run] -- TRACE_FLAGS...
#
# TRACE_FLAGS go to experiments/trace.py (e.g. --config=experiments/configs/pythia.py
# --workdir=/shared/runs/pythia). With several nodes the workdir must be on a shared
# filesystem. Rerun the same command after a preemption: the trace resumes where it stopped.
set -euo pipefail

nodes=1; gpus=8; partition=""; time_limit="24:00:00"; dry_run=0
root=$(cd "$(dirname "$0")/.." && pwd)
python="${PYTHON:-python}"
die() { echo "gpu.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; allowed: --nodes --gpus-per-node --partition --time --python --dry-run, then -- TRACE_FLAGS" ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$nodes must be a positive integer"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node=$gpus must be a positive integer"
[[ $# -gt 0 ]] || die "no trace flags after --; at least --workdir=... is needed"
q() { printf '%q ' "$@"; }
cmd="cd $(q "$root") && $(q "$python") experiments/trace.py $(q "$@")"

if [[ $nodes -eq 1 ]]; then
  if [[ $dry_run -eq 1 ]]; then echo "${cmd% }"; exit 0; fi
  cd "$root" && exec "$python" experiments/trace.py "$@"
fi

job=$(cat <<JOB
#!/usr/bin/env bash
#SBATCH --job-name=sae_jax_trace
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --requeue
${partition:+#SBATCH --partition=$partition}
#SBATCH --output=sae_jax_trace_%j.log
# SLURM sends SIGTERM before preempting; the trace checkpoints on it, and --requeue reruns the
# job, which resumes.
srun bash -c $(q "$cmd --coordinator=auto")
JOB
)
if [[ $dry_run -eq 1 ]]; then
  echo "sbatch <<'JOB'"; echo "$job"; echo "JOB"; exit 0
fi
command -v sbatch >/dev/null || die "sbatch is not on PATH: several nodes need SLURM (or run one node with --nodes 1)"
sbatch <<<"$job"
