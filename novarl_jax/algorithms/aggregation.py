"""Token-loss aggregation that does not depend on how a batch is split.

A policy-gradient loss is a matrix ``L`` ``[B, T]`` of per-token terms and a mask ``m``
(1 = a real generated token). The aggregation mode says how it becomes one number. With
``N_tok = sum(m)`` the valid tokens and ``N_seq`` the sequences holding at least one valid token,
*both counted over the whole mini-batch* (one optimizer step), and ``n_b = sum_t m[b, t]``:

==============================  ================================================  ============
mode                            loss                                              used by
==============================  ================================================  ============
``'token-mean'``                ``sum_{b,t} m L / N_tok``                         DAPO, verl
``'seq-mean-token-sum'``        ``sum_b (sum_t m L) / N_seq``                     --
``'seq-mean-token-mean'``       ``sum_b (sum_t m L / n_b) / N_seq``               GRPO paper
``'seq-mean-token-sum-norm'``   ``sum_{b,t} m L / (N_seq * S)``                   Dr. GRPO
==============================  ================================================  ============

``S`` (``loss_scale_factor``) is a constant length, normally the maximum response length, so
Dr. GRPO (Liu et al., 2025) weights every token alike whatever the response lengths; it
defaults to ``T``, the padded length of the mask. DAPO (Yu et al., 2025) argues for
``'token-mean'``; the GRPO paper (Shao et al., 2024) averages per sequence first.

Why the split does not matter: in every mode the numerator is a sum of per-row terms (each row's
term depends only on that row), and the denominator is computed once from the whole
mini-batch's mask by :func:`loss_denominators`. A micro-batch's loss is its rows' share of the
numerator over the *global* denominator, so summing the micro-batches' losses (and gradients)
gives exactly the full mini-batch's loss (and gradient), however the rows are split into
micro-batches or shards and however many rows are pure padding. The alternative, averaging
per-micro-batch means, weights tokens by how full their micro-batch happened to be (the bug
class of verl issues #5625 and #7200). Under ``jit`` with the batch sharded over a mesh, the
sums in :func:`aggregate` and :func:`loss_denominators` reduce over every shard, so a sharded
batch needs nothing extra; micro-batches need the global denominators passed in, which
:func:`split_micro_batches` attaches to each micro-batch as ``batch['loss_denominators']``.

Metrics follow the same contract: every metric of the loss functions is a per-token mean over
the global ``N_tok`` (or the aggregated loss), so a full mini-batch's metric is the *sum* of its
micro-batches' metrics, except names ending in ``_max`` or ``_min`` (combine with ``max`` or
``min``, :func:`extreme_of`); :func:`combine_micro_batch_metrics` does that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "LOSS_AGG_MODES",
    "LossDenominators",
    "aggregate",
    "check_loss_agg_mode",
    "combine_micro_batch_metrics",
    "extreme_of",
    "loss_denominators",
    "masked_max",
    "masked_mean",
    "split_micro_batches",
]

LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


class LossDenominators(NamedTuple):
    """The global counts a mini-batch's losses are divided by (float32 scalars).

    Attributes:
        num_tokens: valid tokens in the whole mini-batch (``N_tok``).
        num_sequences: sequences with at least one valid token in the whole mini-batch
            (``N_seq``).
    """

    num_tokens: jax.Array
    num_sequences: jax.Array


def check_loss_agg_mode(mode: str, name: str = "loss_agg_mode") -> None:
    """Raises ValueError when ``mode`` is not one of :data:`LOSS_AGG_MODES`."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"{name}={mode!r} is not one of {list(LOSS_AGG_MODES)}")


def _check_pair(loss_mat: jax.Array, mask: jax.Array) -> None:
    if loss_mat.ndim != 2 or loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss_mat and mask must both have shape [B, T], got {loss_mat.shape} and {mask.shape}"
        )


def loss_denominators(mask: ArrayLike) -> LossDenominators:
    """Counts the valid tokens and non-empty sequences of a whole mini-batch.

    Call it once on the full mini-batch's mask (before splitting into micro-batches) and pass
    the result to every micro-batch's loss.

    Args:
        mask: ``[B, T]``; nonzero = a real generated token.

    Returns:
        :class:`LossDenominators` of float32 scalars.
    """
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape [B, T], got {mask.shape}")
    valid = mask != 0
    return LossDenominators(
        num_tokens=jnp.sum(valid, dtype=jnp.float32),
        num_sequences=jnp.sum(jnp.any(valid, axis=1), dtype=jnp.float32),
    )


