"""The rollout engine: prompts from a task -> sampled completions -> rewards, as one pytree.

``RolloutEngine.rollout`` samples B prompts from the task, generates G completions per prompt
with the KV-cache sampler (one prefill per prompt), decodes and scores them, and returns a
:class:`Trajectory` of arrays plus host-side :class:`RolloutInfo` (texts, per-sample info).
The same trajectory feeds PPO and GRPO: the advantage estimator and the loss take what they
need (:meth:`Trajectory.estimator_batch` gives an estimator its inputs under its names, with
``group_ids`` to check its groups against; ``behavior_logprobs`` for importance ratios).

Rewards that are NaN or infinite are reported (one ``RuntimeWarning`` per rollout naming the
samples and prompt indices) and excluded: the sample's ``valid`` flag is 0, its
``response_mask`` is zeroed and its reward set to 0, so no loss term touches it, and the
trainer passes ``valid`` to the advantage estimator as ``sample_mask``, so the sample is out
of its group's baseline too.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from novarl_jax.core.checks import check_int, is_integer
from novarl_jax.core.distributed import host_array
from novarl_jax.rollout.chat import RenderError, prompt_text
from novarl_jax.rollout.rewards import RewardFunctionError
from novarl_jax.rollout.sampler import make_settings, sample
from novarl_jax.rollout.tasks.base import (
    Task,
    TaskError,
    check_batch_size,
    check_task,
    rewards_to_array,
    sample_task_prompts,
    task_label,
)
from novarl_jax.rollout.tokenizers import TextTooLongError, UnencodableTextError

# Non-finite rewards named in a rollout's warning (the rest are counted).
_SHOWN_INVALID = 3

# Trajectory.policy_version is int32.
_MAX_VERSION = 2**31


class EmptyPromptError(ValueError):
    """A prompt encodes to no token (empty text, and a tokenizer that adds no BOS); ``index``
    is its row in the encoded batch."""

    def __init__(self, index: int, text: str):
        super().__init__(
            f"the prompt {text!r} encodes to no token (the tokenizer adds no BOS token); every "
            "prompt needs at least one: give it text, or set model.bos_token"
        )
        self.index = index


def check_prompt_rows(prompts: list[str], mask: Any) -> None:
    """Raises :class:`EmptyPromptError` for the first row of ``mask`` with no real token."""
    empty = np.flatnonzero(np.asarray(mask).sum(axis=1) == 0)
    if empty.size:
        raise EmptyPromptError(int(empty[0]), prompts[int(empty[0])])


class Trajectory(NamedTuple):
    """One batch of rollouts (a pytree of arrays). R = B*G rows, prompt-major: row
    ``b * G + g`` is sample ``g`` of prompt ``b``.

    Attributes:
        prompt_tokens: [R, P] int32, left-padded prompts.
        prompt_mask: [R, P] int32, 1 = a real prompt token.
        response_tokens: [R, T] int32, generated tokens (pad after the stop token).
        response_mask: [R, T] int32, 1 = a real generated token (stop token included) of a
            valid sample; all 0 for invalid samples.
        behavior_logprobs: [R, T] float32, log-probs under the distribution the tokens were
            sampled from (temperature/top-k/top-p applied; 0 for greedy).
        policy_logprobs: [R, T] float32, log-probs under the policy that sampled them, at the
            sampling temperature without top-k / top-p (equal to a training forward's
            log-probs at that temperature for the same tokens; for an MoE
            policy with a capacity factor, only where no routing group drops them: see
            :mod:`novarl_jax.rollout.sampler`).
        rewards: [R] float32 (0 for invalid samples).
        valid: [R] float32, 1 = the reward is finite and the sample may be trained on.
        group_ids: [R] int32, the prompt index b of each row (GRPO groups).
        policy_version: [R] int32, the version of the parameters that sampled the row.
        routing: MoE expert choices for router replay, or None.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    behavior_logprobs: jax.Array
    policy_logprobs: jax.Array
    rewards: jax.Array
    valid: jax.Array
    group_ids: jax.Array
    policy_version: jax.Array
    routing: Any = None

    def estimator_batch(self, **extra: Any) -> dict[str, Any]:
        """The advantage estimators' inputs (:mod:`novarl_jax.core.utils.advantages`) under
        their names: ``scores`` (the rewards), ``sample_mask`` (``valid``: a sample whose
        reward was not finite stays out of its group's baseline), ``response_mask`` and
        ``group_ids`` (a group estimator checks its ``group_size`` against them); ``extra``
        adds others (``values`` for GAE, ``token_rewards``)."""
        return {
            "response_mask": self.response_mask,
            "scores": self.rewards,
            "sample_mask": self.valid,
            "group_ids": self.group_ids,
            **extra,
        }


