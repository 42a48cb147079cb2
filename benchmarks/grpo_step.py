"""One GRPO step: the trainer's iteration vs TRL's ``GRPOTrainer``, on the bench-tiny Mixtral.

Workload (both sides): 8 prompts x 8 samples, prompts of exactly 32 tokens, exactly 64 new
tokens per sample (no early stop), temperature-1 sampling, a frozen reference model with
KL weight beta = 0.04, one optimizer step per rollout batch (one epoch, one minibatch, no
gradient accumulation), float32, one device. The policy is the bench-tiny Mixtral (vocab 512,
hidden 256, intermediate 512, 4 layers, 8 heads, 4 KV heads, 8 experts, top-2; random
weights), with dropless routing on both sides (``experiment.capacity_factor=None``;
transformers drops nothing).

Ours is the trainer's real code path: ``validate_config`` -> ``build_run`` ->
``Trainer(run, workdir, mesh)`` on a mesh of one device, ``initial_state()``, then
``iteration(state, reference, i)`` (rollout with the KV-cache sampler, rewards, policy and
reference scoring, advantages, the update). The task is the built-in ``copy`` task over a
503-character alphabet with strings of 25 characters: with the verb, separator and BOS the
prompt is exactly 32 tokens, and the task's character tokenizer has exactly 512 ids
(``model.tokenizer`` cannot be used: the trainer loads a tokenizer.json without naming its
special tokens, which fails). To generate exactly 64 tokens, the run's sampling settings are
replaced with ``stop_token_ids=()`` before the trainer is built (a public field of the frozen
``Run``); the random policy still samples its EOS now and then, it just does not stop.

The reference, in the same process: TRL's ``GRPOTrainer`` on ``MixtralForCausalLM`` with the
same sizes (random init, saved to a temporary directory so that TRL can build its reference
model from it), the same task's prompts (a character-level ``tokenizers`` tokenizer with the
same 512 ids and BOS), the same positional-match reward, ``per_device_train_batch_size=64``,
``num_generations=8``, ``max_completion_length=64``, ``beta=0.04``, and
``generation_kwargs={'min_new_tokens': 64}`` (EOS is masked until 64 tokens, so every sample
runs to 64). Everything else is TRL's default (gradient checkpointing on, transformers'
default experts and attention implementations), except ``bf16=False`` (the workload is
float32; TRL defaults to bf16 autocast) and ``logging_steps=1`` (so each step's mean
completion length can be read back). It runs once with gradient checkpointing on (TRL's
default) and once with it off.

Each side runs one warm-up step (compilation on ours, first-call set-up on TRL's), then
timed steps; each step's wall time and this process's CPU time are recorded (on TRL's side by
a callback from ``on_step_begin`` to ``on_step_end``). TRL runs ``--steps`` timed steps per
configuration; ours runs a block of ``--steps`` steps first and another after each TRL block,
so that its figures sample the same stretches of the (changing) load on the shared machine.
Each ratio compares a TRL configuration with our block run right after it (as many steps on
each side: a best of more steps would favour ours). The headline figures are the best wall
time per step; medians and CPU seconds are printed too
(other work inflates wall time more than CPU time). torch uses ``--threads`` threads (default:
the CPU cores; below it, the whole process, ours included, is pinned to that many cores);
``--trl-threads`` adds more thread counts for the reference alone (on a loaded machine torch
with 2 threads spends much CPU time waiting for its other thread, so 1 thread can be faster
there): ours still uses ``--threads`` cores, so those rows are not thread for thread, and the
CPU-time ratio is the matched one.

The trainer's scoring and training forwards run each prompt once for its 8 samples
(``train.share_prompts``, on by default: the completions attend to their prompt's keys and
values, same numbers as running every row's prompt); ``--no-share-prompts`` turns it off, to
measure what it saves.

Model FLOPs of one step (the work the step's model needs, by the usual "model FLOPs"
convention: the active experts only, top-2 of 8; recomputation is not counted, neither the
attention backward's recomputed scores nor the layers a ``train.gradient_checkpointing=True``
run recomputes, and attention counts the causal context, not the masked slots it also
multiplies; about 3% of the total is attention): per token, 2 x (attention projections + router
+ 2 experts' SwiGLU + LM head) multiply-adds, plus 4 * N * head_dim * c for the attention
scores and values over the c tokens it attends to (causal). Training forward+backward = 3 x the
forward, the reference forward = 1 x, over the 8 prompts (32 tokens each) and the 64 x 64
completion tokens (over the 64 x 96 tokens of the full rows with ``--no-share-prompts``);
generation = the 8 prompts' prefill (shared by their 8 samples) plus the 63 decode steps of the
64 rows (the 64th token needs no forward). The step's model FLOPs divided by our step time is
compared with the machine's float32 matmul rate measured in the same run (``jnp.dot`` on
2048^3): on wall time (best of each), and on CPU time (FLOPs per CPU-second of the step vs of
the matmul), which the other load on the machine distorts less. With one optimizer step per
rollout batch, our trainer takes the old log-probs from the update's own forward
(``trainer.steps.on_policy_loss``), so it runs no scoring forward under the policy; TRL does
the same in this setting.

Unless ``--no-breakdown``, our step's pieces are also timed on their own at the end:
the rollout (``engine.rollout``), the scoring (``_training_batch``: the reference forward,
advantages and host-side statistics) and the update (``_update``).

Usage:
    python benchmarks/grpo_step.py [--steps 3] [--threads 2] [--trl-threads 1]
        [--skip-reference] [--no-breakdown]

Prints ``RESULT <name> <value> <unit>`` lines, ours last.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import statistics
import tempfile
import time

import torch_side
from bench_tiny import BENCH_TINY, MAX_POSITIONS
from host import cpu_model

PROMPTS, GROUP, PROMPT_LEN, NEW = 8, 8, 32, 64
BETA = 0.04
# 503 CJK characters + the 6 of "copy :" = a 509-character alphabet; with pad, BOS and EOS
# the task's character tokenizer has exactly 512 ids. "copy " + 25 characters + ":" + BOS
# = 32 prompt tokens.
SYMBOLS = "".join(chr(0x4E00 + i) for i in range(503))
STRING_LEN = 25
MATMUL_N = 2048
LEARNING_RATE = 1e-6  # TRL's default; the step's cost does not depend on it


def result(name: str, value: float, unit: str) -> None:
    print(f"RESULT {name} {value:.6g} {unit}", flush=True)


def forward_flops(tokens_at: list[tuple[int, int]]) -> float:
    """Forward FLOPs of the policy over ``(rows, context)`` pairs: ``rows`` tokens that each
    attend to ``context`` tokens (their position + 1)."""
    d, f, v = BENCH_TINY["hidden_size"], BENCH_TINY["intermediate_size"], BENCH_TINY["vocab_size"]
    n, kv = BENCH_TINY["num_attention_heads"], BENCH_TINY["num_key_value_heads"]
    e, k, layers = (
        BENCH_TINY["num_local_experts"],
        BENCH_TINY["num_experts_per_tok"],
        BENCH_TINY["num_hidden_layers"],
    )
    hd = d // n
    per_layer = d * n * hd + 2 * d * kv * hd + n * hd * d + d * e + k * 3 * d * f
    dense = 2 * (layers * per_layer + d * v)
    total = 0.0
    for rows, context in tokens_at:
        total += rows * (dense + layers * 4 * n * hd * context)
    return total


def step_flops(share_prompts: bool = True) -> dict[str, float]:
    """Model FLOPs of one step, by part (see the module docstring)."""
    rows, length = PROMPTS * GROUP, PROMPT_LEN + NEW
    if share_prompts:  # each group's prompt once, its completions once per row
        sequence = [(PROMPTS, t + 1) for t in range(PROMPT_LEN)]
        sequence += [(rows, t + 1) for t in range(PROMPT_LEN, length)]
    else:
        sequence = [(rows, t + 1) for t in range(length)]
    forward = forward_flops(sequence)
    prefill = forward_flops([(PROMPTS, t + 1) for t in range(PROMPT_LEN)])
    decode = forward_flops([(rows, PROMPT_LEN + t + 1) for t in range(NEW - 1)])
    return {
        "train_fwd_bwd": 3 * forward,
        "reference_fwd": forward,
        "generation": prefill + decode,
    }


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def matmul_rate(repeats: int = 7) -> tuple[float, float]:
    """(GFLOP/s on the best wall time, GFLOP per CPU-second on the best CPU time) of jnp.dot."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(3), (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    times = [timed(lambda: jax.block_until_ready(dot(a, a)))[:2] for _ in range(repeats)]
    flops = 2 * MATMUL_N**3
    return flops / min(t[0] for t in times) / 1e9, flops / min(t[1] for t in times) / 1e9


