"""Generation throughput: the KV-cache sampler vs Hugging Face transformers ``generate``.

Workload: the bench-tiny Mixtral (vocab 512, hidden 256, intermediate 512, 4 layers, 8 heads,
4 KV heads, 8 experts, top-2, float32, random weights), batch 32, prompt 64 tokens, 128 new
tokens, no early stop (no stop tokens on our side, ``eos_token_id=None`` and
``min_new_tokens=128`` on the transformers side). Both sides decode greedily by default
(``--sample`` switches both to temperature-1 sampling). The figure is generated tokens per
second (32 * 128 / wall time of one whole generate call, prefill included), measured after
compilation / warm-up, in interleaved rounds (one call of each side per round, so both see
the same load): best and median wall time of ``--repeats`` calls, and the best
per-call CPU time of this process (the machine is shared: other work inflates wall time more
than CPU time).

Our MoE routing is dropless by default, like transformers' (``--eval-capacity-factor`` sets
a capacity factor for sampling; the dropped fraction is then printed).

The transformers reference runs in the same process when torch and transformers are
installed (the ``bench`` extra); otherwise only our figure is printed. ``--threads N`` (default:
the CPU cores) gives torch N threads and, below the core count, pins the whole process, ours
included, to N cores.

Usage:
    python benchmarks/generate.py [--repeats 5] [--threads 2] [--sample]
        [--eval-capacity-factor 2.0] [--skip-reference]

Prints ``RESULT <name> <value> <unit>`` lines, ours last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch_side
from bench_tiny import BENCH_TINY, MAX_POSITIONS
from host import cpu_model

BATCH, PROMPT, NEW = 32, 64, 128
CONFIG = dict(**BENCH_TINY, max_position_embeddings=MAX_POSITIONS)


def _time(fn, repeats: int) -> list[tuple[float, float]]:
    """(wall seconds, this process's CPU seconds) of each of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def make_ours(args, prompts):
    """Our sampler on the workload: returns (run, report) after compiling.

    ``run()`` is one timed call; ``report()`` prints where a call's time goes and returns the
    dropped fraction of the MoE routing.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from novarl_jax.models import ModelConfig, forward, init_params
    from novarl_jax.rollout.sampler import sample

    config = ModelConfig(**CONFIG, eval_capacity_factor=args.eval_capacity_factor)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(tokens)
    kw = dict(
        max_new_tokens=NEW,
        temperature=1.0 if args.sample else 0.0,
        stop_token_ids=(),
        pad_id=0,
    )

    def run():
        out = sample(params, config, tokens, mask, jax.random.key(1), **kw)
        jax.block_until_ready(out.response_tokens)
        return out

    start = time.perf_counter()
    out = run()
    print(f"# ours: first call (compile + run) {time.perf_counter() - start:.1f} s")
    assert int(np.asarray(out.lengths).min()) == NEW, "a row stopped early"

    def report() -> float:
        # Where a call's time goes: the prefill program vs the decode loop.
        from novarl_jax.rollout import sampler as S

        settings = S.make_settings(**kw)
        static, dyn = settings.static(), settings.dynamic(config.vocab_size)
        split = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cache, *first = S._prefill(params, tokens, mask, jax.random.key(1), dyn,
                                       config=config, static=static, mesh=None)  # fmt: skip
            jax.block_until_ready(cache)
            t1 = time.perf_counter()
            jax.block_until_ready(S._decode(params, cache, tuple(first), jax.random.key(1), dyn,
                                            config=config, static=static, mesh=None))  # fmt: skip
            split.append((t1 - t0, (time.perf_counter() - t1) / (NEW - 1)))
        prefill, step = min(s[0] for s in split), min(s[1] for s in split)
        print(f"# ours: prefill {prefill * 1e3:.0f} ms, decode {step * 1e3:.2f} ms/step (best)")
        if args.eval_capacity_factor is None:
            return 0.0
        full = jnp.concatenate([out.prompt_mask, out.response_mask], 1)
        _, _, aux = forward(params, out.tokens[:, :-1], config, attention_mask=full[:, :-1],
                            train=False)  # fmt: skip
        return float(aux["dropped_fraction"])

    return run, report


def make_transformers(args, prompts):
    """transformers ``generate`` on the same workload: returns run() after a warm-up, or None."""
    try:
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as err:
        print(f"# transformers reference skipped: {err}")
        return None
    torch.set_num_threads(args.threads)
    torch_side.prepare(args.torch_device)
    torch.manual_seed(0)
    config = MixtralConfig(
        **CONFIG,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = MixtralForCausalLM(config).eval().to(args.torch_device)
    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=args.torch_device)
    attention_mask = torch.ones_like(input_ids)
    gen = dict(
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=bool(args.sample),
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    if args.sample:
        gen.update(temperature=1.0, top_k=0, top_p=1.0)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen)
        torch_side.sync(args.torch_device)
        assert out.shape == (BATCH, PROMPT + NEW), out.shape
        return out

    run()  # warm-up
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample", action="store_true", help="temperature-1 sampling, not greedy")
    parser.add_argument("--eval-capacity-factor", type=float, default=None)
    parser.add_argument("--skip-reference", action="store_true")
    torch_side.add_argument(parser)
    args = parser.parse_args()
    torch_side.use_cores(args.threads)  # both sides, before jax starts its threads

    import numpy as np

    prompts = np.random.default_rng(0).integers(3, CONFIG["vocab_size"], size=(BATCH, PROMPT))
    tokens = BATCH * NEW
    mode = "sampling" if args.sample else "greedy"
    print(f"# batch {BATCH}, prompt {PROMPT}, new {NEW}, {mode}, threads {args.threads}")
    print(f"# {cpu_model()}, {os.cpu_count()} CPU cores")

    ref_run = None if args.skip_reference else make_transformers(args, prompts)
    ours_run, report = make_ours(args, prompts)
    # Interleaved rounds, so both sides see the same load from other work on the machine.
    ours, ref = [], None if ref_run is None else []
    for _ in range(args.repeats):
        ours += _time(ours_run, 1)
        if ref_run is not None:
            ref += _time(ref_run, 1)
    dropped = report()
    factor = "dropless" if args.eval_capacity_factor is None else args.eval_capacity_factor
    print(f"# ours: eval capacity factor {factor}, dropped fraction {dropped:.4f}")

    def rates(times):
        walls, cpus = [t[0] for t in times], [t[1] for t in times]
        wall_s, cpu_s = [round(w, 3) for w in walls], [round(c, 3) for c in cpus]
        print(f"#   wall s per call {wall_s}, CPU s per call {cpu_s}")
        return tokens / min(walls), tokens / statistics.median(walls), tokens / min(cpus)

    print("# ours:")
    ours_best, ours_med, ours_cpu = rates(ours)
    if ref is not None:
        print("# transformers:")
        ref_best, ref_med, ref_cpu = rates(ref)
        print(f"RESULT generate_transformers_tok_per_s {ref_best:.0f} tok/s")
        print(f"RESULT generate_transformers_tok_per_s_median {ref_med:.0f} tok/s")
        print(f"RESULT generate_transformers_tok_per_cpu_s {ref_cpu:.0f} tok/s")
        print(f"RESULT generate_speedup_vs_transformers {ours_best / ref_best:.2f} x")
        print(f"RESULT generate_speedup_vs_transformers_cpu {ours_cpu / ref_cpu:.2f} x")
    print(f"RESULT generate_novarl_tok_per_cpu_s {ours_cpu:.0f} tok/s")
    print(f"RESULT generate_novarl_tok_per_s_median {ours_med:.0f} tok/s")
    print(f"RESULT generate_novarl_tok_per_s {ours_best:.0f} tok/s")


if __name__ == "__main__":
    main()