def aggregate(
    loss_mat: ArrayLike,
    mask: ArrayLike,
    mode: str = "token-mean",
    *,
    denominators: LossDenominators | None = None,
    loss_scale_factor: float | None = None,
) -> jax.Array:
    """Reduces a per-token loss matrix to a scalar (formulas in the module docstring).

    Args:
        loss_mat: ``[B, T]`` per-token losses.
        mask: ``[B, T]``; nonzero = a token that counts. Masked entries never reach the result,
            even when they hold NaN.
        mode: one of :data:`LOSS_AGG_MODES`.
        denominators: the whole mini-batch's counts from :func:`loss_denominators`; None
            computes them from ``mask`` (right when ``loss_mat`` is the whole mini-batch).
        loss_scale_factor: ``S`` of ``'seq-mean-token-sum-norm'``; None = ``T``.

    Returns:
        float32 scalar. An empty batch gives 0.

    Raises:
        ValueError: an unknown mode, shapes that are not one ``[B, T]``, or a
            ``loss_scale_factor`` that is not positive.

    Example:
        >>> aggregate(jnp.array([[1.0, 3.0], [5.0, 0.0]]), jnp.array([[1, 1], [1, 0]]),
        ...           "seq-mean-token-mean").tolist()
        3.5
    """
    check_loss_agg_mode(mode, "mode")
    loss_mat = jnp.asarray(loss_mat, jnp.float32)
    mask = jnp.asarray(mask)
    _check_pair(loss_mat, mask)
    if (
        loss_scale_factor is not None
        and not isinstance(loss_scale_factor, jax.core.Tracer)  # traced: checked by the caller
        and (isinstance(loss_scale_factor, (bool, str)) or not loss_scale_factor > 0)
    ):
        raise ValueError(f"loss_scale_factor must be > 0 or None, got {loss_scale_factor!r}")
    if denominators is None:
        denominators = loss_denominators(mask)
    elif not isinstance(denominators, LossDenominators):
        raise TypeError(
            f"denominators must be a LossDenominators (from loss_denominators or "
            f"split_micro_batches), got {type(denominators).__name__}"
        )
    valid = mask != 0
    masked = jnp.where(valid, loss_mat, 0.0)
    row_sums = jnp.sum(masked, axis=1)
    num_sequences = jnp.maximum(denominators.num_sequences, 1.0)
    if mode == "token-mean":
        return jnp.sum(row_sums) / jnp.maximum(denominators.num_tokens, 1.0)
    if mode == "seq-mean-token-sum":
        return jnp.sum(row_sums) / num_sequences
    if mode == "seq-mean-token-mean":
        row_counts = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.float32), 1.0)
        return jnp.sum(row_sums / row_counts) / num_sequences
    scale = loss_mat.shape[1] if loss_scale_factor is None else loss_scale_factor
    return jnp.sum(row_sums) / (num_sequences * jnp.asarray(scale, jnp.float32))


def masked_mean(
    x: ArrayLike, mask: ArrayLike, *, denominators: LossDenominators | None = None
) -> jax.Array:
    """``sum(m * x) / N_tok``: the token mean used for metrics (``'token-mean'``)."""
    return aggregate(x, mask, "token-mean", denominators=denominators)