def apply_settings(config, settings) -> None:
    """``KEY=VALUE`` strings (``--set``) written into the ConfigDict: the value as a Python
    literal when it reads as one (``True``, ``2``; also ``true`` / ``false``), else as the
    string. A key the config lacks or a value of the wrong type exits naming it."""
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
        except (ValueError, SyntaxError):
            value = text
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node.get(section) if hasattr(node, "get") else None
        if not hasattr(node, "get") or name not in node:
            raise SystemExit(f"--set {item!r}: the config has no key {key!r}")
        try:
            node[name] = value
        except TypeError as e:
            raise SystemExit(f"--set {item!r}: {e}") from None


def our_config(share_prompts: bool = True, settings=()):
    """The run's ConfigDict: base config with the workload's keys overridden, then
    ``settings`` (see :func:`apply_settings`)."""
    from novarl_jax.trainer.config import default_config

    config = default_config()
    exp = config.experiment
    exp.num_experts = BENCH_TINY["num_local_experts"]
    exp.top_k = BENCH_TINY["num_experts_per_tok"]
    exp.capacity_factor = None  # dropless, like transformers
    exp.grpo_group_size = GROUP
    model = config.model
    model.hidden_size = BENCH_TINY["hidden_size"]
    model.intermediate_size = BENCH_TINY["intermediate_size"]
    model.num_hidden_layers = BENCH_TINY["num_hidden_layers"]
    model.num_attention_heads = BENCH_TINY["num_attention_heads"]
    model.num_key_value_heads = BENCH_TINY["num_key_value_heads"]
    model.max_position_embeddings = MAX_POSITIONS
    rollout = config.rollout
    rollout.prompts_per_step = PROMPTS
    rollout.max_prompt_length = PROMPT_LEN
    rollout.max_new_tokens = NEW
    config.grpo.beta = BETA
    config.train.epochs = 1
    config.train.minibatches = 1
    config.train.micro_batches = 1
    config.train.share_prompts = share_prompts
    config.optim.learning_rate = LEARNING_RATE
    config.task.name = "copy"
    config.task.options.symbols = SYMBOLS
    config.task.options.min_length = STRING_LEN
    config.task.options.max_length = STRING_LEN
    apply_settings(config, settings)
    return config


