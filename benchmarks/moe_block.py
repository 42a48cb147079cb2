"""MoE block throughput: ``moe_forward`` vs Hugging Face transformers' ``MixtralSparseMoeBlock``.

Workload: 4096 tokens (8 x 512) of width 256 through 8 SwiGLU experts of hidden width 512,
top-2, float32, one device, after compilation / warm-up. Ours runs at capacity factor 1.0,
1.25 and dropless (the dropped fraction is printed beside each figure; transformers drops
nothing, so the dropless figure is the like-for-like one). Forward is ``y`` only (no
gradients: jitted forward; transformers under ``torch.no_grad``); forward+backward is
``grad(sum(y * c))`` with respect to the parameters and the input on both sides.

In the same run:
- the machine's float32 matmul rate (``jnp.dot`` on 2048 x 2048 x 2048; torch's ``mm`` too);
- transformers' ``MixtralSparseMoeBlock`` (eager experts, ``--threads`` torch threads) on the
  same weights, converted with ``moe_params_to_fused``; the largest output difference is
  printed as a cross-check;
- how our forward+backward time grows with E = 8, 16, 32, 64 experts at top-2 (same tokens:
  the active FLOPs are constant), dropless and at capacity factor 1.25.

Active-expert FLOPs: 6 * D * F per routed choice forward (gate and up 4DF, down 2DF), three
times that for forward+backward; the router and dispatch are not counted. Every case runs
once per round, rounds interleave the cases (the machine is shared), and each figure is the
best round (the median is printed too).

``--decode`` measures the block at decoding size instead: T = 32 tokens (a batch of 32
sequences, one new token each), the same D, F, E and top-2, float32, dropless and at capacity
factors 1.25 and 4 (C = T = 32). Each figure is the time per call of a jitted ``fori_loop``
of 64 calls on 64 different inputs (so no call can be hoisted). References in the same run:
the floor, one gate/up + down matmul pair over the 64 useful rows (one expert's weights), and
8 experts of exactly 8 rows each as one batched matmul pair (perfectly balanced routing, no
dispatch). On one device the block runs these small groups on the grouped rows, like large
ones (the slabs sized to the busiest expert are used under expert parallelism only).

The run first calls ``novarl_jax.core.distributed.reuse_host_memory`` (glibc keeps freed memory
for the next call instead of handing back pages the kernel must zero-fill again), as a training
process should; ``--keep-malloc`` measures with glibc's defaults. The transformers reference
runs in the same process, so it gets the same allocator either way.

Usage:
    python benchmarks/moe_block.py [--rounds 7] [--threads N] [--skip-reference]
        [--skip-scaling] [--keep-malloc]
    python benchmarks/moe_block.py --decode [--rounds 15] [--keep-malloc]

``--threads N`` runs the whole process on N cores (its CPU affinity, which bounds XLA:CPU's
threads: the XLA flags that used to set its thread count no longer do) and gives torch N
threads (``set_num_threads``); the default is every core.

Prints ``RESULT <name> <value> <unit>`` lines; the headline (our dropless forward+backward
tokens/s) comes last.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch_side
from host import cpu_model

BATCH, SEQ = 8, 512
TOKENS = BATCH * SEQ
HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 256, 512, 8, 2
FACTORS = {"cf1.0": 1.0, "cf1.25": 1.25, "dropless": None}
SCALING_EXPERTS = (8, 16, 32, 64)
MATMUL_N = 2048


def result(name: str, value: float, unit: str) -> None:
    print(f"RESULT {name} {value:.6g} {unit}", flush=True)


def active_flops(tokens: int, backward: bool) -> float:
    forward = tokens * TOP_K * 6 * HIDDEN * INTERMEDIATE
    return 3 * forward if backward else forward


class Timer:
    """Collects one wall-clock sample per case per round."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.cases: dict[str, callable] = {}

    def add(self, name: str, fn) -> None:
        fn()  # warm-up (compiles)
        fn()
        self.cases[name] = fn
        self.samples[name] = []

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for name, fn in self.cases.items():
                start = time.perf_counter()
                fn()
                self.samples[name].append(time.perf_counter() - start)

    def best(self, name: str) -> float:
        return min(self.samples[name])

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def build_ours(timer: Timer, num_experts: int, factors: dict, prefix: str, forward: bool):
    import jax
    import jax.numpy as jnp

    from novarl_jax.core.distributed import MoERouterConfig
    from novarl_jax.models.moe import init_moe_params, moe_forward

    params = init_moe_params(jax.random.key(0), HIDDEN, INTERMEDIATE, num_experts)
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, HIDDEN), jnp.float32)
    c = jax.random.normal(jax.random.key(2), (BATCH, SEQ, HIDDEN), jnp.float32)
    dropped = {}
    for tag, factor in factors.items():
        router = MoERouterConfig(num_experts=num_experts, top_k=TOP_K, capacity_factor=factor)

        def loss(p, x, router=router):
            y, _ = moe_forward(p, x, router)
            return jnp.sum(y * c)

        fwd = jax.jit(lambda p, x, router=router: moe_forward(p, x, router))
        fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        dropped[tag] = float(fwd(params, x)[1]["dropped_fraction"])
        if forward:
            timer.add(f"{prefix}fwd_{tag}", lambda f=fwd: jax.block_until_ready(f(params, x)[0]))
        timer.add(f"{prefix}fwd_bwd_{tag}", lambda f=fwd_bwd: jax.block_until_ready(f(params, x)))
    return params, x, c, dropped


