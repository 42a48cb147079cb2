"""Turns a validated config into the run's library objects, naming the key of any bad value.

Every object is built here, before anything compiles, so an invalid value stops the run with
one line naming its config key (the constructors' own messages start with the argument's
name, which maps to the key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from novarl_jax.algorithms.kl import KL_KINDS
from novarl_jax.algorithms.registry import make_loss_config, make_loss_fn
from novarl_jax.core.utils.advantages import make_advantage_estimator
from novarl_jax.models import ModelConfig, init_params, load_hf_model
from novarl_jax.models.hf import end_token_ids
from novarl_jax.models.layers import DEFAULT_INIT
from novarl_jax.rollout.chat import ChatTemplate, read_tokenizer_config, special_token_text
from novarl_jax.rollout.engine import RolloutEngine, SamplingConfig
from novarl_jax.rollout.tasks import TASKS, check_task, make_task, task_class
from novarl_jax.rollout.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer
from novarl_jax.trainer.config import (
    ConfigError,
    RunSpec,
    micro_batch_rows,
    samples_per_prompt,
    shared_prompt_group,
    updates_per_step,
)
from novarl_jax.trainer.state import SCHEDULES, make_optimizer, make_schedule
from novarl_jax.trainer.steps import ModelSpec

CRITICS = ("shared", "separate")


def built(section: str, fn: Callable, /, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``; a ValueError becomes a ConfigError naming ``section.<arg>``."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        message = str(e)
        names = sorted(kwargs, key=len, reverse=True)
        arg = next((n for n in names if message.startswith(n)), None)
        raise ConfigError(f"{section}.{arg}" if arg else section, message) from None


@dataclasses.dataclass(frozen=True)
class Run:
    """The library objects of one run (built once, before compiling)."""

    spec: RunSpec
    task: Any
    tokenizer: Any
    model: ModelSpec
    init_params: Callable[[jax.Array], dict]  # key -> {'policy': ..., ['critic': ...]}
    loss_fn: Callable
    loss_config: Any
    estimator: Any
    optimizer: Any
    sampling: SamplingConfig
    needs_reference: bool
    reward_kl: tuple[float, str]  # PPO's (reward_kl_coef, kind); coef 0 = off
    schedule: Callable[[int], Any]  # the optimizer's learning rate by applied update (0-based)
    # Validation (eval.interval > 0): its task (evaluation prompts) and sampling, else None.
    eval_task: Any = None
    eval_sampling: SamplingConfig | None = None

    def rollout_engine(self, mesh: Any = None, *, validation: bool = False) -> RolloutEngine:
        """The engine of the run's training rollouts, or of its validation (``validation``)."""
        task, sampling = (
            (self.eval_task, self.eval_sampling) if validation else (self.task, self.sampling)
        )
        return RolloutEngine(
            model_config=self.model.policy,
            tokenizer=self.tokenizer,
            task=task,
            sampling=sampling,
            mesh=mesh,
        )


