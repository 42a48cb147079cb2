"""Numerical helpers without a mesh test of their own, three ways against NumPy float64.

Each case is a function, random inputs with a leading batch axis (B = 16, right padding
with an empty row, a full row and holes in one row) and a plain NumPy float64 reference
written from the function's documented formula. The function must match the reference
eagerly, under ``jit``, and under ``jit`` with every input's batch axis sharded over the 8
fake devices (statistics over the batch, such as whitening, must stay global).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from novarl_jax.algorithms.common import truncated_importance_weights
from novarl_jax.algorithms.grpo import sequence_log_ratio
from novarl_jax.algorithms.kl import kl_penalty_token_rewards
from novarl_jax.algorithms.logprobs import entropy_from_logits, token_logprobs_and_entropy
from novarl_jax.algorithms.ppo import value_loss
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.utils.advantages import (
    GAEAdvantageEstimator,
    ReinforcePlusPlusAdvantageEstimator,
    RLOOAdvantageEstimator,
    discounted_returns,
    make_advantage_estimator,
    rloo_advantages,
    scores_to_token_rewards,
    sequence_scores,
)
from novarl_jax.models import RopeScaling
from novarl_jax.models.layers import rotary_cos_sin

B, T, V, GROUP = 16, 7, 5, 4
GAMMA, LAM, EPS = 0.9, 0.8, 1e-8


def _mask(rng):
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[1] = 0, T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    mask[2] = [1, 0, 1, 1, 0, 1, 0]  # holes
    return mask


def _inputs(seed):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    return dict(
        mask=_mask(rng),
        rewards=normal(B, T),
        values=normal(B, T),
        old_values=normal(B, T),
        returns=normal(B, T),
        scores=normal(B),
        logprobs=-np.abs(normal(B, T)),
        old_logprobs=-np.abs(normal(B, T)),
        logits=3 * normal(B, T, V),
        positions=rng.integers(0, 16, size=(B, T)).astype(np.int32),
    )


# ----------------------------------------------------------------- float64 references


def np_reward_to_go(rewards, mask, gamma):
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        g = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                g = float(rewards[b, t]) + gamma * g
                out[b, t] = g
    return out


def np_gae(rewards, values, mask, gamma, lam):
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
                next_adv = delta + gamma * lam * next_adv
                next_value = float(values[b, t])
                out[b, t] = next_adv
    return out, np.where(mask != 0, out + values, 0.0)


def np_whitened_gae(x):
    advantages, returns = np_gae(np_token_rewards(x), x["values"], x["mask"], GAMMA, LAM)
    return np_whiten(advantages, x["mask"]), returns


def np_whiten(x, mask):
    valid = mask != 0
    mean = x[valid].mean()
    var = np.square(x[valid] - mean).mean()
    return np.where(valid, (x - mean) / np.sqrt(var + EPS), 0.0)


def np_last_token(scores, mask):
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        valid = np.flatnonzero(mask[b])
        if valid.size:
            out[b, valid[-1]] = scores[b]
    return out


def np_token_rewards(x):
    return np.where(x["mask"] != 0, x["rewards"], 0.0) + np_last_token(x["scores"], x["mask"])


def np_rloo(scores):
    groups = scores.astype(np.float64).reshape(-1, GROUP)
    others = (groups.sum(1, keepdims=True) - groups) / (GROUP - 1)
    return (groups - others).reshape(-1)


def np_group_centred(scores):
    groups = scores.astype(np.float64).reshape(-1, GROUP)
    return (groups - groups.mean(1, keepdims=True)).reshape(-1)


def np_reinforce_plus_plus_baseline(x):
    """Group-centred scores at each row's last token plus the token rewards, reward-to-go
    with gamma 1, whitened over the batch."""
    rewards = np.where(x["mask"] != 0, x["rewards"], 0.0)
    returns = np_reward_to_go(rewards + np_last_token(np_group_centred(x["scores"]), x["mask"]),
                              x["mask"], 1.0)  # fmt: skip
    return np_whiten(returns, x["mask"]), returns


def np_value_loss(x, clip):
    v, old, ret, mask = x["values"], x["old_values"], x["returns"], x["mask"]
    clipped = old + np.clip(v.astype(np.float64) - old, -clip, clip)
    unclipped_err, clipped_err = np.square(v - ret.astype(np.float64)), np.square(clipped - ret)
    valid = mask != 0
    loss = 0.5 * np.maximum(unclipped_err, clipped_err)[valid].mean()
    return loss, (clipped_err > unclipped_err)[valid].mean()


def np_entropy(logits, temperature):
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def np_sequence_log_ratio(x):
    valid = x["mask"] != 0
    diff = np.where(valid, x["logprobs"].astype(np.float64) - x["old_logprobs"], 0.0)
    per_row = diff.sum(1) / np.maximum(valid.sum(1), 1)
    return np.broadcast_to(per_row[:, None], diff.shape)


def np_llama3_rotary(positions, head_dim=8, theta=500.0):
    """cos and sin of Llama 3.1's scaled rotary embedding (factor 8, bands 1 and 4, from 64)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelength = 2 * np.pi / inv
    blend = (64 / wavelength - 1.0) / (4.0 - 1.0)
    scaled = np.where(
        wavelength < 64 / 4,
        inv,
        np.where(wavelength > 64, inv / 8, (1 - blend) * inv / 8 + blend * inv),
    )
    angles = positions[..., None].astype(np.float64) * scaled
    angles = np.concatenate([angles, angles], -1)
    return np.cos(angles), np.sin(angles)


LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)  # fmt: skip

# ----------------------------------------------------------------- the cases

# name -> (function of the inputs dict, NumPy float64 reference of the same dict)
CASES = {
    "discounted_returns": (
        lambda x: discounted_returns(x["rewards"], x["mask"], gamma=GAMMA),
        lambda x: np_reward_to_go(x["rewards"], x["mask"], GAMMA),
    ),
    "scores_to_token_rewards": (
        lambda x: scores_to_token_rewards(x["scores"], x["mask"]),
        lambda x: np_last_token(x["scores"], x["mask"]),
    ),
    "sequence_scores": (
        lambda x: sequence_scores(
            {"scores": x["scores"], "token_rewards": x["rewards"], "response_mask": x["mask"]}
        ),
        lambda x: x["scores"] + np.where(x["mask"] != 0, x["rewards"], 0.0).sum(1),
    ),
    "rloo_advantages": (
        lambda x: rloo_advantages(x["scores"], GROUP),
        lambda x: np_rloo(x["scores"]),
    ),
    "rloo_estimator": (
        lambda x: RLOOAdvantageEstimator(group_size=GROUP)(
            {"scores": x["scores"], "response_mask": x["mask"]}
        )[0],
        lambda x: np.where(x["mask"] != 0, np_rloo(x["scores"])[:, None], 0.0),
    ),
    "reinforce_plus_plus": (
        lambda x: ReinforcePlusPlusAdvantageEstimator(gamma=GAMMA)(
            {"scores": x["scores"], "token_rewards": x["rewards"], "response_mask": x["mask"]}
        ),
        lambda x: (
            np_whiten(np_reward_to_go(np_token_rewards(x), x["mask"], GAMMA), x["mask"]),
            np_reward_to_go(np_token_rewards(x), x["mask"], GAMMA),
        ),
    ),
    "dr_grpo_estimator": (
        lambda x: make_advantage_estimator("dr_grpo", group_size=GROUP)(
            {"scores": x["scores"], "response_mask": x["mask"]}
        )[0],
        lambda x: np.where(x["mask"] != 0, np_group_centred(x["scores"])[:, None], 0.0),
    ),
    "reinforce_plus_plus_baseline": (
        lambda x: make_advantage_estimator("reinforce_plus_plus_baseline", group_size=GROUP)(
            {"scores": x["scores"], "token_rewards": x["rewards"], "response_mask": x["mask"]}
        ),
        np_reinforce_plus_plus_baseline,
    ),
    "gae_estimator_whitened": (
        lambda x: GAEAdvantageEstimator(gamma=GAMMA, lam=LAM, normalize=True)(
            {
                "scores": x["scores"],
                "token_rewards": x["rewards"],
                "values": x["values"],
                "response_mask": x["mask"],
            }
        ),
        np_whitened_gae,
    ),
    "value_loss_clipped": (
        lambda x: (lambda out: (out[0], out[1]["critic/vf_clipfrac"]))(
            value_loss(x["values"], x["old_values"], x["returns"], x["mask"], clip_range=0.2)
        ),
        lambda x: np_value_loss(x, 0.2),
    ),
    "truncated_importance_weights": (
        lambda x: truncated_importance_weights(x["logprobs"], x["old_logprobs"], 1.5),
        lambda x: np.minimum(np.exp(x["logprobs"].astype(np.float64) - x["old_logprobs"]), 1.5),
    ),
    "kl_penalty_token_rewards": (
        lambda x: kl_penalty_token_rewards(
            x["logprobs"], x["old_logprobs"], x["mask"], kl_coef=0.1, kind="k1"
        ),
        lambda x: np.where(
            x["mask"] != 0, -0.1 * (x["logprobs"].astype(np.float64) - x["old_logprobs"]), 0.0
        ),
    ),
    "sequence_log_ratio": (
        lambda x: sequence_log_ratio(x["logprobs"], x["old_logprobs"], x["mask"]),
        np_sequence_log_ratio,
    ),
    "entropy_from_logits": (
        lambda x: entropy_from_logits(x["logits"], temperature=0.7),
        lambda x: np_entropy(x["logits"], 0.7),
    ),
    "rotary_cos_sin_llama3": (
        lambda x: rotary_cos_sin(x["positions"], 8, 500.0, LLAMA3),
        lambda x: np_llama3_rotary(x["positions"]),
    ),
}


