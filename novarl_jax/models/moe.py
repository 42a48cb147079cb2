"""Mixture-of-Experts block: top-k router, expert capacity, sort-based dispatch, expert parallel.

The block computes, for every real token ``t`` (Mixtral; Jiang et al., 2024)::

    logits_t = x_t @ W_r                                  (float32)           [E]
    e_t1..e_tK = top-K experts of logits_t
    g_tk = softmax_k(logits_t[e_tk])       (router.normalize_top_k, Mixtral)
         = softmax(logits_t)[e_tk]         (otherwise)
    y_t = sum_k keep_tk * g_tk * FFN_{e_tk}(x_t)
    FFN_e(x) = (silu(x @ W1_e) * (x @ W3_e)) @ W2_e     (SwiGLU; Shazeer, 2020)

``keep_tk`` is 0 when expert ``e_tk`` was full (GShard, Lepikhin et al., 2020; Switch
Transformer, Fedus et al., 2021): within a routing group (the tokens of one batch shard over
``('dp', 'ep')``; the whole batch on one device) each expert accepts at most
``C = router.capacity(real_tokens_in_group)`` choices; the rest are dropped and contribute
zeros (the residual stream carries the token). ``drop_policy`` decides who loses:
``'position'`` keeps the earliest tokens of the group, ``'probs'`` keeps the choices with the
largest gate weight ``g_tk`` (ties by position), as Megatron-LM does.
Padding tokens (``token_mask`` 0) are never routed, take no slot, do not count towards ``C``
(a padded batch gets the configured factor on its real tokens, as with padding removed) and
output zeros.

Dispatch is sort based and costs O(T * K * D) memory: the T*K choices are sorted by
(expert, priority) with one ``lax.sort``; a choice's slot in its expert is its rank in the
sorted order minus the expert's first rank. Tokens are gathered into an expert-sorted buffer,
the experts run over it, and outputs are gathered back per choice and summed with the gate
weights. Both gathers have custom VJPs that are gathers too (a token -> row map is a partial
bijection), so the backward pass has no scatter.

The experts (``impl='dense'``) run in a loop over experts; each expert's rows go through in a
few large chunks of two plain 2D matmuls each (gate and up fused in one), which XLA runs near
its matmul peak on CPU, and a custom VJP runs the four backward matmuls per chunk and adds the
weight gradients into the expert's slab in place. Two buffer layouts:

* capacity slabs ``[E, C, D]``: C rows per expert. Used when experts are split over an ``ep``
  mesh axis (the ``all_to_all`` needs fixed slabs; dropless routing then takes the worst case
  C = tokens of the group).
* grouped rows: experts one after another, each padded to a whole number of small blocks and
  run as power-of-two chunks of blocks. Used without expert parallelism, dropless or not, so
  only the kept choices are computed plus a few percent of padding, rather than a worst-case
  capacity (dropless) or every expert's full C rows (capacity 1.25 computes 25% padding).

Under expert parallelism, small routing groups (at most ``_SLOT_MAX_CHOICES`` choices T*K,
e.g. decoding one token per sequence) shrink their capacity slabs: dropless routing would
otherwise send every expert a worst-case slab of T rows. They use capacity slots cut to
``[E, c, D]``, c the smallest of a few sizes that holds the busiest expert's load (a
``lax.switch`` over the sizes), and run all experts as one batched matmul pair. Routing, drops
and statistics are the capacity layout's, so the results are the same as the other layouts'.
Without expert parallelism small groups take the grouped rows like any other: inside a model
they computed less there than over slabs sized to the busiest expert, and routing that
crowds a few experts makes those slabs several times the useful rows.

``impl='ragged'`` runs the grouped rows unpadded through :func:`jax.lax.ragged_dot` (grouped
matmul kernels on GPU/TPU; on CPU it is about ten times slower than the dense loop).

Parameters (all stacked over experts)::

    router     [D, E]        HF: gate.weight [E, D] transposed
    w_gate_up  [E, D, 2, F]  [e, :, 0, :] = HF experts.e.w1.weight.T (gate),
                             [e, :, 1, :] = HF experts.e.w3.weight.T (up);
                             transformers v5 fused experts.gate_up_proj [E, 2F, D]
                             (gate rows first) = w_gate_up.reshape(E, D, 2F).transpose(0, 2, 1)
    w_down     [E, F, D]     [e] = HF experts.e.w2.weight.T; v5 experts.down_proj [E, D, F]
                             = w_down.transpose(0, 2, 1)

Gate and up are one tensor so that both projections are a single matmul. They are kept on a
separate axis of size 2 (rather than one 2F axis) so that sharding F over ``tp`` leaves every
shard with matching gate and up columns. :func:`moe_params_from_per_expert`,
:func:`moe_params_to_per_expert`, :func:`moe_params_from_fused` and
:func:`moe_params_to_fused` convert to and from Hugging Face's layouts.

With a mesh, :func:`moe_forward` runs :func:`moe_forward_local` inside :func:`jax.shard_map`:
every shard of the batch (sharded over ``('dp', 'ep')``) routes its own tokens, an
``all_to_all`` over ``ep`` sends each expert's slab to the shard that holds the expert, the
``E / ep`` local experts run over their ``ep * C`` rows with F sharded over ``tp``, a second
``all_to_all`` brings the outputs back, and a ``psum`` over ``tp`` of the combined [T, D]
output completes the down projection.
``pp`` (and any other axis) is treated as replicated. Auxiliary statistics are summed over the
data axes, so they are the same as on a single device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from novarl_jax.core import sharding as shd
from novarl_jax.core.distributed import MoERouterConfig

PARAM_NAMES: tuple[str, ...] = ("router", "w_gate_up", "w_down")
IMPLS: tuple[str, ...] = ("dense", "ragged")
AUX_KEYS: tuple[str, ...] = (
    "aux_loss", "z_loss", "dropped_fraction", "expert_load", "routing", "sums",
)  # fmt: skip

# Initial weights: normal(0, 0.02), Hugging Face's default ``initializer_range``.
_INIT_STDDEV = 0.02


# ----------------------------------------------------------------------------------------------
# Parameters


def init_moe_params(
    key: jax.Array,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
    """Random MoE-block parameters, normal(0, 0.02) like Hugging Face's initialiser.

    Args:
        key: PRNG key.
        hidden_size: D, model width.
        intermediate_size: F, hidden width of each expert.
        num_experts: E.
        dtype: parameter dtype.

    Returns:
        ``{'router': [D, E], 'w_gate_up': [E, D, 2, F], 'w_down': [E, F, D]}`` of ``dtype``.

    Example:
        >>> params = init_moe_params(jax.random.key(0), 16, 32, 4)
        >>> params["w_gate_up"].shape
        (4, 16, 2, 32)
    """
    for name, value in (
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_experts", num_experts),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    k_router, k_gate_up, k_down = jax.random.split(key, 3)
    d, f, e = int(hidden_size), int(intermediate_size), int(num_experts)

    def normal(k, shape):
        return (_INIT_STDDEV * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    return {
        "router": normal(k_router, (d, e)),
        "w_gate_up": normal(k_gate_up, (e, d, 2, f)),
        "w_down": normal(k_down, (e, f, d)),
    }


def moe_logical_axes() -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of each parameter (see :mod:`novarl_jax.core.sharding`).

    Experts are split over ``EXPERT`` (the ``ep`` mesh axis), each expert's hidden units over
    ``MLP`` (``tp``); the model width is ``EMBED``. The router is replicated.

    Example:
        >>> moe_logical_axes()["w_down"]
        ('expert', 'mlp', 'embed')
    """
    return {
        "router": (shd.EMBED, None),
        "w_gate_up": (shd.EXPERT, shd.EMBED, None, shd.MLP),
        "w_down": (shd.EXPERT, shd.MLP, shd.EMBED),
    }


def _namespace(*arrays: Any):
    """jax.numpy if any input is a JAX array, else NumPy (so converters keep host arrays)."""
    leaves = jax.tree.leaves(arrays)
    return jnp if any(isinstance(a, jax.Array) for a in leaves) else np


