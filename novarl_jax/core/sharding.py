"""Logical axis names and the one table that maps them to mesh axes.

Weights and activations are annotated with *logical* axis names (``embed``, ``heads``,
``expert`` ...). This module alone knows how those names map onto the mesh axes of
:mod:`novarl_jax.core.distributed`; every other module asks it for a ``PartitionSpec`` or a
``NamedSharding``.

A dimension is sharded over those of its mesh axes, in the rule's order, whose sizes keep
dividing it; an axis that would not divide it is skipped (a batch of 4 on ``dp=4, ep=2`` is
sharded over ``dp`` alone; 2 KV heads on ``tp=8`` stay replicated). A mesh axis is never used
twice in one spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from novarl_jax.core.distributed import DP, EP, PP, TP

# Logical axis names (the vocabulary of annotations).
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
EXPERT = "expert"
LAYERS = "layers"
STAGE = "stage"

LOGICAL_AXES: tuple[str, ...] = (
    BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, EXPERT, LAYERS, STAGE,
)  # fmt: skip

# logical name -> mesh axes (a tuple; empty = replicated).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    BATCH: (DP, EP),  # dense layers: the expert axis carries data too
    LENGTH: (),
    EMBED: (),
    HEADS: (TP,),
    KV_HEADS: (TP,),
    HEAD_DIM: (),
    MLP: (TP,),
    VOCAB: (TP,),
    EXPERT: (EP,),
    LAYERS: (),  # layers within one pipeline stage
    STAGE: (PP,),  # pipeline stages
}

LogicalNames = Sequence[str | None]


def _mesh_sizes(mesh: Any) -> Mapping[str, int]:
    return dict(mesh.shape)


def logical_to_spec(
    names: LogicalNames,
    mesh: Any = None,
    *,
    shape: Sequence[int] | None = None,
    rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES,
):
    """PartitionSpec for one array annotated with logical axis names.

    Args:
        names: one logical name (or None) per dimension.
        mesh: the mesh; when given, mesh axes of size 1 are omitted and, with ``shape``, an
            axis whose size does not divide the dimension is left out.
        shape: the array's shape, to check divisibility.
        rules: logical name -> mesh axes.

    Raises:
        ValueError: an unknown logical name, or ``shape`` of a different rank.
    """
    from jax.sharding import PartitionSpec

    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    sizes = _mesh_sizes(mesh) if mesh is not None else None
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; valid names: {sorted(rules)}")
        axes: list[str] = []
        factor = 1
        for axis in rules[name]:
            if axis in used:
                continue
            if sizes is not None:
                size = sizes.get(axis, 1)
                if size == 1:
                    continue
                if shape is not None and shape[dim] % (factor * size):
                    continue
                factor *= size
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def tree_specs(logical_tree: Any, mesh: Any = None, shapes: Any = None, **kwargs):
    """Maps a pytree of logical-name tuples (and optional shapes) to PartitionSpecs."""
    import jax

    if shapes is None:
        return jax.tree.map(
            lambda n: logical_to_spec(n, mesh, **kwargs),
            logical_tree,
            is_leaf=_is_names,
        )
    return jax.tree.map(
        lambda n, s: logical_to_spec(n, mesh, shape=getattr(s, "shape", s), **kwargs),
        logical_tree,
        shapes,
        is_leaf=_is_names,
    )


def tree_shardings(logical_tree: Any, mesh: Any, shapes: Any = None, **kwargs):
    """Maps a pytree of logical-name tuples to ``NamedSharding``s on ``mesh``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    specs = tree_specs(logical_tree, mesh, shapes, **kwargs)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_spec(ndim: int, mesh: Any = None, batch_size: int | None = None):
    """PartitionSpec for an activation whose leading dim is the batch: ``(('dp','ep'), ...)``."""
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return logical_to_spec((BATCH,) + (None,) * (ndim - 1), mesh, shape=shape)
