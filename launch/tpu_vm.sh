#!/usr/bin/env bash
# Starts training on every worker of a TPU VM slice; with --distributed, JAX reads the
# coordinator, process count and index from the slice's metadata.
# Usage: launch/tpu_vm.sh TPU_NAME ZONE --config=configs/moe.py --workdir=SHARED_DIR [overrides...]
# Every worker needs a clone of this repository at REPO_DIR (default: novarl_jax, relative
# to the worker's home directory, or an absolute path) and
# Python 3.11 or newer as PYTHON (default: python3). --workdir must be a directory every
# worker mounts (Filestore, NFS, a gcsfuse mount of a bucket): the workers write each
# checkpoint together.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE --config=CONFIG --workdir=SHARED_DIR [overrides...]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; shift 2
workdir_given=0
for arg in "$@"; do
  [[ "$arg" == --workdir=?* || "$arg" == --workdir || "$arg" == -workdir=?* || "$arg" == -workdir ]] && workdir_given=1
done
if ((!workdir_given)); then
  echo "$0: pass --workdir=DIR on a file system every worker mounts (each worker's own disk would not do)" >&2
  exit 2
fi
# Each value quoted for the remote shell, so values with spaces or quotes arrive whole.
# A leading ~/ is the remote home, where the remote shell starts: quoted, it would not expand.
repo_dir=${REPO_DIR:-novarl_jax}
[[ "$repo_dir" == "~" ]] && repo_dir=.
repo_dir=${repo_dir#\~/}
repo=$(printf '%q' "${repo_dir:-.}")
python=$(printf '%q' "${PYTHON:-python3}")
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd ${repo} && ${python} -m pip install -q -e '.[tpu]' && ${python} -m novarl_jax.train --distributed${args}"
