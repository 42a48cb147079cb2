"""A tiny stand-in policy for the loss tests: a linear map from one-hot tokens to logits.

``logits[b, t] = w[tokens[b, t]]`` predicts ``tokens[b, t + 1]`` and ``values[b, t] =
v[tokens[b, t]]``, so the losses can be differentiated without a transformer.
"""

import jax
import jax.numpy as jnp
import numpy as np

from novarl_jax.algorithms.logprobs import token_logprobs_and_entropy

VOCAB = 6


def tiny_apply_fn(params, batch):
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    one_hot = jax.nn.one_hot(inputs, VOCAB, dtype=jnp.float32)
    logits = one_hot @ params["w"]
    logprobs, entropy = token_logprobs_and_entropy(logits, targets)
    return {
        "logprobs": logprobs,
        "entropy": entropy,
        "values": one_hot @ params["v"],
        # A router-like loss that depends on params only (the same for every micro-batch).
        "moe_aux_loss": jnp.mean(jnp.square(params["w"])),
        "moe_z_loss": jnp.mean(jnp.square(params["v"])),
    }


def tiny_params(seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)) * scale, jnp.float32),
        "v": jnp.asarray(rng.normal(size=(VOCAB,)) * scale, jnp.float32),
    }


def tiny_rollout_batch(params, *, batch_size=8, num_tokens=5, seed=0, lengths=None):
    """A rollout batch with every key either loss may read; old log-probs near the params'."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, size=(batch_size, num_tokens + 1)), jnp.int32)
    if lengths is None:
        lengths = rng.integers(0, num_tokens + 1, size=batch_size)
    mask = (np.arange(num_tokens)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    out = tiny_apply_fn(params, {"tokens": tokens})

    def noise(scale):
        return jnp.asarray(rng.normal(size=(batch_size, num_tokens)) * scale, jnp.float32)

    old_logprobs = out["logprobs"] + noise(0.3)
    return {
        "tokens": tokens,
        "response_mask": jnp.asarray(mask),
        "old_logprobs": old_logprobs,
        "ref_logprobs": old_logprobs + noise(0.2),
        "behavior_logprobs": old_logprobs + noise(0.5),
        "advantages": noise(1.0),
        "returns": noise(1.0),
        "old_values": out["values"] + noise(0.3),
        "scores": jnp.asarray(rng.integers(0, 2, size=batch_size), jnp.float32),
    }
