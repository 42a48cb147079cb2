"""The run configuration: every key, its default and its meaning, and its validation.

A run is described by one ``ml_collections.ConfigDict``. :func:`default_config` is the schema:
every key a run may set appears here with its default and a comment, so a key that is not
here is a typo and is rejected. Keys under ``experiment`` keep the NovaRL quickstart's names,
so its Hydra-style overrides (``experiment.world_size=8``) work on our command line.

This module does not import JAX: the command line validates a config before JAX starts
(and before it decides how many fake CPU devices to create).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

_FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
_INT32_MAX = 2**31 - 1  # step counts, sizes and positions are int32 inside jitted code


def default_config() -> ml_collections.ConfigDict:
    """The defaults: a tiny dense policy trained with GRPO on one device."""
    config = ml_collections.ConfigDict()

    # --- The quickstart's experiment keys -------------------------------------------------
    config.experiment = ml_collections.ConfigDict()
    exp = config.experiment
    exp.world_size = 1  # devices in the run = dp * tp * pp * ep
    exp.tensor_parallel_size = 1  # tp: shards attention heads and MLP hidden units
    exp.pipeline_parallel_size = 1  # pp: consecutive groups of decoder layers
    exp.expert_parallel_size = 1  # ep: shards experts; carries data outside MoE layers
    exp.num_experts = 0  # experts per MoE layer; 0 = dense SwiGLU MLP (Llama/Mistral style)
    exp.top_k = 2  # experts chosen per token (ignored when dense)
    # Per-expert capacity = max(ceil(tokens_per_group * top_k * capacity_factor /
    # num_experts), min_capacity), counting a group's real (non-padding) tokens; set to None
    # for dropless routing.
    exp.capacity_factor = config_dict.FieldReference(1.25, field_type=float)
    # Capacity factor of the rollout's sampling forwards (they route with train=False);
    # None = capacity_factor. Megatron-LM and DeepSpeed call it the evaluation factor.
    exp.eval_capacity_factor = config_dict.FieldReference(None, field_type=float)
    exp.min_capacity = 0  # lower bound on each expert's capacity C per routing group
    # Which choices a full expert drops: 'position' keeps a group's earliest tokens, 'probs'
    # the choices with the largest gate weights (Megatron-LM's --moe-token-drop-policy).
    exp.drop_policy = "position"
    # Pipeline microbatches per forward when pipeline_parallel_size > 1 (GPipe bubble:
    # (pp - 1) / (num_microbatches + pp - 1)); must divide every forward's batch.
    exp.num_microbatches = 4
    exp.algorithm = "grpo"  # 'ppo' or 'grpo'
    exp.grpo_group_size = 4  # completions sampled per prompt (GRPO's relative baseline window)
    # Async runs: broadcast once this many updates are unbroadcast (checked after every step
    # of train.epochs x train.minibatches updates, so a value up to that is every step).
    exp.weight_sync_interval = 1
    # async runs: broadcast when a worker lags this much; also the most a trained batch may
    # lag. A rollout sampled ahead lags by a step's updates (train.epochs x minibatches = 4).
    exp.weight_sync_max_staleness = 4
    exp.weight_sync_timeout_s = 0.0  # async runs: broadcast pending updates after this; 0 = off
    # Asynchronous rollouts (docs/async.md): workers sample with broadcast weights while the
    # trainer learns; the three weight_sync_* keys above set the cadence and staleness bound.
    exp.async_rollouts = False
    exp.rollout_workers = 1  # rollout worker threads (async runs)
    exp.rollout_queue_size = 0  # rollouts sampled ahead of the trainer; 0 = one per worker
    exp.steps = 20  # training iterations (one rollout batch + its updates each)
    # Split into the model's, the rollouts' and the synthetic tasks' keys (a jsonl task
    # shuffles its file with task.options.seed instead, default 0). In [0, 2**32).
    exp.seed = 0

    # --- Policy model (Hugging Face MixtralConfig names) ---------------------------------
    config.model = ml_collections.ConfigDict()
    model = config.model
    model.hidden_size = 32  # width of the residual stream
    model.intermediate_size = 64  # SwiGLU hidden units (of each expert, for MoE layers)
    model.num_hidden_layers = 2  # decoder layers
    model.num_attention_heads = 4  # query heads
    model.num_key_value_heads = 2  # key/value heads (grouped-query attention; divides the above)
    # Per-head width; None = hidden_size / num_attention_heads (Hugging Face's head_dim).
    model.head_dim = config_dict.placeholder(int)
    model.rope_theta = 10000.0  # rotary embedding base
    model.rms_norm_eps = 1e-5  # RMSNorm's epsilon
    model.max_position_embeddings = 256  # longest prompt + completion the model takes
    model.tie_word_embeddings = False  # the LM head reuses the token embeddings
    model.router_aux_loss_coef = 0.01  # weight of the MoE load-balancing loss
    model.router_z_loss_coef = 0.001  # weight of the MoE router z-loss
    # Dtype the policy, reference and critic compute in: 'float32' or 'bfloat16' (mixed
    # precision: the weights, their gradients and the optimizer state stay float32, each
    # forward casts the weights on entry, all but the MoE routers' and the value head's;
    # logits, log-probs, losses float32). bfloat16 halves activation and KV-cache memory on
    # GPU/TPU; XLA:CPU emulates it (slower there).
    model.compute_dtype = "float32"
    # Start from a Hugging Face checkpoint directory (config.json + *.safetensors: Mixtral,
    # Mistral, Llama, Qwen2/Qwen2.5 or dense Qwen3) instead of random weights; '' = random
    # init. Its architecture replaces the sizes above (experiment.num_experts and top_k must
    # match it, the tokenizer must fit its vocabulary); the router loss weights above, the
    # capacity factor and a value head (zero-initialised when the checkpoint has none) come
    # from this config. The reference policy and a separate PPO critic start from the same
    # weights.
    model.init_from = ""
    # Tokenizer: a tokenizer.json, whose special tokens are named by the three strings below;
    # '' = the model.init_from checkpoint's tokenizer.json when it has one, else a character
    # tokenizer over a built-in task's alphabet (bytes for the jsonl task).
    model.tokenizer = ""
    # Padding and end-of-sequence tokens of a tokenizer.json: 'auto' = those its
    # tokenizer_config.json names (pad_token, eos_token), else '<pad>' and '</s>'.
    model.pad_token = "auto"
    model.eos_token = "auto"
    # Beginning-of-sequence token put before every prompt of a tokenizer.json: 'auto' = the
    # one its post-processor adds (as transformers' tokenizer(text) does; none if it adds
    # none), '' = none.
    model.bos_token = "auto"

    # --- Rollouts ---------------------------------------------------------------------------
    config.rollout = ml_collections.ConfigDict()
    rollout = config.rollout
    # Prompts per iteration; samples = prompts * grpo_group_size under GRPO, = prompts under PPO.
    rollout.prompts_per_step = 8
    rollout.max_prompt_length = 16  # tokens; see prompt_truncation for longer ones
    rollout.max_new_tokens = 8  # completion budget per sample
    # Sampling temperature (0 = greedy); the trainer's log-probs, ratios, KL and entropy are
    # those of softmax(logits / temperature) too (as in verl and TRL), 1 for greedy.
    rollout.temperature = 1.0
    rollout.top_k = 0  # 0 = off
    rollout.top_p = 1.0  # 1.0 = off
    # Tokens that end a completion, as ids or (with a tokenizer.json) token strings; () = the
    # tokenizer's end-of-sequence token and every end id the model.init_from checkpoint
    # declares (eos_token_id of its generation_config.json, else of its config.json).
    rollout.stop_token_ids = ()
    # A prompt with more tokens than max_prompt_length: 'error' stops the run naming it;
    # 'left' keeps its last tokens (the question usually ends a prompt), 'right' its first.
    rollout.prompt_truncation = "error"
    # Instruct models: each prompt as the user turn of the chat template beside the run's
    # tokenizer.json (chat_template.jinja, or tokenizer_config.json's chat_template), which
    # then opens the assistant's turn. The template writes its own BOS: model.bos_token='auto'
    # adds none. Needed for jsonl prompts that are conversations (lists of role/content
    # messages), laid out as they are. Rewards and samples.jsonl see the prompt as the task
    # wrote it.
    rollout.chat_template = False
    rollout.system_prompt = ""  # with chat_template, a system message before each prompt

    # --- Task: prompts and verifiable rewards ---------------------------------------------
    config.task = ml_collections.ConfigDict()
    # copy | reverse | sort | addition | jsonl, or "module.path:Class" for a task of your own
    # (novarl_jax.rollout.tasks: task.options are its keyword arguments).
    config.task.name = "reverse"
    # The JSONL file of the 'jsonl' task (fields: prompt, answer), or the path= argument of
    # a task of your own.
    config.task.path = ""
    # Reward override "module.path:function", (prompts, completions, metadata) -> list[float];
    # '' = the task's own reward.
    config.task.reward_fn = ""
    # Free-form keyword arguments of the task's constructor (e.g. max_length=4).
    config.task.options = ml_collections.ConfigDict()

    # --- PPO (experiment.algorithm='ppo') ---------------------------------------------------
    config.ppo = ml_collections.ConfigDict()
    ppo = config.ppo
    ppo.clip_ratio_low = 0.2  # ratio clip below 1 (PPO epsilon)
    ppo.clip_ratio_high = 0.2  # ratio clip above 1 (> low = DAPO's clip-higher)
    # Dual-clip bound c > 1 on negative-advantage tokens; None = off (verl's default is 3.0).
    ppo.dual_clip_c = config_dict.placeholder(float)
    # Aggregation of the policy, value, entropy and KL terms: see novarl_jax.algorithms.aggregation
    ppo.loss_agg_mode = "token-mean"
    ppo.vf_coef = 0.5  # value-loss weight
    ppo.value_clip_range = config_dict.FieldReference(0.2, field_type=float)  # None = off
    ppo.entropy_coef = 0.0  # entropy bonus: the loss subtracts entropy_coef * entropy
    ppo.gamma = 1.0  # GAE discount
    ppo.lam = 0.95  # GAE lambda
    ppo.normalize_advantages = True  # whiten advantages over the batch's valid tokens
    ppo.reward_kl_coef = 0.02  # InstructGPT KL penalty in the token rewards; 0 = off
    # k1 | k2 | k3 | abs, or verl's names kl | mse | low_var_kl; a '+' suffix (k3+) takes the
    # gradient from k2 (straight-through); see novarl_jax.algorithms.kl.
    ppo.reward_kl_kind = "k1"
    ppo.kl_coef = 0.0  # KL-to-reference as a loss term instead; 0 = off
    ppo.kl_kind = "low_var_kl"  # estimator of the KL loss term: the kinds of reward_kl_kind
    # 'shared': a value head on the policy's trunk. 'separate': a second model of the policy's
    # architecture (MoE included) with a value head, starting from the policy's initial
    # weights; its routers route their own tokens (router replay is the policy's) and take
    # the router loss weights above.
    ppo.critic = "shared"
    ppo.tis_cap = config_dict.placeholder(float)  # truncated IS cap vs sampler; None = off

    # --- GRPO (experiment.algorithm='grpo') -------------------------------------------------
    config.grpo = ml_collections.ConfigDict()
    grpo = config.grpo
    grpo.clip_ratio_low = 0.2  # ratio clip below 1
    grpo.clip_ratio_high = 0.2  # ratio clip above 1; DAPO uses 0.28
    grpo.dual_clip_c = config_dict.placeholder(float)  # as ppo.dual_clip_c; None = off
    # 'token' (GRPO) or 'sequence' (GSPO: the sequence's geometric-mean ratio; its paper and
    # verl's 'gspo' pair it with clip ranges of 3e-4 / 4e-4 and 'seq-mean-token-mean').
    grpo.importance_sampling_level = "token"
    # 'seq-mean-token-mean' = the GRPO paper's. The seq-mean modes count the sequences that
    # have a valid token (verl and TRL count every row), so rows masked out entirely
    # (dapo.mask_truncated, failed rewards) change their denominator.
    grpo.loss_agg_mode = "token-mean"
    grpo.loss_scale_factor = config_dict.placeholder(float)  # Dr. GRPO's constant length
    grpo.beta = 0.04  # KL-to-reference loss weight; 0 = no reference model
    grpo.kl_kind = "k3"  # estimator of the KL loss: the kinds of ppo.reward_kl_kind
    grpo.entropy_coef = 0.0  # entropy bonus: the loss subtracts entropy_coef * entropy
    grpo.advantage_estimator = "grpo"  # grpo | dr_grpo | rloo
    grpo.tis_cap = config_dict.placeholder(float)  # truncated IS cap vs sampler; None = off

    # --- Optimisation -------------------------------------------------------------------------
    config.train = ml_collections.ConfigDict()
    train = config.train
    train.epochs = 2  # passes over each rollout batch (PPO epochs)
    train.minibatches = 2  # optimizer steps per epoch
    # With epochs = minibatches = 1 (one step per rollout batch) and no critic or
    # KL-in-reward, the old log-probs come from the update's own forward (exact; no separate
    # scoring forward under the policy).
    train.micro_batches = 1  # gradient-accumulation splits of each minibatch
    # Recompute each decoder layer's activations in the backward pass instead of keeping
    # them (jax.checkpoint per layer; policy and critic): less activation memory for about
    # one more forward's FLOPs per update. The numbers agree to float rounding.
    train.gradient_checkpointing = False
    # Train MoE layers on the experts the rollout chose (the scoring forwards replay them too,
    # the reference model's included, so its KL compares the two under the same routing).
    train.router_replay = False
    # Run each prompt once per group of samples in the scoring and training forwards (its
    # completions attend to its keys and values; same numbers, fewer FLOPs; with an MoE
    # capacity factor the routing groups hold fewer tokens, so the drops differ). Used when
    # grpo_group_size > 1 and pp = 1; the update's forward also needs minibatches = 1 and
    # micro-batches of whole groups.
    train.share_prompts = True
    # Stop after this many non-finite (skipped) updates in a row, counted across steps, or as
    # many steps in a row that trained nothing (every reward non-finite, or every completion
    # masked by dapo.mask_truncated: the policy does not move, so the next steps do alike).
    train.max_consecutive_skips = 3

    config.optim = ml_collections.ConfigDict()
    optim = config.optim
    optim.learning_rate = 3e-3  # AdamW's peak learning rate (> 0)
    optim.schedule = "constant"  # constant | cosine | linear (after warmup)
    optim.warmup_steps = 0  # linear warmup from 0, in optimizer updates (not steps)
    # Updates the cosine or linear decay takes after the warmup; 0 = the rest of the run
    # (experiment.steps * epochs * minibatches - warmup_steps), ending where the run does.
    optim.decay_steps = 0
    optim.end_learning_rate = 0.0  # where cosine and linear decays end (<= learning_rate)
    # AdamW's decoupled decay, of matrices only: not of norm gains or biases (a layer's rank is
    # counted without the axis that stacks the layers).
    optim.weight_decay = 0.0
    # Global-norm gradient clip, of each model on its own (the policy; a separate critic, as
    # verl's actor.grad_clip and critic.grad_clip); 0 = off.
    optim.max_grad_norm = 1.0
    optim.b1 = 0.9  # Adam's first-moment decay
    optim.b2 = 0.99  # Adam's second-moment decay
    optim.eps = 1e-8  # Adam's denominator term (> 0)

    # --- DAPO options ---------------------------------------------------------------------
    config.dapo = ml_collections.ConfigDict()
    dapo = config.dapo
    dapo.dynamic_sampling = False  # GRPO: drop groups whose rewards all agree, sample more
    # Rollout batches beyond the first that dynamic sampling may draw per step (0 = none).
    # When they run out, the step trains on the groups it has plus groups whose rewards agree
    # (advantage 0; counted in dapo/kept_groups), where verl's DAPO stops with an error.
    dapo.max_extra_batches = 2
    dapo.overlong_buffer = 0  # tokens before max_new_tokens where a length penalty starts
    dapo.overlong_penalty = 1.0  # reward penalty at max_new_tokens (linear in the buffer)
    dapo.mask_truncated = False  # no loss on completions that hit max_new_tokens

    # --- Validation on fixed evaluation prompts --------------------------------------------
    config.eval = ml_collections.ConfigDict()
    ev = config.eval
    ev.interval = 0  # evaluate every this many steps and after the last one; 0 = off
    ev.prompts = 16  # prompts per evaluation: the same ones every time
    ev.samples = 1  # completions per prompt (> 1: set a temperature; adds best_of_n/mean)
    # Sampling temperature of the evaluation; 0 = greedy. Above 0, the rollout's top_k and
    # top_p filter the evaluation's samples too.
    ev.temperature = 0.0
    # Prompts sampled at once (bounds an evaluation's memory); 0 = as many as make a training
    # rollout's rows (rollout.prompts_per_step x samples per prompt) with eval.samples each.
    # Each batch has a key of its own: with eval.temperature > 0, another value draws other
    # samples (as another seed would); greedy evaluations do not depend on it, unless an MoE
    # policy drops tokens at a capacity factor (its routing groups are batch shards).
    ev.prompts_per_batch = 0
    # The evaluation prompts of the 'jsonl' task: another JSONL file, read from its start in
    # file order (at least eval.prompts lines). The built-in tasks draw a fixed set with a
    # key the training stream does not use ('' here); small synthetic tasks can repeat
    # training prompts.
    ev.path = ""

    # --- Checkpoints and logging ----------------------------------------------------------
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.interval = 10  # save every this many steps (and at the end)
    config.checkpoint.keep = 3  # checkpoints kept
    config.checkpoint.async_save = True  # write in the background while training goes on

    config.logging = ml_collections.ConfigDict()
    config.logging.tensorboard = False  # needs the tensorboard extra
    config.logging.wandb = False  # needs the wandb extra; WANDB_MODE=offline works
    config.logging.wandb_project = "novarl_jax"  # the W&B project runs are logged to
    config.logging.plot = True  # write plots/training.png at the end (needs matplotlib)
    config.logging.progress = True  # progress bar (a line per step when not a terminal)
    # Rollout samples appended to samples.jsonl: the first N rows of every step (prompt,
    # completion, score, length) and of every evaluation; 0 = none.
    config.logging.samples = 0

    return config


# Keys whose value may also be None (with the meaning given in default_config's comments).
NULLABLE_KEYS = frozenset(
    {
        "experiment.capacity_factor",
        "experiment.eval_capacity_factor",
        "model.head_dim",
        "ppo.dual_clip_c",
        "ppo.value_clip_range",
        "ppo.tis_cap",
        "grpo.dual_clip_c",
        "grpo.loss_scale_factor",
        "grpo.tis_cap",
    }
)
# Subtrees whose keys are free-form (checked by the constructor they are passed to).
FREE_FORM = ("task.options",)
ALGORITHMS = ("ppo", "grpo")
# Dtypes the trainer computes in (model.compute_dtype); the weights are always float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A bad config value; ``key`` is the dotted config key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def prompt_too_long(
    error: Any, key: str = "rollout.max_prompt_length", what: str = "a prompt"
) -> ConfigError:
    """The ConfigError for a tokenizer's TextTooLongError about a prompt of the run (one
    rendered with a chat template cannot be cut: that would cut the template's markup)."""
    from novarl_jax.rollout.chat import prompt_text

    counted = " (BOS included)" if error.with_bos else ""
    fix = "or set rollout.prompt_truncation='left' or 'right'"
    if getattr(error, "templated", False):
        counted, fix = " as the chat template renders it", "or shorten the prompts"
    return ConfigError(
        key,
        f"{what} has {error.length} tokens{counted}, more than rollout.max_prompt_length="
        f"{error.max_length}: {prompt_text(error.text)[:60]!r}; raise "
        f"rollout.max_prompt_length {fix}",
    )


