#!/usr/bin/env bash
# Runs the four comparison benchmarks one after another, each in its own process with a time
# limit, and keeps each one's full output as OUTDIR/<name>.log; the RESULT lines of all four
# are collected in OUTDIR/results.txt. A benchmark that fails or runs out of time does not stop
# the others.
#
#   bash benchmarks/run_all.sh OUTDIR            # on the CPU (JAX and torch on the CPU)
#   bash benchmarks/run_all.sh OUTDIR --gpu      # JAX and the PyTorch references on one GPU
#
# With --gpu, JAX runs on the first CUDA device with float32 matmuls in full float32
# (JAX_DEFAULT_MATMUL_PRECISION=highest; torch's TF32 is turned off to match) and without
# preallocating GPU memory, so torch can share the card in the same process.
set -u
out=${1:?usage: run_all.sh OUTDIR [--gpu]}
gpu=${2:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
torch_args=()
if [ "$gpu" = "--gpu" ]; then
  export JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  torch_args=(--torch-device cuda)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?"
  grep -E '^(RESULT|# )' "$out/$name.log" | grep -v '^# *$' | tail -n 60
  grep '^RESULT' "$out/$name.log" | sed "s/^/$name /" >>"$out/results.txt"
}
: >"$out/results.txt"
run moe_block "${MOE_LIMIT:-240}" python3 "$here/moe_block.py" ${torch_args[@]+"${torch_args[@]}"}
run generate "${GENERATE_LIMIT:-240}" python3 "$here/generate.py" ${torch_args[@]+"${torch_args[@]}"}
run gae "${GAE_LIMIT:-180}" python3 "$here/gae.py"
run grpo_step "${GRPO_LIMIT:-420}" python3 "$here/grpo_step.py" --steps "${GRPO_STEPS:-3}" --no-breakdown ${torch_args[@]+"${torch_args[@]}"}
