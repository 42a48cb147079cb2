"""A tiny stand-in policy for the loss tests: a linear map from one-hot tokens to logits.

``logits[b, t] = w[tokens[b, t]]`` predicts ``tokens[b, t + 1]`` and ``values[b, t] =
v[tokens[b, t]]``, so the losses can be differentiated without a transformer.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from novarl_jax.algorithms.logprobs import token_logprobs_and_entropy
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.sharding import batch_spec

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


def np_tiny_apply(params, tokens):
    """``tiny_apply_fn`` in NumPy float64, written from the formula above."""
    w, v = np.asarray(params["w"], np.float64), np.asarray(params["v"], np.float64)
    tokens = np.asarray(tokens)
    logits = w[tokens[:, :-1]]
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return {
        "logprobs": np.take_along_axis(log_softmax, tokens[:, 1:, None], -1)[..., 0],
        "entropy": -(np.exp(log_softmax) * log_softmax).sum(-1),
        "values": v[tokens[:, :-1]],
        "moe_aux_loss": np.mean(w**2),
        "moe_z_loss": np.mean(v**2),
    }


def check_loss_eager_jit_and_sharded(loss_fn, config, params, batch, np_loss):
    """``loss_fn(params, batch, config, tiny_apply_fn)[0]`` and its gradient w.r.t. the
    params equal the float64 reference ``np_loss(params)`` and its central finite differences,
    eagerly, under ``jit``, and under ``jit`` with every batch array split over the 8 fake
    devices."""
    want, want_grad = np_loss(params), np_gradient(np_loss, params)

    def run(p, b):
        return loss_fn(p, b, config, tiny_apply_fn)[0]

    def check(fn, b):
        loss, grad = fn(params, b)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
        for name in want_grad:
            np.testing.assert_allclose(grad[name], want_grad[name], rtol=1e-4, atol=1e-6)

    check(jax.value_and_grad(run), batch)
    jitted = jax.jit(jax.value_and_grad(run))
    check(jitted, batch)
    mesh = ParallelLayout(dp=2, ep=4).make_mesh()
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, batch_spec(v.ndim, mesh, v.shape[0])))
        for k, v in batch.items()
    }
    assert len(sharded["response_mask"].sharding.device_set) == 8
    check(jitted, sharded)


def np_gradient(np_loss, params, step=1e-6):
    """Central finite differences of the float64 ``np_loss(params)`` over every parameter."""
    base = {name: np.asarray(value, np.float64) for name, value in params.items()}
    grads = {}
    for name, value in base.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[index] += step
            down[index] -= step
            delta = np_loss({**base, name: up}) - np_loss({**base, name: down})
            grad[index] = delta / (2 * step)
        grads[name] = grad
    return grads


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
