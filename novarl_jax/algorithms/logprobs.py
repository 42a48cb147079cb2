"""Per-token log-probabilities and entropies from a policy's logits.

The loss functions of this package never see a model: they call
``apply_fn(params, batch) -> {'logprobs': [B, T], 'entropy': [B, T], ...}``, where position
``t`` holds the log-prob of the response token at ``t``. The trainer builds that ``apply_fn``
from the model's logits with :func:`token_logprobs_and_entropy`, after shifting: logits at
sequence position ``p`` predict the token at ``p + 1``, so ``logits[:, :-1]`` go with
``targets = tokens[:, 1:]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["entropy_from_logits", "token_logprobs_and_entropy"]


def _scaled_logits(logits: ArrayLike, temperature: float) -> jax.Array:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a vocabulary axis [..., V], got shape {logits.shape}")
    return logits if temperature == 1.0 else logits / temperature


def _shifted(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``z - max(z)`` and its log-sum-exp: exact log-probs even for logits of 1e4 and more."""
    shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return shifted, jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def _entropy(shifted: jax.Array, lse: jax.Array) -> jax.Array:
    probs = jnp.exp(shifted - lse[..., None])
    # A token of probability 0 (a logit of -inf: a masked vocabulary) adds 0, not 0 * -inf;
    # the where on both sides keeps the gradient finite too.
    safe = jnp.where(probs > 0, shifted, 0.0)
    return lse - jnp.sum(probs * safe, axis=-1)


def entropy_from_logits(logits: ArrayLike, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of the categorical distribution ``softmax(logits / temperature)``.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` with ``z = logits / temperature``, computed
    in float32 from the max-shifted logits ``z - max(z)`` (the entropy does not change under a
    shift), so it is finite and accurate for any finite logits. Logits of ``-inf`` (tokens
    masked out) are tokens of probability 0: they add nothing, and their gradient is 0.

    Args:
        logits: ``[..., V]`` (for example ``[B, T, V]``).
        temperature: the sampler's temperature, > 0.

    Returns:
        ``[...]`` float32 entropies in nats.
    """
    return _entropy(*_shifted(_scaled_logits(logits, temperature)))


def token_logprobs_and_entropy(
    logits: ArrayLike, targets: ArrayLike, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each target token and the entropy of each position's distribution.

    ``log p(y_t) = s_t[y_t] - logsumexp(s_t)`` with ``s_t = z_t - max(z_t)`` (a log-softmax of
    the shifted logits, accurate in float32 even when the logits are large) and ``H_t`` as in
    :func:`entropy_from_logits`, with ``z = logits / temperature`` in float32. Use the
    sampler's temperature so the trainer's log-probs match the rollout's.

    Args:
        logits: ``[B, T, V]`` where ``logits[:, t]`` is the distribution of ``targets[:, t]``.
        targets: ``[B, T]`` integer token ids.
        temperature: > 0.

    Returns:
        ``(logprobs [B, T] float32, entropy [B, T] float32)``.

    Raises:
        TypeError: ``targets`` is not an integer array.
        ValueError: ``targets`` does not match the leading dimensions of ``logits``, or (when
            its values are known here, not traced under ``jit``) holds an id outside
            ``[0, V)``: -1 would read the last entry and ids past V give NaN. Under ``jit``
            nothing checks them: mask such positions out (padding ids must be real ids).

    Example:
        >>> logp, ent = token_logprobs_and_entropy(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
        >>> round(float(logp[0, 0]), 4), round(float(ent[0, 0]), 4)
        (-1.3863, 1.3863)
    """
    z = _scaled_logits(logits, temperature)
    targets = jnp.asarray(targets)
    if targets.shape != z.shape[:-1]:
        raise ValueError(
            f"targets {targets.shape} must match the leading dimensions of logits {z.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):  # a float id would be truncated
        raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if not isinstance(targets, jax.core.Tracer) and targets.is_fully_addressable:
        ids = np.asarray(targets)
        bad = ids[(ids < 0) | (ids >= z.shape[-1])]
        if bad.size:
            raise ValueError(
                f"targets must be token ids in [0, vocab_size={z.shape[-1]}), got "
                f"{int(bad.flat[0])}"
            )
    shifted, lse = _shifted(z)
    picked = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse, _entropy(shifted, lse)
