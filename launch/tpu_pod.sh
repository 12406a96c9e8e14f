#!/usr/bin/env bash
# Run the trace on a Cloud TPU VM slice: create it (or reuse it), install sae_jax on every
# worker, then run the same entry point on all workers at once; JAX finds its peers itself
# (--coordinator=auto) and the slice becomes one global mesh.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator v4-32] [--version RUNTIME] \
#       [--project P] [--repo URL] [--ref BRANCH] [--spot] [--dry-run] -- TRACE_FLAGS...
#
# TRACE_FLAGS go to experiments/trace.py, e.g.
#   -- --config=experiments/configs/llm_jp_3_1p8b.py --workdir=/mnt/runs/llmjp
# The workdir must be a filesystem every worker shares (Filestore / GCS FUSE mount): checkpoints
# are written by every host, run files by process 0. Rerun the same command after a preemption:
# finished pairs are skipped and a cut-off one resumes from its last checkpoint.
set -euo pipefail

name=""; zone=""; acc="v4-32"; version="tpu-ubuntu2204-base"; project=""; spot=0; dry_run=0
repo=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")
ref=$(git -C "$(dirname "$0")/.." rev-parse --abbrev-ref HEAD 2>/dev/null || echo main)
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) acc="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'; allowed: --name --zone --accelerator --version --project --repo --ref --spot --dry-run, then -- TRACE_FLAGS" ;;
  esac
done
[[ -n "$name" ]] || die "--name is required (the TPU VM to create or reuse)"
[[ -n "$zone" ]] || die "--zone is required (e.g. us-central2-b)"
[[ -n "$repo" ]] || die "--repo is required (no git remote to default to)"
[[ "$acc" =~ ^v[0-9]+[a-z]*(-[0-9]+)?$ ]] || die "--accelerator=$acc is not a TPU type like v4-32 or v5litepod-16"
[[ $# -gt 0 ]] || die "no trace flags after --; at least --workdir=... is needed"

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
create=("${gc[@]}" create "$name" "${where[@]}" --accelerator-type="$acc" --version="$version")
[[ $spot -eq 1 ]] && create+=(--spot)
q() { printf '%q ' "$@"; }
install="set -e; if [ -d sae_jax ]; then git -C sae_jax fetch -q origin && git -C sae_jax checkout -q $(q "$ref") && git -C sae_jax pull -q; else git clone -q --branch $(q "$ref") $(q "$repo") sae_jax; fi; cd sae_jax; python3 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . 'jax[tpu]'"
run="cd sae_jax && .venv/bin/python experiments/trace.py --coordinator=auto $(q "$@")"
ssh=("${gc[@]}" ssh "$name" "${where[@]}" --worker=all)

if [[ $dry_run -eq 1 ]]; then
  echo "$(q "${gc[@]}" describe "$name" "${where[@]}") || $(q "${create[@]}")"
  echo "$(q "${ssh[@]}") --command=$(q "$install")"
  echo "$(q "${ssh[@]}") --command=$(q "$run")"
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud is not installed or not on PATH (https://cloud.google.com/sdk)"
"${gc[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1 || "${create[@]}"
"${ssh[@]}" --command="$install"
"${ssh[@]}" --command="$run"
