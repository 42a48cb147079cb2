#!/usr/bin/env bash
# Runs N processes on this machine, each with DEVICES fake CPU devices, as one JAX job.
# Usage: launch/local_processes.sh N DEVICES --config=configs/moe.py [overrides...]
# experiment.world_size must be N x DEVICES (a smaller DEVICES is raised to world_size / N).
# PYTHON (default: python) is the interpreter; PORT (default: 12355) the coordinator's port.
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N DEVICES --config=CONFIG [overrides...]  (N processes, DEVICES CPU devices each)" >&2
  exit 2
fi
n="$1"; devices="$2"; shift 2
port="${PORT:-12355}"
pids=()
# Ctrl-C or SIGTERM here reaches every process as SIGTERM (background processes of a script
# ignore SIGINT): they finish the step in progress, checkpoint it and exit with status 143.
trapped=0
stop() { ((${#pids[@]} == 0)) || kill -TERM "${pids[@]}" 2>/dev/null || true; }
on_signal() { trapped=1; stop; }
trap on_signal INT TERM
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} --xla_cpu_enable_concurrency_optimized_scheduler=false" \
    JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" -m novarl_jax.train "$@" \
      --coordinator_address="127.0.0.1:${port}" --num_processes="$n" --process_id="$i" \
      --cpu_collectives=gloo &
  pids+=("$!")
done
status=0
# A process that fails stops the others (they would wait for it in a collective).
while [[ -n "$(jobs -rp)" ]]; do
  trapped=0
  code=0
  wait -n || code=$?
  ((trapped == 0)) || continue # the signal interrupted wait; no process has ended
  if ((code != 0)); then
    ((status != 0)) || status=$code
    stop
  fi
done
for pid in "${pids[@]}"; do # statuses not collected above (127: collected already)
  code=0
  wait "$pid" 2>/dev/null || code=$?
  if ((code != 0 && code != 127 && status == 0)); then status=$code; fi
done
exit "$status"
