"""GAE speed: novarl_jax's masked `gae` against rlax, a NumPy loop and the memory floor.

Usage:
    python benchmarks/gae.py                      # B=256, T=1024, float32
    python benchmarks/gae.py --quick              # small sizes, a smoke run

What is compared, all measured in this one run, on the same random right-padded batch
(rewards and values ~ N(0, 1), response lengths uniform in [1, T], gamma=0.99, lam=0.95):

* ``gae``: :func:`novarl_jax.core.utils.advantages.gae` under ``jax.jit``; reads rewards,
  values and the mask, writes advantages and returns. Right-padded masks take its blocked
  matmul path; ``gae_holes`` times the same call on a mask with holes (its scan path).
* ``rlax``: ``rlax.truncated_generalized_advantage_estimation`` vmapped over the batch and
  jitted, given the same rewards and values (with a 0 bootstrap value appended). It has no
  mask and writes only the advantages, so it does less work than ``gae``.
* ``numpy``: the same masked recursion as a Python loop over time with NumPy vector operations
  over the batch (float32).
* Memory-traffic floor: ``gae`` must read 3 and write 2 arrays of ``B x T`` float32. The floor
  is those bytes divided by a bandwidth measured here: ``floor_dram`` uses a jitted in-place
  update of a 256 MiB array (DRAM streaming, read + write); ``floor_stream`` times a fused
  elementwise kernel that reads and writes exactly the bytes ``gae`` does (the speed of the
  cache level a [256, 1024] working set lives in). The target is judged against the lower of
  the two floors in each run (usually the DRAM one; the two came within 10% of each other
  on some hosts).

``--breakdown`` also times, in the same interleaved rounds, the pieces of ``gae`` on the
right-padded batch: ``check`` (the pass over the mask that picks the path), ``matmul_path``
(the contiguous-mask path and the returns, without the check and the cond) and ``scan_path``
(the reverse scan and the returns alone, i.e. a single path that would serve every mask with
no check). These call private helpers of the advantages module and are diagnostics only.

Every function is timed in interleaved rounds (``--rounds`` x ``--iters`` calls); the script
prints the median and best per-call time in ms (wall clock) and the process CPU time per call,
which other load on a shared machine inflates less.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from host import cpu_model  # noqa: E402

from novarl_jax.core.utils import advantages  # noqa: E402
from novarl_jax.core.utils.advantages import gae  # noqa: E402

try:
    import rlax
except Exception as err:  # a benchmark-only dependency (pip install .[bench]); or one that
    rlax, RLAX_SKIPPED = None, f"{type(err).__name__}: {err}"  # does not import on this JAX

GAMMA, LAM = 0.99, 0.95


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="B, responses")
    parser.add_argument("--tokens", type=int, default=1024, help="T, tokens per response")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the bandwidth probe")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the mask check and each path alone"
    )
    args = parser.parse_args()
    if args.quick:
        args.batch, args.tokens, args.iters, args.rounds, args.copy_mib = 32, 128, 5, 3, 16
    return args


def numpy_gae(rewards, values, mask, gamma, lam):
    """The masked recursion of `gae` as a loop over time, vectorised over the batch."""
    valid = mask != 0
    advantages = np.zeros_like(rewards)
    next_value = np.zeros(rewards.shape[0], rewards.dtype)
    next_adv = np.zeros(rewards.shape[0], rewards.dtype)
    for t in range(rewards.shape[1] - 1, -1, -1):
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        next_value = np.where(valid[:, t], values[:, t], next_value)
        next_adv = np.where(valid[:, t], adv, next_adv)
        advantages[:, t] = np.where(valid[:, t], adv, 0.0)
    returns = np.where(valid, advantages + values, 0.0)
    return advantages, returns


def numpy_gae_f64_rows(rewards, values, mask, gamma, lam, rows):
    """A float64 double loop over a few rows, to check the others' values."""
    out = np.zeros((len(rows), rewards.shape[1]))
    for i, b in enumerate(rows):
        next_value = next_adv = 0.0
        for t in range(rewards.shape[1] - 1, -1, -1):
            if mask[b, t]:
                delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
                next_adv = delta + gamma * lam * next_adv
                next_value = float(values[b, t])
                out[i, t] = next_adv
    return out


