"""A Mixtral/Llama-style decoder-only policy: pure ``init_params`` / ``forward`` over pytrees.

Each decoder layer is pre-norm: ``x += attn(rms_norm(x)); x += mlp(rms_norm(x))``, where
``mlp`` is a SwiGLU MLP (dense models) or a Mixture-of-Experts block
(:mod:`novarl_jax.models.moe`). The layers' weights are stacked along a leading [L] axis and
run as one ``jax.lax.scan``, so a model compiles one layer however deep it is. On a mesh with
``pp > 1`` the stack is split over ``pp`` in contiguous blocks of ``L / pp`` layers, and the
training forward runs them as pipeline stages (:mod:`novarl_jax.models.pipeline`); see
:func:`forward`.

Parameters (``D`` model width, ``V`` vocab, ``N`` / ``N_kv`` heads, ``Dh`` head width, ``F``
MLP width, ``L`` layers)::

    embed_tokens/embedding           [V, D]
    layers/input_norm/scale          [L, D]
    layers/attn/{q,k,v,o}_proj       [L, D, N, Dh] / [L, D, N_kv, Dh] x2 / [L, N, Dh, D]
    layers/attn/{q,k,v}_bias         [L, N, Dh] / [L, N_kv, Dh] x2  (only when qkv_bias: Qwen2)
    layers/attn/{q,k}_norm           [L, Dh] x2   (only when qk_norm: Qwen3)
    layers/post_attn_norm/scale      [L, D]
    layers/mlp/{gate,up,down}_proj   [L, D, F] x2 / [L, F, D]      (dense)
    layers/moe/...                   [L, ...] the MoE block's parameters (MoE)
    final_norm/scale                 [D]
    lm_head/kernel                   [D, V]       (absent when tie_word_embeddings)
    value_head/{kernel,bias}         [D, 1], [1]  (only when value_head)

Example:
    >>> config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4)
    >>> params = init_params(config, jax.random.key(0))
    >>> logits, _, aux = forward(params, jnp.zeros((2, 5), jnp.int32), config)
    >>> logits.shape
    (2, 5, 64)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from novarl_jax.core import sharding as shd
from novarl_jax.core.checks import check_random_key, is_integer
from novarl_jax.models import moe as moe_lib
from novarl_jax.models import pipeline
from novarl_jax.models.config import ModelConfig
from novarl_jax.models.layers import (
    DEFAULT_INIT,
    Attention,
    LayerKV,
    RMSNorm,
    SwiGLU,
    attention_mask_for,
    cached_attention_mask,
    constrain,
    rms_norm,
    rotary_cos_sin,
)

_ACT = (shd.BATCH, shd.LENGTH, shd.EMBED)


class KVCache(NamedTuple):
    """Keys and values of every layer for incremental decoding.

    Attributes:
        k: L arrays [B, N_kv, Dh, S], one per layer: keys (rotary already applied), S =
            slots, stored transposed, so a decode step's scores are a plain
            ``[G*T, Dh] x [Dh, S]`` matmul per key/value head (an ``[S, Dh]`` operand made
            XLA:CPU's matmul 2.4x slower at decode sizes). One buffer per layer, so the
            attention reads it in place (see :class:`~novarl_jax.models.layers.LayerKV`).
        v: L arrays [B, N_kv, S, Dh], values, head-major.
        key_mask: [B, S] int32, 1 = the slot holds a real token.
        index: int32 scalar, the next slot to write.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    key_mask: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``max_length`` slots per sequence.

    Args:
        config: the model.
        batch_size: B.
        max_length: S, the total number of tokens (prompt + generated) the cache can hold.
        dtype: dtype of the stored keys/values; None = ``config.activation_dtype`` (the
            dtype the forward computes them in).

    Returns:
        KVCache with zero k/v, key_mask all 0 and index 0.

    Example:
        >>> cache = init_cache(config, batch_size=2, max_length=16)
        >>> cache.k[0].shape, cache.v[0].shape  # [B, N_kv, Dh, S], [B, N_kv, S, Dh], L of each
        ((2, 4, 8, 16), (2, 4, 16, 8))
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    batch_size, max_length = int(batch_size), int(max_length)
    if batch_size < 1 or max_length < 1:
        raise ValueError(
            f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}"
        )
    k_shape, v_shape = _cache_shapes(config, batch_size, max_length)
    layers = range(config.num_hidden_layers)
    dtype = config.activation_dtype if dtype is None else dtype
    return KVCache(
        k=tuple(jnp.zeros(k_shape, dtype) for _ in layers),
        v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
        key_mask=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


# Weights the forward reads in float32 whatever the compute dtype: the MoE router's (its
# logits decide the experts, and bfloat16 rounding would move near-tied choices) and the
# value head's (a scalar per token, regressed onto returns). Both are small.
FLOAT32_PARAMS = ("router", "value_head")


def cast_params(params: Any, config: ModelConfig) -> Any:
    """``params`` with its floating-point leaves in ``config.activation_dtype``.

    What the forward does on entry, so a model with ``compute_dtype`` set computes in it
    while its parameters keep ``dtype`` (the cast is differentiable: gradients come back in
    the parameters' dtype). The weights under a key in :data:`FLOAT32_PARAMS` (MoE router,
    value head) are left as they are: the forward reads them in float32. Leaves already in
    the compute dtype, and integer leaves, are returned as they are, so casting once before
    a loop of forwards (a decode loop) makes the forwards' own casts free.

    Args:
        params: a parameter tree (from :func:`init_params` or a checkpoint).
        config: the model.

    Returns:
        A tree of the same structure.
    """
    dtype = config.activation_dtype

    def cast(path, x):
        x_dtype = getattr(x, "dtype", None)
        if x_dtype is None or x_dtype == dtype or not jnp.issubdtype(x_dtype, jnp.floating):
            return x
        if any(getattr(key, "key", None) in FLOAT32_PARAMS for key in path):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def _host_value(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known here: not traced (under ``jit``) and
    wholly held by this process; else None (checks of values are then skipped)."""
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _cache_shapes(config: ModelConfig, batch_size: int, slots: int):
    """Shapes of one layer's keys [B, N_kv, Dh, S] and values [B, N_kv, S, Dh]."""
    nkv, dh = config.num_key_value_heads, config.head_dim
    return (batch_size, nkv, dh, slots), (batch_size, nkv, slots, dh)


def cache_logical_axes(config: ModelConfig) -> KVCache:
    """Logical axis names of a :class:`KVCache` (a KVCache of name tuples)."""
    layers = config.num_hidden_layers
    k = ((shd.BATCH, shd.KV_HEADS, shd.HEAD_DIM, shd.LENGTH),) * layers
    v = ((shd.BATCH, shd.KV_HEADS, shd.LENGTH, shd.HEAD_DIM),) * layers
    return KVCache(k=k, v=v, key_mask=(shd.BATCH, shd.LENGTH), index=())


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer: attention then SwiGLU MLP or MoE block.

    Attributes:
        config: the model.
        mesh: the device mesh (None = no sharding constraints, no shard_map).
        train: MoE capacity: ``capacity_factor`` when True, ``eval_capacity_factor`` else.
        return_kv: return the tokens' keys and values also when there is no cache.
    """

    config: ModelConfig
    mesh: Any = None
    train: bool = True
    return_kv: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        token_mask: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        routing: Any = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, dict[str, Any] | None]:
        """Args: x [B, T, D]; cos/sin [B, T, Dh]; mask [B, T, S + T] bool with a cache,
        [B, T, T] without (see :class:`~novarl_jax.models.layers.Attention`); token_mask
        [B, T] (1 = real token); kv_cache (k, v) [B, N_kv, S, Dh] (read only) or None;
        routing: this layer's expert choices to replay (MoE) or None.

        Returns: (x [B, T, D], the new tokens' (k, v) [B, N_kv, T, Dh] or None without a
        cache (unless ``return_kv``), the MoE block's aux or None).
        """
        cfg = self.config
        dt = cfg.param_dtype
        h = RMSNorm(cfg.rms_norm_eps, dt, name="input_norm")(x)
        h, new_cache = Attention(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dt,
            self.mesh,
            self.return_kv,
            cfg.qkv_bias,
            cfg.qk_norm,
            cfg.rms_norm_eps,
            name="attn",
        )(h, cos, sin, mask, kv_cache)
        x = constrain(x + h, _ACT, self.mesh)
        h = RMSNorm(cfg.rms_norm_eps, dt, name="post_attn_norm")(x)
        aux = None
        if cfg.is_moe:
            moe_params = self.param(
                "moe",
                moe_lib.init_moe_params,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_local_experts,
                dt,
            )
            h, aux = moe_lib.moe_forward(
                moe_params,
                h,
                cfg.router,
                mesh=self.mesh,
                token_mask=token_mask,
                routing=routing,
                train=self.train,
            )
        else:
            h = SwiGLU(cfg.intermediate_size, dt, self.mesh, name="mlp")(h)
        x = constrain(x + h.astype(x.dtype), _ACT, self.mesh)
        return x, new_cache, aux


def _layer_params_init(config: ModelConfig, key: jax.Array) -> dict[str, Any]:
    """One layer's parameters (unstacked), by running the layer on a dummy token."""
    x = jnp.zeros((1, 1, config.hidden_size), config.param_dtype)
    cos, sin = rotary_cos_sin(
        jnp.zeros((1, 1), jnp.int32), config.head_dim, config.rope_theta, config.rope_scaling
    )
    mask = jnp.ones((1, 1, 1), bool)
    token_mask = jnp.ones((1, 1), jnp.int32)
    return DecoderLayer(config).init(key, x, cos, sin, mask, token_mask)["params"]


def _init_params(config: ModelConfig, key: jax.Array) -> dict[str, Any]:
    k_embed, k_layers, k_head, k_value = jax.random.split(key, 4)
    dt = config.param_dtype
    d, v = config.hidden_size, config.vocab_size
    layer_keys = jax.random.split(k_layers, config.num_hidden_layers)
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": DEFAULT_INIT(k_embed, (v, d), dt)},
        "layers": jax.vmap(lambda k: _layer_params_init(config, k))(layer_keys),
        "final_norm": {"scale": jnp.ones((d,), dt)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": DEFAULT_INIT(k_head, (d, v), dt)}
    if config.value_head:
        params["value_head"] = {
            "kernel": DEFAULT_INIT(k_value, (d, 1), dt),
            "bias": jnp.zeros((1,), dt),
        }
    return params


_init_params_jit = jax.jit(_init_params, static_argnums=0)


def init_params(config: ModelConfig, key: jax.Array) -> dict[str, Any]:
    """Random initial parameters (normal(0, 0.02) weights, unit norm gains).

    Args:
        config: the model.
        key: PRNG key.

    Returns:
        Nested dict of arrays in ``config.dtype``; decoder-layer weights stacked [L, ...]
        (see the module docstring for the tree).

    Example:
        >>> params = init_params(config, jax.random.key(0))
        >>> params["layers"]["attn"]["q_proj"].shape  # [L, D, N, Dh]
        (2, 32, 4, 8)
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    check_random_key(key)
    return _init_params_jit(config, key)


def _shape_fields(config: ModelConfig) -> str:
    """The config fields that set parameter shapes, for messages."""
    names = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "num_local_experts", "qkv_bias", "qk_norm")  # fmt: skip
    return ", ".join(f"{n}={getattr(config, n)}" for n in names)


@functools.lru_cache(maxsize=64)
def param_specs(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """``{keystr path: shape and dtype}`` of every parameter :func:`init_params` makes for
    ``config`` (computed once per config, without allocating)."""
    tree = jax.eval_shape(lambda key: _init_params(config, key), jax.random.key(0))
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_pipeline_layers(config: ModelConfig, pp: int) -> None:
    """Raises ValueError unless ``pp`` pipeline stages split the decoder layers evenly."""
    if config.num_hidden_layers % pp:
        valid = [d for d in range(1, config.num_hidden_layers + 1)
                 if config.num_hidden_layers % d == 0]  # fmt: skip
        raise ValueError(
            f"num_hidden_layers={config.num_hidden_layers} is not divisible by "
            f"pipeline_parallel_size={pp}; valid pipeline_parallel_size: {valid}"
        )


def param_logical_axes(config: ModelConfig, *, pp: int = 1) -> dict[str, Any]:
    """Logical axis names of every parameter: a tree with exactly the structure of params.

    Each leaf is a tuple with one :mod:`novarl_jax.core.sharding` name (or None) per
    dimension. Stacked layer weights start with ``LAYERS`` (replicated) when ``pp == 1`` and
    with ``STAGE`` (split over the ``pp`` mesh axis in ``pp`` contiguous blocks) when
    ``pp > 1``: device group ``pp = s`` then holds exactly stage ``s``'s layers, so
    :func:`~novarl_jax.models.pipeline.to_stages` is a local reshape, and the parameter tree
    (and so every checkpoint) keeps the same ``[L, ...]`` shapes whatever ``pp`` is.

    Args:
        config: the model.
        pp: pipeline stages (the mesh's ``pp`` size); must divide ``num_hidden_layers``.

    Raises:
        ValueError: ``num_hidden_layers`` is not divisible by ``pp``.

    Example:
        >>> param_logical_axes(config, pp=2)["layers"]["input_norm"]["scale"]
        ('stage', 'embed')
    """
    if isinstance(pp, bool) or not isinstance(pp, int | np.integer) or pp < 1:
        raise ValueError(f"pp must be an integer >= 1, got {pp!r}")
    _check_pipeline_layers(config, pp)
    layer_axis = shd.STAGE if pp > 1 else shd.LAYERS
    layer_axes: dict[str, Any] = {
        "input_norm": {"scale": (shd.EMBED,)},
        "attn": {
            "q_proj": (shd.EMBED, shd.HEADS, shd.HEAD_DIM),
            "k_proj": (shd.EMBED, shd.KV_HEADS, shd.HEAD_DIM),
            "v_proj": (shd.EMBED, shd.KV_HEADS, shd.HEAD_DIM),
            "o_proj": (shd.HEADS, shd.HEAD_DIM, shd.EMBED),
            **(
                {
                    "q_bias": (shd.HEADS, shd.HEAD_DIM),
                    "k_bias": (shd.KV_HEADS, shd.HEAD_DIM),
                    "v_bias": (shd.KV_HEADS, shd.HEAD_DIM),
                }
                if config.qkv_bias
                else {}
            ),
            **({"q_norm": (shd.HEAD_DIM,), "k_norm": (shd.HEAD_DIM,)} if config.qk_norm else {}),
        },
        "post_attn_norm": {"scale": (shd.EMBED,)},
    }
    if config.is_moe:
        layer_axes["moe"] = moe_lib.moe_logical_axes()
    else:
        layer_axes["mlp"] = {
            "gate_proj": (shd.EMBED, shd.MLP),
            "up_proj": (shd.EMBED, shd.MLP),
            "down_proj": (shd.MLP, shd.EMBED),
        }
    axes: dict[str, Any] = {
        "embed_tokens": {"embedding": (shd.VOCAB, shd.EMBED)},
        "layers": jax.tree.map(lambda names: (layer_axis, *names), layer_axes, is_leaf=_is_names),
        "final_norm": {"scale": (shd.EMBED,)},
    }
    if not config.tie_word_embeddings:
        axes["lm_head"] = {"kernel": (shd.EMBED, shd.VOCAB)}
    if config.value_head:
        axes["value_head"] = {"kernel": (shd.EMBED, None), "bias": (None,)}
    return axes


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def param_shardings(config: ModelConfig, mesh: Any, params: Any = None) -> Any:
    """``NamedSharding`` of every parameter on ``mesh`` (a tree shaped like params).

    The layer axis is split over ``pp`` when the mesh has ``pp > 1`` (see
    :func:`param_logical_axes`).

    Args:
        config: the model.
        mesh: the device mesh.
        params: params or their shapes (e.g. ``jax.eval_shape(init_params, ...)``); used to
            keep dimensions the mesh does not divide replicated. Default: derived from
            ``config``.
    """
    if params is None:
        params = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    axes = param_logical_axes(config, pp=pipeline.num_stages(mesh))
    return shd.tree_shardings(axes, mesh, params)


def shard_params(params: Any, config: ModelConfig, mesh: Any) -> Any:
    """Places ``params`` on ``mesh`` by the logical-axis rule table.

    With ``pp > 1`` in the mesh, stage ``s``'s layers land on the devices of ``pp = s``.

    Raises:
        ValueError: the mesh's ``pp`` does not divide ``num_hidden_layers``.

    Example:
        >>> mesh = ParallelLayout(dp=2, tp=2, ep=2).make_mesh()
        >>> params = shard_params(init_params(config, key), config, mesh)
    """
    return jax.device_put(params, param_shardings(config, mesh, params))


def _check_inputs(
    tokens: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    cache: KVCache | None,
    config: ModelConfig,
) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if 0 in tokens.shape:
        raise ValueError(f"tokens must be [B, T] with B >= 1 and T >= 1, got shape {tokens.shape}")
    for name, arr in (("positions", positions), ("attention_mask", attention_mask)):
        if arr.shape != tokens.shape:
            raise ValueError(
                f"{name} must have the shape of tokens {tokens.shape}, got {arr.shape}"
            )
    if cache is not None:
        layers, b = config.num_hidden_layers, tokens.shape[0]
        slots = cache.v[0].shape[2] if cache.v and cache.v[0].ndim == 4 else 0
        k_shape, v_shape = _cache_shapes(config, b, slots)
        if (
            len(cache.k) != layers
            or len(cache.v) != layers
            or any(a.shape != k_shape for a in cache.k)
            or any(a.shape != v_shape for a in cache.v)
        ):
            raise ValueError(
                f"cache must hold L = {layers} key arrays [B, N_kv, Dh, S] and {layers} value "
                f"arrays [B, N_kv, S, Dh] with B, N_kv, Dh = "
                f"{(b, config.num_key_value_heads, config.head_dim)} and one S; got "
                f"{len(cache.k)} key arrays of shapes {sorted({a.shape for a in cache.k})} and "
                f"{len(cache.v)} value arrays of shapes {sorted({a.shape for a in cache.v})}"
            )
        t = tokens.shape[1]
        if t > slots:
            raise ValueError(f"{t} tokens do not fit a cache of {slots} slots")
        if jnp.shape(cache.index) != ():
            raise ValueError(f"cache.index must be a scalar, got shape {jnp.shape(cache.index)}")
        index = _host_value(cache.index)
        if index is not None:
            if not np.issubdtype(index.dtype, np.integer):
                raise ValueError(f"cache.index must be an integer, got {index.dtype} {index}")
            if index < 0 or index + t > slots:
                raise ValueError(
                    f"cache.index {int(index)} + {t} new tokens exceed the cache's {slots} "
                    f"slots (the index must be in [0, {slots - t}])"
                )
    _check_token_ids(tokens, attention_mask, config)


def _check_token_ids(tokens: jax.Array, attention_mask: jax.Array, config: ModelConfig) -> None:
    """When the values are known (not under ``jit``), every real token (``attention_mask !=
    0``) must be an id in ``[0, vocab_size)``; padding may hold any id."""
    ids, mask = _host_value(tokens), _host_value(attention_mask)
    if ids is None or mask is None:
        return
    bad = np.argwhere((mask != 0) & ((ids < 0) | (ids >= config.vocab_size)))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raise ValueError(
            f"tokens must be ids in [0, vocab_size={config.vocab_size}), got {int(ids[row, col])} "
            f"at [{row}, {col}] ({len(bad)} real token(s) out of range; padding is not checked)"
        )


def _array(name: str, value: Any, *, integer: bool, what: str) -> jax.Array:
    """``value`` as an array; ``integer`` requires an integer dtype (no silent truncation)."""
    if not isinstance(value, jax.Array):  # tracers are jax.Arrays too
        try:
            value = np.asarray(value)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(
                f"{name} must be an array of {what}, got {type(value).__name__}"
            ) from None
        if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == np.bool_):
            raise TypeError(f"{name} must be a numeric array of {what}, got dtype {value.dtype}")
    arr = jnp.asarray(value)
    if integer and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of {what}, got dtype {arr.dtype}")
    return arr


def checked_params(params: Any, config: ModelConfig) -> Any:
    """``params`` as a forward computes with them (:func:`cast_params`), after checking that
    they can be the parameters of ``config``.

    Raises a clear error for a missing top-level entry, an embedding / LM head not
    ``[V, D]`` / ``[D, V]`` of the config, a layer stack of another depth, or a
    floating-point weight in neither ``config.dtype`` nor the compute dtype (the dtype of
    :func:`cast_params`' output). (Shapes and dtypes only: works on traced params too.)"""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a mapping (from init_params or load_hf_model), got "
            f"{type(params).__name__}"
        )
    v, d, layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
    expect = {("embed_tokens", "embedding"): (v, d)}
    if not config.tie_word_embeddings:
        expect[("lm_head", "kernel")] = (d, v)
    for keys, shape in expect.items():
        name = "params" + "".join(f"[{k!r}]" for k in keys)
        try:
            got = jnp.shape(params[keys[0]][keys[1]])
        except (KeyError, TypeError, IndexError):
            raise ValueError(
                f"{name} is missing (config tie_word_embeddings={config.tie_word_embeddings})"
            ) from None
        if got != shape:
            raise ValueError(
                f"{name} has shape {got}, but config vocab_size={v}, hidden_size={d} need "
                f"{shape}; were the params made for another config?"
            )
    for key in ("layers", "final_norm", *(("value_head",) if config.value_head else ())):
        if key not in params:
            raise ValueError(f"params[{key!r}] is missing (config value_head={config.value_head})")
    block = "moe" if config.is_moe else "mlp"
    if not isinstance(params["layers"], Mapping) or block not in params["layers"]:
        raise ValueError(
            f"params['layers'][{block!r}] is missing: config num_local_experts="
            f"{config.num_local_experts} is a {'MoE' if config.is_moe else 'dense'} model"
        )
    depths = {jnp.shape(x)[:1] for x in jax.tree.leaves(params["layers"])}
    if depths != {(layers,)}:
        raise ValueError(
            f"params['layers'] must be stacked over num_hidden_layers={layers} layers, got "
            f"leading sizes {sorted(depths)}"
        )
    got = {
        jax.tree_util.keystr(p): jnp.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    for name, spec in param_specs(config).items():
        shape = spec.shape
        if name not in got:
            raise ValueError(f"params{name} is missing; config ({_shape_fields(config)}) has it")
        if got[name] != shape:
            raise ValueError(
                f"params{name} has shape {got[name]}, but config ({_shape_fields(config)}) "
                f"needs {shape}; were the params made for another config?"
            )
    allowed = {config.param_dtype, config.activation_dtype}  # as stored, or cast already
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        x_dtype = getattr(x, "dtype", None)
        if x_dtype is not None and jnp.issubdtype(x_dtype, jnp.floating):
            if x_dtype not in allowed:
                raise ValueError(
                    f"params{jax.tree_util.keystr(path)} has dtype {x_dtype}, but config "
                    f"dtype={config.dtype!r}; cast the params to it or make the config with "
                    f"their dtype (compute_dtype sets the dtype the forward computes in)"
                )
    return cast_params(params, config)


def check_routing(routing: Any, config: ModelConfig, batch: int, length: int) -> jax.Array:
    """``routing`` as an integer [L, B, T, K] array; when its values are known (not under
    ``jit``) they must be experts in ``[0, num_local_experts)``."""
    if not config.is_moe:
        raise ValueError("routing= was given but the model is dense (num_local_experts=0)")
    want = (config.num_hidden_layers, batch, length, config.num_experts_per_tok)
    routing = _array("routing", routing, integer=True, what="expert indices [L, B, T, K]")
    if routing.shape != want:
        raise ValueError(
            f"routing must be [L, B, T, K] = {want} (as aux['routing'] returns it), got shape "
            f"{routing.shape}"
        )
    moe_lib.check_routing_values(routing, config.num_local_experts)
    return routing


def check_flag(name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is a real bool (NumPy bools too)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


# --------------------------------------------------------------------------------------------
# The decoder layers: one scan (any layout, and every cached call), or a pipeline over 'pp'

# Per-layer MoE statistics as sums over real (non-padding) tokens, so that the statistics of
# several microbatches combine exactly by addition: 'tokens' [] routed tokens, 'counts' [E]
# choices per expert before dropping, 'kept' [] choices placed, 'probs' [E] summed router
# probabilities, 'z' [] summed squared router logsumexp.
_STAT_KEYS = ("tokens", "counts", "kept", "probs", "z")


def _layer_stats(moe_aux: dict[str, Any]) -> dict[str, jax.Array]:
    """One MoE layer's statistics as sums (see ``_STAT_KEYS``) over this call's tokens."""
    return {key: moe_aux["sums"][key].astype(jnp.float32) for key in _STAT_KEYS}


def _finish_stats(stats: dict[str, jax.Array] | None, config: ModelConfig) -> dict:
    """Turns per-layer sums [L, ...] into forward's aux entries (means over layers).

    Per layer, with N the routed tokens and K experts per token (the MoE block's formulas):
    ``aux_loss = E * sum_e (counts_e / N) * (probs_e / N)``, ``z_loss = z / N``,
    ``dropped_fraction = (N * K - kept) / (N * K)``, ``expert_load = counts / (N * K)``;
    ``layer_dropped_fraction`` keeps the dropped fraction of each layer.
    """
    if stats is None:
        zero = jnp.zeros((), jnp.float32)
        return {
            "moe_aux_loss": zero,
            "moe_z_loss": zero,
            "dropped_fraction": zero,
            "layer_dropped_fraction": jnp.zeros((config.num_hidden_layers,), jnp.float32),
            "expert_load": jnp.zeros((config.num_hidden_layers, 0), jnp.float32),
        }
    k, e = config.num_experts_per_tok, config.num_local_experts
    tokens = jnp.maximum(stats["tokens"], 1.0)  # [L]
    choices = jnp.maximum(stats["tokens"] * k, 1.0)
    frac = stats["counts"] / tokens[:, None]
    mean_probs = stats["probs"] / tokens[:, None]
    dropped = (stats["tokens"] * k - stats["kept"]) / choices  # [L]
    return {
        "moe_aux_loss": jnp.mean(e * jnp.sum(frac * mean_probs, axis=-1)),
        "moe_z_loss": jnp.mean(stats["z"] / tokens),
        "dropped_fraction": jnp.mean(dropped),
        "layer_dropped_fraction": dropped,
        "expert_load": stats["counts"] / choices[:, None],
    }


def _scan_layers(
    layers, x, cos, sin, mask, token_mask, kv, routing, *, config, mesh, train,
    return_routing, return_kv=False,
):  # fmt: skip
    """Runs stacked layers [L', ...] as one ``lax.scan``.

    ``kv``: the cache's (k, v), L' arrays each (keys [B, N_kv, Dh, S], values
    [B, N_kv, S, Dh]), read by the layers (layer i reads the i-th buffers, see
    :class:`~novarl_jax.models.layers.LayerKV`) and not written.

    Returns (x [B, T, D], the new tokens' (k, v) [L', B, N_kv, T, Dh] or None (no ``kv`` and
    not ``return_kv``),
    stats {key: [L', ...]} or None for dense models, routing [L', B, T, K] or None).
    """
    layer = DecoderLayer(config, mesh, train, return_kv=return_kv)

    def body(x, xs):
        layer_params, index, layer_routing = xs
        layer_kv = None if kv is None else LayerKV(kv[0], kv[1], index)
        x, new_kv, moe_aux = layer.apply(
            {"params": layer_params},
            x,
            cos,
            sin,
            mask,
            token_mask,
            layer_kv,
            layer_routing,
        )
        stats = chosen = None
        if moe_aux is not None:
            stats = _layer_stats(moe_aux)
            if return_routing:
                chosen = moe_aux["routing"]
        return x, (new_kv, stats, chosen)

    if config.remat and kv is None:
        body = jax.checkpoint(body)  # gradient checkpointing, one layer at a time
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    xs = (layers, jnp.arange(num_layers, dtype=jnp.int32), routing)
    x, (new_kv, stats, chosen) = jax.lax.scan(body, x, xs)
    return x, new_kv, stats, chosen


def _pipelined_layers(
    layers, x, cos, sin, mask, token_mask, routing, *, config, mesh, train, return_routing,
    num_microbatches,
):  # fmt: skip
    """Runs the layers as ``pp`` pipeline stages of ``L / pp`` layers (GPipe schedule).

    Every stage scans its layers over one microbatch per tick
    (:func:`~novarl_jax.models.pipeline.pipeline_apply`). MoE statistics come back as sums
    over each stage's microbatches, so they equal the whole batch's (``_finish_stats``).
    Expert choices are returned through the same summed aux: each microbatch writes its
    rows into an otherwise zero [L / pp, B, T, K] array.

    Returns (x [B, T, D] replicated over 'pp', stats {key: [L, ...]} or None, routing
    [L, B, T, K] or None).
    """
    pp = pipeline.num_stages(mesh)
    b = x.shape[0]
    stages = pipeline.to_stages(layers, pp)
    layer_extra = None if routing is None else pipeline.to_stages(routing, pp)
    rows = jnp.arange(b, dtype=jnp.int32)

    def stage_fn(stage_params, h, extra, layer_extra=None):
        cos_j, sin_j, mask_j, token_mask_j, rows_j = extra
        # Inside the schedule 'pp' is a manual axis: sharding constraints and the MoE
        # block's own shard_map must be built on the context's abstract mesh.
        h, _, stats, chosen = _scan_layers(
            stage_params, h, cos_j, sin_j, mask_j, token_mask_j, None, layer_extra,
            config=config, mesh=pipeline.context_mesh(mesh), train=train,
            return_routing=return_routing,
        )  # fmt: skip
        aux = {} if stats is None else {"stats": stats}
        if chosen is not None:
            full = jnp.zeros(chosen.shape[:1] + (b,) + chosen.shape[2:], chosen.dtype)
            aux["routing"] = full.at[:, rows_j].set(chosen)
        return h, aux

    y, aux = pipeline.pipeline_apply(
        stage_fn,
        stages,
        x,
        mesh=mesh,
        num_microbatches=num_microbatches,
        extra=(cos, sin, mask, token_mask, rows),
        layer_extra=layer_extra,
        has_aux=True,
    )
    aux = pipeline.from_stages(aux)
    return y, aux.get("stats"), aux.get("routing")


def _check_num_microbatches(num_microbatches: Any, batch: int, pp: int, cached: bool) -> None:
    if (
        isinstance(num_microbatches, bool)
        or not isinstance(num_microbatches, int | np.integer)
        or num_microbatches < 1
    ):
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    if pp > 1 and not cached and batch % num_microbatches:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ValueError(
            f"num_microbatches={num_microbatches} does not divide the batch size B={batch}; "
            f"valid num_microbatches: {divisors}"
        )


def checked_inputs(
    tokens: ArrayLike,
    positions: ArrayLike | None,
    attention_mask: ArrayLike | None,
    config: ModelConfig,
    *,
    cache: KVCache | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(tokens, positions, attention_mask)`` as checked int32 [B, T] arrays.

    The mask defaults to all ones and the positions to ``arange(T)`` (after ``cache.index``
    with a cache). Token ids and positions must have an integer dtype (floats are refused,
    not truncated); the mask is 1 where it is nonzero. Values known here (not traced under
    ``jit``) are checked too: real tokens' ids in ``[0, vocab_size)`` and, with a cache,
    ``cache.index + T <= S``.

    Raises:
        TypeError: a non-integer tokens/positions dtype, or a cache that is not a KVCache.
        ValueError: bad shapes (B or T = 0 included), ids out of range, or a cache overflow.
    """
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(
            f"cache must be a KVCache (from init_cache or prefill) or None, got "
            f"{type(cache).__name__}"
        )
    tokens = _array("tokens", tokens, integer=True, what="token ids [B, T]").astype(jnp.int32)
    b, t = tokens.shape if tokens.ndim == 2 else (0, 0)
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    # Nonzero = a real token, as everywhere in the library (0.5 is real, not padding).
    attention_mask = _array(
        "attention_mask", attention_mask, integer=False, what="[B, T] (nonzero = real token)"
    )
    attention_mask = (attention_mask != 0).astype(jnp.int32)
    if positions is None:
        start = 0 if cache is None else cache.index
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = _array("positions", positions, integer=True, what="rotary positions [B, T]")
    positions = positions.astype(jnp.int32)
    _check_inputs(tokens, positions, attention_mask, cache, config)
    return tokens, positions, attention_mask


def embed(params: Any, tokens: jax.Array) -> jax.Array:
    """The token embeddings [B, T, D] of ``tokens`` [B, T].

    Clipped lookup: an out-of-range padding id must not become NaN (0 * NaN would leak
    through the masked attention weights into real tokens).
    """
    return jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0, mode="clip")


def forward_aux(
    stats: dict[str, jax.Array] | None,
    config: ModelConfig,
    values: jax.Array | None,
    routing: jax.Array | None,
) -> dict[str, Any]:
    """The aux dict :func:`forward` returns: MoE statistics, and values / routing if given."""
    aux: dict[str, Any] = dict(_finish_stats(stats, config))
    if routing is not None:
        aux["routing"] = routing
    if values is not None:
        aux["values"] = values
    return aux


def output_heads(
    params: Any, x: jax.Array, config: ModelConfig, mesh: Any = None
) -> tuple[jax.Array, jax.Array | None]:
    """The final norm and the heads on the last layer's output ``x`` [B, T, D].

    Returns (logits [B, T, V] float32, values [B, T] float32 when ``config.value_head``, else
    None).
    """
    h = rms_norm(x, params["final_norm"]["scale"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        logits = jnp.einsum(
            "btd,vd->btv",
            h,
            params["embed_tokens"]["embedding"],
            preferred_element_type=jnp.float32,
        )
    else:
        logits = jnp.einsum(
            "btd,dv->btv", h, params["lm_head"]["kernel"], preferred_element_type=jnp.float32
        )
    logits = constrain(logits.astype(jnp.float32), (shd.BATCH, shd.LENGTH, shd.VOCAB), mesh)
    if not config.value_head:
        return logits, None
    vh = params["value_head"]
    values = jnp.einsum("btd,do->bto", h.astype(jnp.float32), vh["kernel"].astype(jnp.float32))
    values = values[..., 0] + vh["bias"].astype(jnp.float32)[0]
    return logits, constrain(values, (shd.BATCH, shd.LENGTH), mesh)


def forward(
    params: Any,
    tokens: ArrayLike,
    config: ModelConfig,
    *,
    positions: ArrayLike | None = None,
    attention_mask: ArrayLike | None = None,
    cache: KVCache | None = None,
    mesh: Any = None,
    routing: Any = None,
    return_routing: bool = False,
    train: bool = True,
    num_microbatches: int = 1,
) -> tuple[jax.Array, KVCache | None, dict[str, Any]]:
    """Runs the decoder: next-token logits for every position, and the updated cache.

    Without a cache, token t attends to tokens ``<= t`` whose ``attention_mask`` is nonzero.
    With a cache, the T new tokens' keys/values are written at slots ``[index, index + T)``
    (``index + T <= S``: checked when ``cache.index`` is concrete, the caller's duty under
    ``jit``), ``key_mask`` there is set from ``attention_mask``, and each new token attends to
    slots ``<= its own slot`` with ``key_mask == 1``. A left-padded prefill (positions
    ``max(cumsum(mask) - 1, 0)``) followed by single-token steps (position = last + 1)
    therefore reproduces the full forward exactly.

    Pipeline parallelism: when ``mesh`` has ``pp > 1`` and there is no cache (training and
    scoring forwards), the decoder layers run as ``pp`` stages of ``L / pp`` consecutive
    layers under a GPipe schedule over ``num_microbatches`` microbatches
    (:func:`~novarl_jax.models.pipeline.pipeline_apply`; bubble
    ``(pp - 1) / (num_microbatches + pp - 1)``). The embedding, final norm, LM head and value
    head run outside the pipeline, replicated over ``pp``. MoE statistics are combined from
    per-microbatch sums, so every aux entry equals the unpipelined one; with a capacity factor
    the routing groups are the microbatches' shards, so which choices are dropped can
    depend on ``num_microbatches`` (dropless routing does not). With a cache (prefill and
    decode steps of the sampler) the layers run as one scan whatever ``pp`` is: XLA
    all-gathers the layer stack over ``pp`` before the scan, so every ``pp`` group holds all
    layers' weights while it decodes (memory ``pp`` times the stage's share). That is
    simpler than pipelining one-token steps, exact, and costs nothing at this scale; the
    cache itself is not split over ``pp``.

    Args:
        params: from :func:`init_params` (or :func:`~novarl_jax.models.hf.load_hf_model`).
        tokens: [B, T] integer token ids, B and T >= 1; real tokens' ids in
            ``[0, vocab_size)`` (checked when not traced; padding ids are not read).
        config: the model (static under jit).
        positions: [B, T] integer rotary positions; default ``arange(T)`` (plus
            ``cache.index`` when a cache is given).
        attention_mask: [B, T], nonzero = a real token, 0 = padding; default all ones.
            Padding tokens are neither attended to nor routed to experts.
        cache: a :class:`KVCache` (from :func:`init_cache` or :func:`prefill`) to read and
            extend, or None.
        mesh: device mesh; shards activations by the logical rules and runs MoE blocks with
            expert parallelism. None = no constraints.
        routing: [L, B, T, K] int32 expert choices to replay, as returned in
            ``aux['routing']`` (MoE only), values in ``[0, num_local_experts)`` (checked when
            not traced); gate weights come from the current router.
        return_routing: put the expert choices of this call in ``aux['routing']``.
        train: MoE capacity factor: ``capacity_factor`` (True) or ``eval_capacity_factor``.
        num_microbatches: M, pipeline microbatches (used when the mesh has ``pp > 1`` and
            there is no cache; must then divide B). More microbatches shrink the pipeline
            bubble; with dropless routing the result does not depend on M (with a capacity
            factor each microbatch is a routing group, so drops do). Under ``pp > 1`` call
            ``forward`` inside ``jax.jit``: eagerly, its pipeline compiles on every call.

    Returns:
        (logits [B, T, V] float32, the updated cache or None, aux) where aux has
        'moe_aux_loss', 'moe_z_loss', 'dropped_fraction' (float32 scalars, means over
        layers; 0 for dense models), 'layer_dropped_fraction' [L] float32 (each layer's),
        'expert_load' [L, E] float32 ([L, 0] dense),
        'values' [B, T] float32 when ``config.value_head``, and 'routing' [L, B, T, K]
        int32 when ``return_routing``.

    Raises:
        TypeError: non-integer tokens/positions/routing, a cache that is not a KVCache, or a
            non-bool ``train`` / ``return_routing``.
        ValueError: bad shapes; token ids or routing values out of range; a cache overflow;
            params that do not fit ``config``; ``routing`` for a dense model; a mesh whose
            ``pp`` does not divide ``num_hidden_layers``; ``num_microbatches`` not a positive
            integer or (when the pipeline runs) not dividing B.

    Example:
        >>> cache = init_cache(config, batch_size=1, max_length=8)
        >>> logits, cache, _ = forward(params, prompt, config, cache=cache)  # prefill
        >>> nxt = jnp.argmax(logits[:, -1:], -1)
        >>> logits, cache, _ = forward(params, nxt, config, cache=cache)  # one step
    """
    return _forward(
        params, tokens, config, positions=positions, attention_mask=attention_mask,
        cache=cache, fresh_cache=False, mesh=mesh, routing=routing,
        return_routing=return_routing, train=train, num_microbatches=num_microbatches,
    )  # fmt: skip


def prefill(
    params: Any,
    tokens: ArrayLike,
    config: ModelConfig,
    *,
    max_length: int,
    positions: ArrayLike | None = None,
    attention_mask: ArrayLike | None = None,
    mesh: Any = None,
    return_routing: bool = False,
    train: bool = False,
    dtype: Any = None,
) -> tuple[jax.Array, KVCache, dict[str, Any]]:
    """A prompt's forward into a fresh cache of ``max_length`` slots.

    Returns what ``forward(params, tokens, config, cache=init_cache(config, B, max_length,
    dtype), ...)`` returns, but its attention runs over the T prompt tokens only, as the
    uncached forward's, instead of also scoring the ``max_length`` empty slots of the fresh
    cache (1.7x faster at B=32, T=64, ``max_length``=192 on a 2-core CPU). Like the cached
    forward, it runs the layers as one scan also when the mesh has ``pp > 1``.

    Args:
        params, tokens, config, positions, attention_mask, mesh, return_routing, train: as
            :func:`forward` (``train`` defaults to False here: a prefill samples).
        max_length: S, the slots of the cache, at least T.
        dtype: dtype of the cache's keys and values; None = ``config.activation_dtype``.

    Returns:
        (logits [B, T, V], the cache holding the T tokens at slots ``[0, T)`` with
        ``index = T``, aux) as :func:`forward`.

    Raises:
        ValueError: as :func:`forward`, or T larger than ``max_length``.
    """
    tokens = _array("tokens", tokens, integer=True, what="token ids [B, T]")
    batch = tokens.shape[0] if tokens.ndim == 2 and tokens.shape[0] else 1
    cache = init_cache(config, batch, max_length, dtype)
    return _forward(
        params, tokens, config, positions=positions, attention_mask=attention_mask,
        cache=cache, fresh_cache=True, mesh=mesh, routing=None,
        return_routing=return_routing, train=train, num_microbatches=1,
    )  # fmt: skip


def _forward(
    params, tokens, config, *, positions, attention_mask, cache, fresh_cache, mesh, routing,
    return_routing, train, num_microbatches,
):  # fmt: skip
    """:func:`forward`; with ``fresh_cache`` (an empty ``cache`` at index 0) the attention
    skips the cache's slots and the layers return the tokens' keys and values to write."""
    check_flag("train", train)
    check_flag("return_routing", return_routing)
    tokens, positions, attention_mask = checked_inputs(
        tokens, positions, attention_mask, config, cache=cache
    )
    params = checked_params(params, config)
    b, t = tokens.shape
    pp = pipeline.num_stages(mesh)
    if pp > 1:
        _check_pipeline_layers(config, pp)
    _check_num_microbatches(num_microbatches, b, pp, cache is not None)
    if routing is not None:
        routing = check_routing(routing, config, b, t)

    kv = None
    if cache is None or fresh_cache:
        mask = attention_mask_for(attention_mask, attention_mask, jnp.zeros((), jnp.int32))
    else:
        mask = cached_attention_mask(attention_mask, cache.key_mask, cache.index)
        kv = (cache.k, cache.v)
    if cache is not None:
        first_slot = jnp.asarray(cache.index, jnp.int32)
        key_mask = jax.lax.dynamic_update_slice(
            cache.key_mask, attention_mask.astype(cache.key_mask.dtype), (0, first_slot)
        )
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling)

    x = constrain(embed(params, tokens), _ACT, mesh)
    run = dict(config=config, train=train, return_routing=return_routing)
    if pp > 1 and cache is None:
        x, stats, routing_out = _pipelined_layers(
            params["layers"], x, cos, sin, mask, attention_mask, routing,
            mesh=mesh, num_microbatches=num_microbatches, **run,
        )  # fmt: skip
        new_kv = None
    else:
        x, new_kv, stats, routing_out = _scan_layers(
            params["layers"], x, cos, sin, mask, attention_mask, kv, routing,
            mesh=mesh, return_kv=fresh_cache, **run,
        )  # fmt: skip

    logits, values = output_heads(params, x, config, mesh)
    aux = forward_aux(stats, config, values, routing_out if return_routing else None)

    new_cache = None
    if cache is not None:
        # Each layer's new keys [B, N_kv, Dh, T] and values [B, N_kv, T, Dh] land in its
        # buffers in place (the cache is donated by the sampler) at slot first_slot.
        names = cache_logical_axes(config)
        new_k, new_v = new_kv

        def write(olds, news, start, names):
            return tuple(
                constrain(jax.lax.dynamic_update_slice(old, new.astype(old.dtype), start), n, mesh)
                for old, new, n in zip(olds, news, names, strict=True)
            )

        k = write(cache.k, jnp.swapaxes(new_k, -1, -2), (0, 0, 0, first_slot), names.k)
        v = write(cache.v, new_v, (0, 0, first_slot, 0), names.v)
        new_cache = KVCache(k=k, v=v, key_mask=key_mask, index=first_slot + t)
    return logits, new_cache, aux