class Ours:
    """The trainer on the workload: built and compiled once, then stepped in timed blocks."""

    def __init__(self, workdir: str, share_prompts: bool = True, settings=()):
        import jax

        from novarl_jax.trainer.build import build_run
        from novarl_jax.trainer.config import validate_config
        from novarl_jax.trainer.loop import Trainer

        spec = validate_config(our_config(share_prompts, settings))
        run = build_run(spec)
        # Completions run to max_new_tokens: no stop token (see the module docstring).
        run = dataclasses.replace(
            run, sampling=dataclasses.replace(run.sampling, stop_token_ids=())
        )
        assert run.model.policy.vocab_size == BENCH_TINY["vocab_size"], run.model.policy.vocab_size
        self.run = run
        self.trainer = Trainer(run, workdir, mesh=spec.layout.make_mesh(jax.devices()[:1]))
        self.state, self.reference = self.trainer.initial_state()
        self.times: list[tuple[float, float]] = []
        self.lengths: list[float] = []
        self.dropped: list[float] = []
        self.prompt_tokens = 0
        self.i = 0
        wall, _, _ = timed(self._step)
        print(f"# ours: first step (compile + run) {wall:.1f} s")

    def _step(self) -> dict:
        self.state, metrics, (_, info) = self.trainer.iteration(self.state, self.reference, self.i)
        self.i += 1
        tok = self.run.tokenizer
        self.prompt_tokens = len(tok.encode(info.prompts[0])) + int(tok.add_bos)
        return metrics

    def steps(self, count: int) -> None:
        """Runs ``count`` timed steps."""
        for _ in range(count):
            wall, cpu, metrics = timed(self._step)
            self.times.append((wall, cpu))
            self.lengths.append(metrics["response_length/mean"])
            self.dropped.append(metrics.get("moe/dropped_fraction", 0.0))
            print(
                f"# ours step {self.i - 1}: wall {wall:.2f} s, CPU {cpu:.2f} s (loop's own "
                f"split: rollout {metrics['timing_s/gen']:.2f} s, score+update "
                f"{metrics['timing_s/update']:.2f} s), mean length {self.lengths[-1]:.1f}, "
                f"skipped updates {metrics['train/skipped']:.0f}",
                flush=True,
            )

    def breakdown(self) -> dict:
        return _breakdown(self.trainer, self.state, self.reference)