def prompt_unrenderable(error: Any, what: str = "a prompt") -> ConfigError:
    """The ConfigError for a prompt the chat template cannot render (a RenderError): the
    system prompt's fault when the prompt brings its own system message, else the
    template's."""
    key = "rollout.system_prompt" if error.system_clash else "rollout.chat_template"
    return ConfigError(key, f"{what}: {error}")


def _flatten(cfg, prefix: str = "") -> dict:
    """{dotted key: value}; free-form subtrees stay whole."""
    out = {}
    for name, value in cfg.items():
        key = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict) and key not in FREE_FORM:
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _field_types(cfg, prefix: str = "") -> dict:
    """{dotted key: declared type} of the schema (placeholders keep their type)."""
    out = {}
    for name, value in cfg.items():
        key = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict) and key not in FREE_FORM:
            out.update(_field_types(value, key + "."))
        else:
            out[key] = cfg.get_type(name)
    return out


def unknown_key_error(key: str, defaults: dict | None = None) -> ConfigError:
    """The error for a key that the schema does not have, listing its valid siblings and
    the closest of them to a misspelling; a section given a value is named as one."""
    defaults = _flatten(default_config()) if defaults is None else defaults
    if inside := sorted(k for k in defaults if k.startswith(key + ".")):
        return ConfigError(key, f"is a section, not a value; set its keys, e.g. {inside[0]}=...")
    # The first part of the key below the deepest section the schema has.
    parts = key.split(".")
    depth = next(
        (i for i in range(len(parts) - 1, 0, -1)
         if any(k.startswith(".".join(parts[:i]) + ".") for k in defaults)),
        0,
    )  # fmt: skip
    parent, name = ".".join(parts[:depth]), parts[depth]
    if f"{parent}.{name}" in defaults and depth < len(parts) - 1:
        return ConfigError(
            f"{parent}.{name}", f"is a value, not a section; it has no key {parts[depth + 1]!r}"
        )
    if depth:
        key = f"{parent}.{name}"
        siblings = sorted(
            {k[len(parent) + 1 :].split(".")[0] for k in defaults if k.startswith(parent + ".")}
        )
        valid = f"valid keys under {parent!r}: {', '.join(siblings)}"
    else:
        key, siblings = name, sorted({k.split(".")[0] for k in defaults})
        valid = f"valid sections: {', '.join(siblings)}"
    guess = difflib.get_close_matches(name, siblings, n=1)
    return ConfigError(
        key, f"unknown key; {valid}" + (f"; did you mean {guess[0]!r}?" if guess else "")
    )


