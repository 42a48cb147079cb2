"""Pipeline bubble: measured idle fraction of `pipeline_apply` against GPipe theory.

Usage:
    python benchmarks/pipeline.py                 # pp=4, M = 1, 2, 4, 8, V = 1 and 2
    python benchmarks/pipeline.py --quick         # small sizes, a smoke run

How the bubble is measured. The schedule is SPMD: on every tick every stage runs its layers,
and on idle ticks the result is masked out. So the wall time of a pipelined step is
``ticks x (time of one tick)``, and the bubble shows up as ticks that do no useful work. Two
measurements, both on ``pp`` fake CPU devices:

1. Schedule count: the fraction of idle (stage, tick) slots in ``schedule_table`` (exact).
2. Timing: ``T_pipe``, the jitted pipelined step (forward, and forward+backward), against
   ``T_ideal``, the same devices running the same stage layers over the same M microbatches
   of the same size with no pipeline at all (each stage loops over all M microbatches
   locally; no ppermute, no idle ticks, no output hand-off). ``T_ideal`` is the useful work,
   so ``measured bubble = 1 - T_ideal / T_pipe``; it includes every overhead of the schedule
   (ppermute, buffers, the final psum), not only the idle ticks.

The fake devices share the machine's cores, so one tick costs the *sum* of the stages' work
divided by the cores, not one stage's work as on real accelerators; but both the pipelined
and the ideal runs pay that in the same way, so the ratio is the fraction of time that goes
to idle ticks and overheads, which is what the bubble is on real hardware too. The
microbatch size is held fixed (``--rows``) so that every M has the same cost per tick, and
per-stage compute (``--width``-wide matmuls) dominates the per-tick overhead.
"""

from __future__ import annotations

import argparse
import os
import time

PP_DEFAULT = 4


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, default=PP_DEFAULT, help="pipeline stages")
    parser.add_argument("--layers", type=int, default=8, help="L, layers in the stack")
    parser.add_argument("--width", type=int, default=512, help="D, layer width")
    parser.add_argument("--rows", type=int, default=256, help="rows per microbatch")
    parser.add_argument("--microbatches", type=str, default="1,2,4,8", help="M values")
    parser.add_argument("--repeats", type=str, default="1,2", help="V values (1 = GPipe)")
    parser.add_argument("--iters", type=int, default=9, help="timed calls per measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 iterations")
    return parser.parse_args()


ARGS = _parse()
if ARGS.quick:
    ARGS.width, ARGS.rows, ARGS.iters = 128, 32, 3
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.pp}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from novarl_jax.core.distributed import PP, ParallelLayout  # noqa: E402
from novarl_jax.models.pipeline import (  # noqa: E402
    bubble_fraction,
    num_ticks,
    pipeline_apply,
    schedule_table,
    to_stages,
)


def result(name: str, value: float, unit: str) -> None:
    print(f"RESULT {name} {value:.6g} {unit}", flush=True)


def stage_fn(params, h):
    """The layers of one stage (or chunk): h <- tanh(h @ W + b), scanned."""

    def body(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b), None

    return jax.lax.scan(body, h, params)[0]


def make_pipelined(mesh, m, v, train):
    def forward(stages, x):
        return pipeline_apply(stage_fn, stages, x, mesh=mesh, num_microbatches=m, num_repeats=v)

    if not train:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda s, x: jnp.sum(forward(s, x) ** 2), argnums=(0, 1)))


def make_ideal(mesh, m, train):
    """Every stage applies its own layers to all M microbatches, locally: the useful work."""

    def local(stages, x_mb):
        params = jax.tree.map(lambda a: a[0], stages)
        ys = jax.lax.map(lambda h: stage_fn(params, h), x_mb)  # [M, rows, D]
        return ys[None]

    def forward(stages, x):
        x_mb = x.reshape(m, x.shape[0] // m, x.shape[1])
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(PP), P()),
            out_specs=P(PP),
            axis_names=frozenset({PP}),
            check_vma=False,
        )(stages, x_mb)

    if not train:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda s, x: jnp.sum(forward(s, x) ** 2), argnums=(0, 1)))


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    pp = ARGS.pp
    mesh = ParallelLayout(pp=pp).make_mesh(jax.devices()[:pp])
    key_w, key_b, key_x = jax.random.split(jax.random.PRNGKey(0), 3)
    d = ARGS.width
    w = jax.random.normal(key_w, (ARGS.layers, d, d), jnp.float32) / np.sqrt(d)
    b = 0.01 * jax.random.normal(key_b, (ARGS.layers, d), jnp.float32)
    ms = [int(s) for s in ARGS.microbatches.split(",")]
    vs = [int(s) for s in ARGS.repeats.split(",")]
    print(
        f"# pp={pp} L={ARGS.layers} D={d} rows/microbatch={ARGS.rows} iters={ARGS.iters} "
        f"devices={jax.device_count()} ({jax.devices()[0].platform}) jax {jax.__version__}"
    )
    for v in vs:
        stages = jax.device_put(to_stages((w, b), pp, num_repeats=v), NamedSharding(mesh, P(PP)))
        ideal_stages = jax.device_put(to_stages((w, b), pp), NamedSharding(mesh, P(PP)))
        for m in ms:
            x = jax.random.normal(key_x, (m * ARGS.rows, d), jnp.float32)
            theory = bubble_fraction(pp, m, v)
            table = schedule_table(pp, m, v)
            counted = float(np.mean(table[..., 0] < 0))
            tag = f"pp{pp}_v{v}_m{m}"
            result(f"pipeline_bubble_theory_{tag}", theory, "fraction")
            result(f"pipeline_bubble_schedule_{tag}", counted, "fraction")
            for train in (False, True):
                mode = "fwdbwd" if train else "fwd"
                pipe = make_pipelined(mesh, m, v, train)
                ideal = make_ideal(mesh, m, train)
                timed(pipe, stages, x)  # compile
                timed(ideal, ideal_stages, x)
                t_pipe, t_ideal = [], []
                for _ in range(ARGS.iters):  # interleaved, so load drifts hit both alike
                    t_pipe.append(timed(pipe, stages, x))
                    t_ideal.append(timed(ideal, ideal_stages, x))
                ticks = num_ticks(pp, m, v)
                for clock, k in (("wall", 0), ("cpu", 1)):
                    # Best of N: on a shared machine, other load only ever adds time.
                    tp, ti = min(t[k] for t in t_pipe), min(t[k] for t in t_ideal)
                    measured = 1.0 - ti / tp
                    name = f"{mode}_{clock}_{tag}"
                    result(f"pipeline_step_ms_{name}", 1e3 * tp, "ms")
                    result(f"pipeline_ideal_ms_{name}", 1e3 * ti, "ms")
                    result(f"pipeline_bubble_measured_{name}", measured, "fraction")
                    # Time per tick against the ideal time per useful tick (1/V of a stage).
                    result(f"pipeline_tick_ms_{name}", 1e3 * tp / ticks, "ms")
                    result(f"pipeline_ideal_tick_ms_{name}", 1e3 * ti / (v * m), "ms")
                    result(
                        f"pipeline_bubble_measured_over_theory_{name}",
                        measured / theory if theory else float("nan"),
                        "ratio",
                    )


if __name__ == "__main__":
    main()