@dataclasses.dataclass(frozen=True)
class RolloutInfo:
    """Host-side companions of a :class:`Trajectory` (one entry per row unless noted).

    Attributes:
        prompts: R prompt strings.
        completions: R decoded completions (stop tokens removed).
        metadata: R task metadata dicts.
        sample_info: R dicts from ``task.score``.
        invalid: row indices whose reward was NaN/inf (excluded).
        task_state: the task's state after sampling these prompts (checkpoint it).
    """

    prompts: list[str]
    completions: list[str]
    metadata: list[dict]
    sample_info: list[dict]
    invalid: list[int]
    task_state: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the engine samples.

    Attributes:
        max_prompt_length: P, prompts are left-padded to this many tokens (static shapes);
            longer prompts follow the tokenizer's truncation setting (error by default).
        max_new_tokens: T, generated tokens per sample at most.
        temperature: 0 = greedy, else a finite float >=
            :data:`~novarl_jax.rollout.sampler.MIN_TEMPERATURE` (1e-4).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1] (1 = off).
        num_samples: G, completions per prompt (the GRPO group size; 1 for PPO).
        stop_token_ids: tokens that end a completion (a sequence, or one int); None = the
            tokenizer's ``eos_id``.
        return_routing: also record MoE expert choices (router replay).
    """

    max_prompt_length: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    return_routing: bool = False

    def stops(self, tokenizer: Any) -> tuple[int, ...]:
        """The ids that end a completion: ``stop_token_ids``, else the tokenizer's ``eos_id``."""
        return (tokenizer.eos_id,) if self.stop_token_ids is None else tuple(self.stop_token_ids)

    def __post_init__(self) -> None:
        length = check_int("max_prompt_length", self.max_prompt_length, 1)
        object.__setattr__(self, "max_prompt_length", length)
        if isinstance(self.stop_token_ids, (int, np.integer)) and not isinstance(
            self.stop_token_ids, bool
        ):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        elif self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(
                self.stop_token_ids, "__iter__"
            ):
                raise ValueError(
                    f"stop_token_ids must be a sequence of token ids, one int, or None, got "
                    f"{self.stop_token_ids!r}"
                )
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        # The sampler's checks name the same fields.
        make_settings(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_token_ids=self.stop_token_ids or (),
            pad_id=0,
            num_samples=self.num_samples,
            return_routing=self.return_routing,
        )


def _check_on_mesh(params: Any, mesh: Any) -> None:
    """Raises ValueError naming them when ``params`` are committed to devices outside
    ``mesh`` (JAX's own error names neither the parameters nor the mesh); uncommitted arrays
    (``init_params``' output) JAX moves onto the mesh itself."""
    inside = set(mesh.devices.flat)
    outside = {
        device
        for leaf in jax.tree.leaves(params)
        if isinstance(leaf, jax.Array) and leaf.committed
        for device in leaf.sharding.device_set
        if device not in inside
    }
    if outside:
        shown = ", ".join(sorted(str(d) for d in outside)[:3])
        raise ValueError(
            f"the params lie on {len(outside)} device(s) outside the engine's mesh of "
            f"{len(inside)} ({shown}); place them on it (shard_params(params, config, mesh)) "
            f"or build the engine with the mesh they are on"
        )