def _check_keys_and_types(config: ml_collections.ConfigDict) -> dict:
    """Rejects unknown keys and values of the wrong type; returns the flat config."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            "--config",
            f"get_config() must return an ml_collections.ConfigDict (start from "
            f"configs/base.py's), got {type(config).__name__}",
        )
    defaults = _flatten(default_config())
    flat = _flatten(config)
    for key, value in flat.items():
        if key not in defaults:
            raise unknown_key_error(key, defaults)
        default = defaults[key]
        if value is None:
            if key not in NULLABLE_KEYS:
                raise ConfigError(key, f"must not be None; expected {type(default).__name__}")
            continue
        expected = float if key in NULLABLE_KEYS else type(default)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                key,
                f"expected {expected.__name__}, got {type(value).__name__} {value!r}",
            )
        if expected is int and key != "experiment.seed" and not abs(value) <= _INT32_MAX:
            raise ConfigError(
                key, f"must fit a 32-bit integer (within ±{_INT32_MAX:,}), got {value:,}"
            )
        if expected is float and not math.isfinite(value):
            # inf or nan would pass every range check below and poison the first update.
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        if expected is float and abs(value) > _FLOAT32_MAX:
            # Training computes in float32 at most, where such a value is inf.
            raise ConfigError(
                key, f"must be a finite float32 number (at most {_FLOAT32_MAX:.4g}), got {value!r}"
            )
    for key in defaults:
        if key not in flat:
            raise ConfigError(key, "missing; start from configs/base.py and override keys")
    return flat


def _positive(flat: dict, *keys: str, minimum: float = 1) -> None:
    for key in keys:
        if not flat[key] >= minimum:
            raise ConfigError(key, f"must be >= {minimum}, got {flat[key]!r}")


# Constructor argument names -> config keys, to name the key in errors raised by the
# library's own validation.
_LAYOUT_ARGS = {
    "total_world_size": "experiment.world_size",
    "tensor_parallel_size": "experiment.tensor_parallel_size",
    "pipeline_parallel_size": "experiment.pipeline_parallel_size",
    "expert_parallel_size": "experiment.expert_parallel_size",
    "num_experts": "experiment.num_experts",
    "top_k": "experiment.top_k",
    "capacity_factor": "experiment.capacity_factor",
    "eval_capacity_factor": "experiment.eval_capacity_factor",
    "min_capacity": "experiment.min_capacity",
    "drop_policy": "experiment.drop_policy",
    "aux_loss_coef": "model.router_aux_loss_coef",
    "z_loss_coef": "model.router_z_loss_coef",
}


def _translate(error: ValueError, names: dict) -> ConfigError:
    """Names the config key behind a constructor's ValueError (its message starts with the arg)."""
    message = str(error)
    arg = next((a for a in names if message.startswith(a)), None)
    return ConfigError(names[arg] if arg else "experiment", message)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a validated config describes, as library objects."""

    config: ml_collections.ConfigDict
    layout: Any  # ParallelLayout
    router: Any  # MoERouterConfig, or None for a dense policy


def shared_prompt_group(config: Any, pp: int) -> int:
    """Samples per prompt when the forwards run each prompt once for its group, else 1.

    On when ``train.share_prompts`` is set, each prompt has several samples and the layers
    are not pipelined (``pp = 1``). The scoring forwards (whole batches) then always share;
    the update's forward too when :func:`updates_share_prompts`. See
    :func:`~novarl_jax.models.shared_prompt.forward_shared_prompt`.
    """
    group = samples_per_prompt(config)
    if not config.train.share_prompts or group < 2 or pp > 1:
        return 1
    return group


def updates_share_prompts(config: Any, pp: int) -> bool:
    """Whether the update's forward shares prompts too: its rows must keep their groups.

    True when :func:`shared_prompt_group` is > 1, each epoch is one minibatch (its rows stay
    in rollout order; with several minibatches the rows are shuffled across them) and every
    micro-batch holds whole groups.
    """
    group = shared_prompt_group(config, pp)
    return group > 1 and config.train.minibatches == 1 and micro_batch_rows(config) % group == 0


def decay_updates(decay_steps: int, run_updates: int, warmup_steps: int) -> int:
    """The updates a cosine or linear decay takes after the warmup: ``optim.decay_steps``, or
    with 0 the rest of the run (``run_updates - warmup_steps``), at least 1."""
    return max(decay_steps or run_updates - max(warmup_steps, 0), 1)


def updates_per_step(config: Any) -> int:
    """U, the optimizer updates of one training step: ``train.epochs x train.minibatches``."""
    return config.train.epochs * config.train.minibatches


def micro_batch_rows(config: Any) -> int:
    """Rollouts in each update's micro-batch: rollouts per step / minibatches / micro-batches."""
    rows = config.rollout.prompts_per_step * samples_per_prompt(config)
    return rows // config.train.minibatches // config.train.micro_batches


