"""Pipeline parallelism over the ``pp`` mesh axis: GPipe and circular schedules.

Consecutive decoder layers are grouped into ``pp`` stages. Stage ``s`` holds its layers'
weights on the devices of mesh coordinate ``pp = s``, the batch is split into ``M``
microbatches, and every stage applies its layers to one microbatch per *tick*, handing the
result to the next stage with ``lax.ppermute`` over ``pp``. The whole schedule is one
``lax.scan`` over ticks inside ``jax.shard_map``, so it compiles once and its backward pass
is plain ``jax.grad`` through the scan (the transpose of ``ppermute`` is the reverse
``ppermute``).

Schedules (Huang et al., 2019, "GPipe"; Narayanan et al., 2021, "Efficient large-scale
language model training on GPU clusters", for interleaved/circular stages):

* GPipe (``num_repeats = V = 1``): stage ``s`` processes microbatch ``j`` at tick ``j + s``;
  ``M + pp - 1`` ticks, of which each stage is busy for ``M``. Bubble (idle fraction)
  ``(pp - 1) / (M + pp - 1)``.
* Circular (``V > 1``): the layers are cut into ``pp * V`` chunks; chunk ``r * pp + s`` lives
  on stage ``s`` (its ``r``-th *repeat*). A microbatch goes round the ring of stages ``V``
  times. With ``D = max(M, pp)``, stage ``s`` processes microbatch ``j`` of repeat ``r`` at
  tick ``r * D + j + s``; ``(V - 1) * D + M + pp - 1`` ticks of ``1 / V`` the work each.
  Bubble ``(pp - 1) / (V * M + pp - 1)`` when ``M >= pp``.

Only ``pp`` is manual inside the schedule: ``dp``, ``ep`` and ``tp`` stay automatic, so the
batch keeps its ``('dp', 'ep')`` sharding, weights keep their ``tp``/``ep`` sharding, and the
stage function may use sharding constraints or a nested ``jax.shard_map`` over ``ep`` (give
that inner ``shard_map`` the mesh from :func:`context_mesh`). On idle (bubble) ticks a stage
still runs, on real but irrelevant data, and its result is masked out; so ``stage_fn`` must
be finite on inputs of the kind it normally receives.

Example:
    >>> layout = ParallelLayout(pp=2, dp=4)
    >>> mesh = layout.make_mesh()
    >>> w = jnp.zeros((4, 8, 8))                       # [L, D, D] stacked layer weights
    >>> def stage_fn(w_stage, h):                      # w_stage: [L/pp, D, D]
    ...     return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w_stage)[0]
    >>> y = pipeline_apply(stage_fn, to_stages(w, 2), jnp.ones((16, 8)), mesh=mesh,
    ...                    num_microbatches=4)
    >>> y.shape
    (16, 8)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from novarl_jax.core.distributed import PP

__all__ = [
    "bubble_fraction",
    "context_mesh",
    "from_stages",
    "num_stages",
    "num_ticks",
    "pipeline_apply",
    "schedule_table",
    "to_stages",
]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _path(path: Any) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _stage_ndim(num_repeats: int) -> int:
    # [pp, ...] for GPipe, [pp, V, ...] for the circular schedule.
    return 1 if num_repeats == 1 else 2


# --------------------------------------------------------------------------------------------
# Layer <-> stage layouts


def to_stages(layer_params: Any, num_stages: int, *, num_repeats: int = 1) -> Any:
    """Groups stacked layer weights into pipeline stages.

    Layer ``l`` goes to chunk ``c = l // Lc`` (``Lc = L / (pp * V)`` layers per chunk), and
    chunk ``c`` to stage ``c % pp``, repeat ``c // pp``. With ``V = 1`` this is simply
    consecutive layers per stage: ``[L, ...] -> [pp, L / pp, ...]``.

    Also use it for per-layer side inputs (``layer_extra`` of :func:`pipeline_apply`), e.g.
    router-replay choices ``[L, B, T, K] -> [pp, L / pp, B, T, K]``.

    Args:
        layer_params: pytree whose leaves are ``[L, ...]`` (all with the same L).
        num_stages: pp, the pipeline stages (the size of the mesh axis ``pp``).
        num_repeats: V, chunks per stage (1 = GPipe; > 1 = circular schedule).

    Returns:
        The same pytree with leaves ``[pp, L / pp, ...]`` (V = 1) or
        ``[pp, V, L / (pp * V), ...]`` (V > 1).

    Raises:
        ValueError: L is not divisible by ``pp * V``, leaves disagree on L, or a leaf is a
            scalar.

    Example:
        >>> to_stages(jnp.zeros((8, 4, 4)), 2).shape
        (2, 4, 4, 4)
        >>> to_stages(jnp.zeros((8, 4, 4)), 2, num_repeats=2).shape
        (2, 2, 2, 4, 4)
    """
    _check_positive_int("num_stages", num_stages)
    _check_positive_int("num_repeats", num_repeats)
    leaves = jax.tree_util.tree_leaves_with_path(layer_params)
    lengths = set()
    for path, leaf in leaves:
        if np.ndim(leaf) < 1:
            raise ValueError(
                f"to_stages: leaf {_path(path)} is a scalar; every leaf needs a leading "
                f"layer axis [L, ...]"
            )
        lengths.add(np.shape(leaf)[0])
    if len(lengths) > 1:
        raise ValueError(
            f"to_stages: leaves have different numbers of layers {sorted(lengths)}; every "
            f"leaf needs the same leading layer axis L"
        )
    chunks = num_stages * num_repeats
    for num_layers in lengths:
        if num_layers % chunks:
            raise ValueError(
                f"num_layers L={num_layers} is not divisible by pipeline_parallel_size * "
                f"num_repeats = {num_stages} * {num_repeats} = {chunks}; use a pp (and "
                f"num_repeats) whose product divides {num_layers}"
            )

    def split(a):
        a = jnp.asarray(a)
        per_chunk = a.shape[0] // chunks
        if num_repeats == 1:
            return a.reshape(num_stages, per_chunk, *a.shape[1:])
        a = a.reshape(num_repeats, num_stages, per_chunk, *a.shape[1:])
        return jnp.swapaxes(a, 0, 1)

    return jax.tree.map(split, layer_params)


def from_stages(stage_params: Any, *, num_repeats: int = 1) -> Any:
    """Inverse of :func:`to_stages`: ``[pp, (V,) Lc, ...] -> [L, ...]`` in layer order.

    Also turns per-chunk auxiliary outputs of :func:`pipeline_apply` that carry a per-layer
    axis (``[pp, (V,) Lc, ...]``) back into ``[L, ...]``.

    Args:
        stage_params: pytree with leaves ``[pp, Lc, ...]`` (V = 1) or ``[pp, V, Lc, ...]``.
        num_repeats: V, as given to :func:`to_stages`.

    Returns:
        The pytree with leaves ``[L, ...]``, ``L = pp * V * Lc``.

    Raises:
        ValueError: a leaf has too few dimensions, or its repeat axis is not V.
    """
    _check_positive_int("num_repeats", num_repeats)
    need = _stage_ndim(num_repeats) + 1

    def merge(path, a):
        a = jnp.asarray(a)
        if a.ndim < need:
            raise ValueError(
                f"from_stages: leaf {_path(path)} has shape {a.shape}; expected "
                f"{'[pp, Lc, ...]' if num_repeats == 1 else '[pp, V, Lc, ...]'}"
            )
        if num_repeats == 1:
            return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
        if a.shape[1] != num_repeats:
            raise ValueError(
                f"from_stages: leaf {_path(path)} has shape {a.shape}; its axis 1 should be "
                f"num_repeats={num_repeats}"
            )
        a = jnp.swapaxes(a, 0, 1)
        return a.reshape(a.shape[0] * a.shape[1] * a.shape[2], *a.shape[3:])

    return jax.tree_util.tree_map_with_path(merge, stage_params)


# --------------------------------------------------------------------------------------------
# Schedule arithmetic (shared by the implementation, the tests and the benchmark)


def _period(num_stages: int, num_microbatches: int, num_repeats: int) -> int:
    # Ticks between a microbatch's entries into stage 0 on consecutive repeats. It must be
    # >= pp so that a microbatch has come round the ring before it is needed again.
    return num_microbatches if num_repeats == 1 else max(num_microbatches, num_stages)


def num_ticks(num_stages: int, num_microbatches: int, num_repeats: int = 1) -> int:
    """Ticks of the schedule: ``(V - 1) * max(M, pp) + M + pp - 1`` (GPipe: ``M + pp - 1``)."""
    period = _period(num_stages, num_microbatches, num_repeats)
    return (num_repeats - 1) * period + num_microbatches + num_stages - 1


def _slot(tick, stage, num_stages, num_microbatches, num_repeats, xp=np):
    """(microbatch j, repeat r, valid) that ``stage`` works on at ``tick`` (numpy or jnp)."""
    period = _period(num_stages, num_microbatches, num_repeats)
    u = tick - stage
    r = xp.floor_divide(u, period)
    j = u - r * period
    valid = (u >= 0) & (j < num_microbatches) & (r < num_repeats)
    return j, r, valid


def schedule_table(num_stages: int, num_microbatches: int, num_repeats: int = 1) -> np.ndarray:
    """Which microbatch and repeat each stage works on at each tick.

    Args:
        num_stages: pp.
        num_microbatches: M.
        num_repeats: V.

    Returns:
        int array ``[ticks, pp, 2]``: ``[..., 0]`` the microbatch ``j`` and ``[..., 1]`` the
        repeat ``r``, both -1 where the stage is idle (a bubble).
    """
    _check_positive_int("num_stages", num_stages)
    _check_positive_int("num_microbatches", num_microbatches)
    _check_positive_int("num_repeats", num_repeats)
    ticks = np.arange(num_ticks(num_stages, num_microbatches, num_repeats))[:, None]
    stages = np.arange(num_stages)[None, :]
    j, r, valid = _slot(ticks, stages, num_stages, num_microbatches, num_repeats)
    return np.stack([np.where(valid, j, -1), np.where(valid, r, -1)], axis=-1)


def bubble_fraction(num_stages: int, num_microbatches: int, num_repeats: int = 1) -> float:
    """Idle fraction of stage-ticks: ``1 - V * M / ticks`` (each stage is busy V * M ticks).

    For GPipe this is ``(pp - 1) / (M + pp - 1)``; for the circular schedule with ``M >= pp``
    it is ``(pp - 1) / (V * M + pp - 1)``.
    """
    _check_positive_int("num_stages", num_stages)
    _check_positive_int("num_microbatches", num_microbatches)
    _check_positive_int("num_repeats", num_repeats)
    ticks = num_ticks(num_stages, num_microbatches, num_repeats)
    return 1.0 - num_repeats * num_microbatches / ticks


# --------------------------------------------------------------------------------------------
# Meshes inside a stage


def num_stages(mesh: Any) -> int:
    """pp, the size of the mesh's ``pp`` axis: 1 for ``mesh=None`` or a mesh without one.

    Example:
        >>> num_stages(ParallelLayout(pp=2, dp=4).make_mesh()), num_stages(None)
        (2, 1)
    """
    if mesh is None:
        return 1
    return int(dict(mesh.shape).get(PP, 1))


def context_mesh(mesh: Any) -> Any:
    """The mesh a ``jax.shard_map`` nested inside a stage function must be given.

    Inside :func:`pipeline_apply` the ``pp`` axis is manual, and a nested ``shard_map`` (the
    MoE block's all-to-all over ``ep``) must be built on the current *abstract* mesh, whose
    ``pp`` axis is marked manual; passing the concrete mesh raises "context mesh ... should
    match the mesh passed to shard_map". Outside any ``shard_map`` (or ``jax.set_mesh``) the
    abstract mesh is empty, and ``mesh`` is returned unchanged, so one call works in both.

    Args:
        mesh: the concrete ``jax.sharding.Mesh`` of the run.

    Returns:
        The context's abstract mesh when there is one, else ``mesh``.
    """
    abstract = jax.sharding.get_abstract_mesh()
    if abstract is None or abstract.empty:
        return mesh
    return abstract


# --------------------------------------------------------------------------------------------
# The schedule


def _check_mesh(mesh: Any) -> int:
    if mesh is None or not hasattr(mesh, "shape"):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with a {PP!r} axis (ParallelLayout(...)."
            f"make_mesh()), got {mesh!r}"
        )
    sizes = dict(mesh.shape)
    if PP not in sizes:
        raise ValueError(
            f"mesh has axes {tuple(sizes)} but no {PP!r} axis; build it with "
            f"ParallelLayout(...).make_mesh()"
        )
    return int(sizes[PP])


def _check_leading(tree: Any, what: str, expected: tuple[int, ...], meaning: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if tuple(shape[: len(expected)]) != expected:
            raise ValueError(
                f"{what} leaf {_path(path)} has shape {tuple(shape)}; its leading axes must be "
                f"{meaning} = {expected}"
            )


def _cpu_collectives_dtype(mesh: Any, dtype: Any) -> Any:
    """The dtype the pipeline's ``pp`` all-reduces of a ``dtype`` array run in.

    XLA:CPU (jax 0.10.2) fails to compile them in bfloat16 ("Invalid binary instruction
    opcode copy" in its all-reduce promotion pass), so on CPU devices they run in float32 at
    least; elsewhere in ``dtype`` itself (no extra bytes moved or kept).
    """
    try:
        on_cpu = any(d.platform == "cpu" for d in np.asarray(mesh.devices).flat)
    except (AttributeError, ValueError):  # an abstract mesh: no devices to ask
        on_cpu = True
    return jnp.promote_types(dtype, jnp.float32) if on_cpu else jnp.dtype(dtype)


def _microbatch(a: jax.Array, axis: int, num_microbatches: int) -> jax.Array:
    # Microbatch j holds examples j, j + M, j + 2M, ... (a strided split): splitting [B] into
    # [B / M, M] keeps the leading B / M axis on the devices that held those rows, so each
    # microbatch stays spread over the ('dp', 'ep') shards without any data movement.
    # Result: the microbatch axis M in front of position `axis`, then [B / M] at `axis + 1`.
    shape = a.shape
    a = a.reshape(*shape[:axis], shape[axis] // num_microbatches, num_microbatches,
                  *shape[axis + 1:])  # fmt: skip
    return jnp.moveaxis(a, axis + 1, axis)


def _unmicrobatch(a: jax.Array) -> jax.Array:
    # [M, B / M, ...] -> [B, ...], inverse of _microbatch(a, 0, M).
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def pipeline_apply(
    stage_fn: Callable[..., Any],
    stage_params: Any,
    x: jax.typing.ArrayLike,
    *,
    mesh: Any,
    num_microbatches: int,
    extra: Any = None,
    layer_extra: Any = None,
    has_aux: bool = False,
    num_repeats: int = 1,
    remat: bool = False,
) -> Any:
    """Applies ``pp`` pipeline stages to ``x`` with a microbatched GPipe/circular schedule.

    Computes ``stage_{pp-1}(... stage_1(stage_0(x)))`` (for ``V > 1``: all ``pp * V`` chunks
    in order ``c = r * pp + s``), microbatch by microbatch, with stage ``s`` running on the
    devices of ``pp = s``. Equal, up to float reassociation, to applying the stages one after
    another to the whole batch whenever ``stage_fn`` treats examples independently.

    ``stage_fn`` is called as ``stage_fn(params, x_mb)``, plus the keyword arguments
    ``extra=...`` and ``layer_extra=...`` when those are given:

    * ``params``: this stage's (chunk's) weights, ``stage_params`` leaves without the stage
      axes, e.g. ``[L / pp, ...]``; ``stage_fn`` typically ``lax.scan``s over them.
    * ``x_mb``: ``[B / M, ...]``, one microbatch; ``stage_fn`` must return the same shape and
      dtype (or ``(y_mb, aux)`` with ``has_aux``).
    * ``extra``: per-example side inputs for every stage (attention mask, positions), this
      microbatch's rows: leaves ``[B / M, ...]``.
    * ``layer_extra``: per-layer, per-example side inputs (router-replay choices), this
      chunk's layers and this microbatch's rows: leaves ``[Lc, B / M, ...]``.

    Microbatch ``j`` holds examples ``j, j + M, j + 2M, ...``, so each microbatch keeps the
    batch's ``('dp', 'ep')`` sharding (best when ``B / M`` is divisible by ``dp * ep``).
    Auxiliary outputs are summed over the microbatches each stage processed, per stage: to
    aggregate a per-microbatch mean exactly, return its numerator and denominator as aux.

    Call it inside ``jax.jit`` (as the model's ``forward`` under ``pp > 1`` should be): the
    schedule runs as a ``shard_map`` over the mesh, which an eager call compiles afresh
    every time (a new ``stage_fn`` closure each call is a new program to XLA).

    Args:
        stage_fn: ``(params, x_mb, [extra=], [layer_extra=]) -> y_mb`` or ``(y_mb, aux)``.
        stage_params: pytree with leaves ``[pp, Lc, ...]`` (V = 1) or ``[pp, V, Lc, ...]``
            from :func:`to_stages`, sharded over ``pp`` on axis 0 (other axes as they like).
        x: ``[B, ...]`` activations entering stage 0 (e.g. ``[B, T, D]`` float32).
        mesh: the run's mesh (with a ``pp`` axis; ``ParallelLayout(...).make_mesh()``).
        num_microbatches: M, must divide B.
        extra: optional pytree with leaves ``[B, ...]``.
        layer_extra: optional pytree with leaves ``[pp, (V,) Lc, B, ...]`` (``to_stages`` of
            ``[L, B, ...]`` leaves).
        has_aux: ``stage_fn`` returns ``(y_mb, aux)``, aux a pytree of arrays.
        num_repeats: V, chunks per stage; 1 = GPipe, > 1 = circular schedule (smaller bubble,
            ``V`` times more ``ppermute``s of ``1 / V`` the compute each).
        remat: recompute each stage's forward in the backward pass (``jax.checkpoint``), so
            only the stage inputs of each tick are kept, not every layer's activations.

    Returns:
        ``y``: ``[B, ...]`` like ``x``, the last stage's output, replicated over ``pp``. With
        ``has_aux``: ``(y, aux)``, aux leaves ``[pp, ...]`` (V = 1) or ``[pp, V, ...]``:
        per stage (chunk), the sum over microbatches of ``stage_fn``'s aux.

    Raises:
        ValueError: a non-positive M or V; a mesh without ``pp``; stage params whose leading
            axes are not ``[pp, (V,)]``; B not divisible by M; extras whose batch axis is
            not B; ``stage_fn`` changing the activation's shape or dtype.

    Example:
        >>> mesh = ParallelLayout(pp=2, dp=4).make_mesh()
        >>> w = jnp.zeros((4, 8, 8))                   # [L, D, D]
        >>> def stage_fn(w_stage, h, extra):           # w_stage [L/pp, D, D], h [B/M, D]
        ...     h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w_stage)[0]
        ...     return h * extra[:, None], {"sq": jnp.sum(h**2)}
        >>> y, aux = pipeline_apply(stage_fn, to_stages(w, 2), jnp.ones((16, 8)), mesh=mesh,
        ...                         num_microbatches=4, extra=jnp.ones(16), has_aux=True)
        >>> aux["sq"].shape                            # per stage, summed over microbatches
        (2,)
    """
    _check_positive_int("num_microbatches", num_microbatches)
    _check_positive_int("num_repeats", num_repeats)
    num_stages = _check_mesh(mesh)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis [B, ...], got shape {x.shape}")
    batch = x.shape[0]
    if batch % num_microbatches:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ValueError(
            f"batch size B={batch} is not divisible by num_microbatches={num_microbatches}; "
            f"valid num_microbatches: {divisors}"
        )
    stage_axes = (num_stages,) if num_repeats == 1 else (num_stages, num_repeats)
    stage_meaning = "[pp]" if num_repeats == 1 else "[pp, num_repeats]"
    _check_leading(stage_params, "stage_params", stage_axes, stage_meaning + " (see to_stages)")
    if extra is not None:
        _check_leading(extra, "extra", (batch,), "[B] (the batch of x)")
    if layer_extra is not None:
        for path, leaf in jax.tree_util.tree_leaves_with_path(layer_extra):
            shape = tuple(np.shape(leaf))
            nd = len(stage_axes)
            if shape[:nd] != stage_axes or len(shape) < nd + 2 or shape[nd + 1] != batch:
                raise ValueError(
                    f"layer_extra leaf {_path(path)} has shape {shape}; expected "
                    f"{stage_meaning[:-1]}, Lc, B={batch}, ...] = {stage_axes} + (Lc, "
                    f"{batch}, ...) (to_stages of a [L, B, ...] array)"
                )

    m = num_microbatches
    nd = len(stage_axes)
    x_mb = _microbatch(x, 0, m)  # [M, B/M, ...]
    extra_mb = None if extra is None else jax.tree.map(lambda a: _microbatch(a, 0, m), extra)
    # [pp, (V,) Lc, B, ...] -> [pp, (V,) M, Lc, B/M, ...]
    layer_mb = None if layer_extra is None else jax.tree.map(
        lambda a: jnp.moveaxis(_microbatch(jnp.asarray(a), nd + 1, m), nd + 1, nd),
        layer_extra,
    )  # fmt: skip

    # x is replicated over 'pp', so the backward pass sums its cotangent over the stages
    # (only the first stage's is nonzero). On CPU that all-reduce and the outputs' sum in
    # _schedule run in float32 at least (see _cpu_collectives_dtype); both are exact in any
    # dtype, since they add zeros to one stage's values.
    x_dtype = x_mb.dtype
    wide = _cpu_collectives_dtype(mesh, x_dtype)
    x_mb = x_mb.astype(wide)
    body = functools.partial(
        _schedule,
        x_dtype=x_dtype,
        sum_dtype=wide,
        stage_fn=stage_fn,
        num_stages=num_stages,
        num_microbatches=m,
        num_repeats=num_repeats,
        has_aux=has_aux,
        remat=remat,
    )
    stage_spec = PartitionSpec(PP)
    replicated = PartitionSpec()
    # Manual over 'pp' only: dp/ep/tp stay automatic inside. check_vma=False because on jax
    # 0.10.2 the backward pass of a shard_map nested inside (the MoE all-to-all over 'ep')
    # fails to lower under the varying-manual-axes checker (its residuals get a sharding
    # that lists the outer manual 'pp' axis before 'ep'); results are the same either way.
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(stage_spec, replicated, replicated, stage_spec),
        out_specs=(replicated, stage_spec),
        axis_names=frozenset({PP}),
        check_vma=False,
    )
    if num_stages == 1:
        # One stage: no pipeline, just the loop over microbatches (gradient accumulation). A
        # shard_map manual over a size-1 axis next to sharded automatic axes fails to
        # partition in XLA (a cross-partition all-reduce outside manual mode), so skip it.
        y_mb, aux = body(stage_params, x_mb, extra_mb, layer_mb)
    else:
        # Under jit even when called eagerly: eager shard_map does not support automatic axes.
        y_mb, aux = jax.jit(mapped)(stage_params, x_mb, extra_mb, layer_mb)
    y = _unmicrobatch(y_mb)
    return (y, aux) if has_aux else y


def _schedule(
    params, x_mb, extra_mb, layer_mb, *, x_dtype, sum_dtype, stage_fn, num_stages,
    num_microbatches, num_repeats, has_aux, remat,
):  # fmt: skip
    """The per-stage program (inside shard_map): one lax.scan over the ticks."""
    pp, m, v = num_stages, num_microbatches, num_repeats
    x_mb = x_mb.astype(x_dtype)
    stage = jax.lax.axis_index(PP) if pp > 1 else 0
    # Drop the local stage axis of size 1.
    params = jax.tree.map(lambda a: a[0], params)
    layer_mb = None if layer_mb is None else jax.tree.map(lambda a: a[0], layer_mb)

    def call(chunk_params, h, extra_j, layer_j):
        kwargs = {}
        if extra_j is not None:
            kwargs["extra"] = extra_j
        if layer_j is not None:
            kwargs["layer_extra"] = layer_j
        out = stage_fn(chunk_params, h, **kwargs)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    "with has_aux=True, stage_fn must return a pair (y_mb, aux), got "
                    f"{type(out).__name__}"
                )
            return out
        return out, ()

    if remat:
        call = jax.checkpoint(call)

    def pick(tree, index):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, False), tree)

    def slot_inputs(j, r):
        chunk_params = params if v == 1 else pick(params, r)
        extra_j = None if extra_mb is None else pick(extra_mb, j)
        if layer_mb is None:
            layer_j = None
        else:
            layer_j = pick(layer_mb if v == 1 else pick(layer_mb, r), j)
        return chunk_params, extra_j, layer_j

    # Check the stage function once, on abstract values, so a mismatch fails with a clear
    # message instead of a scan carry type error.
    chunk_params, extra_j, layer_j = slot_inputs(0, 0)
    out_shape, aux_shape = jax.eval_shape(call, chunk_params, x_mb[0], extra_j, layer_j)
    if out_shape.shape != x_mb.shape[1:] or out_shape.dtype != x_mb.dtype:
        raise ValueError(
            f"stage_fn must return a microbatch of the shape and dtype it was given, "
            f"{x_mb.shape[1:]} {x_mb.dtype}, but returned {out_shape.shape} {out_shape.dtype}"
        )
    aux_zero = jax.tree.map(
        lambda s: jnp.zeros(((v,) if v > 1 else ()) + s.shape, s.dtype), aux_shape
    )

    forward = [(i, i + 1) for i in range(pp - 1)]
    ring = forward + [(pp - 1, 0)]

    def tick(carry, t):
        received, pending, aux_sum = carry
        j, r, valid = _slot(t, stage, pp, m, v, xp=jnp)
        jc = jnp.clip(j, 0, m - 1)
        rc = jnp.clip(r, 0, v - 1)
        if v > 1:
            # Stage 0 parks the microbatches coming back round the ring until their next
            # repeat starts (at most M - pp + 1 ticks later); stored before it is read, so a
            # microbatch can go straight on when M <= pp.
            jb, rb, valid_b = _slot(t - 1, pp - 1, pp, m, v, xp=jnp)
            keep = valid_b & (rb < v - 1)
            jbc = jnp.clip(jb, 0, m - 1)
            old = jax.lax.dynamic_index_in_dim(pending, jbc, 0, False)
            pending = jax.lax.dynamic_update_index_in_dim(
                pending, jnp.where(keep, received, old), jbc, 0
            )
            first = jnp.where(
                r <= 0,
                jax.lax.dynamic_index_in_dim(x_mb, jc, 0, False),
                jax.lax.dynamic_index_in_dim(pending, jc, 0, False),
            )
        else:
            first = jax.lax.dynamic_index_in_dim(x_mb, jc, 0, False)
        h = jnp.where(stage == 0, first, received)
        chunk_params, extra_j, layer_j = slot_inputs(jc, rc)
        out, aux = call(chunk_params, h, extra_j, layer_j)
        aux = jax.tree.map(lambda a: jnp.where(valid, a, jnp.zeros_like(a)), aux)
        if v > 1:
            aux_sum = jax.tree.map(lambda s, a: s.at[rc].add(a), aux_sum, aux)
        else:
            aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        if pp > 1:
            received = jax.lax.ppermute(out, PP, ring if v > 1 else forward)
        else:
            received = out
        return (received, pending, aux_sum), out

    # Every buffer starts from real inputs, not zeros: idle ticks then compute on ordinary
    # data, so their (masked-out) results and derivatives stay finite.
    pending = x_mb if v > 1 else jnp.zeros((0,), x_mb.dtype)
    init = (x_mb[0], pending, aux_zero)
    ticks = jnp.arange(num_ticks(pp, m, v))
    (_, _, aux_sum), outs = jax.lax.scan(tick, init, ticks)
    # The last stage finishes microbatch j on its final repeat at tick `first_done + j`. (The
    # per-tick outputs are stacked by the scan rather than written into a carried buffer:
    # a carried [M, ...] buffer costs a copy per tick when XLA cannot update it in place.)
    first_done = (v - 1) * _period(pp, m, v) + pp - 1
    outputs = outs[first_done : first_done + m]
    # Only the last stage holds the outputs; the masked sum hands them to every stage (in
    # sum_dtype: see pipeline_apply).
    if pp > 1:
        last = jnp.where(stage == pp - 1, outputs.astype(sum_dtype), jnp.zeros((), sum_dtype))
        outputs = jax.lax.psum(last, PP).astype(outputs.dtype)
    aux_sum = jax.tree.map(lambda a: a[None], aux_sum)
    return outputs, aux_sum