def _check(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-5, atol=2e-6)


@functools.cache
def _batch_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("dp",))
    return NamedSharding(mesh, PartitionSpec("dp"))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_eager_jit_and_sharded_match_numpy_float64(name, seed, devices):
    del devices  # the 8 fake devices must exist
    fn, reference = CASES[name]
    x = _inputs(seed)
    want = reference(x)
    _check(fn({k: jnp.asarray(v) for k, v in x.items()}), want)
    jitted = jax.jit(fn)
    _check(jitted({k: jnp.asarray(v) for k, v in x.items()}), want)
    sharded = {k: jax.device_put(v, _batch_sharding()) for k, v in x.items()}
    assert len(sharded["mask"].sharding.device_set) == 8
    _check(jitted(sharded), want)


def test_token_logprobs_and_entropy_with_the_vocabulary_split_over_tp(devices):
    """The trainer's logits have their vocabulary axis split over 'tp' by the rule table:
    batch over (dp, ep), vocabulary over tp, against NumPy float64 at temperature 0.7."""
    del devices
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(8, 5, 16))).astype(np.float32)
    targets = rng.integers(0, 16, size=(8, 5)).astype(np.int32)
    z = logits.astype(np.float64) / 0.7
    shifted = z - z.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    mesh = ParallelLayout(dp=2, ep=2, tp=2).make_mesh()
    x = jax.device_put(logits, NamedSharding(mesh, PartitionSpec(("dp", "ep"), None, "tp")))
    t = jax.device_put(targets, NamedSharding(mesh, PartitionSpec(("dp", "ep"))))
    assert len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape == (2, 5, 8)
    logp, entropy = jax.jit(lambda x, t: token_logprobs_and_entropy(x, t, temperature=0.7))(x, t)
    want = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, np_entropy(logits, 0.7), rtol=1e-5, atol=1e-5)