def _check_eval(config: ml_collections.ConfigDict, flat: dict) -> None:
    ev = config.eval
    _positive(flat, "eval.interval", "eval.temperature", "eval.prompts_per_batch", minimum=0)
    if config.task.name != "jsonl" and ":" not in config.task.name and ev.path:
        raise ConfigError(
            "eval.path",
            f"only the 'jsonl' task reads evaluation prompts from a file; task "
            f"{config.task.name!r} draws them from a key of their own (leave it '')",
        )
    if not ev.interval:
        return
    _positive(flat, "eval.prompts", "eval.samples")
    if ev.samples > 1 and ev.temperature == 0:
        raise ConfigError(
            "eval.samples",
            f"{ev.samples} greedy completions of a prompt are identical; set eval.temperature "
            f"> 0 or eval.samples=1",
        )
    if ev.samples > 1 and config.rollout.top_k == 1:
        raise ConfigError(
            "eval.samples",
            f"{ev.samples} completions of a prompt under rollout.top_k=1 (which evaluation "
            "sampling keeps) are identical; set eval.samples=1 or rollout.top_k != 1",
        )
    if config.task.name == "jsonl" and not ev.path:
        raise ConfigError(
            "eval.path", "the 'jsonl' task evaluates on a JSONL file of held-out prompts; set it"
        )


