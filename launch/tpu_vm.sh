#!/usr/bin/env bash
# Starts training on every worker of a TPU VM slice; with --distributed, JAX reads the
# coordinator, process count and index from the slice's metadata.
# Usage: launch/tpu_vm.sh TPU_NAME ZONE --config=configs/moe.py [overrides...]
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd novarl_jax && pip install -e '.[tpu]' && python -m novarl_jax.train --distributed $*"