def _breakdown(trainer, state, reference, repeats: int = 3) -> dict:
    """Best (wall, CPU) seconds of the rollout, the scoring and the update, each run alone."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(1000)
    # The update donates its state, so every piece reads the latest one from here.
    holder = {"state": state}

    def rollout():
        traj, _ = trainer.engine.rollout(holder["state"].params["policy"], key, 0, PROMPTS)
        return jax.block_until_ready(traj)

    traj = rollout()

    def score():
        batch, _ = trainer._training_batch(holder["state"], reference, traj)
        return jax.block_until_ready(batch)

    batch = score()
    index = jnp.arange(PROMPTS * GROUP)

    def update():
        holder["state"], metrics = trainer._update(holder["state"], batch, index)
        return jax.block_until_ready(metrics)

    update()
    parts = {}
    for name, fn in (("rollout", rollout), ("score", score), ("update", update)):
        samples = [timed(fn)[:2] for _ in range(repeats)]
        parts[name] = (min(s[0] for s in samples), min(s[1] for s in samples))
    return parts


def _hf_tokenizer():
    """A character-level tokenizer with the task tokenizer's ids (0 pad, 1 BOS, 2 EOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from novarl_jax.rollout.tasks import make_task

    task = make_task("copy", symbols=SYMBOLS, min_length=STRING_LEN, max_length=STRING_LEN)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(task.alphabet)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    return hf, task


def bench_trl(
    steps: int, threads: int, checkpointing: bool, model_dir: str, hf_tok, task, device: str = "cpu"
):
    """Per-step (wall, CPU) seconds of TRL's GRPOTrainer after one warm-up step."""
    import jax
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from novarl_jax.rollout.rewards import positional_match_reward

    torch.set_num_threads(threads)
    prompts, metadata = task.sample_prompts(jax.random.key(7), PROMPTS * (steps + 1))
    lengths = {len(ids) for ids in hf_tok(prompts)["input_ids"]}
    assert lengths == {PROMPT_LEN}, lengths
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [m["answer"] for m in metadata]})

    def reward(prompts, completions, answer, **kwargs):
        return positional_match_reward(prompts, completions, [{"answer": a} for a in answer])

    class Clock(TrainerCallback):
        def __init__(self):
            self.samples, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            torch_side.sync(device)
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            torch_side.sync(device)
            wall, cpu = self.start
            self.samples.append((time.perf_counter() - wall, time.process_time() - cpu))

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=PROMPTS * GROUP,
            num_generations=GROUP,
            max_completion_length=NEW,
            generation_kwargs={"min_new_tokens": NEW},
            beta=BETA,
            gradient_checkpointing=checkpointing,
            bf16=False,
            use_cpu=device == "cpu",
            max_steps=steps + 1,
            learning_rate=LEARNING_RATE,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        clock = Clock()
        trainer = GRPOTrainer(
            model=model_dir,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            processing_class=hf_tok,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 is for the lengths only
        config = trainer.model.config
        info = (
            f"experts {config._experts_implementation}, attention {config._attn_implementation}, "
            f"{trainer.model.dtype}, reference model {trainer.ref_model is not None}"
        )
        trainer.train()
    logged = [h["completions/mean_length"] for h in trainer.state.log_history if "loss" in h]
    return {"times": clock.samples[1:], "length": float(np.mean(logged[1:])), "info": info}


def save_hf_model(model_dir: str, hf_tok) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        **BENCH_TINY,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    MixtralForCausalLM(config).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)


def run_references(args, ours: Ours) -> dict:
    """TRL's step for each thread count, with and without gradient checkpointing; a block
    of our steps follows each reference block (the load on the machine changes)."""
    try:
        import torch
        import transformers
        import trl
    except ImportError as err:  # bench-only dependencies
        print(f"# TRL reference skipped: {err}")
        return {}
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}")  # fmt: skip
    torch_side.prepare(args.torch_device)
    hf_tok, task = _hf_tokenizer()
    refs = {}
    with tempfile.TemporaryDirectory() as model_dir:
        save_hf_model(model_dir, hf_tok)
        for threads in [args.threads, *args.trl_threads]:
            for checkpointing in (True, False):
                tag = f"trl_{'gc' if checkpointing else 'nogc'}_t{threads}"
                refs[tag] = bench_trl(
                    args.steps, threads, checkpointing, model_dir, hf_tok, task, args.torch_device
                )
                print(f"# {tag}: {refs[tag]['info']}, mean completion length "
                      f"{refs[tag]['length']:.1f}", flush=True)  # fmt: skip
                ours.steps(args.steps)
                # Its ratios use this block: as many of our steps, run right after it.
                refs[tag]["ours_times"] = ours.times[-args.steps :]
    return refs