def _check_numbers(config: ml_collections.ConfigDict, flat: dict) -> None:
    """Ranges of the checkpoint, optimizer, DAPO and reward-KL numbers (the other sections'
    numbers are checked by the objects built from them)."""
    _positive(flat, "checkpoint.interval", "checkpoint.keep")
    _positive(
        flat,
        "optim.warmup_steps",
        "optim.decay_steps",
        "optim.end_learning_rate",
        "optim.weight_decay",
        "optim.max_grad_norm",
        "dapo.max_extra_batches",
        "dapo.overlong_buffer",
        "dapo.overlong_penalty",
        "ppo.reward_kl_coef",
        minimum=0,
    )
    for key in ("optim.b1", "optim.b2"):
        if not 0 <= flat[key] < 1:
            raise ConfigError(key, f"must be in [0, 1), got {flat[key]!r}")
    optim = config.optim
    if not optim.eps > 0:
        raise ConfigError(
            "optim.eps",
            f"must be > 0 (Adam divides by sqrt(v) + eps: 0 gives 0/0 for weights with no "
            f"gradient), got {optim.eps!r}",
        )
    if not optim.learning_rate > 0:
        raise ConfigError("optim.learning_rate", f"must be > 0, got {optim.learning_rate!r}")
    if optim.schedule in ("cosine", "linear") and optim.end_learning_rate > optim.learning_rate:
        raise ConfigError(
            "optim.end_learning_rate",
            f"{optim.end_learning_rate} is above optim.learning_rate={optim.learning_rate}: a "
            f"{optim.schedule} decay would rise to it; lower it or use optim.schedule=constant",
        )
    if config.dapo.overlong_buffer > config.rollout.max_new_tokens:
        raise ConfigError(
            "dapo.overlong_buffer",
            f"{config.dapo.overlong_buffer} tokens exceed rollout.max_new_tokens="
            f"{config.rollout.max_new_tokens} (the buffer ends at max_new_tokens)",
        )


