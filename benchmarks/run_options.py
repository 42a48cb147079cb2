"""What three run options cost or save on the CPU: the figures the README quotes.

- compilation cache: wall time of the MoE demo at ``experiment.steps=2`` (start-up, compiling
  and two steps, in a new process) with an empty cache, then again with the cache it filled;
- bfloat16 compute on XLA:CPU: the MoE demo's training throughput (the whole run's tokens
  per second, ``perf/total_num_tokens / timing_s/step``, median over the steps after the
  first) in float32 and in bfloat16;
- gradient checkpointing: XLA's temporary memory for the gradient of an 8-layer MoE toy
  (hidden 64, 16 x 64 tokens) with and without ``remat``, and how far the gradients differ.

Usage: python benchmarks/run_options.py [--steps 8] [--skip-cache] [--skip-dtype] [--skip-remat]
Prints ``RESULT <name> <value> <unit>`` lines.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = [sys.executable, "-m", "novarl_jax.train", "--config=configs/moe.py",
        "logging.progress=False", "logging.plot=False"]  # fmt: skip


def _demo(workdir: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([*DEMO, f"--workdir={workdir}", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def compilation_cache(tmp: str) -> None:
    cache = os.path.join(tmp, "xla_cache")
    cold = _demo(os.path.join(tmp, "cold"), "experiment.steps=2", f"--compilation_cache={cache}")
    warm = _demo(os.path.join(tmp, "warm"), "experiment.steps=2", f"--compilation_cache={cache}")
    print(f"RESULT cache_cold_start_s {cold:.1f} s")
    print(f"RESULT cache_warm_start_s {warm:.1f} s")


def _throughput(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # The whole run's tokens per second (perf/throughput is per device).
    return statistics.median(r["perf/total_num_tokens"] / r["timing_s/step"] for r in rows[1:])


def compute_dtype(tmp: str, steps: int) -> None:
    figures = {}
    for dtype in ("float32", "bfloat16"):
        workdir = os.path.join(tmp, dtype)
        _demo(workdir, f"experiment.steps={steps}", f"model.compute_dtype={dtype}",
              "--compilation_cache=")  # fmt: skip
        figures[dtype] = _throughput(workdir)
        print(f"RESULT demo_throughput_{dtype} {figures[dtype]:.0f} tokens/s")
    print(f"RESULT demo_bfloat16_over_float32 {figures['bfloat16'] / figures['float32']:.2f} x")


def remat_memory() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from novarl_jax.models import ModelConfig, forward, init_params

    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, value_head=True)  # fmt: skip
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (16, 64), 1, 64)

    def loss(p, c):
        logits, _, aux = forward(p, tokens, c)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return nll + 0.1 * jnp.mean(aux["values"] ** 2) + 0.01 * aux["moe_aux_loss"]

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    temp, grads = {}, {}
    for remat in (False, True):
        c = config.replace(remat=remat)
        temp[remat] = grad.lower(params, c).compile().memory_analysis().temp_size_in_bytes
        grads[remat] = grad(params, c)
    pairs = zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False]), strict=True)
    diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    print(f"RESULT remat_temp_plain {temp[False] / 2**20:.1f} MiB")
    print(f"RESULT remat_temp_checkpointed {temp[True] / 2**20:.1f} MiB")
    print(f"RESULT remat_grad_max_abs_diff {diff:.1e} abs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="demo steps per dtype run")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--skip-dtype", action="store_true")
    parser.add_argument("--skip-remat", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cache:
            compilation_cache(tmp)
        if not args.skip_dtype:
            compute_dtype(tmp, args.steps)
    if not args.skip_remat:
        remat_memory()


if __name__ == "__main__":
    main()
