"""The start-up checklist: the run's parallel layout, model, router and batch, as one table."""

from __future__ import annotations

from typing import Any

from novarl_jax.trainer.config import (
    RunSpec,
    eval_prompts_per_batch,
    micro_batch_rows,
    samples_per_prompt,
    shared_prompt_group,
    updates_per_step,
    updates_share_prompts,
)


def update_routing_groups(spec: RunSpec) -> list[int]:
    """Tokens one batch shard routes as one group in the update's forward.

    A MoE layer routes each batch shard's tokens (``dp x ep`` shards) as one group, whose
    capacity is at most ``router.capacity(tokens)`` (that of its real tokens when some
    positions are padding). The update's forward sees one micro-batch
    (``rollout.prompts_per_step`` x samples / ``train.minibatches`` / ``train.micro_batches``
    rows), and with ``pp > 1`` each of its ``experiment.num_microbatches`` pipeline
    microbatches is a group; rows that do not split evenly over the shards are padded, so a
    shard routes the rounded-up share. Returns one size, or two when the forward shares
    prompts: each group's prompt once, then the completions (see
    :func:`~novarl_jax.models.shared_prompt.forward_shared_prompt`).
    """
    config, layout = spec.config, spec.layout
    ro = config.rollout
    rows = micro_batch_rows(config)
    if layout.pp > 1:
        rows //= config.experiment.num_microbatches
    shards = layout.dense_data_parallel_size

    def per_shard(n: int) -> int:  # the MoE block pads a batch the shards do not divide
        return -(-n // shards)

    if updates_share_prompts(config, layout.pp):
        prompts = rows // shared_prompt_group(config, layout.pp)
        return [per_shard(prompts) * ro.max_prompt_length, per_shard(rows) * ro.max_new_tokens]
    return [per_shard(rows) * (ro.max_prompt_length + ro.max_new_tokens)]


def checklist_rows(spec: RunSpec, mesh: Any = None, run: Any = None) -> list[tuple[str, str, str]]:
    """(section, item, value) rows describing the run (``run``: its built objects, whose
    policy's router is the one trained, with a checkpoint's experts under model.init_from)."""
    layout, exp, ro = spec.layout, spec.config.experiment, spec.config.rollout
    rows = [
        ("layout", "world size", str(layout.world_size)),
        ("layout", "DP (data parallel)", str(layout.dp)),
        ("layout", "TP (tensor parallel)", str(layout.tp)),
        ("layout", "PP (pipeline parallel)", str(layout.pp)),
        ("layout", "EP (expert parallel)", str(layout.ep)),
        ("layout", "batch shards (dp x ep)", str(layout.dense_data_parallel_size)),
    ]
    if mesh is not None:
        shape = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
        platform = mesh.devices.flat[0].platform
        devices = f"{mesh.devices.size} {platform} device" + ("s" if mesh.devices.size > 1 else "")
        rows.append(("layout", "mesh", f"({shape}) on {devices}"))
    if run is not None:
        rows += _model_rows(spec, run)
    router = spec.router if run is None else run.model.policy.router
    if router is None:
        rows.append(("router", "experts", "dense MLP (no MoE)"))
    else:
        groups = update_routing_groups(spec)

        def factor(value):
            return "dropless" if value is None else f"{value:g}"

        cf = factor(router.capacity_factor)
        rollout_cf = router.factor(train=False)
        if rollout_cf != router.capacity_factor:  # the sampler routes with the eval factor
            cf += f" (rollout: {factor(rollout_cf)})"
        drops = router.capacity_factor is not None or rollout_cf is not None
        rows += [
            ("router", "experts (E)", str(router.num_experts)),
            (
                "router",
                "experts per shard (E / ep)",
                str(router.num_experts // layout.ep),
            ),
            ("router", "top-k (K)", str(router.top_k)),
            ("router", "capacity factor", cf),
            (
                "router",
                "drop policy",
                router.drop_policy if drops else "none (dropless)",
            ),
            *(
                [("router", "min capacity", str(router.min_capacity))]
                if router.min_capacity
                else []
            ),
            (
                "router",
                "aux / z loss coef",
                f"{router.aux_loss_coef:g} / {router.z_loss_coef:g}",
            ),
            (
                "router",
                "positions per group (update)"
                + (", prompts / completions" if len(groups) > 1 else ""),
                " / ".join(str(g) for g in groups),
            ),
            (
                "router",
                "capacity per expert (C, at most)",
                # The block caps C at the group's tokens (a token picks an expert once); a
                # group with padding positions gets the C of its real tokens.
                " / ".join(str(min(router.capacity(g), g)) for g in groups),
            ),
        ]
    rows += [
        ("algorithm", "algorithm", exp.algorithm),
        (
            "algorithm",
            "prompts x samples per step",
            f"{ro.prompts_per_step} x {samples_per_prompt(spec.config)}",
        ),
        (
            "algorithm",
            "prompt / completion tokens",
            f"{ro.max_prompt_length} / {ro.max_new_tokens}",
        ),
        ("algorithm", "sampling", _sampling(spec, run)),
        ("algorithm", "shared-prompt forward", _shared_prompts(spec)),
    ]
    if exp.algorithm == "ppo":
        critic = "value head on policy"
        if spec.config.ppo.critic == "separate":
            critic = "separate model (the policy's + value head)"
        rows.append(("algorithm", "critic", critic))
    rows += [
        ("algorithm", "steps", str(exp.steps)),
        ("algorithm", "seed", str(exp.seed)),
        ("algorithm", "optimizer", _optimizer(spec)),
    ]
    dapo = _dapo(spec)
    if dapo:
        rows.append(("algorithm", "DAPO", dapo))
    if spec.config.eval.interval:
        rows.append(("algorithm", "validation", _validation(spec)))
    return rows + _sync_rows(spec)


def _sampling(spec: RunSpec, run: Any) -> str:
    """The rollout's sampling settings and, with the run built, the ids that end a
    completion."""
    ro = spec.config.rollout
    text = "greedy" if ro.temperature == 0 else f"temperature {ro.temperature:g}"
    text += f", {_filters(ro)}"
    if run is not None:
        stops = run.sampling.stops(run.tokenizer)
        from novarl_jax.rollout.tokenizers import HFTokenizer

        names = {}
        if isinstance(run.tokenizer, HFTokenizer):  # the token strings, where a file names them
            names = {i: t for t, i in run.tokenizer.vocabulary().items() if i in stops}
        text += ", stop ids " + ", ".join(
            f"{i} {names[i]}" if i in names else str(i) for i in stops
        )
    return text


def _filters(rollout: Any) -> str:
    """``top-k K, top-p P`` of the rollout's sampling (``off`` where a filter is off)."""
    top_p = "off" if rollout.top_p == 1 else f"{rollout.top_p:g}"
    return f"top-k {rollout.top_k or 'off'}, top-p {top_p}"


def _dapo(spec: RunSpec) -> str:
    """The DAPO options that are on, or ''."""
    d = spec.config.dapo
    parts = []
    if d.dynamic_sampling:
        parts.append(f"dynamic sampling (up to {d.max_extra_batches} extra batches)")
    if d.overlong_buffer:
        penalty, buffer = d.overlong_penalty, d.overlong_buffer
        parts.append(f"overlong penalty up to {penalty:g} in the last {buffer} tokens")
    if d.mask_truncated:
        parts.append("truncated completions masked")
    return ", ".join(parts)


def _validation(spec: RunSpec) -> str:
    """When the run is evaluated, on what, and in batches of how many prompts."""
    ev, ro = spec.config.eval, spec.config.rollout
    sampling = "greedy" if ev.temperature == 0 else f"temperature {ev.temperature:g}"
    if ev.temperature and (ro.top_k or ro.top_p != 1):  # the rollout's filters apply too
        sampling += f" (rollout's {_filters(ro)})"
    text = f"every {ev.interval} steps and the last: {ev.prompts} x {ev.samples}, {sampling}"
    per_batch = eval_prompts_per_batch(spec.config)
    if per_batch < ev.prompts:
        text += f", in batches of {per_batch} prompts"
    return text


def _optimizer(spec: RunSpec) -> str:
    """AdamW's rate and schedule over the run's updates (and a warmup the run never ends)."""
    optim = spec.config.optim
    updates = spec.config.experiment.steps * updates_per_step(spec.config)
    text = f"AdamW, lr {optim.learning_rate:g} {optim.schedule}, {updates} updates"
    if optim.warmup_steps:
        text += f", warmup {optim.warmup_steps}"
        if optim.warmup_steps >= updates:
            text += " (longer than the run: the peak rate is never reached)"
    return text


def _sync_rows(spec: RunSpec) -> list[tuple[str, str, str]]:
    """How rollouts get the trainer's weights: the synchronous loop, or the async cadence."""
    exp = spec.config.experiment
    if not exp.async_rollouts:
        return [("weight sync", "rollouts", "synchronous (each step samples, then trains)")]
    workers = exp.rollout_workers
    queue = exp.rollout_queue_size or workers
    timeout = f", or after {exp.weight_sync_timeout_s:g} s" if exp.weight_sync_timeout_s else ""
    updates = updates_per_step(spec.config)
    steps = -(-exp.weight_sync_interval // updates)  # checked after every step of U updates
    return [
        (
            "weight sync",
            "rollouts",
            f"asynchronous: {workers} worker{'s' if workers > 1 else ''}, {queue} sampled ahead",
        ),
        (
            "weight sync",
            "broadcast",
            f"every {steps} step(s) ({exp.weight_sync_interval} update(s) asked, {updates} "
            f"per step), when a worker lags {exp.weight_sync_max_staleness}{timeout}",
        ),
        (
            "weight sync",
            "staleness bound",
            f"{exp.weight_sync_max_staleness} versions (a step is "
            f"{updates_per_step(spec.config)} updates)",
        ),
    ]


def _model_rows(spec: RunSpec, run: Any) -> list[tuple[str, str, str]]:
    """What the policy is, where its weights come from, and how text becomes its ids."""
    import jax
    import numpy as np

    from novarl_jax.rollout.tokenizers import ByteTokenizer, CharTokenizer
    from novarl_jax.trainer.build import tokenizer_path

    policy, config = run.model.policy, spec.config
    mlp = (
        f"{policy.num_local_experts} experts, top-{policy.num_experts_per_tok}"
        if policy.num_local_experts
        else "dense MLP"
    )
    shapes = jax.eval_shape(run.init_params, jax.random.key(0))["policy"]
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    weights = config.model.init_from or f"random (experiment.seed={config.experiment.seed})"
    tok = run.tokenizer
    vocab = tok.vocab_size
    if isinstance(tok, CharTokenizer):
        words = f"characters of the task ({vocab} ids)"
    elif isinstance(tok, ByteTokenizer):
        words = f"bytes ({vocab} ids)"
    else:
        chat = tok.chat_template
        bos = f"BOS {tok.bos_token} (id {tok.bos_id})" if tok.add_bos else "no BOS"
        if chat is not None and not tok.add_bos:
            own = chat.special_tokens.get("bos_token")
            if own and chat.render("").startswith(own):
                bos = "the chat template's own BOS"
        words = f"{tokenizer_path(config)} ({vocab} ids; {bos} before each prompt)"
        if chat is not None:
            system = " after a system message" if chat.system_prompt else ""
            turns = "as user turns"
            if getattr(run.task, "conversational", False):
                turns = "(texts as user turns, conversations as they are)"
            words += f"; prompts {turns} of {chat.where}{system}"
    if vocab < policy.vocab_size:
        words += f"; the policy's ids {vocab}-{policy.vocab_size - 1} decode to nothing"
    tensor_parallel = []
    if spec.layout.tp > 1:
        tensor_parallel = [
            ("model", f"split over tp={spec.layout.tp}", _tp_split(policy, spec.layout.tp))
        ]
    return [
        (
            "model",
            "architecture",
            f"{policy.num_hidden_layers} layers, hidden {policy.hidden_size}, "
            f"{policy.num_attention_heads} heads of width {policy.head_dim} "
            f"({policy.num_key_value_heads} KV{', q/k/v biases' if policy.qkv_bias else ''}"
            f"{', q/k norms' if policy.qk_norm else ''}), "
            f"{mlp}{_rotary(policy)}",
        ),
        ("model", "parameters (policy)", f"{count:,}"),
        ("model", "precision", _precision(policy)),
        (
            "model",
            "gradient checkpointing",
            "on (each layer recomputed in the backward pass)" if policy.remat else "off",
        ),
        ("model", "initial weights", weights),
        ("model", "tokenizer", words),
        *tensor_parallel,
    ]


def _tp_split(policy: Any, tp: int) -> str:
    """Which dimensions tensor parallelism shards, and which it leaves replicated because
    ``tp`` does not divide them (the sharding rules skip such an axis)."""
    dims = (
        ("attention heads", policy.num_attention_heads),
        ("KV heads", policy.num_key_value_heads),
        (
            "MLP hidden" if not policy.num_local_experts else "expert hidden",
            policy.intermediate_size,
        ),
        ("vocab", policy.vocab_size),
    )
    split = [name for name, size in dims if size % tp == 0]
    whole = [f"{name} ({size})" for name, size in dims if size % tp]
    text = ", ".join(split) if split else "nothing"
    if whole:
        text += f"; replicated, as tp does not divide them: {', '.join(whole)}"
    return text


def _rotary(policy: Any) -> str:
    """The architecture row's note on a scaled rotary embedding ('' for plain ones)."""
    scaling = policy.rope_scaling
    if scaling is None:
        return ""
    return (
        f"; rotary scaled x{scaling.factor:g} from {scaling.original_max_position_embeddings} "
        "positions (llama3)"
    )


def _precision(policy) -> str:
    weights, compute = policy.param_dtype.name, policy.activation_dtype.name
    if compute == weights:
        return weights
    return f"{weights} weights, {compute} compute"


def _shared_prompts(spec: RunSpec) -> str:
    group = shared_prompt_group(spec.config, spec.layout.pp)
    if group > 1:
        shared_updates = updates_share_prompts(spec.config, spec.layout.pp)
        where = "scoring and update" if shared_updates else "scoring"
        return f"on in {where} (each prompt runs once for its {group} samples)"
    if not spec.config.train.share_prompts:
        return "off (train.share_prompts=False)"
    if spec.layout.pp > 1:
        return "off (the layers are pipelined, pp > 1)"
    return "off (one sample per prompt)"


def print_checklist(spec: RunSpec, mesh: Any = None, console: Any = None, run: Any = None) -> None:
    """Prints the checklist as a table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=100)
    table = Table(title="novarl_jax run checklist", show_lines=False)
    for column in ("section", "item", "value"):
        table.add_column(column)
    previous = None
    for section, item, value in checklist_rows(spec, mesh, run):
        table.add_row(section if section != previous else "", item, value)
        previous = section
    console.print(table)