# (keys a run does not read when ``unread(config, asynchronous)`` holds, why), for
# ignored_settings.
_UNREAD_WHEN = (
    (
        ("experiment.rollout_workers", "experiment.rollout_queue_size",
         "experiment.weight_sync_interval", "experiment.weight_sync_max_staleness",
         "experiment.weight_sync_timeout_s"),
        lambda c, asynchronous: not asynchronous,
        "experiment.async_rollouts=False: each step samples with the weights it trains",
    ),
    (
        ("train.router_replay", "experiment.top_k", "experiment.capacity_factor",
         "experiment.eval_capacity_factor", "experiment.min_capacity", "experiment.drop_policy"),
        lambda c, asynchronous: c.experiment.num_experts == 0,
        "the model is dense (experiment.num_experts=0): it has no router",
    ),
    (
        ("model.router_aux_loss_coef", "model.router_z_loss_coef"),
        lambda c, asynchronous: c.experiment.num_experts == 0 and not c.model.init_from,
        "the model is dense (experiment.num_experts=0): it has no router losses",
    ),
    (
        ("optim.decay_steps", "optim.end_learning_rate"),
        lambda c, asynchronous: c.optim.schedule == "constant",
        "optim.schedule='constant' keeps optim.learning_rate after the warmup",
    ),
    (
        ("grpo.loss_scale_factor",),
        lambda c, asynchronous: c.experiment.algorithm == "grpo"
        and c.grpo.loss_agg_mode != "seq-mean-token-sum-norm",
        "only grpo.loss_agg_mode='seq-mean-token-sum-norm' divides by it",
    ),
    (
        ("rollout.system_prompt",),
        lambda c, asynchronous: not c.rollout.chat_template,
        "rollout.chat_template=False: prompts are encoded as the task writes them",
    ),
    (
        ("model.pad_token", "model.eos_token", "model.bos_token"),
        lambda c, asynchronous: not c.model.tokenizer
        and not (c.model.init_from and os.path.isfile(f"{c.model.init_from}/tokenizer.json")),
        "special tokens are named in a tokenizer.json (model.tokenizer, or one beside "
        "model.init_from); the built-in tokenizer has its own",
    ),
    (
        ("model.hidden_size", "model.intermediate_size", "model.num_hidden_layers",
         "model.num_attention_heads", "model.num_key_value_heads", "model.head_dim",
         "model.rope_theta", "model.rms_norm_eps", "model.max_position_embeddings",
         "model.tie_word_embeddings"),
        lambda c, asynchronous: bool(c.model.init_from),
        "the checkpoint model.init_from fixes the architecture (its config.json)",
    ),
    (
        ("experiment.grpo_group_size",),
        lambda c, asynchronous: c.experiment.algorithm != "grpo"
        and c.experiment.grpo_group_size != 1,
        "experiment.algorithm='ppo' samples one completion per prompt",
    ),
    (
        ("experiment.num_microbatches",),
        lambda c, asynchronous: c.experiment.pipeline_parallel_size == 1,
        "there is no pipeline (experiment.pipeline_parallel_size=1)",
    ),
    (
        ("dapo.max_extra_batches",),
        lambda c, asynchronous: not c.dapo.dynamic_sampling,
        "dapo.dynamic_sampling=False: no group is dropped, so none is sampled again",
    ),
    (
        ("dapo.overlong_penalty",),
        lambda c, asynchronous: c.dapo.overlong_buffer == 0,
        "dapo.overlong_buffer=0: no length penalty",
    ),
    (
        ("ppo.reward_kl_kind",),
        lambda c, asynchronous: c.experiment.algorithm == "ppo" and c.ppo.reward_kl_coef == 0,
        "ppo.reward_kl_coef=0: no KL penalty in the rewards",
    ),
    (
        ("ppo.kl_kind",),
        lambda c, asynchronous: c.experiment.algorithm == "ppo" and c.ppo.kl_coef == 0,
        "ppo.kl_coef=0: no KL loss",
    ),
    (
        ("grpo.kl_kind",),
        lambda c, asynchronous: c.experiment.algorithm == "grpo" and c.grpo.beta == 0,
        "grpo.beta=0: no KL loss",
    ),
    (
        ("eval.prompts", "eval.samples", "eval.temperature", "eval.prompts_per_batch",
         "eval.path"),
        lambda c, asynchronous: c.eval.interval == 0,
        "eval.interval=0: no validation",
    ),
)  # fmt: skip