def _task(config, *, validation: bool = False) -> Any:
    """The run's task; ``validation``: the validation task (eval.path's file, in file order)."""
    t = config.task
    options = dict(t.options)
    if t.reward_fn:
        if t.reward_fn.count(":") != 1:
            raise ConfigError(
                "task.reward_fn", f"{t.reward_fn!r} must look like 'module.path:function'"
            )
        for option in ("reward", "reward_fn") if t.name == "jsonl" else ("reward_fn",):
            if option in options:
                raise ConfigError(
                    "task.reward_fn",
                    f"and task.options.{option}={options[option]!r} both choose the task's "
                    f"reward; set one of them",
                )
        options["reward" if t.name == "jsonl" else "reward_fn"] = t.reward_fn
    if t.name == "jsonl":
        if validation:
            options.update(path=config.eval.path, shuffle=False)
            try:
                return make_task("jsonl", **options)
            except (ValueError, TypeError) as e:
                raise ConfigError("eval.path", f"cannot read the evaluation prompts: {e}") from None
        if not t.path:
            raise ConfigError("task.path", "the 'jsonl' task needs the path of a JSONL file")
        options["path"] = t.path
    elif ":" in t.name:  # a task of one's own: a file and a reward override if it takes them
        try:
            task_class(t.name)
        except ValueError as e:
            raise ConfigError("task.name", str(e)) from None
        path = config.eval.path if validation and config.eval.path else t.path
        checks = (("task.path", "path", path), ("task.reward_fn", "reward_fn", t.reward_fn))
        for key, name, value in checks:
            if value and not _task_takes(t.name, name):
                raise ConfigError(key, f"task {t.name!r} takes no {name}= argument")
        if path:
            options["path"] = path
    elif t.path:
        raise ConfigError(
            "task.path",
            f"only the 'jsonl' task reads a file; task {t.name!r} does not: leave it ''",
        )
    unknown = sorted(set(t.options) - set(task_options(t.name)))
    if unknown and (t.name in TASKS or _takes_no_var_kwargs(t.name)):
        raise ConfigError(
            f"task.options.{unknown[0]}",
            f"task {t.name!r} has no option {unknown[0]!r}; its options: "
            f"{', '.join(task_options(t.name)) or 'none'}",
        )
    try:
        task = make_task(t.name, **options)
    except TypeError as e:
        try:  # a class that is no task at all: say so, rather than what its constructor took
            check_task(task_class(t.name), f"task {t.name!r}")
        except ValueError as lacking:
            raise ConfigError("task.name", str(lacking)) from None
        raise ConfigError("task.options", f"task {t.name!r}: {e}") from None
    except (ValueError, OSError) as e:
        raise ConfigError(_task_error_key(str(e), t), str(e)) from None
    try:  # checkpointed as JSON: found out now rather than at the first save
        json.dumps(task.get_state())
    except (TypeError, ValueError) as e:
        raise ConfigError(
            "task.name",
            f"task {t.name!r}: get_state() must return plain JSON values (ints, not NumPy "
            f"integers), for the checkpoint: {e}",
        ) from None
    return task


def _constructor_parameters(name: str) -> list[inspect.Parameter] | None:
    """The parameters of a task class's constructor; None for an unknown task or one with no
    signature to read (either is found out when the task is built)."""
    try:
        return list(inspect.signature(task_class(name).__init__).parameters.values())
    except (ValueError, TypeError):
        return None


def _task_takes(name: str, argument: str) -> bool:
    """Whether a task class's constructor takes ``argument=`` (any, with ``**kwargs``)."""
    params = _constructor_parameters(name)
    return params is None or any(p.kind == p.VAR_KEYWORD or p.name == argument for p in params)


def _takes_no_var_kwargs(name: str) -> bool:
    """Whether a task class of one's own names all its options (no ``**kwargs``)."""
    params = _constructor_parameters(name)
    return params is not None and not any(p.kind == p.VAR_KEYWORD for p in params)