def _stack(xp, value: Any, name: str, ndim: int):
    if isinstance(value, list | tuple):
        value = xp.stack([xp.asarray(v) for v in value])
    value = xp.asarray(value)
    if value.ndim != ndim:
        raise ValueError(
            f"{name} must be stacked over experts with {ndim} dims (or a sequence of "
            f"{ndim - 1}-dim per-expert arrays), got shape {tuple(value.shape)}"
        )
    return value


def moe_params_from_per_expert(router: ArrayLike, w1: Any, w3: Any, w2: Any) -> dict[str, Any]:
    """Converts Hugging Face's per-expert Mixtral weights to MoE-block parameters.

    Hugging Face ``nn.Linear`` weights are ``[out, in]``: ``block_sparse_moe.gate.weight``
    is [E, D], ``experts.e.w1.weight`` (gate) and ``experts.e.w3.weight`` (up) are [F, D],
    ``experts.e.w2.weight`` (down) is [D, F]. Pure: NumPy in -> NumPy out, JAX in -> JAX out;
    dtypes are kept.

    Args:
        router: [E, D] router (``gate.weight``).
        w1: [E, F, D] or a sequence of E arrays [F, D].
        w3: [E, F, D] or a sequence of E arrays [F, D].
        w2: [E, D, F] or a sequence of E arrays [D, F].

    Returns:
        ``{'router': [D, E], 'w_gate_up': [E, D, 2, F], 'w_down': [E, F, D]}``.

    Example:
        >>> e, d, f = 4, 16, 32
        >>> p = moe_params_from_per_expert(np.zeros((e, d)), np.zeros((e, f, d)),
        ...                                np.zeros((e, f, d)), np.zeros((e, d, f)))
        >>> p["w_gate_up"].shape
        (4, 16, 2, 32)
    """
    xp = _namespace(router, w1, w3, w2)
    router = _stack(xp, router, "router", 2)
    w1, w3, w2 = (_stack(xp, w, n, 3) for w, n in ((w1, "w1"), (w3, "w3"), (w2, "w2")))
    e, d = router.shape
    f = w1.shape[1]
    expected = {"w1": (e, f, d), "w3": (e, f, d), "w2": (e, d, f)}
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if tuple(w.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(w.shape)}; with router [E, D] = [{e}, {d}] and "
                f"w1 [E, F, D] it must be {expected[name]}"
            )
    gate_up = xp.stack([w1, w3], axis=1)  # [E, 2, F, D]
    return {
        "router": xp.transpose(router),
        "w_gate_up": xp.transpose(gate_up, (0, 3, 1, 2)),
        "w_down": xp.transpose(w2, (0, 2, 1)),
    }