def _breakdown(r, v, m, rows, want):
    """Jitted pieces of `gae` for --breakdown, each checked against the float64 rows."""
    gamma_lam = GAMMA * LAM

    def with_returns(path):
        def fn(r, v, m):
            valid = m != 0
            adv = path(r, v, valid, GAMMA, gamma_lam)
            return adv, jnp.where(valid, adv + v, 0.0)

        return jax.jit(fn)

    pieces = {
        "check": jax.jit(advantages._valid_runs_are_contiguous),
        "matmul_path": with_returns(advantages._gae_contiguous),
        "scan_path": with_returns(advantages._gae_scan),
    }
    assert bool(pieces["check"](m))
    for name in ("matmul_path", "scan_path"):
        got = np.asarray(pieces[name](r, v, m)[0])[rows]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    return {
        "check": lambda: pieces["check"](m),
        "matmul_path": lambda: pieces["matmul_path"](r, v, m),
        "scan_path": lambda: pieces["scan_path"](r, v, m),
    }


def time_interleaved(fns, iters, rounds):
    """Per-call wall and CPU seconds of each function, over interleaved rounds."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    for _ in range(rounds):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                out = fn()
            jax.block_until_ready(out)
            wall[name].append((time.perf_counter() - w0) / iters)
            cpu[name].append((time.process_time() - c0) / iters)
    return wall, cpu


def main() -> None:
    args = _parse()
    batch, tokens = args.batch, args.tokens
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(batch, tokens)).astype(np.float32)
    values = rng.normal(size=(batch, tokens)).astype(np.float32)
    lengths = rng.integers(1, tokens + 1, size=batch)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.float32)
    holes = (mask * (rng.random(mask.shape) > 0.05)).astype(np.float32)
    r, v, m, mh = (jnp.asarray(x) for x in (rewards, values, mask, holes))

    ours = jax.jit(lambda r, v, m: gae(r, v, m, gamma=GAMMA, lam=LAM))

    def rlax_gae(r, v):
        bootstrapped = jnp.concatenate([v, jnp.zeros((v.shape[0], 1), v.dtype)], axis=1)
        discounts = jnp.full(r.shape, GAMMA, r.dtype)
        fn = jax.vmap(rlax.truncated_generalized_advantage_estimation, (0, 0, None, 0))
        return fn(r, discounts, LAM, bootstrapped)

    def stream(r, v, m):  # the same bytes as gae: 3 arrays in, 2 out
        return r + v * m, r - v

    # Correctness before timing.
    rows = [0, 1, 2, batch - 1]
    want = numpy_gae_f64_rows(rewards, values, mask, GAMMA, LAM, rows)
    got_adv, got_ret = ours(r, v, m)
    np.testing.assert_allclose(np.asarray(got_adv)[rows], want, rtol=1e-4, atol=1e-4)
    np_adv, _ = numpy_gae(rewards, values, mask, GAMMA, LAM)
    np.testing.assert_allclose(np_adv, got_adv, rtol=1e-4, atol=1e-4)
    want_h = numpy_gae_f64_rows(rewards, values, holes, GAMMA, LAM, rows)
    np.testing.assert_allclose(np.asarray(ours(r, v, mh)[0])[rows], want_h, rtol=1e-4, atol=1e-4)
    fns = {
        "gae": lambda: ours(r, v, m),
        "gae_holes": lambda: ours(r, v, mh),
        "stream": (lambda f: lambda: f(r, v, m))(jax.jit(stream)),
    }
    if rlax is not None:
        rlax_jit = jax.jit(rlax_gae)
        full = jnp.ones_like(m)
        np.testing.assert_allclose(rlax_jit(r, v), ours(r, v, full)[0], rtol=1e-4, atol=1e-4)
        fns["rlax"] = lambda: rlax_jit(r, v)
    else:
        print(f"# rlax reference skipped ({RLAX_SKIPPED}); pip install .[bench]")
    if args.breakdown:
        fns.update(_breakdown(r, v, m, rows, want))

    # DRAM bandwidth: an in-place (donated) update of a large array reads and writes it once.
    probe = jnp.zeros((args.copy_mib * 2**20 // 4,), jnp.float32)
    bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    probe = bump(probe)
    probe.block_until_ready()
    copy_times = []
    for _ in range(max(args.rounds // 2, 3)):
        t0 = time.perf_counter()
        for _ in range(3):
            probe = bump(probe)
        probe.block_until_ready()
        copy_times.append((time.perf_counter() - t0) / 3)
    copy_bw = 2 * probe.nbytes / min(copy_times)

    wall, cpu = time_interleaved(fns, args.iters, args.rounds)
    np_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        numpy_gae(rewards, values, mask, GAMMA, LAM)
        np_times.append(time.perf_counter() - t0)

    def ms(xs, how=np.median):
        return 1e3 * float(how(xs))

    def best(name):
        return ms(wall[name], np.min)

    floor_dram = 1e3 * 5 * batch * tokens * 4 / copy_bw  # ms
    print(f"# {cpu_model()}, jax {jax.__version__}, {jax.devices()[0].platform}, B={batch}, "
          f"T={tokens}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"# per call, {args.rounds} rounds x {args.iters} calls: median (best) wall ms, "
          f"median CPU ms")  # fmt: skip
    for name in fns:
        print(f"#   {name:10s} {ms(wall[name]):8.3f} ({best(name):.3f})  cpu {ms(cpu[name]):.3f}")
    print(f"RESULT gae_ms {ms(wall['gae']):.3f} ms")
    print(f"RESULT gae_best_ms {best('gae'):.3f} ms")
    print(f"RESULT gae_cpu_ms {ms(cpu['gae']):.3f} ms")
    print(f"RESULT gae_holes_ms {ms(wall['gae_holes']):.3f} ms")
    if "rlax" in fns:
        print(f"RESULT rlax_gae_ms {ms(wall['rlax']):.3f} ms")
        print(f"RESULT rlax_gae_best_ms {best('rlax'):.3f} ms")
        print(f"RESULT rlax_gae_cpu_ms {ms(cpu['rlax']):.3f} ms")
        print(f"RESULT gae_speed_vs_rlax {ms(wall['rlax']) / ms(wall['gae']):.2f} x")
        print(f"RESULT gae_speed_vs_rlax_best {best('rlax') / best('gae'):.2f} x")
        print(f"RESULT gae_speed_vs_rlax_cpu {ms(cpu['rlax']) / ms(cpu['gae']):.2f} x")
    print(f"RESULT numpy_gae_ms {ms(np_times):.3f} ms")
    print(f"RESULT gae_speed_vs_numpy {ms(np_times) / ms(wall['gae']):.1f} x")
    print(f"RESULT copy_bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(f"RESULT gae_floor_dram_ms {floor_dram:.3f} ms")
    print(f"RESULT gae_over_floor_dram {best('gae') / floor_dram:.2f} x")
    print(f"RESULT gae_floor_stream_ms {best('stream'):.3f} ms")
    print(f"RESULT gae_over_floor_stream {best('gae') / best('stream'):.2f} x")
    for name in ("check", "matmul_path", "scan_path"):
        if name in fns:
            print(f"RESULT gae_breakdown_{name}_ms {ms(wall[name]):.3f} ms")
            print(f"RESULT gae_breakdown_{name}_best_ms {best(name):.3f} ms")


if __name__ == "__main__":
    main()