def masked_max(x: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Maximum of ``x`` over the valid tokens; ``-inf`` when there are none (an empty batch
    too). ``x`` and ``mask`` have one shape (a ``[B, 1]`` mask would broadcast silently)."""
    if np.shape(x) != np.shape(mask):
        raise ValueError(f"x {np.shape(x)} and mask {np.shape(mask)} must have one shape")
    x = jnp.asarray(x, jnp.float32)
    return jnp.max(jnp.where(jnp.asarray(mask) != 0, x, -jnp.inf), initial=-jnp.inf)


def split_micro_batches(
    batch: Mapping[str, Any],
    num_micro_batches: int,
    *,
    mask_key: str = "response_mask",
) -> dict[str, Any]:
    """Splits a mini-batch into micro-batches that carry the global loss denominators.

    Every leaf of ``batch`` must have the batch dimension first. The result stacks the
    micro-batches on a new leading axis (``[num_micro_batches, B / num_micro_batches, ...]``),
    ready for ``jax.lax.scan`` or indexing, and adds ``'loss_denominators'`` (counted once over
    the whole mini-batch, repeated per micro-batch). Summing the micro-batch losses and
    gradients then reproduces the full mini-batch's loss and gradient; do not average them.

    Args:
        batch: mapping of arrays ``[B, ...]`` including ``mask_key``.
        num_micro_batches: how many consecutive-row micro-batches; must divide B.
        mask_key: the key whose ``[B, T]`` mask defines the denominators.

    Returns:
        A dict with the same keys (each ``[num_micro_batches, B / num_micro_batches, ...]``)
        plus ``'loss_denominators'`` (:class:`LossDenominators` of ``[num_micro_batches]``).

    Raises:
        ValueError: a missing mask, a leaf without the batch dimension, or a count that does
            not divide B.

    Example:
        >>> mb = split_micro_batches({"response_mask": jnp.ones((4, 3))}, 2)
        >>> mb["response_mask"].shape, mb["loss_denominators"].num_tokens.tolist()
        ((2, 2, 3), [12.0, 12.0])
    """
    if mask_key not in batch:
        raise ValueError(f"batch has no {mask_key!r}; keys: {sorted(batch)}")
    if (
        isinstance(num_micro_batches, bool)
        or not isinstance(num_micro_batches, int)
        or (num_micro_batches < 1)
    ):
        raise ValueError(f"num_micro_batches must be an integer >= 1, got {num_micro_batches!r}")
    batch = {k: v for k, v in batch.items() if k != "loss_denominators"}
    batch_size = np.shape(batch[mask_key])[0]
    if batch_size % num_micro_batches:
        raise ValueError(
            f"num_micro_batches={num_micro_batches} does not divide the batch size {batch_size}"
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = np.shape(leaf)
        if not shape or shape[0] != batch_size:
            raise ValueError(
                f"every batch entry needs the batch dimension {batch_size} first; "
                f"{jax.tree_util.keystr(path)} has shape {shape}"
            )
    denominators = loss_denominators(batch[mask_key])
    micro = batch_size // num_micro_batches

    def split(x):
        x = jnp.asarray(x)
        return x.reshape((num_micro_batches, micro) + x.shape[1:])

    out = jax.tree.map(split, batch)
    out["loss_denominators"] = jax.tree.map(
        lambda d: jnp.broadcast_to(d, (num_micro_batches,)), denominators
    )
    return out


def extreme_of(name: str) -> str | None:
    """``'max'`` or ``'min'`` for a metric name ending in ``_max`` or ``_min``: such metrics
    combine across micro-batches, updates or steps by that extreme; others by a sum or mean."""
    for extreme in ("max", "min"):
        if name.endswith("_" + extreme):
            return extreme
    return None


def combine_micro_batch_metrics(
    metrics: Sequence[Mapping[str, ArrayLike]] | Mapping[str, ArrayLike],
) -> dict[str, jax.Array]:
    """Combines the metrics of a mini-batch's micro-batches into the mini-batch's metrics.

    Metrics computed with the global denominators are additive: the sum over micro-batches is
    the full mini-batch's value. Names ending in ``_max`` combine with ``max`` and ``_min`` with
    ``min``.

    Args:
        metrics: a list of per-micro-batch metric dicts, or one dict of stacked
            ``[num_micro_batches]`` arrays (the output of ``jax.lax.scan``).

    Returns:
        dict of float32 scalars.
    """
    if isinstance(metrics, Mapping):
        stacked = {k: jnp.asarray(v) for k, v in metrics.items()}
    else:
        if not metrics:
            raise ValueError("metrics must hold at least one micro-batch")
        names = set(metrics[0])
        for index, m in enumerate(metrics):
            if set(m) != names:
                raise ValueError(
                    f"micro-batch {index}'s metrics have keys {sorted(m)}, micro-batch 0's "
                    f"{sorted(names)}; every micro-batch must report the same metrics"
                )
        stacked = {k: jnp.stack([jnp.asarray(m[k]) for m in metrics]) for k in metrics[0]}
    reduce = {"max": jnp.max, "min": jnp.min, None: jnp.sum}
    return {name: reduce[extreme_of(name)](values) for name, values in stacked.items()}