def moe_params_to_per_expert(params: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """Inverse of :func:`moe_params_from_per_expert`.

    Returns:
        ``(router [E, D], w1 [E, F, D], w3 [E, F, D], w2 [E, D, F])`` in Hugging Face's
        ``[out, in]`` orientation; index the leading axis for ``experts.e.w*.weight``.
    """
    xp = _namespace(params)
    router, gate_up, down = (xp.asarray(params[k]) for k in PARAM_NAMES)
    return (
        xp.transpose(router),
        xp.transpose(gate_up[:, :, 0, :], (0, 2, 1)),
        xp.transpose(gate_up[:, :, 1, :], (0, 2, 1)),
        xp.transpose(down, (0, 2, 1)),
    )


def moe_params_from_fused(
    router: ArrayLike, gate_up_proj: ArrayLike, down_proj: ArrayLike
) -> dict[str, Any]:
    """Converts transformers v5's fused Mixtral experts to MoE-block parameters.

    transformers v5 stores ``mlp.gate.weight`` [E, D], ``mlp.experts.gate_up_proj``
    [E, 2F, D] (the F gate rows first, then the F up rows) and ``mlp.experts.down_proj``
    [E, D, F].

    Returns:
        ``{'router': [D, E], 'w_gate_up': [E, D, 2, F], 'w_down': [E, F, D]}``.
    """
    xp = _namespace(router, gate_up_proj, down_proj)
    router = _stack(xp, router, "router", 2)
    gate_up_proj = _stack(xp, gate_up_proj, "gate_up_proj", 3)
    down_proj = _stack(xp, down_proj, "down_proj", 3)
    e, d = router.shape
    if gate_up_proj.shape[0] != e or gate_up_proj.shape[2] != d or gate_up_proj.shape[1] % 2:
        raise ValueError(
            f"gate_up_proj has shape {tuple(gate_up_proj.shape)}; with router [E, D] = "
            f"[{e}, {d}] it must be [{e}, 2F, {d}]"
        )
    f = gate_up_proj.shape[1] // 2
    if tuple(down_proj.shape) != (e, d, f):
        raise ValueError(
            f"down_proj has shape {tuple(down_proj.shape)}; it must be [E, D, F] = {(e, d, f)}"
        )
    return {
        "router": xp.transpose(router),
        "w_gate_up": xp.transpose(xp.reshape(gate_up_proj, (e, 2, f, d)), (0, 3, 1, 2)),
        "w_down": xp.transpose(down_proj, (0, 2, 1)),
    }


def moe_params_to_fused(params: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Inverse of :func:`moe_params_from_fused`.

    Returns:
        ``(router [E, D], gate_up_proj [E, 2F, D], down_proj [E, D, F])``.
    """
    xp = _namespace(params)
    router, gate_up, down = (xp.asarray(params[k]) for k in PARAM_NAMES)
    e, d, _, f = gate_up.shape
    return (
        xp.transpose(router),
        xp.reshape(xp.transpose(gate_up, (0, 2, 3, 1)), (e, 2 * f, d)),
        xp.transpose(down, (0, 2, 1)),
    )


# ----------------------------------------------------------------------------------------------
# Gathers whose transposes are gathers


def _take_rows(src: jax.Array, index: jax.Array) -> jax.Array:
    """``src[index]`` along axis 0; an index equal to ``len(src)`` reads a row of zeros."""
    return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _dispatch(x: jax.Array, token_of_row: jax.Array, row_of_choice: jax.Array) -> jax.Array:
    """Buffer rows from tokens: ``buf[r] = x[token_of_row[r]]`` (sentinel T -> zeros).

    ``row_of_choice`` [T, K] is the inverse map (sentinel R = unplaced), used by the VJP:
    ``dx[t] = sum_k dbuf[row_of_choice[t, k]]``, a gather instead of a scatter-add.
    """
    return _take_rows(x, token_of_row)


def _dispatch_fwd(x, token_of_row, row_of_choice):
    return _take_rows(x, token_of_row), row_of_choice


def _dispatch_bwd(row_of_choice, dbuf):
    return _take_rows(dbuf, row_of_choice).sum(axis=1), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _collect(out: jax.Array, row_of_choice: jax.Array, choice_of_row: jax.Array) -> jax.Array:
    """Per-choice expert outputs: ``[T, K, D] = out[row_of_choice]`` (sentinel R -> zeros).

    ``choice_of_row`` [R] (sentinel T*K) is the inverse map used by the VJP.
    """
    return _take_rows(out, row_of_choice)


def _collect_fwd(out, row_of_choice, choice_of_row):
    return _take_rows(out, row_of_choice), choice_of_row


def _collect_bwd(choice_of_row, dchoices):
    flat = dchoices.reshape(-1, dchoices.shape[-1])
    return _take_rows(flat, choice_of_row), None, None


_collect.defvjp(_collect_fwd, _collect_bwd)


# ----------------------------------------------------------------------------------------------
# Routing plan: where every choice goes (integer bookkeeping, no gradients)


class _Plan(NamedTuple):
    """Integer maps between choices (t, k) and buffer rows, plus per-expert counts."""

    row_of_choice: jax.Array  # [T, K] int32, R = not placed (dropped or padding)
    choice_of_row: jax.Array  # [R] int32, T*K = empty row
    counts: jax.Array  # [E] int32, non-padding choices per expert (before dropping)
    kept_per_expert: jax.Array  # [E] int32, placed choices per expert
    kept: jax.Array  # [] int32, placed choices
    first_row: jax.Array | None  # [E] int32, first buffer row of each expert (grouped)
    num_blocks: jax.Array | None  # [E] int32, blocks of each expert (grouped dense)
    group_sizes: jax.Array | None  # [E] int32, rows of each expert (grouped ragged)


def _block_size(rows: int, num_experts: int) -> int:
    """Rows per block of the grouped dense layout (dropless routing).

    Each expert's rows are padded to a whole number of blocks (half a block wasted per
    expert on average) and run in power-of-two chunks of blocks, so small blocks cost little:
    a sixteenth of the mean load per expert keeps the padding near 3%.
    """
    target = max(rows // (16 * num_experts), 1)
    return int(min(max(1 << (target.bit_length() - 1), 8), 64))


def _route_plan(
    experts: jax.Array,
    valid: jax.Array,
    gates: jax.Array,
    *,
    num_experts: int,
    capacity: int,
    limit: jax.Array | int,
    drop_policy: str,
    layout: str,
    block: int,
) -> _Plan:
    """Sorts the choices by (expert, priority) and assigns each a buffer row.

    Args:
        experts: [T, K] int32 chosen experts.
        valid: [T] bool, 1 = a real token.
        gates: [T, K] float32 gate weight of each choice ('probs' policy).
        num_experts: E.
        capacity: C, the most choices an expert can keep: sizes the buffers.
        limit: the most choices an expert keeps in this group (at most ``capacity``; less
            when part of the group is padding), an int or an int32 scalar.
        drop_policy: 'position' or 'probs'.
        layout: 'capacity' ([E, C] slabs), 'blocks' (grouped, padded to ``block``) or
            'ragged' (grouped, unpadded).
        block: rows per block for 'blocks'.
    """
    t, k = experts.shape
    n = t * k
    e = num_experts
    # Padding tokens get the sentinel expert E: they sort last and take no capacity.
    keys = jnp.where(valid[:, None], experts, e).reshape(n).astype(jnp.int32)
    iota = lax.iota(jnp.int32, n)
    if drop_policy == "position":
        sorted_e, order = lax.sort((keys, iota), num_keys=1, is_stable=True)
    else:
        neg_p = -gates.reshape(n).astype(jnp.float32)
        sorted_e, _, order = lax.sort((keys, neg_p, iota), num_keys=2, is_stable=True)
    # starts[j]: first sorted index of expert j; starts[E] = number of non-padding choices.
    # (A scan's while loop costs more than comparing all pairs when there are few choices.)
    method = "compare_all" if n * (e + 1) <= 2**14 else "scan"
    starts = jnp.searchsorted(
        sorted_e, jnp.arange(e + 1, dtype=jnp.int32), side="left", method=method
    )
    starts = starts.astype(jnp.int32)
    counts = starts[1:] - starts[:-1]
    rank = iota - starts[sorted_e]  # rank of each sorted choice within its expert
    kept_e = jnp.minimum(counts, limit)
    placed = (sorted_e < e) & (rank < limit)
    safe_e = jnp.minimum(sorted_e, e - 1)

    first_row = num_blocks = group_sizes = None
    if layout == "capacity":
        rows = e * capacity
        row_sorted = safe_e * capacity + rank
        slot = lax.iota(jnp.int32, capacity)
        src = starts[:e, None] + slot[None, :]
        occupied = slot[None, :] < kept_e[:, None]
        choice_of_row = jnp.where(occupied, order[jnp.minimum(src, n - 1)], n).reshape(rows)
    else:
        # Experts one after another, each padded to whole blocks ('ragged': blocks of 1).
        block = block if layout == "blocks" else 1
        rows = min(n, e * capacity) + e * (block - 1)
        padded = (kept_e + block - 1) // block * block
        ends = jnp.cumsum(padded).astype(jnp.int32)
        first_row = ends - padded
        row_sorted = first_row[safe_e] + rank
        row = lax.iota(jnp.int32, rows)
        # The expert owning each row: the first whose range ends after it.
        row_expert = jnp.minimum(jnp.searchsorted(ends, row, side="right"), e - 1)
        offset = row - first_row[row_expert]
        occupied = offset < kept_e[row_expert]
        src = jnp.clip(starts[row_expert] + offset, 0, n - 1)
        choice_of_row = jnp.where(occupied, order[src], n)
        if layout == "blocks":
            num_blocks = padded // block
        else:
            # Rows past the last expert join it: their input is zero, so they output zero
            # and add nothing to any gradient.
            group_sizes = kept_e.at[e - 1].add(rows - ends[e - 1])

    row_sorted = jnp.where(placed, row_sorted, rows).astype(jnp.int32)
    row_of_choice = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted, unique_indices=True)
    return _Plan(
        row_of_choice=row_of_choice.reshape(t, k),
        choice_of_row=choice_of_row.astype(jnp.int32),
        counts=counts,
        kept_per_expert=kept_e,
        kept=jnp.sum(kept_e),
        first_row=first_row,
        num_blocks=num_blocks,
        group_sizes=group_sizes,
    )


@functools.lru_cache(maxsize=32)
def _capacities(router: MoERouterConfig, positions: int, train: bool) -> np.ndarray:
    """``router.capacity(n)`` for n = 0..positions real tokens, capped as the whole group's
    capacity is (at most ``positions``): int32 [positions + 1], made once per group size."""
    cap = min(router.capacity(positions, train=train), positions)
    table = [min(router.capacity(n, train=train), cap) for n in range(positions + 1)]
    return np.asarray(table, np.int32)


# ----------------------------------------------------------------------------------------------
# Experts


def _swiglu(h: jax.Array) -> jax.Array:
    """``silu(gate) * up`` for ``h [..., 2, F]`` = (gate, up)."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def _swiglu_with_derivatives(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SwiGLU of ``h [b, 2, F]`` and its derivatives w.r.t. (gate, up), stacked [b, 2, F].

    ``d/dgate = up * s * (1 + gate * (1 - s))`` with ``s = sigmoid(gate)``; ``d/dup = silu``.
    Computing them next to the activation (one pass, one exp) keeps the backward pass to a
    single multiply.
    """
    gate, up = h[:, 0], h[:, 1]
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return silu * up, jnp.stack([up * sig * (1 + gate * (1 - sig)), silu], axis=1)


def _zeros(shape: tuple[int, ...], dtype: Any, *refs: jax.Array) -> jax.Array:
    """Zeros that vary over every mesh axis any of ``refs`` varies over.

    Inside ``shard_map`` a loop carry must keep one type, and the loop bodies mix values that
    vary over the data, expert and tensor axes; plain zeros would be replicated. ``full_like``
    of a scalar slice carries its source's axes, and adding the scalars joins them.
    """
    seed = sum(lax.full_like(ref, 0, dtype, shape=()) for ref in refs)
    return jnp.broadcast_to(seed, shape)


def _varying_axes(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)
    if axes is None:  # jax 0.10 keeps them on the manual axis type
        axes = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return frozenset(axes)


def _join_varying(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Casts every array to vary over the union of the mesh axes any of them varies over.

    A custom VJP must return cotangents typed like its inputs. Casting before the call puts
    the reductions a replicated input's gradient needs (a ``psum`` over the axes it was cast
    along, e.g. ``tp`` for the tokens and the data axes for the expert weights) in the
    transpose of the cast, where JAX inserts them.
    """
    union = frozenset().union(*(_varying_axes(a) for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(union - _varying_axes(a)))
        out.append(lax.pcast(a, missing, to="varying") if missing else a)
    return tuple(out)


# A full chunk holds about this many [rows, F] elements (and at least this many rows).
_CHUNK_ELEMENTS = 2**19
_MIN_CHUNK_ROWS = 128


def _chunk_blocks(block: int, max_blocks: int, hidden: int) -> int:
    """Blocks per full chunk: a power of two, at most ``max_blocks``.

    Chunks bound the per-chunk temporaries (the [rows, 2F] gate/up product) so that an
    expert's load, however large, never needs a buffer bigger than a balanced one.
    """
    rows = max(_CHUNK_ELEMENTS // hidden, _MIN_CHUNK_ROWS)
    blocks = max(rows // block, 1)
    return min(1 << (blocks.bit_length() - 1), 1 << (max(max_blocks, 1).bit_length() - 1))


def _expert_ffn_loop(buf, w_gate_up, w_down, first_row, num_blocks, block, max_blocks, residuals):
    """Forward of :func:`_grouped_ffn`; with ``residuals`` also the activations and their
    derivatives for the VJP."""
    rows, d = buf.shape
    f = w_gate_up.shape[-1]
    refs = (buf, w_gate_up, w_down)

    def chunk(carry, start, size, e, wg, wd):
        xb = lax.dynamic_slice_in_dim(buf, start, size)
        h = jnp.dot(xb, wg).reshape(size, 2, f)
        if residuals:
            act, dact = _swiglu_with_derivatives(h)
        else:
            act = _swiglu(h)
        out = jnp.dot(act, wd).astype(buf.dtype)
        new = (lax.dynamic_update_slice_in_dim(carry[0], out, start, 0),)
        if residuals:
            new += (
                lax.dynamic_update_slice_in_dim(carry[1], act.astype(buf.dtype), start, 0),
                lax.dynamic_update_slice_in_dim(carry[2], dact.astype(buf.dtype), start, 0),
            )
        return new

    def expert(e, carry):
        wg, wd = w_gate_up[e].reshape(d, 2 * f), w_down[e]
        count = None if num_blocks is None else num_blocks[e]
        return _over_chunks(
            chunk, carry, first_row[e], count, block, max_blocks, f, e, wg, wd, limit=rows
        )

    init = (_zeros((rows, d), buf.dtype, *refs),)
    if residuals:
        init += (_zeros((rows, f), buf.dtype, *refs), _zeros((rows, 2, f), buf.dtype, *refs))
    return lax.fori_loop(0, w_gate_up.shape[0], expert, init)


def _over_chunks(fn, carry, start, count, block, max_blocks, hidden, *args, limit=None):
    """Runs ``fn(carry, start, size, *args)`` over an expert's rows in chunks.

    The expert owns ``count`` blocks of ``block`` rows from row ``start`` (``count=None``:
    exactly one block, a capacity slab). Full chunks of :func:`_chunk_blocks` blocks run in a
    loop; the remainder runs as a few power-of-two chunks, one conditional chunk each, so an
    expert costs a few large matmuls whatever its load. A remainder at least three quarters
    of the next power of two runs as that one chunk, past the expert's own rows: those rows
    belong to the experts after it (or to no expert), which the caller runs later and which
    overwrite them, so ``fn`` must ignore rows past the expert's end in anything it sums (the
    weight gradients). ``limit`` is the buffer's row count; no chunk runs past it (a slice
    past the end would be shifted back onto rows already computed).
    """
    if count is None:  # a static slab: full chunks, then one static remainder
        step = min(_chunk_blocks(1, block, hidden), block)
        full, rest = divmod(block, step)

        def full_chunk(i, carry):
            return fn(carry, start + i * step, step, *args)

        carry = lax.fori_loop(0, full, full_chunk, carry) if full > 1 else (
            fn(carry, start, step, *args))  # fmt: skip
        return fn(carry, start + full * step, rest, *args) if rest else carry

    big = _chunk_blocks(block, max_blocks, hidden)

    def full_chunk(i, carry):
        return fn(carry, start + i * (big * block), big * block, *args)

    carry = lax.fori_loop(0, count // big, full_chunk, carry)
    start = start + count // big * (big * block)
    rest = count % big
    # Rounding 15 blocks up to one chunk of 16 instead of 8 + 4 + 2 + 1 took 6% off an E=64
    # forward+backward (~16 blocks per expert) on a 2-core CPU; rounding from half up computed
    # so many extra rows that it ran 20% slower.
    for blocks in (1 << k for k in reversed(range(big.bit_length()))):
        size = blocks * block
        full = rest >= blocks
        over = (rest > 0) & (4 * rest >= 3 * blocks) & (start + size <= limit)
        run = full | over
        carry = lax.cond(
            run,
            lambda c, start=start, size=size: fn(c, start, size, *args),
            lambda c: c,
            carry,
        )  # fmt: skip
        start = start + jnp.where(run, size, 0)
        rest = jnp.where(full, rest - blocks, jnp.where(over, 0, rest))
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_ffn(buf, w_gate_up, w_down, first_row, num_blocks, block, max_blocks):
    """SwiGLU experts over expert-sorted rows: buf [R, D] -> [R, D].

    Expert ``e`` owns rows ``[first_row[e], first_row[e] + num_blocks[e] * block)``
    (``num_blocks=None``: exactly ``block`` rows); the output on rows owned by no expert is
    unspecified (a chunk of the last expert may run into them) and must not be read. Each
    chunk is two plain 2D matmuls (gate and up fused in one), which XLA runs near the
    machine's matmul peak; the VJP is a second loop of four matmuls per chunk that
    accumulates the expert's weight gradients in a local slab.
    """
    out = _expert_ffn_loop(buf, w_gate_up, w_down, first_row, num_blocks, block, max_blocks, False)
    return out[0]


def _grouped_ffn_fwd(buf, w_gate_up, w_down, first_row, num_blocks, block, max_blocks):
    out, act, dact = _expert_ffn_loop(
        buf, w_gate_up, w_down, first_row, num_blocks, block, max_blocks, True
    )
    return out, (buf, w_gate_up, w_down, first_row, num_blocks, act, dact)


def _grouped_ffn_bwd(block, max_blocks, res, dout):
    buf, w_gate_up, w_down, first_row, num_blocks, act, dact = res
    rows, d = buf.shape
    f = w_gate_up.shape[-1]
    acc = jnp.promote_types(w_gate_up.dtype, jnp.float32)  # accumulate weight grads in f32
    refs = (buf, dout, w_gate_up, w_down)

    def chunk(carry, start, size, e, wg, wd):
        dbuf, dw_gate_up, dw_down = carry
        xb = lax.dynamic_slice_in_dim(buf, start, size)
        a = lax.dynamic_slice_in_dim(act, start, size)
        da_dh = lax.dynamic_slice_in_dim(dact, start, size)
        do = lax.dynamic_slice_in_dim(dout, start, size)
        if num_blocks is not None:
            # A chunk may run past the expert's rows (see _over_chunks): rows that are not
            # its own add nothing to its weight gradients, and their dx is rewritten later.
            own = lax.iota(jnp.int32, size) < first_row[e] + num_blocks[e] * block - start
            do = jnp.where(own[:, None], do, jnp.zeros((), do.dtype))
        # Weight gradients go straight into the expert's slab (read-modify-write in place).
        dwd = jnp.dot(a.T, do, preferred_element_type=acc)
        dw_down = dw_down.at[e].add(dwd)
        da = jnp.dot(do, wd.T)
        dh = (da[:, None, :] * da_dh).reshape(size, 2 * f)
        dwg = jnp.dot(xb.T, dh, preferred_element_type=acc)
        dw_gate_up = dw_gate_up.at[e].add(dwg)
        dx = jnp.dot(dh, wg.T).astype(dbuf.dtype)
        return lax.dynamic_update_slice_in_dim(dbuf, dx, start, 0), dw_gate_up, dw_down

    def expert(e, carry):
        wg, wd = w_gate_up[e].reshape(d, 2 * f), w_down[e]
        count = None if num_blocks is None else num_blocks[e]
        return _over_chunks(
            chunk, carry, first_row[e], count, block, max_blocks, f, e, wg, wd, limit=rows
        )

    init = (
        _zeros(buf.shape, buf.dtype, *refs),
        _zeros((w_gate_up.shape[0], d, 2 * f), acc, *refs),
        _zeros(w_down.shape, acc, *refs),
    )
    dbuf, dw_gate_up, dw_down = lax.fori_loop(0, w_gate_up.shape[0], expert, init)
    return (
        dbuf,
        dw_gate_up.reshape(w_gate_up.shape).astype(w_gate_up.dtype),
        dw_down.astype(w_down.dtype),
        None,
        None,
    )


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


def _experts_ragged(
    buf: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, group_sizes: jax.Array
) -> jax.Array:
    """SwiGLU experts on expert-sorted rows: buf [R, D] with group sizes [E] -> [R, D]."""
    e, d, _, f = w_gate_up.shape
    h = lax.ragged_dot(buf, w_gate_up.reshape(e, d, 2 * f), group_sizes)
    return lax.ragged_dot(_swiglu(h.reshape(-1, 2, f)), w_down, group_sizes)


# ----------------------------------------------------------------------------------------------
# Small routing groups under expert parallelism (decoding): batched experts over slabs sized
# to the real loads

# Groups of at most this many choices (T * K) take the slot path when experts are split over
# a mesh. Decoding routes one token per sequence, so its groups are a few dozen tokens with a
# handful of choices per expert.
_SLOT_MAX_CHOICES = 256


def _slot_sizes(capacity: int, steps: tuple[int, ...] = (4, 5, 6, 7)) -> tuple[int, ...]:
    """Slab sizes the slot path picks from, the capacity C last.

    By default 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... <= C: steps of a quarter of a power
    of two keep the rows computed within 25% of the busiest expert's load (the slab must hold
    it). Below 8 rows the experts' weights, not their rows, bound the time, so smaller slabs
    would not be faster. ``steps=(4,)`` gives powers of two, for the backward pass: each size is
    a branch to compile, and a backward branch costs about three forward ones.
    """
    sizes = []
    power = 8
    while power < capacity:
        sizes += [power * q // 4 for q in steps]
        power *= 2
    return tuple(sorted({min(size, capacity) for size in sizes} | {capacity}))


def _slot_index(sizes: tuple[int, ...], load: jax.Array) -> jax.Array:
    """Index of the smallest size >= load (the last one if none)."""
    return jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < load, dtype=jnp.int32)


def _slot_experts(xt, w_gate_up, w_down, plan, *, capacity, top_k, axes):
    """Experts over ``[E, c, D]`` slabs, c the smallest slot size that holds every kept load
    (experts split over a mesh).

    The routing plan is the capacity layout's (``[E, C]`` slots, C the true capacity, so
    drops are the same); only the slabs shrink from C to ``c`` rows. Each size is a branch of
    one ``lax.switch`` that sends the slabs to the experts' shards with an ``all_to_all``,
    runs two batched matmuls over the local experts and sends the outputs back. Every shard
    takes the same branch (the load is a maximum over the data axes), so the ``all_to_all``
    inside it has the same shape on all.

    Returns:
        [T, K, D] each choice's expert output (zeros where not placed).
    """
    load = lax.pmax(jnp.max(plan.kept_per_expert), _axis_arg(axes.data))
    # Mesh-varying casts before the custom VJP: their transposes are the gradients' psums.
    xt, w_gate_up, w_down = _join_varying(xt, w_gate_up, w_down)
    # Gate and up as one 2F axis: a dot contracting two axes gets its operand transposed.
    w_gate_up = w_gate_up.reshape(*w_gate_up.shape[:2], -1)
    return _slot_ffn(
        xt, w_gate_up, w_down, plan.row_of_choice, plan.choice_of_row, load, capacity, top_k,
        axes.expert,
    )  # fmt: skip


class _SlotMaps(NamedTuple):
    """Row maps of one slab size c: the capacity layout's maps with C rows per expert cut to c."""

    row_of_choice: jax.Array  # [T, K] int32, E*c = not placed
    choice_of_row: jax.Array  # [E*c] int32, T*K = empty slot
    token_of_row: jax.Array  # [E*c] int32, T = empty slot


def _slot_maps(c, row_of_choice, choice_of_row, capacity, top_k) -> _SlotMaps:
    e = choice_of_row.shape[0] // capacity
    placed = row_of_choice < e * capacity
    rows = (row_of_choice // capacity) * c + row_of_choice % capacity
    cut = choice_of_row.reshape(e, capacity)[:, :c].reshape(e * c)
    return _SlotMaps(jnp.where(placed, rows, e * c), cut, cut // top_k)


def _slot_hidden(c, xt, w_gate_up, maps: _SlotMaps, expert_axes):
    """Slab size c: the gathered slabs [E_local, R, D] and their gate/up product."""
    e = maps.choice_of_row.shape[0] // c
    buf = _take_rows(xt, maps.token_of_row).reshape(e, c, xt.shape[1])
    # Slab j of every shard goes to shard j, which owns experts [j*E/ep, (j+1)*E/ep).
    buf = lax.all_to_all(buf, _axis_arg(expert_axes), 0, 1, tiled=True)
    return buf, jnp.einsum("ecd,edg->ecg", buf, w_gate_up)


def _slot_back(out, maps: _SlotMaps, expert_axes):
    """Local expert outputs [E_local, R, D] -> per-choice rows [T, K, D]."""
    out = lax.all_to_all(out, _axis_arg(expert_axes), 1, 0, tiled=True)
    return _take_rows(out.reshape(-1, out.shape[-1]), maps.row_of_choice)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _slot_ffn(xt, w_gate_up, w_down, row_of_choice, choice_of_row, load, capacity, top_k,
              expert_axes):  # fmt: skip
    """SwiGLU experts over ``[E, c, D]`` slabs, c a slot size >= load: xt [T, D] -> [T, K, D].

    ``w_gate_up`` is [E, D, 2F] (gate and up on one axis); ``row_of_choice`` [T, K] and
    ``choice_of_row`` [E*C] are the capacity layout's maps, C = ``capacity``; ``load`` is the
    most choices any expert keeps. The VJP keeps only the inputs and recomputes the slab's
    forward in a second switch (over fewer sizes) before the four gradient matmuls: had JAX
    differentiated the switch, its residuals would be every branch's, zero-filled for the
    branches not taken.
    """
    sizes = _slot_sizes(capacity)

    def branch(c, xt, w_gate_up, w_down):
        maps = _slot_maps(c, row_of_choice, choice_of_row, capacity, top_k)
        buf, h = _slot_hidden(c, xt, w_gate_up, maps, expert_axes)
        act = _swiglu(h.reshape(*h.shape[:2], 2, -1))
        out = jnp.einsum("ecf,efd->ecd", act, w_down).astype(xt.dtype)
        return _slot_back(out, maps, expert_axes)

    branches = [functools.partial(branch, c) for c in sizes]
    return lax.switch(_slot_index(sizes, load), branches, xt, w_gate_up, w_down)


def _slot_ffn_fwd(xt, w_gate_up, w_down, row_of_choice, choice_of_row, load, capacity, top_k,
                  expert_axes):  # fmt: skip
    out = _slot_ffn(
        xt, w_gate_up, w_down, row_of_choice, choice_of_row, load, capacity, top_k, expert_axes
    )
    return out, (xt, w_gate_up, w_down, row_of_choice, choice_of_row, load)


def _slot_ffn_bwd(capacity, top_k, expert_axes, res, dchoices):
    xt, w_gate_up, w_down, row_of_choice, choice_of_row, load = res
    sizes = _slot_sizes(capacity, steps=(4,))
    acc = jnp.promote_types(w_gate_up.dtype, jnp.float32)  # accumulate weight grads in f32

    def branch(c, xt, w_gate_up, w_down, dchoices):
        maps = _slot_maps(c, row_of_choice, choice_of_row, capacity, top_k)
        buf, h = _slot_hidden(c, xt, w_gate_up, maps, expert_axes)
        local, rows, d = buf.shape
        act, dact = _swiglu_with_derivatives(h.reshape(local * rows, 2, -1))
        act = act.reshape(local, rows, -1).astype(xt.dtype)
        dact = dact.reshape(local, rows, 2, -1).astype(xt.dtype)
        # The transpose of _slot_back: gather each slot's choice gradient, send it home.
        flat = dchoices.reshape(-1, d)
        dout = _take_rows(flat, maps.choice_of_row).reshape(-1, c, d)
        dout = lax.all_to_all(dout, _axis_arg(expert_axes), 0, 1, tiled=True)
        dw_down = jnp.einsum("ecf,ecd->efd", act, dout, preferred_element_type=acc)
        da = jnp.einsum("ecd,efd->ecf", dout, w_down)
        dh = (da[:, :, None, :] * dact).astype(xt.dtype).reshape(local, rows, -1)
        dw_gate_up = jnp.einsum("ecd,ecg->edg", buf, dh, preferred_element_type=acc)
        dbuf = jnp.einsum("ecg,edg->ecd", dh, w_gate_up).astype(xt.dtype)
        dbuf = lax.all_to_all(dbuf, _axis_arg(expert_axes), 1, 0, tiled=True)
        # The transpose of the gather: each token sums its K slots' gradients.
        dxt = _take_rows(dbuf.reshape(-1, d), maps.row_of_choice).sum(axis=1)
        return dxt, dw_gate_up.astype(w_gate_up.dtype), dw_down.astype(w_down.dtype)

    branches = [functools.partial(branch, c) for c in sizes]
    index = _slot_index(sizes, load)
    dxt, dw_gate_up, dw_down = lax.switch(index, branches, xt, w_gate_up, w_down, dchoices)
    return dxt, dw_gate_up, dw_down, None, None, None


_slot_ffn.defvjp(_slot_ffn_fwd, _slot_ffn_bwd)


# ----------------------------------------------------------------------------------------------
# The block


@dataclasses.dataclass(frozen=True)
class _MeshAxes:
    """Mesh axes the block uses inside ``shard_map`` (empty tuples without a mesh)."""

    data: tuple[str, ...] = ()  # the batch is split over these: statistics are summed
    expert: tuple[str, ...] = ()  # experts are split over these: all_to_all
    tensor: tuple[str, ...] = ()  # F is split over these: psum
    expert_size: int = 1


def _axis_arg(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _router_outputs(params, xt, router: MoERouterConfig, routing):
    """Float32 logits, chosen experts [T, K], gate weights [T, K], probs and logsumexp."""
    logits = jnp.dot(
        xt.astype(jnp.float32),
        params["router"].astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    _, experts = lax.top_k(logits, router.top_k)
    if routing is not None:
        # A token whose replayed experts are -1 had none chosen (never fed to the sampling
        # model): it takes the router's own choice.
        replayed = jnp.all(routing >= 0, axis=-1, keepdims=True)
        experts = jnp.where(replayed, routing.astype(experts.dtype), experts)
    experts = experts.astype(jnp.int32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[:, None])
    chosen = jnp.take_along_axis(logits, experts, axis=-1)
    if router.normalize_top_k:
        gates = jax.nn.softmax(chosen, axis=-1)
    else:
        gates = jnp.exp(chosen - lse[:, None])
    return experts, gates, probs, lse


def moe_forward_local(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    router: MoERouterConfig,
    *,
    token_mask: jax.Array | None = None,
    routing: jax.Array | None = None,
    train: bool = True,
    impl: str = "dense",
    data_axes: Sequence[str] = (),
    expert_axes: Sequence[str] = (),
    tensor_axes: Sequence[str] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-shard body of :func:`moe_forward`; call it inside your own ``shard_map``.

    Without axes it is the whole single-device block. Inside ``shard_map``, ``x`` is this
    shard's tokens (one routing group), ``params`` hold this shard's experts
    (``E / size(expert_axes)`` of them) and F slice (``F / size(tensor_axes)``), the router
    is whole. ``expert_axes`` must be among ``data_axes``.

    Args:
        params: the block's parameters (local shards).
        x: [B, S, D] tokens of this routing group.
        router: routing settings.
        token_mask: [B, S], 1 = a real token; None = all real.
        routing: [B, S, K] int32 experts to replay instead of the router's top-k.
        train: use ``capacity_factor`` (True) or ``eval_capacity_factor``.
        impl: 'dense' or 'ragged' (as :func:`moe_forward`).
        data_axes: mesh axes the batch is split over (statistics are summed over them).
        expert_axes: mesh axes the experts are split over (``all_to_all``).
        tensor_axes: mesh axes F is split over (``psum``).

    Returns:
        ``(y [B, S, D], aux)`` as :func:`moe_forward`; aux statistics are global (summed
        over ``data_axes``).

    Example:
        Inside a ``shard_map`` over a ``(dp, pp, ep, tp)`` mesh, with ``in_specs`` that split
        the batch over ``('dp', 'ep')``, the experts over ``'ep'`` and F over ``'tp'``:

        >>> y, aux = moe_forward_local(
        ...     local_params, local_x, router, data_axes=("dp", "ep"), expert_axes=("ep",),
        ...     tensor_axes=("tp",))  # doctest: +SKIP
    """
    data_axes, expert_axes, tensor_axes = tuple(data_axes), tuple(expert_axes), tuple(tensor_axes)
    outside = [axis for axis in expert_axes if axis not in data_axes]
    if outside:
        raise ValueError(
            f"moe_forward_local: expert_axes {outside} must also be in data_axes "
            f"{list(data_axes)}: each expert shard routes its own tokens"
        )
    ep = 1
    for axis in expert_axes:
        ep *= lax.axis_size(axis)
    axes = _MeshAxes(data_axes, expert_axes, tensor_axes, ep)
    return _moe_group(
        params, x, token_mask, routing, router=router, train=train, impl=impl, axes=axes
    )


def _experts_in_layout(xt, w_gate_up, w_down, plan, *, layout, capacity, block, top_k, axes):
    """Experts over the grouped ('blocks', 'ragged') or capacity-slab buffer of ``plan``.

    Returns:
        [T, K, D] each choice's expert output (zeros where not placed).
    """
    e = plan.counts.shape[0]
    d = xt.shape[1]
    token_of_row = plan.choice_of_row // top_k  # sentinel T*K -> T (a zero row)
    buf = _dispatch(xt, token_of_row, plan.row_of_choice)  # [R, D]
    if layout == "ragged":
        out = _experts_ragged(buf, w_gate_up, w_down, plan.group_sizes)
    elif layout == "blocks":
        buf, w_gate_up, w_down = _join_varying(buf, w_gate_up, w_down)
        out = _grouped_ffn(
            buf, w_gate_up, w_down, plan.first_row, plan.num_blocks, block,
            -(-capacity // block),
        )  # fmt: skip
    else:  # 'capacity': experts split over the mesh's expert axes
        # Slab j of every shard goes to shard j, which owns experts [j*E/ep, (j+1)*E/ep).
        buf = buf.reshape(e, capacity, d)
        buf = lax.all_to_all(buf, _axis_arg(axes.expert), 0, 1, tiled=True)
        buf = buf.reshape(-1, d)  # [E/ep * ep*C, D]: ep*C rows per local expert
        local = w_gate_up.shape[0]
        slab = buf.shape[0] // local
        buf, w_gate_up, w_down = _join_varying(buf, w_gate_up, w_down)
        first_row = jnp.arange(local, dtype=jnp.int32) * slab
        out = _grouped_ffn(buf, w_gate_up, w_down, first_row, None, slab, 1)
        out = out.reshape(local, -1, d)
        out = lax.all_to_all(out, _axis_arg(axes.expert), 1, 0, tiled=True)
        out = out.reshape(e * capacity, d)

    return _collect(out, plan.row_of_choice, plan.choice_of_row)  # [T, K, D]


def _moe_group(params, x, token_mask, routing, *, router, train, impl, axes: _MeshAxes):
    b, s, d = x.shape
    t, k, e = b * s, router.top_k, router.num_experts
    xt = x.reshape(t, d)
    valid = jnp.ones((t,), bool) if token_mask is None else token_mask.reshape(t) > 0
    if token_mask is not None:
        # Padding may hold anything (NaN): it must not reach the statistics or gradients.
        xt = jnp.where(valid[:, None], xt, jnp.zeros((), xt.dtype))
    experts, gates, probs, lse = _router_outputs(
        params, xt, router, None if routing is None else routing.reshape(t, k)
    )

    # No expert takes more than t choices (a token picks an expert at most once).
    capacity = min(router.capacity(t, train=train), t)
    limit = capacity
    if token_mask is not None and capacity < t:
        # C counts the group's real tokens; the buffers stay sized for all t positions.
        limit = jnp.asarray(_capacities(router, t, train))[jnp.sum(valid, dtype=jnp.int32)]
    slots = axes.expert_size > 1 and t * k <= _SLOT_MAX_CHOICES
    if axes.expert_size > 1:
        layout = "capacity"  # all_to_all needs fixed [E, C, D] slabs; slots shrink them
    elif impl == "ragged":
        layout = "ragged"
    else:
        layout = "blocks"
    block = _block_size(min(t * k, e * capacity), e)
    plan = _route_plan(
        experts, valid, lax.stop_gradient(gates),
        num_experts=e, capacity=capacity, limit=limit, drop_policy=router.drop_policy,
        layout=layout, block=block,
    )  # fmt: skip

    w_gate_up, w_down = params["w_gate_up"], params["w_down"]
    if slots:
        choices = _slot_experts(xt, w_gate_up, w_down, plan, capacity=capacity, top_k=k, axes=axes)
    else:
        choices = _experts_in_layout(
            xt, w_gate_up, w_down, plan, layout=layout, capacity=capacity, block=block,
            top_k=k, axes=axes,
        )  # fmt: skip
    # A multiply-and-sum, not an einsum: XLA would make the latter T tiny matmuls.
    y = jnp.sum(choices * gates.astype(choices.dtype)[..., None], axis=1)
    if axes.tensor:
        # Each tp shard holds F / tp hidden units: the down projection is a partial sum.
        y = lax.psum(y, _axis_arg(axes.tensor))
    y = y.astype(x.dtype).reshape(b, s, d)

    # Statistics over non-padding tokens, summed over the data axes (global, like 1 device).
    valid_f = valid.astype(jnp.float32)
    sums = {
        "tokens": jnp.sum(valid_f),
        "probs": jnp.sum(probs * valid_f[:, None], axis=0),
        "z": jnp.sum(jnp.square(lse) * valid_f),
        "counts": plan.counts.astype(jnp.float32),
        "kept": plan.kept.astype(jnp.float32),
    }
    if axes.data:
        sums = lax.psum(sums, _axis_arg(axes.data))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    choices_total = jnp.maximum(sums["tokens"] * k, 1.0)
    frac_tokens = sums["counts"] / tokens  # f_e, sums to K
    mean_probs = sums["probs"] / tokens  # P_e
    aux = {
        "aux_loss": e * jnp.sum(frac_tokens * mean_probs),
        "z_loss": sums["z"] / tokens,
        "dropped_fraction": (sums["tokens"] * k - sums["kept"]) / choices_total,
        "expert_load": sums["counts"] / choices_total,
        "routing": experts.reshape(b, s, k),
        # The numerators and denominators, so callers that split a batch (pipeline
        # microbatches) can combine statistics exactly by adding them.
        "sums": sums,
    }
    return y, aux


def _check_params(params: Any, router: MoERouterConfig) -> tuple[int, int]:
    if not isinstance(params, Mapping) or any(name not in params for name in PARAM_NAMES):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params must be a mapping with keys {list(PARAM_NAMES)}, got {got}")
    shapes = {name: tuple(np.shape(params[name])) for name in PARAM_NAMES}
    if len(shapes["router"]) != 2:
        raise ValueError(f"params['router'] must be [D, E], got shape {shapes['router']}")
    d, e = shapes["router"]
    if e != router.num_experts:
        raise ValueError(
            f"params['router'] has {e} experts but router.num_experts={router.num_experts}"
        )
    gu = shapes["w_gate_up"]
    if len(gu) != 4 or gu[0] != e or gu[1] != d or gu[2] != 2:
        raise ValueError(f"params['w_gate_up'] must be [E, D, 2, F] = [{e}, {d}, 2, F], got {gu}")
    f = gu[3]
    if shapes["w_down"] != (e, f, d):
        raise ValueError(
            f"params['w_down'] must be [E, F, D] = {(e, f, d)}, got {shapes['w_down']}"
        )
    return d, f


def _mesh_axes(mesh: Any, x_shape: tuple[int, ...], param_shapes: dict) -> tuple[_MeshAxes, dict]:
    """Mesh axes of the batch, experts and hidden units, from the logical rule table."""
    x_spec = shd.logical_to_spec((shd.BATCH, shd.LENGTH, shd.EMBED), mesh, shape=x_shape)
    param_specs = shd.tree_specs(moe_logical_axes(), mesh, param_shapes)

    def axes_of(spec, dim):
        entry = spec[dim] if dim < len(spec) else None
        if entry is None:
            return ()
        return (entry,) if isinstance(entry, str) else tuple(entry)

    data = axes_of(x_spec, 0)
    sizes = dict(mesh.shape)
    wanted_expert = tuple(a for a in shd.DEFAULT_RULES[shd.EXPERT] if sizes.get(a, 1) > 1)
    expert = axes_of(param_specs["w_gate_up"], 0)
    ep = int(np.prod([sizes[a] for a in wanted_expert])) if wanted_expert else 1
    num_experts = param_shapes["w_gate_up"][0]
    if expert != wanted_expert:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size {ep} of "
            f"the mesh; use a multiple of {ep} experts"
        )
    if any(a not in data for a in expert):  # unreachable after padding the batch
        raise AssertionError(f"batch axes {data} do not include the expert axes {expert}")
    tensor = axes_of(param_specs["w_down"], 1)
    specs = {"x": x_spec, "params": param_specs}
    return _MeshAxes(data, expert, tensor, ep), specs


def check_routing_values(routing: jax.Array, num_experts: int) -> None:
    """Out-of-range experts would silently give NaN or zero outputs, and an expert named twice
    for one token would overflow the capacity (sized for K distinct experts per token): when
    the values are known here (not traced under ``jit``, held by this process) each must be
    in ``[0, E)`` and each token's K experts distinct."""
    if isinstance(routing, jax.core.Tracer) or not routing.is_fully_addressable:
        return
    values = np.asarray(routing)
    unset = np.all(values == -1, axis=-1, keepdims=True)  # "choose as usual"
    bad = values[((values < 0) | (values >= num_experts)) & ~unset]
    if bad.size:
        raise ValueError(
            f"routing values must be in [0, num_experts={num_experts}) (or -1 for all of a "
            f"token's top_k: its own choice), got {int(bad.flat[0])}"
        )
    ordered = np.sort(values, axis=-1)
    twice = np.argwhere(np.any(ordered[..., 1:] == ordered[..., :-1], axis=-1) & ~unset[..., 0])
    if twice.size:
        where = tuple(int(i) for i in twice[0])
        raise ValueError(
            f"routing{list(where)} names an expert twice ({values[where].tolist()}); each "
            f"token's top_k experts must be distinct"
        )


def moe_forward(
    params: Mapping[str, ArrayLike],
    x: ArrayLike,
    router: MoERouterConfig,
    *,
    mesh: Any = None,
    token_mask: ArrayLike | None = None,
    routing: ArrayLike | None = None,
    train: bool = True,
    impl: str = "dense",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mixture-of-Experts block: top-k routing with capacity, sort-based dispatch.

    See the module docstring for the formulas. Auxiliary outputs (statistics over non-padding
    tokens of the whole batch, identical with or without a mesh)::

        aux_loss = E * sum_e f_e * P_e     (Switch Transformer; HF Mixtral; balanced = K)
        f_e = #choices of expert e / #tokens     P_e = mean_t softmax(logits_t)[e]
        z_loss = mean_t logsumexp(logits_t) ** 2   (ST-MoE, Zoph et al., 2022)

    The losses are returned unweighted; the caller multiplies them by
    ``router.aux_loss_coef`` and ``router.z_loss_coef``.

    Args:
        params: ``{'router': [D, E], 'w_gate_up': [E, D, 2, F], 'w_down': [E, F, D]}``.
        x: [B, S, D] activations.
        router: routing settings (experts, top-k, capacity factor, drop policy).
        mesh: a mesh with the axes of :class:`~novarl_jax.core.distributed.ParallelLayout`;
            None runs on one device. The experts must split over ``ep``; a batch that
            ``('dp', 'ep')`` does not divide is padded with padding tokens.
        token_mask: [B, S], 1 = a real token, 0 = padding (not routed, output 0, gradient
            0, whatever it holds, NaN included); None = all real.
        routing: [B, S, K] int expert indices in [0, E) to replay (``aux['routing']`` of an
            earlier call), K distinct experts per token, or -1 for all K of a token that was
            never routed (it takes the router's own choice); gate weights are recomputed from
            the current router at those experts. Capacity and drops are decided afresh.
        train: capacity from ``capacity_factor`` (True) or ``eval_capacity_factor`` (False).
        impl: 'dense' (a loop of plain matmuls over padded expert chunks; under expert
            parallelism, small routing groups such as decoding steps run all experts as one
            batched matmul over slabs sized to the loads; fastest on CPU) or 'ragged'
            (``lax.ragged_dot`` over the unpadded expert-sorted rows, for GPU/TPU; used
            without expert parallelism, else 'dense').

    Returns:
        ``(y, aux)``: y [B, S, D] of x's dtype; aux with 'aux_loss', 'z_loss',
        'dropped_fraction' (of non-padding choices) float32 scalars, 'expert_load' [E]
        float32 (fraction of non-padding choices per expert, before dropping), 'routing'
        [B, S, K] int32 (the chosen experts; at padding, those of an all-zero token) and
        'sums', the float32 sums the statistics are ratios of: 'tokens' (non-padding
        tokens), 'probs' [E] (their router probabilities), 'z' (their squared logsumexp),
        'counts' [E] (their choices per expert) and 'kept' (choices not dropped).

    Raises:
        TypeError: a non-bool ``train``.
        ValueError: bad shapes (B or S = 0 included), an unknown ``impl``, a routing array
            that is not an integer [B, S, K] (or, when not traced, holds values outside
            ``[0, E)`` or an expert twice for one token), or a mesh whose ``ep`` does not
            divide the experts.

    Example:
        >>> router = MoERouterConfig(num_experts=4, top_k=2, capacity_factor=None)
        >>> params = init_moe_params(jax.random.key(0), 16, 32, 4)
        >>> x = jnp.ones((2, 8, 16))
        >>> y, aux = moe_forward(params, x, router)
        >>> y.shape, aux["routing"].shape
        ((2, 8, 16), (2, 8, 2))
    """
    if not isinstance(router, MoERouterConfig):
        raise ValueError(f"router must be a MoERouterConfig, got {type(router).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {list(IMPLS)}")
    if not isinstance(train, bool | np.bool_):
        raise TypeError(f"train must be a bool (True or False), got {train!r}")
    d, _ = _check_params(params, router)
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != d:
        raise ValueError(f"x must be [B, S, D] with D={d} (the router's width), got {x.shape}")
    b, s, _ = x.shape
    if not b or not s:
        raise ValueError(f"x must be [B, S, D] with B >= 1 and S >= 1, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating-point activations, got dtype {x.dtype}")
    if token_mask is not None:
        token_mask = jnp.asarray(token_mask)
        if token_mask.shape != (b, s):
            raise ValueError(f"token_mask must be [B, S] = {(b, s)}, got {token_mask.shape}")
    if routing is not None:
        routing = jnp.asarray(routing)
        if routing.shape != (b, s, router.top_k) or not jnp.issubdtype(routing.dtype, jnp.integer):
            raise ValueError(
                f"routing must be an integer array [B, S, K] = {(b, s, router.top_k)}, got "
                f"{routing.dtype}{list(routing.shape)}"
            )
        check_routing_values(routing, router.num_experts)
    params = {name: jnp.asarray(params[name]) for name in PARAM_NAMES}

    if mesh is None or all(size == 1 for size in dict(mesh.shape).values()):
        return _moe_group(
            params, x, token_mask, routing, router=router, train=train, impl=impl, axes=_MeshAxes()
        )

    # A batch the data axes do not divide is padded with padding tokens (not routed, no
    # capacity) so that every expert-parallel shard routes its own slice.
    sizes = dict(mesh.shape)
    data_size = int(np.prod([sizes.get(a, 1) for a in shd.DEFAULT_RULES[shd.BATCH]]))
    pad = -b % data_size
    if token_mask is None:
        token_mask = jnp.ones((b, s), jnp.int32)
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0), (0, 0)))
        token_mask = jnp.pad(token_mask, ((0, pad), (0, 0)))
        if routing is not None:
            routing = jnp.pad(routing, ((0, pad), (0, 0), (0, 0)))
    param_shapes = {name: params[name].shape for name in PARAM_NAMES}
    axes, specs = _mesh_axes(mesh, x.shape, param_shapes)
    row_spec = P(*specs["x"][:1])
    routing_spec = None if routing is None else row_spec
    body = functools.partial(_moe_group, router=router, train=train, impl=impl, axes=axes)
    aux_specs = {
        "aux_loss": P(), "z_loss": P(), "dropped_fraction": P(), "expert_load": P(),
        "routing": row_spec, "sums": P(),
    }  # fmt: skip
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs["params"], row_spec, row_spec, routing_spec),
        out_specs=(row_spec, aux_specs),
    )
    y, aux = fn(params, x, token_mask, routing)
    if pad:
        y, aux = y[:b], {**aux, "routing": aux["routing"][:b]}
    return y, aux


# ----------------------------------------------------------------------------------------------
# The oracle


def moe_reference(
    params: Mapping[str, ArrayLike],
    x: ArrayLike,
    router: MoERouterConfig,
    token_mask: ArrayLike | None = None,
) -> jax.Array:
    """The MoE block as a plain loop over experts with no capacity limit (a test oracle).

    Every expert runs on every token; its output is kept where the token chose it.

    Args:
        params: as :func:`moe_forward`.
        x: [B, S, D].
        router: only ``top_k`` and ``normalize_top_k`` are used (no capacity).
        token_mask: [B, S], 1 = a real token; padding tokens output 0.

    Returns:
        y [B, S, D] float32.
    """
    x = jnp.asarray(x, jnp.float32)
    logits = jnp.einsum("bsd,de->bse", x, jnp.asarray(params["router"], jnp.float32),
                        precision=lax.Precision.HIGHEST)  # fmt: skip
    probs = jax.nn.softmax(logits, axis=-1)
    top_logits, top_experts = lax.top_k(logits, router.top_k)
    if router.normalize_top_k:
        gates = jax.nn.softmax(top_logits, axis=-1)
    else:
        gates = jnp.take_along_axis(probs, top_experts, axis=-1)
    y = jnp.zeros_like(x)
    for expert in range(router.num_experts):
        weight = jnp.sum(jnp.where(top_experts == expert, gates, 0.0), axis=-1)  # [B, S]
        gate = x @ jnp.asarray(params["w_gate_up"][expert, :, 0, :], jnp.float32)
        up = x @ jnp.asarray(params["w_gate_up"][expert, :, 1, :], jnp.float32)
        out = (jax.nn.silu(gate) * up) @ jnp.asarray(params["w_down"][expert], jnp.float32)
        y = y + weight[..., None] * out
    if token_mask is not None:
        y = y * (jnp.asarray(token_mask) > 0)[..., None]
    return y
