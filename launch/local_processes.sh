#!/usr/bin/env bash
# Runs N processes on this machine, each with DEVICES fake CPU devices, as one JAX job.
# Usage: launch/local_processes.sh N DEVICES --config=configs/moe.py [overrides...]
# experiment.world_size must be N x DEVICES (a smaller DEVICES is raised to world_size / N).
# PYTHON (default: python) is the interpreter; PORT (default: 12355) the coordinator's port.
# The caller's XLA_FLAGS are kept, except a device count.
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N DEVICES --config=CONFIG [overrides...]  (N processes, DEVICES CPU devices each)" >&2
  exit 2
fi
n="$1"; devices="$2"; shift 2
# The caller's XLA_FLAGS, less any device count: each process gets DEVICES.
caller_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
port="${PORT:-12355}"
pids=()
# Ctrl-C or SIGTERM here reaches every process as SIGTERM (background processes of a script
# ignore SIGINT): they finish the step in progress, checkpoint it and exit with status 143.
signal_all() { # SIGNAL: to every process still running (none before the first starts)
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do [[ -z "$pid" ]] || kill "-$1" "$pid" 2>/dev/null || true; done
}
stop() { signal_all TERM; }
trap stop INT TERM
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="${caller_flags:+$caller_flags }--xla_force_host_platform_device_count=${devices} --xla_cpu_enable_concurrency_optimized_scheduler=false" \
    JAX_PLATFORMS=cpu \
    "${PYTHON:-python}" -m novarl_jax.train "$@" \
      --coordinator_address="127.0.0.1:${port}" --num_processes="$n" --process_id="$i" \
      --cpu_collectives=gloo &
  pids+=("$!")
done
# Poll (no `wait -n`: bash 3.2 lacks it). A process that fails (a status other than 0 and
# 143, a clean stop) makes the others stop; any still running 30 s later are killed, since a
# process blocked in a collective with the failed one cannot act on SIGTERM.
status=0
failed_at=""
while :; do
  running=" $(jobs -rp | tr '\n' ' ') "
  left=0
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -n "$pid" ]] || continue
    if [[ "$running" == *" $pid "* ]]; then left=1; continue; fi
    code=0
    wait "$pid" 2>/dev/null || code=$?
    pids[$i]=""
    ((code != 0 && status == 0)) && status=$code
    if ((code != 0 && code != 143)) && [[ -z "$failed_at" ]]; then
      failed_at=$SECONDS
      stop
    fi
  done
  ((left)) || break
  if [[ -n "$failed_at" ]] && ((SECONDS - failed_at >= 30)); then signal_all KILL; fi
  sleep 0.2
done
exit "$status"