def task_options(name: str) -> list[str]:
    """The options (keyword arguments) a task takes under ``task.options``: those of its
    constructor, less what other keys set (``task.path``, ``task.reward_fn``)."""
    taken = {"self", "path", "reward_fn"}
    return [
        p.name
        for p in _constructor_parameters(name) or []
        if p.name not in taken and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _task_error_key(message: str, t: Any) -> str:
    """The config key a task constructor's error is about."""
    if message.startswith(("unknown task", f"task {t.name!r}")):
        return "task.name"
    if message.startswith("reward function") and t.reward_fn:
        return "task.reward_fn"
    if t.path and (t.path in message or message.startswith("JSONL")):
        for name in ("prompt_field", "answer_field"):  # "...: missing field 'solution' ..."
            field = t.options.get(name)
            if field is not None and f"missing field {field!r}" in message:
                return f"task.options.{name}"
        return "task.path"
    for name in t.options:  # "symbols must be ...": the option the message is about
        if message.startswith((f"{name} ", f"{name}=")):
            return f"task.options.{name}"
    return "task.options"


def tokenizer_path(config) -> str:
    """The tokenizer.json a run uses: ``model.tokenizer``, else the one beside the
    ``model.init_from`` checkpoint when it has one, else '' (a built-in tokenizer)."""
    m = config.model
    if m.tokenizer:
        return m.tokenizer
    beside = os.path.join(m.init_from, "tokenizer.json") if m.init_from else ""
    return beside if beside and os.path.isfile(beside) else ""


def _check_conversations(config, task, key: str) -> None:
    """Refuses a task whose prompts are conversations when no chat template renders them."""
    if getattr(task, "conversational", False) and not config.rollout.chat_template:
        raise ConfigError(
            "rollout.chat_template",
            f"the prompts of {key} include conversations (lists of messages), which only a "
            "chat template lays out: set rollout.chat_template=True, with a tokenizer.json "
            "that has one beside it",
        )


def _tokenizer(config, task) -> Any:
    m, ro = config.model, config.rollout
    path = tokenizer_path(config)
    if ro.chat_template and not path:
        raise ConfigError(
            "rollout.chat_template",
            "needs a tokenizer.json with a chat template beside it (model.tokenizer, or the "
            "model.init_from checkpoint's); the built-in tokenizer has none",
        )
    if ro.chat_template and ro.prompt_truncation != "error":
        raise ConfigError(
            "rollout.prompt_truncation",
            f"{ro.prompt_truncation!r} would cut the chat template's own markup with the "
            "prompt (its header, or the assistant turn it opens); keep 'error' with "
            "rollout.chat_template, and raise rollout.max_prompt_length or shorten the prompts",
        )
    if path:
        key = "model.tokenizer" if m.tokenizer else "model.init_from"
        chat = _chat_template(path, ro) if ro.chat_template else None
        bos = m.bos_token or None  # 'auto': the file's post-processor's
        resolved = {name: _special_token(m, name, path) for name in _FALLBACK}
        try:
            return HFTokenizer.from_file(
                path,
                truncation=ro.prompt_truncation,
                pad_token=resolved["pad_token"][0],
                eos_token=resolved["eos_token"][0],
                bos_token=None if chat and bos == "auto" else bos,  # the template writes it
                chat_template=chat,
            )
        except ValueError as e:
            name = next(
                (k for k in ("pad_token", "eos_token", "bos_token") if str(e).startswith(k)), None
            )
            if name is None:
                raise ConfigError(key, str(e)) from None
            if name in _FALLBACK and getattr(m, name) == AUTO_SPECIAL:
                token, named = resolved[name]
                why = (
                    f"the {token!r} its tokenizer_config.json names"
                    if named
                    else f"its fallback {token!r} (no tokenizer_config.json beside it names one)"
                )
                raise ConfigError(
                    f"model.{name}",
                    f"'auto' takes {why}, which is not in the vocabulary of {path}: name the "
                    f"token (a model without a padding token can pad with its EOS)",
                ) from None
            raise ConfigError(f"model.{name}", f"{e}{_named_beside(path, name)}") from None
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
            raise ConfigError(key, f"cannot load {path!r}: {e}") from None
    alphabet = getattr(task, "alphabet", None)
    truncation = config.rollout.prompt_truncation
    if alphabet:
        return CharTokenizer(alphabet, truncation=truncation)
    return ByteTokenizer(truncation=truncation)


AUTO_SPECIAL = "auto"
# What 'auto' falls back to without a tokenizer_config.json that names the token.
_FALLBACK = {"pad_token": "<pad>", "eos_token": "</s>"}


def _special_token(m, name: str, path: str) -> tuple[str, bool]:
    """``model.pad_token`` / ``model.eos_token`` resolved, and whether the
    tokenizer_config.json beside ``path`` named it: 'auto' is the token that file names, else
    the conventional one."""
    value = getattr(m, name)
    if value != AUTO_SPECIAL:
        return value, False
    try:
        named = _token_beside(path, name)
    except ValueError as e:
        raise ConfigError(f"model.{name}", f"'auto' reads tokenizer_config.json: {e}") from None
    return (named, True) if named else (_FALLBACK[name], False)


def _token_beside(path: str, name: str) -> str | None:
    """The special token ``name`` the tokenizer_config.json beside the tokenizer.json
    ``path`` names, None when it names none (or there is no such file).

    Raises:
        ValueError: the file cannot be read.
    """
    return special_token_text(read_tokenizer_config(os.path.dirname(path) or "."), name)


def _named_beside(path: str, name: str) -> str:
    """``'; tokenizer_config.json beside it names <name> '<token>'`` when it does."""
    try:
        token = _token_beside(path, name)
    except ValueError:  # an unreadable file: the error at hand is the one to report
        return ""
    return f"; the tokenizer_config.json beside it names {name} {token!r}" if token else ""


def _stop_ids(config, tokenizer, vocab: int) -> tuple[int, ...]:
    """The ids that end a completion: ``rollout.stop_token_ids`` (ids, or token strings of
    the tokenizer), else the tokenizer's EOS and the end ids the ``model.init_from``
    checkpoint declares when the run uses that checkpoint's own tokenizer.json (Llama 3
    instruct models end a turn with ``<|eot_id|>``, not with their EOS)."""
    listed = config.rollout.stop_token_ids
    if not listed:
        return tuple(dict.fromkeys([tokenizer.eos_id, *_checkpoint_end_ids(config, vocab)]))
    ids, names = [], None
    for token in listed:
        if isinstance(token, str):
            names = tokenizer.vocabulary() if names is None else names
            if token not in names:
                raise ConfigError(
                    "rollout.stop_token_ids",
                    f"{token!r} is not a token of the run's tokenizer; give a token it has or "
                    "an id",
                )
            ids.append(names[token])
        elif isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ConfigError(
                "rollout.stop_token_ids",
                f"{token!r} is not a token id of the policy's vocabulary [0, {vocab}) or a "
                "token string",
            )
        else:
            ids.append(token)
    return tuple(dict.fromkeys(ids))


def _checkpoint_end_ids(config, vocab: int) -> list[int]:
    """The end ids of the ``model.init_from`` checkpoint (:func:`end_token_ids`) when the
    run's tokenizer is that checkpoint's tokenizer.json; [] otherwise (another tokenizer's
    ids need not mean the same tokens)."""
    init_from, path = config.model.init_from, tokenizer_path(config)
    if not init_from or not path:
        return []
    own = os.path.join(init_from, "tokenizer.json")
    if not os.path.isfile(own) or not os.path.samefile(path, own):
        return []
    try:
        ids = end_token_ids(init_from)
    except ValueError as e:
        raise ConfigError("model.init_from", str(e)) from None
    outside = [i for i in ids if i >= vocab]
    if outside:
        raise ConfigError(
            "model.init_from",
            f"its eos_token_id holds {outside}, outside its vocabulary [0, {vocab}); fix the "
            "checkpoint's generation_config.json, or set rollout.stop_token_ids",
        )
    return ids


def _chat_template(path: str, rollout) -> ChatTemplate:
    """The chat template beside the tokenizer.json ``path`` (``rollout.chat_template``)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        return ChatTemplate.from_directory(directory, system_prompt=rollout.system_prompt)
    except ValueError as e:
        key = "rollout.chat_template"
        if rollout.system_prompt:  # the system message's fault when the template works without
            with contextlib.suppress(ValueError):
                ChatTemplate.from_directory(directory)
                key = "rollout.system_prompt"
        raise ConfigError(key, str(e)) from None


def _model_config(config, tokenizer, *, value_head: bool) -> ModelConfig:
    m, exp = config.model, config.experiment
    # experiment.top_k is ignored by a dense model (its ModelConfig keeps the default).
    experts = {"num_experts_per_tok": exp.top_k} if exp.num_experts else {}
    return built(
        "model",
        ModelConfig,
        vocab_size=tokenizer.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim,
        num_local_experts=exp.num_experts,
        **experts,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.rms_norm_eps,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings,
        **_run_fields(config, value_head),
    )


def _run_fields(config, value_head: bool) -> dict[str, Any]:
    """The ModelConfig fields the run's config sets whatever fixes the architecture (these
    keys, or a ``model.init_from`` checkpoint): routing and router losses, the value head,
    precision and gradient checkpointing."""
    m = config.model
    return dict(
        router_aux_loss_coef=m.router_aux_loss_coef,
        router_z_loss_coef=m.router_z_loss_coef,
        capacity_factor=config.experiment.capacity_factor,
        eval_capacity_factor=config.experiment.eval_capacity_factor,
        min_capacity=config.experiment.min_capacity,
        drop_policy=config.experiment.drop_policy,
        value_head=value_head,
        compute_dtype=m.compute_dtype,
        remat=config.train.gradient_checkpointing,
    )


def _load_policy(config, tokenizer, *, value_head: bool) -> tuple[ModelConfig, Any]:
    """The policy's config and weights from the checkpoint directory ``model.init_from``.

    The checkpoint fixes the architecture; the run's config keeps the training settings
    (:func:`_run_fields`). A value head the checkpoint lacks starts at zero. The experts, the
    prompt and completion lengths and the tokenizer must fit the checkpoint.
    """
    m, exp, ro = config.model, config.experiment, config.rollout
    try:
        # Kept in host memory: the trainer moves each device only its part of the weights.
        policy, params = load_hf_model(m.init_from, host=True, **_run_fields(config, value_head))
    except (ValueError, OSError) as e:
        raise ConfigError("model.init_from", f"cannot load {m.init_from!r}: {e}") from None
    checks = [("experiment.num_experts", exp.num_experts, "num_local_experts")]
    if policy.num_local_experts:
        checks.append(("experiment.top_k", exp.top_k, "num_experts_per_tok"))
    for key, ours, name in checks:
        if ours != getattr(policy, name):
            raise ConfigError(
                key,
                f"is {ours} but the checkpoint model.init_from has {name}={getattr(policy, name)}",
            )
    if tokenizer.vocab_size > policy.vocab_size:
        raise ConfigError(
            "model.tokenizer",
            f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint model.init_from "
            f"has vocab_size={policy.vocab_size}",
        )
    pp = exp.pipeline_parallel_size
    if policy.num_hidden_layers % pp:
        raise ConfigError(
            "experiment.pipeline_parallel_size",
            f"{pp} pipeline stages do not split the checkpoint model.init_from's "
            f"num_hidden_layers={policy.num_hidden_layers}; use a divisor of it",
        )
    length = ro.max_prompt_length + ro.max_new_tokens
    if length > policy.max_position_embeddings:
        raise ConfigError(
            "rollout.max_new_tokens",
            f"max_prompt_length + max_new_tokens = {length} exceeds the checkpoint's "
            f"max_position_embeddings={policy.max_position_embeddings} (model.init_from)",
        )
    return policy, params


def critic_params(policy_params: Any, critic: ModelConfig, key: jax.Array | None) -> dict:
    """A separate critic's initial weights: a copy of the policy's plus a value head.

    Args:
        policy_params: the policy's initial parameters (no value head).
        critic: the critic's ModelConfig (the policy's with ``value_head=True``).
        key: draws the value head's kernel as :func:`~novarl_jax.models.init_params` does
            (normal, std 0.02); None = a zero kernel. The bias starts at zero.

    Returns:
        A new parameter tree: the copies are the critic's own buffers, so updating (and
        donating) one model's weights never touches the other's.
    """
    dt, d = critic.param_dtype, critic.hidden_size
    kernel = jnp.zeros((d, 1), dt) if key is None else DEFAULT_INIT(key, (d, 1), dt)
    trunk = {name: value for name, value in policy_params.items() if name != "value_head"}
    return {
        # NumPy weights (a checkpoint's, in host memory) stay NumPy copies.
        **jax.tree.map(lambda x: x.copy(), trunk),
        "value_head": {"kernel": kernel, "bias": jnp.zeros((1,), dt)},
    }


def _loss(config, algorithm: str, policy: ModelConfig):
    section = config[algorithm]
    moe = dict(
        moe_aux_loss_coef=policy.router_aux_loss_coef if policy.num_local_experts else 0.0,
        moe_z_loss_coef=policy.router_z_loss_coef if policy.num_local_experts else 0.0,
    )
    common = dict(
        clip_ratio_low=section.clip_ratio_low,
        clip_ratio_high=section.clip_ratio_high,
        dual_clip_c=section.dual_clip_c,
        loss_agg_mode=section.loss_agg_mode,
        entropy_coef=section.entropy_coef,
        kl_kind=section.kl_kind,
        tis_cap=section.tis_cap,
        **moe,
    )
    if algorithm == "ppo":
        fields = dict(
            common,
            vf_coef=section.vf_coef,
            value_clip_range=section.value_clip_range,
            value_loss_agg_mode=section.loss_agg_mode,  # the critic aggregates like the actor
            kl_coef=section.kl_coef,
        )
    else:
        fields = dict(
            common,
            beta=section.beta,
            loss_scale_factor=section.loss_scale_factor,
            importance_sampling_level=section.importance_sampling_level,
        )
    loss_config = built(algorithm, make_loss_config, algorithm, **fields)
    return loss_config, make_loss_fn(algorithm, loss_config)


def _estimator(config, algorithm: str, group: int) -> tuple[Any, bool, tuple[float, str]]:
    """The advantage estimator of ``algorithm``'s section, whether it needs the reference
    policy, and the KL-in-reward ``(coefficient, kind)``."""
    if algorithm == "ppo":
        ppo = config.ppo
        estimator = built(
            "ppo",
            make_advantage_estimator,
            "gae",
            gamma=ppo.gamma,
            lam=ppo.lam,
            normalize=ppo.normalize_advantages,
        )
        if ppo.reward_kl_kind not in KL_KINDS:
            raise ConfigError(
                "ppo.reward_kl_kind", f"{ppo.reward_kl_kind!r} is not one of {list(KL_KINDS)}"
            )
        needs_reference = ppo.reward_kl_coef > 0 or ppo.kl_coef > 0
        return estimator, needs_reference, (float(ppo.reward_kl_coef), ppo.reward_kl_kind)
    name = config.grpo.advantage_estimator
    if name not in ("grpo", "dr_grpo", "rloo"):
        raise ConfigError(
            "grpo.advantage_estimator", f"{name!r} is not one of ['grpo', 'dr_grpo', 'rloo']"
        )
    estimator = built("grpo", make_advantage_estimator, name, group_size=group)
    return estimator, config.grpo.beta > 0, (0.0, "k1")


def _rollouts(n: int) -> str:
    return f"{n} rollout" if n == 1 else f"{n} rollouts"


def build_run(spec: RunSpec) -> Run:
    """Builds every object of the run described by ``spec`` (no compilation).

    Raises:
        ConfigError: a value the library rejects, naming its key.
    """
    config = spec.config
    exp = config.experiment
    algorithm = exp.algorithm
    task = _task(config)
    _check_conversations(config, task, "task.path")
    tokenizer = _tokenizer(config, task)
    ro = config.rollout
    if tokenizer.add_bos and ro.max_prompt_length < 2 and ro.prompt_truncation != "error":
        raise ConfigError(
            "rollout.max_prompt_length",
            f"{ro.max_prompt_length} leaves no room for a prompt after the tokenizer's BOS "
            f"token (rollout.prompt_truncation={ro.prompt_truncation!r} would cut every prompt "
            "to BOS alone); give at least 2",
        )
    critic_kind = config.ppo.critic
    if critic_kind not in CRITICS:
        raise ConfigError("ppo.critic", f"{critic_kind!r} is not one of {list(CRITICS)}")
    separate = algorithm == "ppo" and critic_kind == "separate"
    value_head = algorithm == "ppo" and not separate
    if config.model.init_from:
        policy, loaded = _load_policy(config, tokenizer, value_head=value_head)
    else:
        policy, loaded = _model_config(config, tokenizer, value_head=value_head), None
    # A separate critic is the policy's architecture with a value head (as verl's critic is
    # the actor's model class with a value head); it starts from the policy's initial weights.
    critic = dataclasses.replace(policy, value_head=True) if separate else None
    model = ModelSpec(
        policy=policy,
        critic=critic,
        prompt_length=ro.max_prompt_length,
        router_replay=bool(config.train.router_replay and policy.num_local_experts),
        num_microbatches=exp.num_microbatches if spec.layout.pp > 1 else 1,
        temperature=float(ro.temperature) if ro.temperature > 0 else 1.0,
    )
    loss_config, loss_fn = _loss(config, algorithm, policy)
    group = samples_per_prompt(config)
    estimator, needs_reference, reward_kl = _estimator(config, algorithm, group)
    # The other algorithm's section is checked too: a bad value there would be written to
    # the run's config.json and bite the day the run switches algorithm.
    other = "grpo" if algorithm == "ppo" else "ppo"
    _loss(config, other, policy)
    _estimator(config, other, max(exp.grpo_group_size, 2))  # a PPO run may leave it at 1
    optim = config.optim
    if optim.schedule not in SCHEDULES:
        raise ConfigError("optim.schedule", f"{optim.schedule!r} is not one of {list(SCHEDULES)}")
    updates = exp.steps * updates_per_step(config)
    # One schedule: the optimizer's, which the logs read too.
    schedule = make_schedule(optim, default_decay_steps=updates)
    optimizer = make_optimizer(optim, schedule=schedule)
    train = config.train
    for key in ("epochs", "minibatches", "micro_batches", "max_consecutive_skips"):
        if train[key] < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {train[key]}")
    rows = ro.prompts_per_step * group
    if rows % train.minibatches:
        raise ConfigError(
            "train.minibatches",
            f"{train.minibatches} does not divide the {_rollouts(rows)} per step",
        )
    if (rows // train.minibatches) % train.micro_batches:
        raise ConfigError(
            "train.micro_batches",
            f"{train.micro_batches} does not divide the minibatch of "
            f"{_rollouts(rows // train.minibatches)}",
        )
    micro_rows = micro_batch_rows(config)
    if spec.layout.pp > 1 and micro_rows % exp.num_microbatches:
        raise ConfigError(
            "experiment.num_microbatches",
            f"{exp.num_microbatches} pipeline microbatches do not divide the "
            f"{_rollouts(micro_rows)} of each update's micro-batch (rollouts per step / "
            f"train.minibatches / train.micro_batches)",
        )
    model = dataclasses.replace(model, prompt_group=shared_prompt_group(config, spec.layout.pp))
    sampling = built(
        "rollout",
        SamplingConfig,
        max_prompt_length=ro.max_prompt_length,
        max_new_tokens=ro.max_new_tokens,
        temperature=ro.temperature,
        top_k=ro.top_k,
        top_p=ro.top_p,
        num_samples=group,
        return_routing=model.router_replay,
        stop_token_ids=_stop_ids(config, tokenizer, model.policy.vocab_size),
    )

    eval_task = eval_sampling = None
    if config.eval.interval:
        eval_task = _task(config, validation=True)
        _check_conversations(config, eval_task, "eval.path")
        # The rollouts' sampling, with the evaluation's temperature and samples per prompt.
        eval_sampling = built(
            "eval",
            dataclasses.replace,
            sampling,
            temperature=config.eval.temperature,
            num_samples=config.eval.samples,
            return_routing=False,
        )

    def make_params(key: jax.Array) -> dict:
        k_policy, k_critic = jax.random.split(key)
        params = {"policy": init_params(policy, k_policy) if loaded is None else loaded}
        if critic is not None:
            # A checkpoint's value head starts at zero, as the shared critic's does.
            head_key = k_critic if loaded is None else None
            params["critic"] = critic_params(params["policy"], critic, head_key)
        return params

    return Run(
        spec=spec,
        task=task,
        tokenizer=tokenizer,
        model=model,
        init_params=make_params,
        loss_fn=loss_fn,
        loss_config=loss_config,
        estimator=estimator,
        optimizer=optimizer,
        schedule=schedule,
        sampling=sampling,
        needs_reference=needs_reference,
        reward_kl=reward_kl,
        eval_task=eval_task,
        eval_sampling=eval_sampling,
    )