def build_reference(timer: Timer, params, x, c, threads: int, device: str = "cpu") -> float | None:
    """transformers' block on our weights; returns max |y_ours - y_hf| (None if unavailable)."""
    try:
        import torch
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as err:  # bench-only dependencies
        print(f"# transformers reference skipped: {err}")
        return None
    import numpy as np

    from novarl_jax.core.distributed import MoERouterConfig
    from novarl_jax.models.moe import moe_forward, moe_params_to_fused

    torch.set_num_threads(threads)
    torch_side.prepare(device)
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config).float()
    router, gate_up, down = (np.asarray(w) for w in moe_params_to_fused(params))
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(router))
        block.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        block.experts.down_proj.copy_(torch.from_numpy(down))
    block.to(device)
    xt = torch.from_numpy(np.asarray(x)).clone().to(device)
    ct = torch.from_numpy(np.asarray(c)).clone().to(device)
    xg = xt.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            block(xt)
        torch_side.sync(device)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        xg.grad = None
        (block(xg) * ct).sum().backward()
        torch_side.sync(device)

    def matmul():
        torch.mm(a, a)
        torch_side.sync(device)

    block.train()
    timer.add("hf_fwd", forward)
    timer.add("hf_fwd_bwd", forward_backward)
    a = torch.randn(MATMUL_N, MATMUL_N, device=device)
    timer.add("torch_mm", matmul)
    with torch.no_grad():
        y_hf = block(xt).cpu().numpy()
    dropless = MoERouterConfig(num_experts=EXPERTS, top_k=TOP_K, capacity_factor=None)
    y_ours = np.asarray(moe_forward(params, x, dropless)[0])
    return float(np.abs(y_ours - y_hf).max())


DECODE_TOKENS, DECODE_CALLS = 32, 64
# Capacity factor 4 gives C = T = 32: the slabs every expert-parallel mesh used to run.
DECODE_FACTORS = {"dropless": None, "cf1.25": 1.25, "cf4.0": 4.0}


