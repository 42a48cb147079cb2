"""Parallel layouts (DP/TP/PP/EP), MoE router settings, meshes and launcher arguments.

The four parallel sizes of a run live in one frozen :class:`ParallelLayout`. It becomes a
:class:`jax.sharding.Mesh` with the axis names ``dp``, ``pp``, ``ep`` and ``tp`` (in that
order, so that ``tp`` is innermost: neighbouring devices, which share the fastest links,
exchange the per-layer tensor-parallel collectives). The same layout can be written out as
Megatron-LM flags or DeepSpeed-MoE keyword arguments, so a run keeps one source of truth for
its EP/TP/PP sizes whatever backend launches it.

How the batch is split: dense layers see the batch sharded over ``('dp', 'ep')`` (the expert
axis is a data axis outside expert layers); expert weights are sharded over ``ep``; ``tp``
shards attention heads and MLP hidden units; ``pp`` holds consecutive layer stages.

Example:
    >>> layout = ParallelLayout.from_world_size(
    ...     total_world_size=8, tensor_parallel_size=2, pipeline_parallel_size=2,
    ...     expert_parallel_size=2)
    >>> layout.describe()
    {'dp': 1, 'tp': 2, 'pp': 2, 'ep': 2, 'world': 8}
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import math
import numbers
import os
import re
from collections.abc import MutableMapping, Sequence
from typing import Any

import numpy as np

from novarl_jax.core.checks import check_int

# Mesh axis names. They appear only here and in the rule table of `sharding.py`.
DP = "dp"
PP = "pp"
EP = "ep"
TP = "tp"
MESH_AXES: tuple[str, ...] = (DP, PP, EP, TP)

DROP_POLICIES = ("position", "probs")


def _check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, 1)


def _check_real(name: str, value: Any, condition: str) -> float:
    """``float(value)`` for a finite real number (NumPy scalars too), else ValueError."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be {condition} and a finite number, got {value!r}")
    return float(value)


