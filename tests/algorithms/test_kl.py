"""KL estimators: hand values, aliases, straight-through gradients, clamps, penalties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novarl_jax.algorithms.kl import (
    KL_KINDS,
    adaptive_kl_coef,
    kl_penalty,
    kl_penalty_token_rewards,
)


def np_kl(logp, ref, kind):
    d = np.asarray(logp, np.float64) - np.asarray(ref, np.float64)
    kind = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(kind.rstrip("+"), kind.rstrip("+"))
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "abs":
        return np.abs(d)
    neg = np.clip(-d, -20, 20)
    return np.clip(np.exp(neg) - neg - 1, -10, 10)


def test_hand_computed_values():
    logp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-2.0, -1.0]])
    # log_ratio = [1, -1]
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [[1.0, -1.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, "abs"), [[1.0, 1.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [[0.5, 0.5]])
    np.testing.assert_allclose(
        kl_penalty(logp, ref, "k3"), [[np.exp(-1) + 1 - 1, np.exp(1) - 1 - 1]], rtol=1e-6
    )


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(KL_KINDS), seed=st.integers(0, 2**16))
def test_every_kind_matches_numpy(kind, seed):
    rng = np.random.default_rng(seed)
    logp, ref = rng.normal(size=(2, 5)) * 3, rng.normal(size=(2, 5)) * 3
    want = np_kl(logp, ref, kind)
    np.testing.assert_allclose(kl_penalty(logp, ref, kind), want, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(kl_penalty, static_argnums=2)(logp, ref, kind)
    np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)


def test_aliases_are_the_same_estimators():
    logp, ref = jnp.array([0.3, -2.0]), jnp.array([-0.1, 0.4])
    for alias, kind in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        np.testing.assert_array_equal(kl_penalty(logp, ref, alias), kl_penalty(logp, ref, kind))


def test_k3_is_non_negative_and_clamped():
    logp = jnp.zeros(7)
    ref = jnp.array([-5.0, 30.0, -30.0, 100.0, -100.0, 1e4, -1e4])
    got = np.asarray(kl_penalty(logp, ref, "k3"))
    assert np.all(got >= 0)
    np.testing.assert_allclose(got[0], np.exp(-5) + 5 - 1, rtol=1e-6)  # under the clamp
    np.testing.assert_array_equal(got[1:], 10.0)  # exp(20) - 21 and exp(-20) + 19, clamped
    # The log-ratio is clamped before the exponential: past it, no gradient (never NaN).
    grad = np.asarray(jax.grad(lambda x: kl_penalty(x, ref, "k3").sum())(logp))
    np.testing.assert_allclose(grad[0], 1 - np.exp(-5), rtol=1e-6)
    np.testing.assert_array_equal(grad[1:], 0.0)


def test_plus_suffix_keeps_value_and_takes_k2_gradient():
    logp, ref = jnp.array([0.4, -1.2, 2.0]), jnp.array([0.1, 0.3, -0.5])
    for kind in ("k1", "k3", "abs"):
        np.testing.assert_allclose(
            kl_penalty(logp, ref, kind + "+"), kl_penalty(logp, ref, kind), rtol=1e-6
        )
        grad_plus = jax.grad(lambda x, k=kind: kl_penalty(x, ref, k + "+").sum())(logp)
        grad_k2 = jax.grad(lambda x: kl_penalty(x, ref, "k2").sum())(logp)
        np.testing.assert_allclose(grad_plus, grad_k2, rtol=1e-6)
        np.testing.assert_allclose(grad_k2, logp - ref, rtol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k3", "abs"])
def test_plus_suffix_keeps_the_exact_value_at_extreme_log_ratios(kind):
    """The straight-through term adds exactly 0: a large k2 must not round the estimate (a
    clamped k3 of 10 came out as 8.0 at a log-ratio of 1e4), and a reference log-prob of
    -inf gives the estimator's own value and no NaN gradient."""
    ref = jnp.array([-1e4, 1e4, -1e5, -3000.5, -jnp.inf])
    logp = jnp.zeros(5)
    plain = np.asarray(kl_penalty(logp, ref, kind))
    np.testing.assert_array_equal(np.asarray(kl_penalty(logp, ref, kind + "+")), plain)
    grad = np.asarray(jax.grad(lambda x: kl_penalty(x, ref, kind + "+").sum())(logp))
    np.testing.assert_array_equal(grad, [1e4, -1e4, 1e5, 3000.5, 0.0])  # k2's: the log-ratio


def test_kl_penalty_token_rewards():
    logp = jnp.array([[-1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -0.5, 9.0]])
    mask = jnp.array([[1, 1, 0]])
    got = kl_penalty_token_rewards(logp, ref, mask, kl_coef=0.1)
    np.testing.assert_allclose(got, [[-0.05, 0.05, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda x: kl_penalty_token_rewards(x, ref, mask, kl_coef=0.1).sum())(logp)
    np.testing.assert_array_equal(grad, np.zeros((1, 3)))  # part of the reward: no gradient


def test_adaptive_kl_coef_hand_values():
    # observed 2x the target: error clipped to 0.2; 0.1 * (1 + 0.2 * 100 / 1000) = 0.102
    np.testing.assert_allclose(
        adaptive_kl_coef(0.1, 0.2, 100, target_kl=0.1, horizon=1000), 0.102, rtol=1e-6
    )
    # observed half the target: error -0.5 clipped to -0.2
    np.testing.assert_allclose(
        adaptive_kl_coef(0.1, 0.05, 100, target_kl=0.1, horizon=1000), 0.098, rtol=1e-6
    )
    # in between: error 0.1
    np.testing.assert_allclose(
        adaptive_kl_coef(0.1, 0.11, 1000, target_kl=0.1, horizon=1000), 0.11, rtol=1e-5
    )


def test_errors():
    with pytest.raises(ValueError, match="unknown KL kind 'full'"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), "full")
    with pytest.raises(ValueError, match="must have the same shape"):
        kl_penalty(jnp.zeros(2), jnp.zeros(3), "k1")
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        kl_penalty_token_rewards(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)),
                                 kl_coef=-1.0)  # fmt: skip
    with pytest.raises(ValueError, match="response_mask .* must have the shape"):
        kl_penalty_token_rewards(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 3)),
                                 kl_coef=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="target_kl must be > 0"):
        adaptive_kl_coef(0.1, 0.1, 1, target_kl=0.0, horizon=1.0)
    with pytest.raises(ValueError, match="horizon must be > 0"):
        adaptive_kl_coef(0.1, 0.1, 1, target_kl=0.1, horizon=0.0)


def test_kl_coefficients_are_checked_numbers():
    ones = jnp.zeros((1, 2))
    for coef in (None, "0.1", np.float32(-1.0), jnp.float32(-1.0)):
        with pytest.raises(ValueError, match="kl_coef must be"):
            kl_penalty_token_rewards(ones, ones, jnp.ones((1, 2)), kl_coef=coef)
    with pytest.raises(ValueError, match="horizon must be a number"):
        adaptive_kl_coef(0.1, 0.2, 10, target_kl=0.1, horizon=None)
    # A correction past -100% stops the coefficient at 0.
    assert float(adaptive_kl_coef(0.1, 0.0, 1000, target_kl=0.1, horizon=10)) == 0.0