class RolloutEngine:
    """Samples, decodes and scores rollouts for PPO or GRPO.

    Args:
        model_config: the policy's ``ModelConfig``.
        tokenizer: a tokenizer from :mod:`novarl_jax.rollout.tokenizers` (any object with the
            same interface); its vocabulary must fit the model's.
        task: a :class:`~novarl_jax.rollout.tasks.Task`.
        sampling: a :class:`SamplingConfig`.
        mesh: the device mesh the parameters live on, or None.

    Raises:
        ValueError: the tokenizer's vocabulary is larger than the model's, a stop token is
            outside the model's vocabulary, or ``max_prompt_length + max_new_tokens`` exceeds
            the model's ``max_position_embeddings``.

    Example:
        >>> task = AdditionTask()
        >>> engine = RolloutEngine(model_config=config, tokenizer=CharTokenizer(task.alphabet),
        ...     task=task, sampling=SamplingConfig(max_prompt_length=8, max_new_tokens=4,
        ...     num_samples=4))
        >>> traj, info = engine.rollout(params, jax.random.key(0), policy_version=3,
        ...                             batch_size=8)
        >>> traj.rewards.shape  # 8 prompts x 4 samples
        (32,)
    """

    def __init__(
        self,
        *,
        model_config: Any,
        tokenizer: Any,
        task: Task,
        sampling: SamplingConfig,
        mesh: Any = None,
    ):
        if not isinstance(sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling)!r}")
        if isinstance(task, type):
            raise ValueError(
                f"task must be a task instance (e.g. {task.__name__}()), got the class "
                f"{task.__name__}"
            )
        check_task(task)
        if not isinstance(getattr(model_config, "vocab_size", None), int):
            raise ValueError(
                f"model_config must be a ModelConfig, got {type(model_config).__name__}"
            )
        methods = ("encode_batch", "decode_batch")
        if not isinstance(getattr(tokenizer, "vocab_size", None), int) or not all(
            callable(getattr(tokenizer, m, None)) for m in methods
        ):
            raise ValueError(
                f"tokenizer must be a Tokenizer (vocab_size, encode_batch, decode_batch; e.g. "
                f"CharTokenizer or HFTokenizer), got {type(tokenizer).__name__}"
            )
        task_chars, known = getattr(task, "alphabet", None), getattr(tokenizer, "alphabet", None)
        if isinstance(task_chars, str) and isinstance(known, str):
            missing = sorted(set(task_chars) - set(known))
            if missing:
                raise ValueError(
                    f"the task's alphabet has characters the tokenizer cannot encode: "
                    f"{''.join(missing)!r} (the tokenizer's alphabet: {known!r})"
                )
        vocab = model_config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ValueError(
                f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                f"vocab_size={vocab}"
            )
        stops = sampling.stops(tokenizer)
        if not all(is_integer(s) for s in stops):
            raise ValueError(
                f"the stop tokens {list(stops)} must be token ids; a tokenizer without an "
                f"eos_id (got {getattr(tokenizer, 'eos_id', None)!r}) needs "
                f"SamplingConfig(stop_token_ids=...)"
            )
        bad = [s for s in stops if not 0 <= s < vocab]
        if bad:
            raise ValueError(
                f"stop_token_ids {bad} are outside the model's vocabulary [0, {vocab})"
            )
        total = sampling.max_prompt_length + sampling.max_new_tokens
        max_pos = getattr(model_config, "max_position_embeddings", None)
        if max_pos is not None and total > max_pos:
            raise ValueError(
                f"sampling.max_prompt_length {sampling.max_prompt_length} + max_new_tokens "
                f"{sampling.max_new_tokens} = {total} exceeds the model's "
                f"max_position_embeddings={max_pos}; shorten one of them"
            )
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.task = task
        self.sampling = sampling
        self.mesh = mesh
        self.stop_token_ids: tuple[int, ...] = tuple(int(s) for s in stops)

    def encode_prompts(
        self, key: jax.Array, batch_size: int
    ) -> tuple[list[str], list[dict], np.ndarray, np.ndarray]:
        """The prompts a :meth:`rollout` with ``key`` samples, without sampling completions.

        The task's position (a JSONL file's) is left where it was, so the next rollout with
        ``key`` samples these prompts.

        Returns:
            ``(prompts, metadata, tokens, mask)``: B strings, B dicts, and the left-padded
            ``[B, max_prompt_length]`` token ids and mask.

        Raises:
            ValueError: a prompt longer than ``sampling.max_prompt_length`` (unless the
                tokenizer truncates).
            TaskError: the task raised, returned the wrong number of prompts, or prompts
                the tokenizer cannot encode (a character outside its alphabet).
        """
        start = self.task.get_state()
        try:
            return self._encode_prompts(jax.random.split(key)[0], check_batch_size(batch_size))
        finally:
            self.task.set_state(start)

    def _encode_prompts(self, prompt_key: jax.Array, batch_size: int):
        prompts, metadata = sample_task_prompts(self.task, prompt_key, batch_size)
        if len(prompts) != batch_size or len(metadata) != batch_size:
            raise TaskError(
                f"task {task_label(self.task)!r} returned {len(prompts)} prompts "
                f"and {len(metadata)} metadata for batch_size={batch_size}"
            )
        try:
            tokens, mask = self.tokenizer.encode_batch(
                prompts, max_length=self.sampling.max_prompt_length, padding_side="left"
            )
        except (TextTooLongError, RenderError):  # the caller names the key at fault
            raise
        except UnencodableTextError as e:  # e.g. a character outside the task's alphabet
            raise TaskError(
                f"task {task_label(self.task)!r}: its prompt {e.index} cannot be encoded: "
                f"{e.reason}"
            ) from None
        except ValueError as e:  # e.g. a prompt that is not a string
            raise TaskError(
                f"task {task_label(self.task)!r}: its prompts cannot be encoded: {e}"
            ) from None
        check_prompt_rows(prompts, mask)
        return prompts, metadata, tokens, mask

    def rollout(
        self,
        params: Any,
        key: jax.Array,
        policy_version: int,
        batch_size: int,
        num_samples: int | None = None,
    ) -> tuple[Trajectory, RolloutInfo]:
        """Samples ``batch_size`` prompts and ``num_samples`` completions for each.

        Args:
            params: the policy parameters (on ``mesh`` when one was given).
            key: a ``jax.random`` key; split into the prompt key and the sampling key.
            policy_version: the version of ``params`` (recorded in every row as int32), an
                integer in ``[0, 2**31)``.
            batch_size: B, prompts.
            num_samples: G, samples per prompt; None = ``sampling.num_samples``.

        Returns:
            ``(trajectory, info)``: a :class:`Trajectory` with R = B*G rows and its
            :class:`RolloutInfo`.
        """
        batch_size = check_batch_size(batch_size)
        self._checked_call(policy_version, num_samples)
        prompt_key, sample_key = jax.random.split(key)
        encoded = self._encode_prompts(prompt_key, batch_size)
        return self.complete(params, sample_key, policy_version, encoded, num_samples)

    def _checked_call(self, policy_version: Any, num_samples: Any) -> tuple[int, int]:
        """``(policy_version, num_samples)`` checked (``num_samples`` None = the config's)."""
        group = self.sampling.num_samples if num_samples is None else num_samples
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {group!r}")
        given = policy_version
        try:
            policy_version = check_int("policy_version", policy_version, 0)
        except ValueError:
            policy_version = -1  # refused just below, with the range
        if not 0 <= policy_version < _MAX_VERSION:
            raise ValueError(
                f"policy_version must be an integer in [0, 2**31) (it is stored as int32), got "
                f"{given!r}"
            )
        return policy_version, int(group)

    def complete(
        self,
        params: Any,
        key: jax.Array,
        policy_version: int,
        encoded: tuple[list[str], list[dict], np.ndarray, np.ndarray],
        num_samples: int | None = None,
    ) -> tuple[Trajectory, RolloutInfo]:
        """Samples and scores completions of given prompts: the second half of :meth:`rollout`.

        Args:
            params, policy_version, num_samples: as for :meth:`rollout`.
            key: the sampling key (:meth:`rollout` passes the second half of its key's split).
            encoded: ``(prompts, metadata, tokens, mask)`` as :meth:`encode_prompts` returns
                them (or rows of it).

        Returns:
            ``(trajectory, info)`` as :meth:`rollout`; ``info.task_state`` is the task's
            current state.
        """
        policy_version, group = self._checked_call(policy_version, num_samples)
        prompts, metadata, tokens, mask = encoded
        batch_size = len(prompts)
        if not batch_size or not len(metadata) == len(tokens) == len(mask) == batch_size:
            raise ValueError(
                f"encoded prompts need as many (>= 1) prompts, metadata, token rows and mask "
                f"rows, got {len(prompts)}, {len(metadata)}, {len(tokens)} and {len(mask)}"
            )
        if self.mesh is not None:
            _check_on_mesh(params, self.mesh)
        s = self.sampling
        out = sample(
            params,
            self.model_config,
            tokens,
            mask,
            key,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_token_ids=self.stop_token_ids,
            pad_id=self.tokenizer.pad_id,
            mesh=self.mesh,
            num_samples=group,
            return_routing=s.return_routing,
        )
        response = host_array(out.response_tokens)
        response_mask = host_array(out.response_mask)
        # The text is exactly the trained tokens less the stops and EOS: an EOS that is not a
        # stop token was sampled and trained on like any other token, so it must not cut the
        # text short (decode_batch stops at an EOS it sees; as a special token it has no text).
        hidden = (*self.stop_token_ids, self.tokenizer.eos_id)
        text_mask = response_mask * ~np.isin(response, hidden)
        completions = self.tokenizer.decode_batch(response, text_mask)
        rows_prompts = [p for p in prompts for _ in range(group)]
        rows_meta = [m for m in metadata for _ in range(group)]
        name = task_label(self.task)
        try:
            rewards, sample_info = self.task.score(rows_prompts, completions, rows_meta)
        except RewardFunctionError:
            raise
        except Exception as e:  # noqa: BLE001 - a task's own score(): named, cause chained
            raise RewardFunctionError(
                f"task {name!r} score() raised {type(e).__name__}: {e}"
            ) from e
        rewards = rewards_to_array(rewards, len(rows_prompts), f"task {name!r} score()")
        finite = np.isfinite(rewards)
        invalid = np.flatnonzero(~finite).tolist()
        if invalid:
            # One warning per rollout (not per sample), naming the first few samples.
            shown = "; ".join(
                f"reward {rewards[row]} of sample {row} (prompt index {row // group}: "
                f"{prompt_text(rows_prompts[row])[:60]!r})"
                for row in invalid[:_SHOWN_INVALID]
            )
            more = (
                f"; and {len(invalid) - _SHOWN_INVALID} more"
                if len(invalid) > _SHOWN_INVALID
                else ""
            )
            warnings.warn(
                f"{len(invalid)} of {len(rewards)} rewards are not finite: {shown}{more}; those "
                f"samples are excluded (from the loss, their groups' baselines and validation "
                f"scores)",
                RuntimeWarning,
                stacklevel=2,
            )
        rewards = np.where(finite, rewards, 0.0).astype(np.float32)
        valid = finite.astype(np.float32)
        rows = batch_size * group
        trajectory = Trajectory(
            prompt_tokens=out.prompt_tokens,
            prompt_mask=out.prompt_mask,
            response_tokens=out.response_tokens,
            response_mask=out.response_mask * jnp.asarray(finite, jnp.int32)[:, None],
            behavior_logprobs=out.logprobs,
            policy_logprobs=out.policy_logprobs,
            rewards=jnp.asarray(rewards),
            valid=jnp.asarray(valid),
            group_ids=jnp.asarray(np.repeat(np.arange(batch_size, dtype=np.int32), group)),
            policy_version=jnp.full((rows,), int(policy_version), jnp.int32),
            routing=out.routing,
        )
        info = RolloutInfo(
            prompts=rows_prompts,
            completions=completions,
            metadata=rows_meta,
            sample_info=sample_info,
            invalid=invalid,
            task_state=self.task.get_state(),
        )
        return trajectory, info


def take_info(parts: list[tuple[RolloutInfo, np.ndarray]], task_state: dict) -> RolloutInfo:
    """The :class:`RolloutInfo` of rows taken from several rollouts, in ``parts`` order:
    ``parts`` holds ``(info, rows)`` pairs, ``rows`` the row indices taken from ``info``;
    ``invalid`` is counted in the result's rows."""
    fields = ("prompts", "completions", "metadata", "sample_info")
    taken = {name: [getattr(i, name)[r] for i, rows in parts for r in rows] for name in fields}
    invalid, offset = [], 0
    for info, rows in parts:
        bad = set(info.invalid)
        invalid += [offset + k for k, r in enumerate(rows) if int(r) in bad]
        offset += len(rows)
    return RolloutInfo(**taken, invalid=invalid, task_state=task_state)