def ignored_settings(
    config: ml_collections.ConfigDict, *, asynchronous: bool | None = None
) -> list[str]:
    """Warnings for keys set away from their defaults that the run does not read: the other
    algorithm's section (``ppo.*`` in a GRPO run, ``grpo.*`` in a PPO run), the asynchronous
    keys of a synchronous run, routing keys of a dense model, special tokens without a
    tokenizer.json, and keys of a feature that is off (pipeline microbatches without a
    pipeline, a KL kind at weight 0, validation keys without validation, DAPO's extra
    batches without dynamic sampling, ...). Empty when none.

    Not an error: a config may keep settings for another mode and switch with one key.
    ``asynchronous``: whether the run is asynchronous (default: ``experiment.async_rollouts``;
    ``train_async`` runs asynchronously whatever that key says).
    """
    if asynchronous is None:
        asynchronous = bool(config.experiment.async_rollouts)
    defaults = default_config()

    def changed(keys: Any) -> list[str]:
        out = []
        for key in keys:
            section, name = key.split(".")
            value = config[section][name]
            if name in defaults[section] and value != defaults[section][name]:
                out.append(f"{key}={value!r}")
        return out

    def warning(keys: list[str], why: str) -> str:
        return f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} not used: {why}"

    algorithm = config.experiment.algorithm
    other = "grpo" if algorithm == "ppo" else "ppo"
    warnings = []
    if keys := changed(f"{other}.{key}" for key in sorted(config[other])):
        warnings.append(
            warning(keys, f"experiment.algorithm={algorithm!r} reads the {algorithm}.* settings")
        )
    for keys, unread, why in _UNREAD_WHEN:
        if unread(config, asynchronous) and (keys := changed(keys)):
            warnings.append(warning(keys, why))
    return warnings


