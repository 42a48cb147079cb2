"""GRPO loss: token and sequence (GSPO) ratios, the KL term, and agreement with PPO."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kl import np_kl
from test_ppo import np_policy_terms
from tiny_policy import (
    check_loss_eager_jit_and_sharded,
    np_tiny_apply,
    tiny_apply_fn,
    tiny_params,
    tiny_rollout_batch,
)

from novarl_jax.algorithms import (
    GRPOLossConfig,
    PPOLossConfig,
    aggregate,
    grpo_loss,
    kl_penalty,
    ppo_loss,
    ppo_policy_loss,
    sequence_log_ratio,
    value_loss,
)


def logprob_apply_fn(params, batch):
    return {"logprobs": params}


def test_sequence_log_ratio_matches_numpy():
    rng = np.random.default_rng(0)
    logp, old = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    got = np.asarray(sequence_log_ratio(logp, old, mask))
    for b in range(3):
        n = mask[b].sum()
        want = sum(logp[b, t] - old[b, t] for t in range(4) if mask[b, t]) / max(n, 1)
        np.testing.assert_allclose(got[b], np.full(4, want), rtol=1e-5, atol=1e-7)


def gspo_case():
    # Row 0: log-ratios [log 2, 0] -> s = sqrt(2); row 1: one token, s = 0.9 (junk in padding).
    logp = jnp.array([[np.log(2.0), 0.0], [np.log(0.9), 50.0]], jnp.float32)
    batch = {
        "response_mask": jnp.array([[1.0, 1.0], [1.0, 0.0]]),
        "old_logprobs": jnp.zeros((2, 2)),
        "advantages": jnp.array([[1.0, 1.0], [-1.0, -1.0]]),
    }
    return logp, batch


def test_gspo_sequence_ratio_hand_computed():
    logp, batch = gspo_case()
    config = GRPOLossConfig(importance_sampling_level="sequence", beta=0.0)
    loss, metrics = grpo_loss(logp, batch, config, logprob_apply_fn)
    # row 0: sqrt(2) clipped to 1.2 -> -1.2 per token; row 1: max(0.9, 0.9) = 0.9
    assert float(loss) == pytest.approx((-1.2 * 2 + 0.9) / 3, rel=1e-6)
    assert float(metrics["actor/pg_clipfrac"]) == pytest.approx(2 / 3)
    grad = jax.grad(lambda p: grpo_loss(p, batch, config, logprob_apply_fn)[0])(logp)
    np.testing.assert_allclose(grad, [[0.0, 0.0], [0.9 / 3, 0.0]], rtol=1e-5, atol=1e-7)


def test_gspo_gradient_spreads_over_the_sequence():
    logp, batch = gspo_case()
    config = GRPOLossConfig(importance_sampling_level="sequence", beta=0.0, clip_ratio_high=1.0)
    loss, _ = grpo_loss(logp, batch, config, logprob_apply_fn)
    s = np.sqrt(2.0)
    assert float(loss) == pytest.approx((-2 * s + 0.9) / 3, rel=1e-6)
    grad = jax.grad(lambda p: grpo_loss(p, batch, config, logprob_apply_fn)[0])(logp)
    # each of row 0's two tokens carries d(-s)/dlogp_t = -s / 2, on both of its tokens: -s / 3
    np.testing.assert_allclose(grad, [[-s / 3, -s / 3], [0.9 / 3, 0.0]], rtol=1e-5)


def test_token_level_grpo_equals_ppo_without_critic_and_kl():
    params = tiny_params()
    batch = tiny_rollout_batch(params, seed=1)
    moved = jax.tree.map(lambda x: 1.2 * x, params)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        grpo_config = GRPOLossConfig(beta=0.0, loss_agg_mode=mode, dual_clip_c=3.0)
        ppo_config = PPOLossConfig(vf_coef=0.0, loss_agg_mode=mode, dual_clip_c=3.0)
        grpo, _ = grpo_loss(moved, batch, grpo_config, tiny_apply_fn)
        ppo, _ = ppo_loss(moved, batch, ppo_config, tiny_apply_fn)
        np.testing.assert_allclose(grpo, ppo, rtol=1e-6)


def test_kl_term_and_tis():
    params = tiny_params()
    batch = tiny_rollout_batch(params, seed=2)
    config = GRPOLossConfig(beta=0.04, kl_kind="k3", tis_cap=2.0, clip_ratio_high=0.28,
                            loss_agg_mode="seq-mean-token-mean")  # fmt: skip
    loss, metrics = jax.jit(lambda p, b: grpo_loss(p, b, config, tiny_apply_fn))(params, batch)
    out = tiny_apply_fn(params, batch)
    mask = batch["response_mask"]
    pg, _ = ppo_policy_loss(out["logprobs"], batch["old_logprobs"], batch["advantages"], mask,
                            clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-mean",
                            behavior_logprobs=batch["behavior_logprobs"], tis_cap=2.0)  # fmt: skip
    kl = aggregate(kl_penalty(out["logprobs"], batch["ref_logprobs"], "k3"), mask,
                   "seq-mean-token-mean")  # fmt: skip
    np.testing.assert_allclose(loss, pg + 0.04 * kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/kl_loss"], kl, rtol=1e-5)
    assert "critic/vf_loss" not in metrics and "actor/tis_weight_mean" in metrics
    eager, _ = grpo_loss(params, batch, config, tiny_apply_fn)
    np.testing.assert_allclose(eager, loss, rtol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_matches_numpy_float64_with_a_loss_scale_factor(level):
    """Dr. GRPO's constant S (9, not the padded length 5), the k3 KL term, the entropy bonus,
    clip-higher, dual clip and TIS, with token and sequence (GSPO) ratios, against float64
    formulas; eager, jitted and sharded over 8 devices."""
    params = tiny_params()
    batch = tiny_rollout_batch(params, batch_size=16, seed=11)
    moved = jax.tree.map(lambda x: 1.3 * x, params)  # ratios away from 1: the clips act
    config = GRPOLossConfig(
        loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=9.0, beta=0.04, kl_kind="k3",
        entropy_coef=0.01, clip_ratio_high=0.28, dual_clip_c=3.0, tis_cap=2.0,
        importance_sampling_level=level,
    )  # fmt: skip

    def np_loss(p):
        out = np_tiny_apply(p, batch["tokens"])
        policy_terms, agg = np_policy_terms(out, batch, config, sequence=level == "sequence")
        return policy_terms + 0.04 * agg(np_kl(out["logprobs"], batch["ref_logprobs"], "k3"))

    check_loss_eager_jit_and_sharded(grpo_loss, config, moved, batch, np_loss)


def test_grpo_errors():
    logp, batch = gspo_case()
    with pytest.raises(ValueError, match="config must be a GRPOLossConfig"):
        grpo_loss(logp, batch, PPOLossConfig(), logprob_apply_fn)
    with pytest.raises(ValueError, match=r"batch has no 'ref_logprobs' \(the KL loss is on: beta="):
        grpo_loss(logp, batch, GRPOLossConfig(beta=0.1), logprob_apply_fn)
    with pytest.raises(ValueError, match="apply_fn must return a mapping .*, got tuple"):
        grpo_loss(logp, batch, GRPOLossConfig(beta=0.0), lambda p, b: (p, p))
    with pytest.raises(ValueError, match="batch has no 'behavior_logprobs'"):
        grpo_loss(logp, batch, GRPOLossConfig(beta=0.0, tis_cap=2.0), logprob_apply_fn)
    with pytest.raises(ValueError, match="apply_fn's output has no 'logprobs'"):
        grpo_loss(logp, batch, GRPOLossConfig(beta=0.0), lambda p, b: {"logits": p})
    with pytest.raises(ValueError, match="logprobs has shape"):
        grpo_loss(logp[:, :1], batch, GRPOLossConfig(beta=0.0), logprob_apply_fn)


@pytest.mark.parametrize("loss_fn", [grpo_loss, ppo_loss])
def test_reference_logprobs_and_entropy_of_another_shape_are_refused(loss_fn):
    # A [B, 1] array broadcast against the [B, T] mask without a word: a KL loss T times
    # too large.
    logp, batch = gspo_case()
    rows = logp.shape[0]
    config = (GRPOLossConfig if loss_fn is grpo_loss else PPOLossConfig)(
        **({"beta": 0.1} if loss_fn is grpo_loss else {"kl_coef": 0.1, "vf_coef": 0.0})
    )
    for shape in [(rows, 1), logp.shape[1:], (rows,)]:
        short = {**batch, "ref_logprobs": np.zeros(shape)}
        with pytest.raises(ValueError, match=re.escape(
            f"ref_logprobs has shape {shape}; every token array must have the shape [B, T] = "
            f"{logp.shape} of response_mask"
        )):  # fmt: skip
            loss_fn(logp, short, config, logprob_apply_fn)
    full = {**batch, "ref_logprobs": np.zeros(logp.shape)}
    loss_fn(logp, full, config, logprob_apply_fn)
    with pytest.raises(ValueError, match=r"entropy has shape \(\d+, 1\); every token array"):
        loss_fn(logp, full, config, lambda p, b: {"logprobs": p, "entropy": p[:, :1]})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"importance_sampling_level": "group"}, "importance_sampling_level='group' is not one"),
        ({"beta": -0.1}, "beta must be a number >= 0"),
        ({"clip_ratio_low": -0.1}, r"clip_ratio_low must be in \[0, 1\)"),
        ({"kl_kind": "k5"}, "kl_kind='k5' is not one of"),
        ({"loss_agg_mode": "seq-mean"}, "loss_agg_mode='seq-mean' is not one of"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOLossConfig(**kwargs)


@pytest.mark.parametrize("field", ["advantages", "old_logprobs", "ref_logprobs", "behavior"])
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_padding_holding_nan_reaches_neither_the_loss_nor_its_gradient(field, kl_kind):
    mask = jnp.array([[1.0, 1.0, 0.0]])
    clean = {
        "response_mask": mask,
        "old_logprobs": jnp.full((1, 3), -1.1),
        "advantages": jnp.array([[1.0, -0.5, 0.3]]),
        "ref_logprobs": jnp.full((1, 3), -0.9),
        "behavior_logprobs": jnp.full((1, 3), -1.2),
    }
    key = "behavior_logprobs" if field == "behavior" else field
    dirty = {**clean, key: clean[key].at[0, 2].set(jnp.nan)}
    if kl_kind == "k2":
        dirty["ref_logprobs"] = dirty["ref_logprobs"].at[0, 2].set(-jnp.inf)
    config = GRPOLossConfig(beta=0.1, kl_kind=kl_kind, tis_cap=2.0)
    params = jnp.full((1, 3), -1.0)

    def loss(p, batch):
        return grpo_loss(p, batch, config, logprob_apply_fn)[0]

    want_loss, want_grad = jax.value_and_grad(loss)(params, clean)
    got_loss, got_grad = jax.value_and_grad(loss)(params, dirty)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-6)
    assert np.asarray(got_grad)[0, 2] == 0.0


def test_value_loss_gradient_ignores_nan_padding():
    mask = jnp.array([[1.0, 0.0]])
    returns = jnp.array([[1.0, jnp.nan]])
    old = jnp.array([[0.4, jnp.nan]])
    grad = jax.grad(lambda v: value_loss(v, old, returns, mask, clip_range=0.2)[0])(
        jnp.array([[0.5, 0.5]])
    )
    np.testing.assert_allclose(np.asarray(grad), [[-0.5, 0.0]])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(clip_ratio_low=-0.5), r"clip_ratio_low must be in \[0, 1\)"),
        (dict(clip_ratio_low=None), r"clip_ratio_low must be in \[0, 1\)"),
        (dict(clip_ratio_high=-1.0), "clip_ratio_high must be a number >= 0"),
        (dict(dual_clip_c=0.5), "dual_clip_c must be > 1 or None"),
    ],
)
def test_policy_loss_checks_its_clip_arguments(kwargs, message):
    ones = jnp.ones((1, 2))
    with pytest.raises(ValueError, match=message):
        ppo_policy_loss(ones, ones, ones, ones, **kwargs)
    # NumPy scalars are numbers too.
    ppo_policy_loss(ones, ones, ones, ones, clip_ratio_low=np.float32(0.2))


def test_router_losses_and_denominators_must_be_scalars():
    batch = {
        "response_mask": jnp.ones((1, 2)),
        "old_logprobs": jnp.zeros((1, 2)),
        "advantages": jnp.ones((1, 2)),
    }
    vector_aux = lambda p, b: {"logprobs": p, "moe_aux_loss": jnp.ones(2)}  # noqa: E731
    with pytest.raises(ValueError, match="'moe_aux_loss' must be a scalar"):
        grpo_loss(jnp.zeros((1, 2)), batch, GRPOLossConfig(beta=0.0), vector_aux)
    stacked = {**batch, "loss_denominators": (jnp.ones(2), jnp.ones(2))}
    with pytest.raises(ValueError, match="loss_denominators'\\] must hold scalars"):
        grpo_loss(jnp.zeros((1, 2)), stacked, GRPOLossConfig(beta=0.0), logprob_apply_fn)
