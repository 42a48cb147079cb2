#!/usr/bin/env bash
# Starts training on every worker of a TPU VM slice; with --distributed, JAX reads the
# coordinator, process count and index from the slice's metadata.
# Usage: launch/tpu_vm.sh TPU_NAME ZONE --config=configs/moe.py [overrides...]
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE --config=CONFIG [overrides...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 2
# Each argument quoted for the remote shell, so values with spaces or quotes arrive whole.
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd novarl_jax && pip install -e '.[tpu]' && python -m novarl_jax.train --distributed${args}"