def run_decode(rounds: int) -> None:
    """Per-call time of the block at decoding size (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from novarl_jax.core.distributed import MoERouterConfig
    from novarl_jax.models import moe

    t, n, d, f, e = DECODE_TOKENS, DECODE_CALLS, HIDDEN, INTERMEDIATE, EXPERTS
    print(f"# decode: T={t} tokens per call, D={d}, F={f}, E={e}, top-{TOP_K}, float32; "
          f"{n} calls per jitted fori_loop")  # fmt: skip
    params = moe.init_moe_params(jax.random.key(0), d, f, e)
    xs = jax.random.normal(jax.random.key(1), (n, t, 1, d), jnp.float32)
    timer = Timer()

    def calls(fn, inputs, shape):
        @jax.jit
        def run(params, inputs):
            def body(i, acc):
                return acc + fn(params, inputs[i])

            return lax.fori_loop(0, n, body, jnp.zeros(shape, jnp.float32))

        return lambda: jax.block_until_ready(run(params, inputs))

    dropped = {}
    for tag, factor in DECODE_FACTORS.items():
        router = MoERouterConfig(num_experts=e, top_k=TOP_K, capacity_factor=factor)
        aux = [moe.moe_forward(params, xs[i], router)[1] for i in range(n)]
        dropped[tag] = float(sum(a["dropped_fraction"] for a in aux) / n)
        block = functools.partial(moe.moe_forward, router=router)
        timer.add(f"decode_{tag}", calls(lambda p, x, b=block: b(p, x)[0], xs, (t, 1, d)))

    rows = t * TOP_K
    x_rows = jax.random.normal(jax.random.key(2), (n, rows, d), jnp.float32)

    def pair(p, x):
        h = x @ p["w_gate_up"][0].reshape(d, 2 * f)
        return (jax.nn.silu(h[:, :f]) * h[:, f:]) @ p["w_down"][0]

    timer.add("floor_pair", calls(pair, x_rows, (rows, d)))
    x_slabs = x_rows.reshape(n, e, rows // e, d)

    def balanced(p, x):
        h = jnp.einsum("ecd,edg->ecg", x, p["w_gate_up"].reshape(e, d, 2 * f))
        return jnp.einsum("ecf,efd->ecd", jax.nn.silu(h[..., :f]) * h[..., f:], p["w_down"])

    timer.add("balanced_experts", calls(balanced, x_slabs, (e, rows // e, d)))
    timer.run(rounds)

    def per_call(name: str) -> float:
        return timer.best(name) / n * 1e3

    def show(name: str, tag: str) -> None:
        print(f"# {name}: best {per_call(name):.3f} ms/call, median "
              f"{timer.median(name) / n * 1e3:.3f} over {rounds} rounds ({tag})")  # fmt: skip

    show("floor_pair", f"one expert's matmul pair over the {rows} useful rows")
    show("balanced_experts", f"{e} experts x {rows // e} rows, one batched matmul pair")
    result("decode_floor_pair_ms", per_call("floor_pair"), "ms/call")
    result("decode_balanced_experts_ms", per_call("balanced_experts"), "ms/call")
    for tag in DECODE_FACTORS:
        show(f"decode_{tag}", f"dropped {dropped[tag]:.4f}")
        result(f"decode_{tag}_ms", per_call(f"decode_{tag}"), "ms/call")
        result(f"decode_{tag}_vs_floor_pair", per_call(f"decode_{tag}") / per_call("floor_pair"),
               "x")  # fmt: skip
    result("decode_dropless_ms", per_call("decode_dropless"), "ms/call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--decode", action="store_true", help="the block at decoding size")
    torch_side.add_argument(parser)
    parser.add_argument(
        "--keep-malloc", action="store_true", help="glibc's malloc defaults (no reuse_host_memory)"
    )
    args = parser.parse_args()
    torch_side.use_cores(args.threads)  # before jax starts its threads
    # Before JAX's first computation (its threads pick their heaps then); importing is fine.
    from novarl_jax.core.distributed import reuse_host_memory

    reused = False if args.keep_malloc else reuse_host_memory()

    import jax
    import jax.numpy as jnp

    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores "
          f"({cpu_model()}), {args.threads} threads per side")  # fmt: skip
    memory = "reused across calls (reuse_host_memory)" if reused else "glibc malloc defaults"
    print(f"# host memory: {memory}")
    if args.decode:
        run_decode(args.rounds)
        return
    print(f"# {TOKENS} tokens, D={HIDDEN}, F={INTERMEDIATE}, E={EXPERTS}, top-{TOP_K}, float32")
    timer = Timer()
    a = jax.random.normal(jax.random.key(3), (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    timer.add("jnp_dot", lambda: jax.block_until_ready(dot(a, a)))
    params, x, c, dropped = build_ours(timer, EXPERTS, FACTORS, "moe_", forward=True)
    max_diff = None
    if not args.skip_reference:
        max_diff = build_reference(timer, params, x, c, args.threads, args.torch_device)
    scaling_dropped = {}
    if not args.skip_scaling:
        for e in SCALING_EXPERTS:
            factors = {"dropless": None, "cf1.25": 1.25}
            *_, drop = build_ours(timer, e, factors, f"scale_E{e}_", forward=False)
            scaling_dropped[e] = drop
    timer.run(args.rounds)

    def tok_s(name: str) -> float:
        return TOKENS / timer.best(name)

    def show(name: str, tag: str) -> None:
        print(f"# {name}: best {timer.best(name) * 1e3:.1f} ms, median "
              f"{timer.median(name) * 1e3:.1f} ms over {args.rounds} rounds ({tag})")  # fmt: skip

    flops_mm = 2 * MATMUL_N**3
    rate = flops_mm / timer.best("jnp_dot") / 1e9
    result("matmul_f32_jnp_dot_2048", rate, "GFLOP/s")
    if "torch_mm" in timer.samples:
        result("matmul_f32_torch_mm_2048", flops_mm / timer.best("torch_mm") / 1e9, "GFLOP/s")

    for tag in FACTORS:
        for kind, backward in (("fwd", False), ("fwd_bwd", True)):
            name = f"moe_{kind}_{tag}"
            show(name, f"dropped {dropped[tag]:.4f}")
            result(f"dropped_fraction_{tag}", dropped[tag], "fraction")
            result(name, tok_s(name), "tok/s")
            useful = active_flops(TOKENS, backward) * (1 - dropped[tag])
            gflops = useful / timer.best(name) / 1e9
            result(f"{name}_useful_gflops", gflops, "GFLOP/s")
            result(f"{name}_fraction_of_matmul", gflops / rate, "ratio")

    if max_diff is not None:
        for kind in ("fwd", "fwd_bwd"):
            show(f"hf_{kind}", "transformers MixtralSparseMoeBlock, dropless")
            result(f"hf_mixtral_block_{kind}", tok_s(f"hf_{kind}"), "tok/s")
        result("hf_vs_ours_dropless_max_abs_diff", max_diff, "abs")
        for tag in FACTORS:
            for kind in ("fwd", "fwd_bwd"):
                ratio = tok_s(f"moe_{kind}_{tag}") / tok_s(f"hf_{kind}")
                result(f"ratio_{kind}_{tag}_vs_hf", ratio, "x")

    if scaling_dropped:
        for tag in ("dropless", "cf1.25"):
            base = timer.best(f"scale_E{SCALING_EXPERTS[0]}_fwd_bwd_{tag}")
            for e in SCALING_EXPERTS:
                name = f"scale_E{e}_fwd_bwd_{tag}"
                show(name, f"dropped {scaling_dropped[e][tag]:.4f}")
                result(f"moe_fwd_bwd_{tag}_E{e}", tok_s(name), "tok/s")
                result(f"time_ratio_{tag}_E{e}_vs_E8", timer.best(name) / base, "x")

    result("moe_fwd_bwd_dropless", tok_s("moe_fwd_bwd_dropless"), "tok/s")


if __name__ == "__main__":
    main()