def summary(name: str, times: list[tuple[float, float]]) -> tuple[float, float, float]:
    walls, cpus = [t[0] for t in times], [t[1] for t in times]
    print(
        f"# {name}: wall s per step {[round(w, 2) for w in walls]}, "
        f"CPU s per step {[round(c, 2) for c in cpus]}"
    )
    return min(walls), statistics.median(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--trl-threads", type=int, nargs="*", default=[], help="extra counts")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--no-breakdown", action="store_true")
    torch_side.add_argument(parser)
    parser.add_argument(
        "--keep-malloc", action="store_true", help="glibc's malloc defaults (no reuse_host_memory)"
    )
    parser.add_argument(
        "--no-share-prompts",
        action="store_true",
        help="train.share_prompts=False: run every row's prompt in the training and "
        "reference forwards",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key of our run, e.g. train.gradient_checkpointing=True or "
        "model.compute_dtype=bfloat16 (repeatable)",
    )
    args = parser.parse_args()
    our_config(settings=args.set)  # a bad --set stops here, before anything runs
    torch_side.use_cores(args.threads)  # both sides, before jax starts its threads
    # As the training command line does on CPU, before JAX's first computation. It is
    # process-wide, so the TRL reference in this process runs with it too.
    from novarl_jax.core.distributed import reuse_host_memory

    reused = False if args.keep_malloc else reuse_host_memory()

    import jax
    import numpy as np

    platform = jax.devices()[0].platform
    print(f"# jax {jax.__version__} on {platform}, {os.cpu_count()} CPU cores ({cpu_model()})")
    print(f"# host memory reused across calls (reuse_host_memory): {reused}")
    print(
        f"# {PROMPTS} prompts x {GROUP} samples, prompt {PROMPT_LEN}, completion {NEW}, "
        f"beta {BETA}, bench-tiny Mixtral, float32 weights, dropless"
    )
    share = not args.no_share_prompts
    print(f"# shared-prompt forward (train.share_prompts): {share}")
    if args.set:
        print(f"# our config also sets: {', '.join(args.set)}")
    flops = step_flops(share)
    model_flops = flops["train_fwd_bwd"] + flops["reference_fwd"] + flops["generation"]
    for part, value in flops.items():
        print(f"# model FLOPs, {part}: {value / 1e9:.1f} G")
    mm_wall, mm_cpu = matmul_rate()

    refs = {}
    with tempfile.TemporaryDirectory() as workdir:
        ours = Ours(workdir, share, args.set)
        ours.steps(args.steps)
        if not args.skip_reference:
            refs = run_references(args, ours)
        breakdown = None if args.no_breakdown else ours.breakdown()
    again = matmul_rate()  # best of the start and the end of the run
    mm_wall, mm_cpu = max(mm_wall, again[0]), max(mm_cpu, again[1])
    result("matmul_f32_jnp_dot_2048", mm_wall, "GFLOP/s")
    result("matmul_f32_jnp_dot_2048_per_cpu_s", mm_cpu, "GFLOP/cpu-s")
    result("grpo_step_model_gflop", model_flops / 1e9, "GFLOP")
    print(f"# ours: prompt {ours.prompt_tokens} tokens, mean completion length "
          f"{np.mean(ours.lengths):.1f}, dropped fraction {max(ours.dropped):.4f}")  # fmt: skip
    best, median, cpu = summary("ours", ours.times)
    for tag, ref in refs.items():
        r_best, r_median, r_cpu = summary(tag, ref["times"])
        result(f"grpo_step_{tag}_s", r_best, "s")
        result(f"grpo_step_{tag}_s_median", r_median, "s")
        result(f"grpo_step_{tag}_cpu_s", r_cpu, "cpu-s")
        # Against our block of as many steps run next to it, not our best of every step.
        o_best, o_median, o_cpu = summary(f"ours next to {tag}", ref["ours_times"])
        result(f"grpo_step_speedup_vs_{tag}", r_best / o_best, "x")
        result(f"grpo_step_speedup_vs_{tag}_median", r_median / o_median, "x")
        result(f"grpo_step_speedup_vs_{tag}_cpu", r_cpu / o_cpu, "x")
    if breakdown is not None:
        for part, (wall, part_cpu) in breakdown.items():
            print(f"# ours alone, {part}: best wall {wall:.2f} s, best CPU {part_cpu:.2f} s")
            result(f"grpo_step_novarl_{part}_s", wall, "s")
            result(f"grpo_step_novarl_{part}_cpu_s", part_cpu, "cpu-s")
    result("grpo_step_novarl_fraction_of_matmul", model_flops / best / 1e9 / mm_wall, "ratio")
    result("grpo_step_novarl_fraction_of_matmul_cpu", model_flops / cpu / 1e9 / mm_cpu, "ratio")
    result("grpo_step_novarl_cpu_s", cpu, "cpu-s")
    result("grpo_step_novarl_s_median", median, "s")
    result("grpo_step_novarl_s", best, "s")


if __name__ == "__main__":
    main()