def validate_config(config: ml_collections.ConfigDict) -> RunSpec:
    """Checks a whole config before anything compiles.

    Raises:
        ConfigError: naming the first bad key and what would be valid.
    """
    from novarl_jax.core.distributed import MoERouterConfig, ParallelLayout

    flat = _check_keys_and_types(config)
    exp = config.experiment
    if exp.algorithm not in ALGORITHMS:
        raise ConfigError(
            "experiment.algorithm",
            f"{exp.algorithm!r} is not one of {list(ALGORITHMS)}",
        )
    _positive(
        flat,
        "experiment.steps",
        "experiment.weight_sync_interval",
        "experiment.weight_sync_max_staleness",
    )
    _positive(flat, "experiment.weight_sync_timeout_s", "experiment.rollout_queue_size", minimum=0)
    _positive(flat, "experiment.rollout_workers")
    _positive(flat, "logging.samples", minimum=0)
    if not 0 <= exp.seed < 2**32:
        # jax.random.key keeps a seed's low 32 bits (without jax_enable_x64): seeds outside
        # this range would silently share another seed's random stream.
        raise ConfigError(
            "experiment.seed",
            f"must be an integer in [0, 2**32), got {exp.seed} (random keys take 32 bits: "
            f"it would run the same stream as seed {exp.seed % 2**32})",
        )
    for key, module, extra in (("tensorboard", "tensorboardX", "tensorboard"), ("wandb",) * 3):
        if config.logging[key] and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logging.{key}",
                f'needs the {extra} extra ({module} is not installed): pip install -e ".[{extra}]"',
            )
    if config.logging.wandb:
        # W&B's own rules, which it checks only when the run starts.
        project = config.logging.wandb_project
        bad = sorted(set(project) & set("/\\#?%:"))
        why = (
            f"has {''.join(bad)!r}" if bad
            else "is blank" if not project.strip()
            else f"is {len(project)} characters long" if len(project) > 128
            else ""
        )  # fmt: skip
        if why:
            raise ConfigError(
                "logging.wandb_project",
                f"{project!r} is not a W&B project name (1 to 128 characters, none of "
                f"/ \\ # ? % :); it {why}",
            )
    if config.dapo.dynamic_sampling and exp.algorithm != "grpo":
        raise ConfigError(
            "dapo.dynamic_sampling",
            f"filters GRPO groups of samples per prompt; experiment.algorithm is "
            f"{exp.algorithm!r} (set experiment.algorithm=grpo or dapo.dynamic_sampling=False)",
        )
    if exp.num_experts < 0:
        raise ConfigError(
            "experiment.num_experts", f"must be >= 0 (0 = dense), got {exp.num_experts}"
        )
    if exp.algorithm == "grpo" and exp.grpo_group_size < 2:
        raise ConfigError(
            "experiment.grpo_group_size",
            f"must be >= 2 for grpo (the baseline is the group's mean), got {exp.grpo_group_size}",
        )
    _positive(flat, "experiment.grpo_group_size", "experiment.num_microbatches")
    _check_eval(config, flat)
    try:
        layout = ParallelLayout.from_world_size(
            total_world_size=exp.world_size,
            tensor_parallel_size=exp.tensor_parallel_size,
            pipeline_parallel_size=exp.pipeline_parallel_size,
            expert_parallel_size=exp.expert_parallel_size,
        )
    except ValueError as e:
        raise _translate(e, _LAYOUT_ARGS) from None
    router = None
    if exp.num_experts == 0:
        if layout.ep > 1:
            raise ConfigError(
                "experiment.expert_parallel_size",
                f"is {layout.ep} but the model is dense (experiment.num_experts=0); "
                "set num_experts to a multiple of it or use expert_parallel_size=1",
            )
    else:
        try:
            router = MoERouterConfig(
                num_experts=exp.num_experts,
                top_k=exp.top_k,
                capacity_factor=exp.capacity_factor,
                eval_capacity_factor=exp.eval_capacity_factor,
                min_capacity=exp.min_capacity,
                drop_policy=exp.drop_policy,
                aux_loss_coef=config.model.router_aux_loss_coef,
                z_loss_coef=config.model.router_z_loss_coef,
            )
        except ValueError as e:
            raise _translate(e, _LAYOUT_ARGS) from None
        if exp.num_experts % layout.ep:
            raise ConfigError(
                "experiment.num_experts",
                f"{exp.num_experts} experts do not split over expert_parallel_size={layout.ep}; "
                f"use a multiple of {layout.ep}",
            )
    model = config.model
    if not model.init_from:  # else the checkpoint's config.json sizes the model (not these)
        _positive(
            flat,
            "model.hidden_size",
            "model.intermediate_size",
            "model.num_hidden_layers",
            "model.num_attention_heads",
            "model.num_key_value_heads",
            "model.max_position_embeddings",
        )
        if model.num_attention_heads % model.num_key_value_heads:
            raise ConfigError(
                "model.num_key_value_heads",
                f"{model.num_key_value_heads} does not divide num_attention_heads="
                f"{model.num_attention_heads}",
            )
    if model.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            "model.compute_dtype",
            f"{model.compute_dtype!r} is not one of {list(COMPUTE_DTYPES)} (float16 would need "
            f"loss scaling, which the trainer does not do)",
        )
    # (With model.init_from the checkpoint's layer count decides: checked when it is read.)
    if model.num_hidden_layers % layout.pp and not model.init_from:
        raise ConfigError(
            "experiment.pipeline_parallel_size",
            f"{layout.pp} pipeline stages do not split model.num_hidden_layers="
            f"{model.num_hidden_layers}; use a divisor of it",
        )
    ro = config.rollout
    _positive(
        flat,
        "rollout.prompts_per_step",
        "rollout.max_prompt_length",
        "rollout.max_new_tokens",
    )
    _positive(flat, "rollout.temperature", "rollout.top_k", minimum=0)
    if not 0 < ro.top_p <= 1:
        raise ConfigError("rollout.top_p", f"must be in (0, 1], got {ro.top_p}")
    if samples_per_prompt(config) > 1 and (ro.temperature == 0 or ro.top_k == 1):
        key, value = ("rollout.temperature", 0) if ro.temperature == 0 else ("rollout.top_k", 1)
        raise ConfigError(
            key,
            f"{value} samples greedily, so the {samples_per_prompt(config)} samples of a prompt "
            f"would be identical and their GRPO advantages all 0; set rollout.temperature > 0 "
            f"and rollout.top_k != 1",
        )
    if ro.prompt_truncation not in ("error", "left", "right"):
        raise ConfigError(
            "rollout.prompt_truncation",
            f"{ro.prompt_truncation!r} is not one of ['error', 'left', 'right']",
        )
    # With model.init_from the checkpoint's own limit applies (checked when it is loaded).
    if not model.init_from and ro.max_prompt_length + ro.max_new_tokens > (
        model.max_position_embeddings
    ):
        raise ConfigError(
            "rollout.max_new_tokens",
            f"max_prompt_length + max_new_tokens = {ro.max_prompt_length + ro.max_new_tokens} "
            f"exceeds model.max_position_embeddings={model.max_position_embeddings}",
        )
    _check_numbers(config, flat)
    samples = ro.prompts_per_step * samples_per_prompt(config)
    if samples % layout.dense_data_parallel_size:
        raise ConfigError(
            "rollout.prompts_per_step",
            f"{ro.prompts_per_step} prompts x {samples_per_prompt(config)} samples = {samples} "
            f"rollouts do not split over dp * ep = {layout.dense_data_parallel_size} data shards",
        )
    return RunSpec(config, layout, router)


def samples_per_prompt(config) -> int:
    """Completions per prompt: the GRPO group size, or 1 for PPO."""
    exp = config.experiment
    return exp.grpo_group_size if exp.algorithm == "grpo" else 1


def eval_prompts_per_batch(config) -> int:
    """Evaluation prompts sampled at once: ``eval.prompts_per_batch``, by default as many as
    make a training rollout's rows (``rollout.prompts_per_step`` x samples per prompt) with
    ``eval.samples`` each; at most ``eval.prompts``."""
    ev = config.eval
    rows = config.rollout.prompts_per_step * samples_per_prompt(config)
    per_batch = ev.prompts_per_batch or max(rows // ev.samples, 1)
    return min(per_batch, ev.prompts)
