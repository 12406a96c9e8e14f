#!/usr/bin/env bash
# N processes on this host: the multi-host path (jax.distributed, gloo collectives on CPU),
# each process with its own forced CPU devices. Every process runs the same command.
#
#   launch/local_multiprocess.sh [--dry-run] [--processes N] [--devices-per-process D] \
#       [--port P] [--log-dir DIR] -- python experiments/trace.py --workdir=runs/mp ...
#
# Process i gets SAE_JAX_COORDINATOR=localhost:P, SAE_JAX_NUM_PROCESSES=N, SAE_JAX_PROCESS_ID=i
# (read by sae_jax.distributed.initialize, which the experiments/ entry points call). Process 0
# prints to this terminal; the others to DIR/process_<i>.log. The exit status is the first
# non-zero one among the processes: on a failure the others are stopped (forced after
# GRACE_S=10 s); on a preemption (143) they get GRACE_S=60 s to checkpoint with it.
set -euo pipefail

dry_run=0; n=2; devices=4; port=""; log_dir=""
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --processes) n="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local_multiprocess.sh: unknown option '$1'; allowed: --dry-run --processes" \
            "--devices-per-process --port --log-dir, then -- COMMAND" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local_multiprocess.sh: no command given; put it after --" >&2; exit 2
fi
if ! [[ "$n" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multiprocess.sh: --processes=$n and --devices-per-process=$devices must be" \
       "positive integers" >&2; exit 2
fi
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
if [[ -z "$log_dir" ]]; then
  log_dir=$([[ $dry_run -eq 1 ]] && echo /tmp/sae_jax_mp.LOGS || mktemp -d -t sae_jax_mp.XXXXXX)
fi

envs() {
  echo "SAE_JAX_COORDINATOR=localhost:$port SAE_JAX_NUM_PROCESSES=$n SAE_JAX_PROCESS_ID=$1" \
       "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
}
if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < n; i++)); do
    out=$([[ $i -eq 0 ]] && echo "" || echo " > $log_dir/process_$i.log 2>&1")
    echo "$(envs "$i") $*$out &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  if [[ $i -eq 0 ]]; then
    env $(envs "$i") "$@" &
  else
    env $(envs "$i") "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
# Wait for whichever ends first; on a failure stop the rest (a lone process would hang in a
# collective waiting for its dead peer).
remaining=$n
while [[ $remaining -gt 0 ]]; do
  set +e
  wait -n
  rc=$?
  set -e
  remaining=$((remaining - 1))
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    if [[ $rc -eq 143 ]]; then
      # Preempted (SIGTERM): the others stop at the same batch after a joint checkpoint;
      # give them time to finish it before forcing them.
      echo "local_multiprocess.sh: a process was preempted (status 143); waiting for the" \
           "others to checkpoint" >&2
      ( sleep "${GRACE_S:-60}"; kill -9 "${pids[@]}" ) >/dev/null 2>&1 &
    else
      echo "local_multiprocess.sh: a process exited with status $rc; stopping the others" \
           "(logs in $log_dir)" >&2
      kill "${pids[@]}" 2>/dev/null || true
      # A process blocked in a collective with its dead peer ignores SIGTERM's flag: force it.
      ( sleep "${GRACE_S:-10}"; kill -9 "${pids[@]}" ) >/dev/null 2>&1 &
    fi
    killer=$!
  fi
done
[[ -n "${killer:-}" ]] && { kill "$killer" 2>/dev/null || true; }
exit $status