def _check_layout(layout: Any) -> ParallelLayout:
    if not isinstance(layout, ParallelLayout):
        raise TypeError(f"layout must be a ParallelLayout, got {type(layout).__name__}")
    return layout


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Sizes of the data, tensor, pipeline and expert parallel axes.

    Attributes:
        dp: data-parallel replicas (of the whole model, experts included).
        tp: tensor-parallel shards of heads and MLP hidden units.
        pp: pipeline stages (consecutive groups of decoder layers).
        ep: expert-parallel shards; each holds ``num_experts / ep`` experts. Outside expert
            layers this axis also carries data, so dense layers see ``dp * ep`` replicas.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep"):
            # NumPy integers are stored as Python ints (hashable, JSON-able, exact equality).
            object.__setattr__(self, name, _check_positive_int(name, getattr(self, name)))

    @classmethod
    def from_world_size(
        cls,
        total_world_size: int,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        expert_parallel_size: int = 1,
    ) -> ParallelLayout:
        """Derives ``dp = total_world_size / (tp * pp * ep)``.

        Raises:
            ValueError: a size is not a positive integer (NumPy integers are accepted), or the
                world size is not divisible by ``tp * pp * ep``.
        """
        total_world_size = _check_positive_int("total_world_size", total_world_size)
        tensor_parallel_size = _check_positive_int("tensor_parallel_size", tensor_parallel_size)
        pipeline_parallel_size = _check_positive_int(
            "pipeline_parallel_size", pipeline_parallel_size
        )
        expert_parallel_size = _check_positive_int("expert_parallel_size", expert_parallel_size)
        model_parallel = tensor_parallel_size * pipeline_parallel_size * expert_parallel_size
        if total_world_size % model_parallel:
            raise ValueError(
                f"total_world_size={total_world_size} is not divisible by "
                f"tensor_parallel_size * pipeline_parallel_size * expert_parallel_size = "
                f"{tensor_parallel_size} * {pipeline_parallel_size} * {expert_parallel_size} = "
                f"{model_parallel}; valid world sizes are multiples of {model_parallel}"
            )
        return cls(
            dp=total_world_size // model_parallel,
            tp=tensor_parallel_size,
            pp=pipeline_parallel_size,
            ep=expert_parallel_size,
        )

    @property
    def world_size(self) -> int:
        """Total number of devices: ``dp * tp * pp * ep``."""
        return self.dp * self.tp * self.pp * self.ep

    @property
    def dense_data_parallel_size(self) -> int:
        """Replicas seen by dense layers: ``dp * ep`` (the batch is sharded over both)."""
        return self.dp * self.ep

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """Mesh sizes in :data:`MESH_AXES` order (dp, pp, ep, tp)."""
        return (self.dp, self.pp, self.ep, self.tp)

    def describe(self) -> dict[str, int]:
        """The layout as ``{'dp', 'tp', 'pp', 'ep', 'world'}``."""
        return {
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "ep": self.ep,
            "world": self.world_size,
        }

    def make_mesh(self, devices: Sequence[Any] | None = None):
        """Builds a :class:`jax.sharding.Mesh` with axes ``('dp', 'pp', 'ep', 'tp')``.

        Devices are arranged by :func:`jax.experimental.mesh_utils.create_device_mesh`, which
        follows the physical topology of TPU slices and GPU hosts, so ``tp`` (innermost) lands
        on the closest devices; a shape that cannot keep each axis within whole physical axes
        of a TPU slice gets one that splits them.

        Args:
            devices: the distinct ``jax.Device`` objects to use; defaults to all of
                ``jax.devices()``.

        Raises:
            TypeError: an entry of ``devices`` is not a ``jax.Device``.
            ValueError: a device is listed twice, or the number of devices differs from
                ``world_size``.
        """
        import jax
        from jax.experimental import mesh_utils

        if isinstance(devices, (str, bytes)):
            raise TypeError(f"devices must be a sequence of jax.Device objects, got {devices!r}")
        devices = list(jax.devices() if devices is None else devices)
        for index, device in enumerate(devices):
            if not isinstance(device, jax.Device):
                raise TypeError(
                    f"devices[{index}] must be a jax.Device (e.g. from jax.devices()), got "
                    f"{type(device).__name__} {device!r}"
                )
        repeated = sorted(str(d) for d, n in collections.Counter(devices).items() if n > 1)
        if repeated:
            raise ValueError(
                f"devices lists {', '.join(repeated)} more than once; a mesh needs "
                f"{self.world_size} distinct devices"
            )
        if len(devices) != self.world_size:
            processes = jax.process_count()
            per_process = self.world_size // processes
            where = f" in each of the {processes} processes" if processes > 1 else ""
            available = len(jax.devices())
            if available >= self.world_size:  # enough exist: pass that many
                advice = f"pass devices=jax.devices()[:{self.world_size}]"
            else:
                advice = (
                    f"(on CPU) set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{per_process}{where} before importing jax"
                )
            raise ValueError(
                f"layout {self.describe()} needs world_size={self.world_size} devices, but "
                f"{len(devices)} devices were given (jax.devices() has {available}); choose "
                f"sizes whose product is {len(devices)}, or {advice}"
            )
        try:
            grid = mesh_utils.create_device_mesh(self.mesh_shape, devices=devices)
        except (NotImplementedError, ValueError):
            # Some shapes cannot keep every axis within whole physical axes of a TPU slice
            # (e.g. (2, 2, 2, 2) on a 4x4 v5e); splitting physical axes still gives a mesh.
            grid = mesh_utils.create_device_mesh(
                self.mesh_shape, devices=devices, allow_split_physical_axes=True
            )
        return jax.sharding.Mesh(grid, MESH_AXES)

    def to_megatron_args(self) -> list[str]:
        """Megatron-LM parallelism flags as an argv list.

        Megatron derives its data-parallel size as ``world / (tp * pp)``, which equals our
        ``dp * ep``: in Megatron the expert-parallel group is carved out of the data-parallel
        group, exactly as our ``ep`` axis carries data outside expert layers.

        Raises:
            ValueError: ``ep > 1``: Megatron refuses expert parallelism without
                ``--num-experts``; :meth:`MoERouterConfig.to_megatron` (or
                :class:`MegatronAdapterConfig` with a router) gives these flags with the MoE
                ones.
        """
        if self.ep > 1:
            raise ValueError(
                f"expert_parallel_size={self.ep} needs Megatron-LM's MoE flags (it refuses "
                "expert parallelism without --num-experts): use "
                "MoERouterConfig.to_megatron(layout, num_moe_layers=...), or "
                "MegatronAdapterConfig with a router"
            )
        return self._megatron_sizes()

    def _megatron_sizes(self) -> list[str]:
        return [
            "--tensor-model-parallel-size", str(self.tp),
            "--pipeline-model-parallel-size", str(self.pp),
            "--expert-model-parallel-size", str(self.ep),
        ]  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoERouterConfig:
    """Top-k token routing with a capacity factor.

    Capacity: each expert accepts at most
    ``C = max(ceil(tokens_per_group * top_k * capacity_factor / num_experts), min_capacity)``
    tokens per routing group (the tokens of one batch shard over ``('dp', 'ep')``; the whole
    batch on one device), counting its real tokens only. Choices beyond ``C``
    are dropped: the MoE block outputs zeros for them and the residual carries the token.
    ``capacity_factor=None`` is dropless (``C`` = every choice fits). Padding tokens are never
    routed, take no slot and do not count towards ``C``.

    Auxiliary losses (added to the training loss as ``aux_loss_coef * aux + z_loss_coef * z``):
    the load-balancing loss follows Switch Transformer (Fedus et al., 2021) and the Hugging
    Face Mixtral convention, ``aux = E * sum_e f_e * P_e``, where ``f_e`` is the fraction of
    tokens that chose expert ``e`` among their top-k (so ``sum_e f_e = top_k``) and ``P_e`` the
    mean router probability of ``e``; perfectly balanced routing gives ``aux = top_k``. The
    router z-loss (ST-MoE, Zoph et al., 2022) is ``mean(logsumexp(logits) ** 2)``.

    Attributes:
        num_experts: E, experts per MoE layer.
        top_k: K, experts chosen per token.
        capacity_factor: training capacity factor (> 0), or None for dropless routing.
        eval_capacity_factor: capacity factor for rollouts/evaluation; None = same as
            ``capacity_factor``.
        min_capacity: lower bound on the per-expert capacity.
        drop_policy: which choices lose when an expert is full: 'position' (later tokens in
            the group) or 'probs' (lowest gate weight, as Megatron-LM ranks them).
        aux_loss_coef: weight of the load-balancing loss.
        z_loss_coef: weight of the router z-loss.
        normalize_top_k: renormalise the gate weights over the chosen K (Mixtral's softmax
            over the selected logits); False keeps the full-softmax probabilities. A bool.

    Raises:
        ValueError: a field of the wrong type or out of range (the message names it).
    """

    num_experts: int
    top_k: int = 2
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: str = "position"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    normalize_top_k: bool = True

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        store("num_experts", _check_positive_int("num_experts", self.num_experts))
        if isinstance(self.top_k, (bool, np.bool_)) or not isinstance(
            self.top_k, (int, np.integer)
        ):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        store("top_k", int(self.top_k))
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        for name, none in (
            ("capacity_factor", "dropless"),
            ("eval_capacity_factor", "= capacity_factor"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, (bool, np.bool_))
                or not isinstance(value, numbers.Real)
                or not (value > 0 and math.isfinite(value))
            ):
                raise ValueError(
                    f"{name} must be > 0 or None ({none}), and a finite number, got {value!r}"
                )
            store(name, float(value))  # a NumPy float32 would make capacity() round in float32
        store("min_capacity", check_int("min_capacity", self.min_capacity, 0))
        if not isinstance(self.drop_policy, str) or self.drop_policy not in DROP_POLICIES:
            raise ValueError(
                f"drop_policy={self.drop_policy!r} is not one of {list(DROP_POLICIES)}"
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if _check_real(name, value, ">= 0") < 0:
                raise ValueError(f"{name} must be >= 0 and a finite number, got {value!r}")
            store(name, float(value))
        if not isinstance(self.normalize_top_k, (bool, np.bool_)):
            raise ValueError(f"normalize_top_k must be a bool, got {self.normalize_top_k!r}")
        store("normalize_top_k", bool(self.normalize_top_k))

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def factor(self, *, train: bool = True) -> float | None:
        """The capacity factor a forward routes with: ``capacity_factor`` (``train``), else
        ``eval_capacity_factor`` when set; None = dropless."""
        if train or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def capacity(self, num_tokens: int, *, train: bool = True) -> int:
        """Per-expert capacity C for a routing group of ``num_tokens`` tokens.

        ``C = max(ceil(num_tokens * top_k * capacity_factor / num_experts), min_capacity)``;
        dropless routing returns ``max(num_tokens, min_capacity)`` (every token could pick the
        same expert).

        Args:
            num_tokens: tokens in the routing group, an integer >= 0 (NumPy integers too).
            train: use ``capacity_factor`` (True) or ``eval_capacity_factor`` (False).

        Raises:
            ValueError: ``num_tokens`` is not an integer >= 0.
        """
        num_tokens = check_int("num_tokens", num_tokens, 0)
        factor = self.factor(train=train)
        if factor is None:
            return max(num_tokens, self.min_capacity)
        # Round the product before ceil so 8 * 2 * 1.2 / 4 is 4.8 -> 5, not 5.000000001 -> 6
        # (Megatron-LM and DeepSpeed take the ceil of the float product, so where the exact
        # product is a whole number they can give one more, e.g. 100 tokens, top-1, 2 experts,
        # factor 1.1: 55 here, 56 in Megatron-LM). A positive product never rounds to 0.
        exact = num_tokens * self.top_k * factor / self.num_experts
        capacity = math.ceil(round(exact, 9)) if exact >= 1 else math.ceil(exact)
        return max(capacity, self.min_capacity)

    def validate_layout(self, layout: ParallelLayout) -> None:
        """Raises ValueError when ``num_experts`` does not split evenly over ``layout.ep``.

        Raises:
            TypeError: ``layout`` is not a :class:`ParallelLayout`.
            ValueError: ``num_experts`` is not divisible by ``layout.ep``.
        """
        _check_layout(layout)
        if self.num_experts % layout.ep:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by expert_parallel_size="
                f"{layout.ep}; use a multiple of {layout.ep} experts or an ep that divides "
                f"{self.num_experts}"
            )

    def to_megatron(
        self, layout: ParallelLayout, *, num_moe_layers: int | None = None
    ) -> list[str]:
        """Megatron-LM (Megatron-Core MoE) flags for this router on ``layout``, as argv.

        Includes the layout's parallel sizes, so the list can be passed on its own. Megatron
        requires sequence parallelism when MoE is combined with tensor parallelism, so
        ``--sequence-parallel`` is added for ``tp > 1``. ``drop_policy`` maps to
        ``--moe-token-drop-policy`` (both rank by the gate weight for 'probs').

        Loss weights: Megatron normalises its load-balancing loss differently (its ``f_e`` is
        the fraction of the T*K choices, summing to 1, where ours counts tokens, summing to K,
        so its loss is ours divided by K), and it adds every MoE layer's losses where our model
        takes their mean over the ``num_moe_layers`` layers. ``--moe-aux-loss-coeff`` is
        therefore ``aux_loss_coef * top_k / num_moe_layers`` and ``--moe-z-loss-coeff``
        ``z_loss_coef / num_moe_layers``, which give the same gradients. ``num_moe_layers``
        is required: the model's number of MoE layers (its ``num_hidden_layers``).

        Megatron's default softmax over the chosen K is ``normalize_top_k=True``, and
        ``--moe-router-pre-softmax`` is ``normalize_top_k=False``. For ``top_k=1`` Megatron
        accepts only the second (a softmax over one logit has no gradient), so a top-1 router
        with ``normalize_top_k=True`` (gate weight 1) raises instead of changing meaning.

        Megatron has no minimum capacity and no evaluation capacity factor, so a
        ``min_capacity`` that can raise the capacity, or an ``eval_capacity_factor`` other than
        ``capacity_factor``, raises instead of being left out.

        Routing groups differ under ``tp > 1``: with sequence parallelism each tensor-parallel
        rank routes its own ``1 / tp`` of the sequence, and Megatron takes each expert's
        capacity from those tokens, where our routing group is the whole batch shard over
        ``('dp', 'ep')``. With a capacity factor the two then drop different choices (the
        loss weights still agree: Megatron gathers its load-balancing counts over the
        tensor-parallel group); dropless routing (``capacity_factor=None``) is the same.

        Raises:
            TypeError: ``layout`` is not a :class:`ParallelLayout`.
            ValueError: experts not divisible by ``ep``, a top-1 router that renormalises, a
                ``min_capacity`` or ``eval_capacity_factor`` Megatron cannot express, or
                ``num_moe_layers`` missing or not an integer >= 1.
        """
        self.validate_layout(layout)
        num_moe_layers = _moe_layers(num_moe_layers)
        if self.min_capacity > 0 and self.capacity_factor is not None:
            raise ValueError(
                f"min_capacity={self.min_capacity} has no Megatron-LM equivalent (Megatron "
                f"takes the capacity from --moe-expert-capacity-factor alone); use "
                f"min_capacity=0"
            )
        if self.eval_capacity_factor not in (None, self.capacity_factor):
            raise ValueError(
                f"eval_capacity_factor={self.eval_capacity_factor} has no Megatron-LM "
                f"equivalent (Megatron evaluates with its training capacity factor); use "
                f"eval_capacity_factor=None"
            )
        if self.top_k == 1 and self.normalize_top_k:
            raise ValueError(
                "normalize_top_k=True with top_k=1 (gate weight 1) has no Megatron-LM "
                "equivalent: Megatron needs --moe-router-pre-softmax for top-1 routing, which "
                "weights the expert by its softmax probability; use normalize_top_k=False"
            )
        args = layout._megatron_sizes() + [
            "--num-experts", str(self.num_experts),
            "--moe-router-topk", str(self.top_k),
            "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", _fmt(self.aux_loss_coef * self.top_k / num_moe_layers),
            "--moe-z-loss-coeff", _fmt(self.z_loss_coef / num_moe_layers),
            "--moe-token-dispatcher-type", "alltoall",
        ]  # fmt: skip
        if self.capacity_factor is not None:
            args += [
                "--moe-expert-capacity-factor", _fmt(self.capacity_factor),
                "--moe-token-drop-policy", self.drop_policy,
            ]  # fmt: skip
        if not self.normalize_top_k:
            # Softmax over all experts before top-k, without renormalising the chosen K.
            args.append("--moe-router-pre-softmax")
        if layout.tp > 1:
            args.append("--sequence-parallel")
        return args

    def to_deepspeed(self, layout: ParallelLayout) -> dict[str, Any]:
        """Keyword arguments for ``deepspeed.moe.layer.MoE`` matching this router.

        Use as ``MoE(hidden_size, expert, **router.to_deepspeed(layout))``. DeepSpeed's
        training JSON has no MoE section: MoE is configured through this layer's constructor
        (plus ``ep_size`` groups created by the engine), and this dict is exactly those
        constructor arguments. ``capacity_factor=None`` maps to ``drop_tokens=False``;
        ``enable_expert_tensor_parallelism`` follows ``tp > 1``.

        DeepSpeed versions: ``top2_2nd_expert_sampling`` (always given, False: the second
        expert is the argmax, as ours) is a keyword of DeepSpeed releases from 2024 on (its
        pull request 5156); older ones raise TypeError on it. ``top_k > 2`` needs a release
        with its general top-k gate (pull request 5881, 2024); older ones accept k = 1 or 2
        only.

        DeepSpeed has no switch for the gate weights: its top-1 gate weights the expert by its
        full-softmax probability (``normalize_top_k=False``), and its top-2 and top-k gates
        renormalise the weights over the chosen experts (``normalize_top_k=True``); the other
        combinations raise.

        The layer then routes exactly like this router as long as no expert overflows (always,
        with ``capacity_factor=None``). When one does, the two differ: DeepSpeed's top-1 gate
        (``use_rts=False``) picks a full expert's tokens with ``torch.topk`` over a 0/1 mask,
        whose order among equal entries is unspecified, where ``drop_policy='position'`` keeps
        the earliest; its top-2 gate serves every token's first choice before any token's
        second choice, where ours keeps the earliest tokens' choices; its top-k gate (k >= 3)
        keeps the choices with the largest router logits; and for k >= 2 it renormalises the
        gate weights a token keeps, where ours leaves them as they were (a dropped choice
        contributes nothing). DeepSpeed's ``drop_tokens`` holds in training and evaluation
        alike, so dropless training with a capped ``eval_capacity_factor`` raises. DeepSpeed's
        constructor has no drop-policy switch, so ``drop_policy='probs'`` raises. DeepSpeed
        returns its load-balancing loss for the caller to weight (its top-2 form counts first
        choices only) and computes no router z-loss (nor returns the logits one would need),
        so ``aux_loss_coef`` and ``z_loss_coef`` have no DeepSpeed argument: a DeepSpeed run
        trains without the z-loss.

        Raises:
            TypeError: ``layout`` is not a :class:`ParallelLayout`.
            ValueError: ``drop_policy='probs'``, experts not divisible by ``ep``, a
                ``normalize_top_k`` DeepSpeed does not implement for this ``top_k``, or
                dropless training with an ``eval_capacity_factor``.
        """
        self.validate_layout(layout)
        if self.capacity_factor is None and self.eval_capacity_factor is not None:
            raise ValueError(
                f"capacity_factor=None with eval_capacity_factor={self.eval_capacity_factor} "
                f"has no DeepSpeed-MoE equivalent: DeepSpeed's drop_tokens applies in training "
                f"and evaluation alike; set eval_capacity_factor=None or a capacity_factor"
            )
        if self.drop_policy != "position":
            raise ValueError(
                f"drop_policy={self.drop_policy!r} has no DeepSpeed-MoE equivalent; "
                f"use drop_policy='position'"
            )
        deepspeed_normalizes = self.top_k > 1
        if self.normalize_top_k != deepspeed_normalizes:
            what = (
                "renormalises the gate weights over the chosen top_k >= 2 experts"
                if deepspeed_normalizes
                else "weights the top-1 expert by its full-softmax probability (no renormalising)"
            )
            raise ValueError(
                f"normalize_top_k={self.normalize_top_k} with top_k={self.top_k} has no "
                f"DeepSpeed-MoE equivalent: DeepSpeed's gate always {what}; use "
                f"normalize_top_k={deepspeed_normalizes}"
            )
        train_factor = 1.0 if self.capacity_factor is None else float(self.capacity_factor)
        eval_factor = (
            float(self.eval_capacity_factor)
            if self.eval_capacity_factor is not None
            else train_factor
        )
        return {
            "num_experts": self.num_experts,
            "ep_size": layout.ep,
            "k": self.top_k,
            "capacity_factor": train_factor,
            "eval_capacity_factor": eval_factor,
            "min_capacity": self.min_capacity,
            "drop_tokens": self.capacity_factor is not None,
            "use_rts": False,
            "noisy_gate_policy": None,
            "use_residual": False,
            "enable_expert_tensor_parallelism": layout.tp > 1,
            "top2_2nd_expert_sampling": False,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class MegatronAdapterConfig:
    """The layout (and optional router) a Megatron-LM launch should use, as one object.

    A dense model (no router) may not use expert parallelism: Megatron-LM refuses
    ``--expert-model-parallel-size`` above 1 without ``--num-experts``. With a router,
    ``num_moe_layers`` (the model's number of MoE layers) is required: it scales the
    router's loss weights (see :meth:`MoERouterConfig.to_megatron`).

    Example:
        >>> adapter = MegatronAdapterConfig(parallel_layout=ParallelLayout(tp=2, pp=2))
        >>> adapter.to_args()[:2]
        ['--tensor-model-parallel-size', '2']
    """

    parallel_layout: ParallelLayout
    router: MoERouterConfig | None = None
    num_moe_layers: int | None = None

    def __post_init__(self) -> None:
        _check_layout(self.parallel_layout)
        if self.router is None:
            if self.num_moe_layers is not None:
                check_int("num_moe_layers", self.num_moe_layers, 1)
            if self.parallel_layout.ep > 1:
                raise ValueError(
                    f"expert_parallel_size={self.parallel_layout.ep} needs a router (Megatron-LM "
                    f"refuses expert parallelism without --num-experts); pass router= or use ep=1"
                )
            return
        if not isinstance(self.router, MoERouterConfig):
            raise TypeError(
                f"router must be a MoERouterConfig or None, got {type(self.router).__name__}"
            )
        self.router.validate_layout(self.parallel_layout)
        object.__setattr__(self, "num_moe_layers", _moe_layers(self.num_moe_layers))

    def to_args(self) -> list[str]:
        """Megatron-LM argv for the layout, plus the MoE flags when a router is set."""
        if self.router is None:
            return self.parallel_layout.to_megatron_args()
        return self.router.to_megatron(self.parallel_layout, num_moe_layers=self.num_moe_layers)


def _moe_layers(num_moe_layers: Any) -> int:
    if num_moe_layers is None:
        raise ValueError(
            "num_moe_layers is required with a router: the model's number of MoE layers (its "
            "num_hidden_layers), since Megatron-LM adds every layer's load-balancing and z "
            "losses where this model averages them; e.g. num_moe_layers=32"
        )
    return check_int("num_moe_layers", num_moe_layers, 1)


def _fmt(value: float) -> str:
    # 12 significant digits: 0.01 * 3 is written 0.03, not 0.030000000000000002.
    return repr(float(f"{float(value):.12g}"))


# XLA:CPU's concurrency-optimized scheduler can let the device threads of one program enter
# independent collectives (say a tp psum and a dp gradient all-reduce) in different orders;
# with fake devices sharing a few cores the rendezvous then deadlocks and aborts after 40 s.
_CPU_SAFE_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def cpu_xla_flags(device_count: int, existing: str = "") -> str:
    """``XLA_FLAGS`` for ``device_count`` fake CPU devices, on top of ``existing`` flags.

    Sets ``--xla_force_host_platform_device_count`` (replacing a smaller count) and the
    scheduler flag above. Set the result as the ``XLA_FLAGS`` environment variable before JAX
    starts its CPU backend; :func:`set_cpu_devices` does that and also sizes XLA's thread pools,
    which fake devices need as well.

    Example:
        >>> cpu_xla_flags(8).split()[-1]
        '--xla_force_host_platform_device_count=8'
    """
    flags = existing.split()
    match = _DEVICE_COUNT_FLAG.search(existing)
    if match and int(match.group(1)) >= device_count:
        device_count = int(match.group(1))
    flags = [f for f in flags if not _DEVICE_COUNT_FLAG.fullmatch(f)]
    for flag in _CPU_SAFE_FLAGS:
        name = flag.split("=")[0]
        if not any(f.split("=")[0] == name for f in flags):
            flags.append(flag)
    if device_count > 1:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    return " ".join(flags)


# Threads per fake device in XLA:CPU's pools (see set_cpu_devices).
_THREADS_PER_FAKE_DEVICE = 4


def set_cpu_devices(device_count: int, environ: MutableMapping[str, str] | None = None) -> None:
    """Sets up ``device_count`` fake CPU devices: call it before JAX starts its CPU backend.

    Sets ``XLA_FLAGS`` to :func:`cpu_xla_flags` of the current flags and, for more than one
    device, ``NPROC`` (the size XLA:CPU gives its thread pools; default: the core count) to
    at least 4 threads per device, keeping a larger value. XLA:CPU can run two independent
    collectives of one program at once on a device, each holding a pool thread while it waits
    for the other devices; with more fake devices than cores the pool ran out and the devices
    waited on each other until XLA aborted the process (a PPO step with a separate critic on
    4 devices with tp and ep of 2, on 2 cores). ``environ``: default ``os.environ``.

    Example:
        >>> env = {}
        >>> set_cpu_devices(8, env)
        >>> int(env["NPROC"]) >= 32, env["XLA_FLAGS"].split()[-1]
        (True, '--xla_force_host_platform_device_count=8')
    """
    device_count = check_int("device_count", device_count, 1)
    environ = os.environ if environ is None else environ
    environ["XLA_FLAGS"] = cpu_xla_flags(device_count, environ.get("XLA_FLAGS", ""))
    if device_count > 1:
        current = environ.get("NPROC", "")
        threads = max(_THREADS_PER_FAKE_DEVICE * device_count, os.cpu_count() or 1)
        if not (current.isdigit() and int(current) >= threads):
            environ["NPROC"] = str(threads)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_host_memory() -> bool:
    """Makes glibc keep freed host memory for reuse instead of handing it back to the OS.

    XLA:CPU mallocs every buffer of every call (an MoE block's residuals, weight-gradient slabs
    and outputs run to 100+ MiB a call at 4096 tokens). By default glibc serves requests above
    32 MiB with fresh ``mmap`` pages, returns freed memory at the top of its heap to the OS, and
    gives each thread its own heap, so such buffers come back as fresh pages on every call, and
    the kernel zero-fills fresh pages one page fault at a time: a 64 MiB gradient buffer cost
    ~18 ms of page faults per call on a 2-core VM, against ~4 ms to fill reused memory. This
    sets ``M_MMAP_MAX`` to 0 (every request from the heap), ``M_TRIM_THRESHOLD`` to 2 GiB (no
    shrinking) and ``M_ARENA_MAX`` to 1 (one heap for all threads, so memory XLA's worker
    threads free is reused by the next call). The costs: the process keeps its peak host
    memory until it exits, and threads that allocate at the same time share one lock.
    Process-wide; a no-op (False) without glibc.

    Call it once at start-up, before JAX runs its first computation: threads that already hold
    a heap of their own keep it (the training command line calls it on CPU; the MoE-block and
    GRPO-step benchmarks call it first thing unless given ``--keep-malloc``).

    Returns:
        True if glibc accepted the settings.

    Example:
        First thing in a training script, before any JAX computation::

            from novarl_jax.core.distributed import reuse_host_memory

            reuse_host_memory()
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc-like (macOS, Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all(mallopt(option, value) == 1 for option, value in settings)


def host_array(x: Any) -> Any:
    """``x`` as a NumPy array holding all of its values, on every process.

    A ``jax.Array`` spread over several processes' devices (a multi-process run) is gathered
    from all of them (every process must call this for the same arrays in the same order);
    anything else is read locally. Host-side work (decoding, rewards, logged statistics) reads
    device arrays through this.
    """
    import jax
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize_multihost(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = None,
) -> None:
    """Starts ``jax.distributed`` for a multi-process run (a no-op for one process).

    On TPU VMs and SLURM the arguments are discovered by JAX and may be left out. For several
    CPU processes on one machine, pass ``cpu_collectives='gloo'``. JAX's preemption service is
    turned off: its SIGTERM handler would keep the signal from the trainer's, which stops
    every process after the same step (:mod:`novarl_jax.trainer.stop`).
    """
    import jax

    if num_processes is not None and num_processes <= 1:
        return
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
