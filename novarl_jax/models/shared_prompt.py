"""The decoder forward over groups of sequences that share their prompt, running each prompt once.

GRPO (and PPO with several samples per prompt) trains on ``n`` completions of every prompt:
rows come in groups of ``n`` consecutive sequences whose first ``P`` tokens are identical. A
causal decoder computes exactly the same activations for those ``P`` tokens in every row of a
group, so the training and scoring forwards can run each group's prompt once and let its
``n`` completions attend to the prompt's keys and values (the "shared prefix" forward of
Prefix Grouper, Liu et al., 2025). With prompt length ``P`` and completion length ``T`` this
removes ``(n - 1) / n`` of the prompt's share ``P / (P + T)`` of the layer FLOPs, in the
forward and in the backward pass; gradients flow from every completion into its prompt.

:func:`forward_shared_prompt` takes the same full rows as :func:`~novarl_jax.models.forward`
and returns the same outputs (logits and values of every position, the prompt's repeated to
each row of its group), so a caller switches between the two without changing anything else.
The MoE statistics count each prompt token ``n`` times, as the unshared forward does, so the
router's load-balancing and z losses and the logged loads equal the unshared forward's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from novarl_jax.core import sharding as shd
from novarl_jax.core.checks import check_int
from novarl_jax.models import pipeline
from novarl_jax.models.config import ModelConfig
from novarl_jax.models.layers import (
    attention_mask_for,
    cached_attention_mask,
    constrain,
    rotary_cos_sin,
)
from novarl_jax.models.transformer import (
    _ACT,
    _STAT_KEYS,
    DecoderLayer,
    _layer_stats,
    check_flag,
    check_routing,
    checked_inputs,
    checked_params,
    embed,
    forward_aux,
    output_heads,
)

# The prompt keys/values handed to the completions: [B, N_kv, P, Dh], as the cache's layout.
_KV = (shd.BATCH, shd.KV_HEADS, shd.LENGTH, shd.HEAD_DIM)


def _check_groups(b: int, s: int, prompt_length: Any, group_size: Any) -> tuple[int, int]:
    """``(prompt_length, group_size)`` as ints, checked against the rows [B, S]."""
    prompt_length = check_int("prompt_length", prompt_length, 1)
    group_size = check_int("group_size", group_size, 1)
    if prompt_length >= s:
        raise ValueError(
            f"prompt_length={prompt_length} must be shorter than the sequences (T={s}): each "
            "row needs at least one token after its prompt"
        )
    if b % group_size:
        divisors = [d for d in range(1, b + 1) if b % d == 0]
        raise ValueError(
            f"group_size={group_size} does not divide the batch size B={b}; rows come in "
            f"groups of consecutive samples of one prompt; valid group sizes: {divisors}"
        )
    return prompt_length, group_size


def _first_of_groups(x: jax.Array, n: int) -> jax.Array:
    """``x[::n]`` ([B, ...] -> [B / n, ...]), spelled as a reshape and an index."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:])[:, 0]


def _repeat_rows(x: jax.Array, n: int) -> jax.Array:
    return x if n == 1 else jnp.repeat(x, n, axis=0)


def forward_shared_prompt(
    params: Any,
    tokens: ArrayLike,
    config: ModelConfig,
    *,
    prompt_length: int,
    group_size: int,
    positions: ArrayLike | None = None,
    attention_mask: ArrayLike | None = None,
    mesh: Any = None,
    routing: Any = None,
    return_routing: bool = False,
    train: bool = True,
) -> tuple[jax.Array, None, dict[str, Any]]:
    """:func:`~novarl_jax.models.forward` (no cache) on rows that share their prompt in groups.

    Row ``r`` belongs to group ``r // group_size``; every row of a group must hold the same
    first ``prompt_length`` tokens, attention mask and positions (the caller guarantees it:
    only the group's first row is read there). Each layer runs the ``B / group_size`` prompts
    with causal attention among their own tokens, then the ``B`` completions, whose queries
    see their group's prompt keys and values (real prompt tokens only) and their own earlier
    tokens. The result equals :func:`~novarl_jax.models.forward` on the full rows up to
    float32 rounding, with the same aux entries. With a capacity factor the MoE routing groups
    are the prompts and the completions rather than whole rows, so which choices are dropped
    can differ (dropless routing is identical); the statistics count each prompt token once
    per row of its group.

    Args:
        params: the model's parameters.
        tokens: [B, S] int32, prompt then completion (``S <= prompt_length`` is an error).
        config: the model (static under jit).
        prompt_length: P, the shared (padded) prompt length.
        group_size: n, consecutive rows per prompt; must divide B.
        positions: [B, S] rotary positions; default ``arange(S)``.
        attention_mask: [B, S], nonzero = a real token; default all ones.
        mesh: device mesh (``pp`` must be 1: the pipelined forward does not share prompts).
        routing: [L, B, S, K] expert choices to replay (MoE), or None.
        return_routing: put the expert choices in ``aux['routing']`` ([L, B, S, K]).
        train: MoE capacity factor (see :func:`~novarl_jax.models.forward`).

    Returns:
        (logits [B, S, V] float32, None, aux) as :func:`~novarl_jax.models.forward`.

    Raises:
        ValueError: bad shapes, ``group_size`` not dividing B, ``prompt_length`` not inside
            the rows, ``routing`` for a dense model, or a mesh with ``pp > 1``.

    Example:
        >>> rows = jnp.concatenate([jnp.repeat(prompts, 4, axis=0), completions], axis=1)
        >>> logits, _, aux = forward_shared_prompt(
        ...     params, rows, config, prompt_length=prompts.shape[1], group_size=4)
    """
    check_flag("train", train)
    check_flag("return_routing", return_routing)
    tokens, positions, attention_mask = checked_inputs(tokens, positions, attention_mask, config)
    params = checked_params(params, config)
    b, s = tokens.shape
    prompt_length, group_size = _check_groups(b, s, prompt_length, group_size)
    if pipeline.num_stages(mesh) > 1:
        raise ValueError(
            "forward_shared_prompt runs the layers as one scan; on a mesh with pp > 1 use "
            "forward (the pipelined forward)"
        )
    if routing is not None:
        routing = check_routing(routing, config, b, s)
    n, p = group_size, prompt_length

    # The prompts: the first row of every group.
    prompt_mask = _first_of_groups(attention_mask[:, :p], n)
    prompt_cos, prompt_sin = rotary_cos_sin(
        _first_of_groups(positions[:, :p], n), config.head_dim, config.rope_theta,
        config.rope_scaling,
    )  # fmt: skip
    prompt_attn = attention_mask_for(prompt_mask, prompt_mask, jnp.zeros((), jnp.int32))
    # The completions: every row, attending to its group's prompt slots [0, P) first.
    completion_mask = attention_mask[:, p:]
    completion_cos, completion_sin = rotary_cos_sin(
        positions[:, p:], config.head_dim, config.rope_theta, config.rope_scaling
    )
    completion_attn = cached_attention_mask(
        completion_mask, _repeat_rows(prompt_mask, n), jnp.asarray(p, jnp.int32)
    )

    # One lookup over the full rows, the prompts taken from its output. Looking up the
    # prompts' ids (`tokens[::n]`), or taking `x[::n]`, made XLA's sharded backward add
    # gradient into the wrong embedding rows when there are fewer prompts than batch shards
    # (CPU devices, jax 0.10.2); `_first_of_groups` (a reshape and an index) does not.
    x = embed(params, tokens)
    x_prompt = constrain(_first_of_groups(x[:, :p], n), _ACT, mesh)
    x_completion = constrain(x[:, p:], _ACT, mesh)
    layer_prompt = DecoderLayer(config, mesh, train, return_kv=True)
    layer_completion = DecoderLayer(config, mesh, train)
    if routing is None:
        routing_prompt = routing_completion = None
    else:
        routing_prompt = jax.vmap(lambda r: _first_of_groups(r, n))(routing[:, :, :p])
        routing_completion = routing[:, :, p:]

    def body(carry, xs):
        x_p, x_c = carry
        layer_params, route_p, route_c = xs
        variables = {"params": layer_params}
        x_p, (k, v), aux_p = layer_prompt.apply(
            variables, x_p, prompt_cos, prompt_sin, prompt_attn, prompt_mask, None, route_p
        )
        kv = tuple(constrain(_repeat_rows(a, n), _KV, mesh) for a in (k, v))
        x_c, _, aux_c = layer_completion.apply(
            variables,
            x_c,
            completion_cos,
            completion_sin,
            completion_attn,
            completion_mask,
            kv,
            route_c,
        )
        stats = chosen = None
        if aux_p is not None:
            # Sums over tokens: each prompt token stands for its n rows.
            sums_p, sums_c = _layer_stats(aux_p), _layer_stats(aux_c)
            stats = {key: n * sums_p[key] + sums_c[key] for key in _STAT_KEYS}
            if return_routing:
                chosen = jnp.concatenate(
                    [_repeat_rows(aux_p["routing"], n), aux_c["routing"]], axis=1
                )
        return (x_p, x_c), (stats, chosen)

    if config.remat:
        body = jax.checkpoint(body)  # gradient checkpointing, one layer at a time
    (x_prompt, x_completion), (stats, routing_out) = jax.lax.scan(
        body, (x_prompt, x_completion), (params["layers"], routing_prompt, routing_completion)
    )
    logits_p, values_p = output_heads(params, x_prompt, config, mesh)
    logits_c, values_c = output_heads(params, x_completion, config, mesh)
    logits = jnp.concatenate([_repeat_rows(logits_p, n), logits_c], axis=1)
    values = None
    if values_p is not None:
        values = jnp.concatenate([_repeat_rows(values_p, n), values_c], axis=1)
    aux = forward_aux(stats, config, values, routing_out if return_routing else None)
    return logits, None, aux
