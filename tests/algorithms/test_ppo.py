"""PPO losses against hand-computed values and a NumPy float64 loop; the composed loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_aggregation import np_aggregate
from test_kl import np_kl
from tiny_policy import (
    check_loss_eager_jit_and_sharded,
    np_tiny_apply,
    tiny_apply_fn,
    tiny_params,
    tiny_rollout_batch,
)

from novarl_jax.algorithms import (
    LOSS_AGG_MODES,
    PPOLossConfig,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    ppo_loss,
    ppo_policy_loss,
    token_logprobs_and_entropy,
    truncated_importance_weights,
    value_loss,
)
from novarl_jax.core.distributed import ParallelLayout

LOG_RATIOS = np.log(np.array([[1.5, 0.5, 1.1, 4.0, 0.5]], np.float32))
ADVANTAGES = np.array([[1.0, 1.0, -1.0, -1.0, -1.0]], np.float32)
MASK = np.ones((1, 5), np.float32)


def policy(**kwargs):
    return ppo_policy_loss(LOG_RATIOS, np.zeros((1, 5), np.float32), ADVANTAGES, MASK, **kwargs)


def test_symmetric_clip_hand_computed():
    # per token: max(-A r, -A clip(r, 0.8, 1.2))
    # r=1.5,A=1: max(-1.5,-1.2)=-1.2 (clipped); r=0.5,A=1: max(-0.5,-0.8)=-0.5;
    # r=1.1,A=-1: 1.1; r=4,A=-1: max(4,1.2)=4; r=0.5,A=-1: max(0.5,0.8)=0.8 (clipped)
    loss, m = policy()
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1 + 4.0 + 0.8) / 5, rel=1e-6)
    assert float(m["actor/pg_clipfrac"]) == pytest.approx(2 / 5)
    assert float(m["actor/pg_clipfrac_lower"]) == 0.0
    assert float(m["actor/ppo_kl"]) == pytest.approx(-np.log([1.5, 0.5, 1.1, 4, 0.5]).mean())
    assert float(m["actor/ratio_mean"]) == pytest.approx((1.5 + 0.5 + 1.1 + 4 + 0.5) / 5)
    assert float(m["actor/ratio_max"]) == pytest.approx(4.0)
    assert float(m["actor/pg_loss"]) == pytest.approx(float(loss))


def test_asymmetric_clip_higher_hand_computed():
    # clip range [0.8, 1.6]: r=1.5 is no longer clipped (-1.5); r=0.5,A=-1 still is (0.8)
    loss, m = policy(clip_ratio_low=0.2, clip_ratio_high=0.6)
    assert float(loss) == pytest.approx((-1.5 - 0.5 + 1.1 + 4.0 + 0.8) / 5, rel=1e-6)
    assert float(m["actor/pg_clipfrac"]) == pytest.approx(1 / 5)
    # clip range [0.4, 1.2]: r=0.5,A=-1 is inside now (0.5)
    loss, _ = policy(clip_ratio_low=0.6, clip_ratio_high=0.2)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1 + 4.0 + 0.5) / 5, rel=1e-6)


def test_dual_clip_hand_computed():
    # A<0 tokens are capped at -A * c = 3: r=4 gives min(4, 3) = 3
    loss, m = policy(dual_clip_c=3.0)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1 + 3.0 + 0.8) / 5, rel=1e-6)
    assert float(m["actor/pg_clipfrac_lower"]) == pytest.approx(1 / 5)
    # A ratio of exactly c is at the bound, not past it: the cap changes nothing there.
    c = float(jnp.exp(jnp.float32(1.0)))
    loss, m = ppo_policy_loss(np.ones((1, 1)), np.zeros((1, 1)), -np.ones((1, 1)),
                              np.ones((1, 1)), dual_clip_c=c)  # fmt: skip
    assert float(loss) == pytest.approx(c) and float(m["actor/pg_clipfrac_lower"]) == 0.0


def test_gradient_is_zero_where_the_clip_is_active():
    def f(logp):
        return ppo_policy_loss(logp, np.zeros((1, 5)), ADVANTAGES, MASK)[0]

    grad = np.asarray(jax.grad(f)(jnp.asarray(LOG_RATIOS)))[0]
    # d/dlogp of -A r / 5 = -A r / 5 where unclipped, 0 where clipped
    np.testing.assert_allclose(grad, [0.0, -0.5 / 5, 1.1 / 5, 4.0 / 5, 0.0], rtol=1e-6)


def np_policy_loss(logp, old, adv, mask, low, high, dual, weights=None):
    out = np.zeros(logp.shape)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = np.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            loss = max(-a * r, -a * min(max(r, 1 - low), 1 + high))
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            out[b, t] = loss * (1.0 if weights is None else weights[b, t])
    return out


def np_policy_metrics(logp, old, adv, mask, low, high, dual):
    """The loss's metrics over the valid tokens, in float64 (padding may hold anything)."""
    valid = mask != 0
    r = np.exp(logp.astype(np.float64) - old)
    clipped = -adv * np.clip(r, 1 - low, 1 + high)
    lower = np.zeros(r.shape, bool)
    if dual is not None:
        lower = (adv < 0) & (np.maximum(-adv * r, clipped) > -adv * dual)
    fraction = (lambda x: x[valid].mean()) if valid.any() else (lambda x: 0.0)
    return {
        "actor/pg_clipfrac": fraction((clipped > -adv * r).astype(np.float64)),
        "actor/pg_clipfrac_lower": fraction(lower.astype(np.float64)),
        "actor/ppo_kl": fraction(old - logp.astype(np.float64)),
        "actor/ratio_mean": fraction(r),
        "actor/ratio_max": r[valid].max() if valid.any() else 0.0,
    }


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(LOSS_AGG_MODES),
    low=st.sampled_from([0.1, 0.2]),
    high=st.sampled_from([0.2, 0.28]),
    dual=st.sampled_from([None, 3.0]),
)
def test_policy_loss_and_metrics_match_numpy_loop(seed, mode, low, high, dual):
    rng = np.random.default_rng(seed)
    logp = rng.normal(size=(8, 6)).astype(np.float32) * 0.5
    old = logp + rng.normal(size=(8, 6)).astype(np.float32) * 0.8
    adv = rng.normal(size=(8, 6)).astype(np.float32)
    mask = (np.arange(6)[None] < rng.integers(0, 7, size=8)[:, None]).astype(np.float32)
    kwargs = dict(clip_ratio_low=low, clip_ratio_high=high, dual_clip_c=dual, loss_agg_mode=mode)
    want = np_aggregate(np_policy_loss(logp, old, adv, mask, low, high, dual), mask, mode)
    want_metrics = np_policy_metrics(logp, old, adv, mask, low, high, dual)
    # Padding holds values that would move every metric if it were counted.
    old_padded = np.where(mask != 0, old, logp - 5.0).astype(np.float32)
    adv_padded = np.where(mask != 0, adv, -7.0).astype(np.float32)
    inputs = (logp, old_padded, adv_padded, mask)
    jitted = jax.jit(lambda *a: ppo_policy_loss(*a, **kwargs))
    sharding = NamedSharding(ParallelLayout(dp=8).make_mesh(), P(("dp",)))
    sharded = [jax.device_put(x, sharding) for x in inputs]
    for got, metrics in (ppo_policy_loss(*inputs, **kwargs), jitted(*inputs), jitted(*sharded)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for name, value in want_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_truncated_importance_sampling():
    old = np.zeros((1, 5), np.float32)
    behavior = np.log(np.array([[0.5, 1.0, 2.0, 0.1, 1.0]], np.float32))
    weights = truncated_importance_weights(old, behavior, 1.5)
    np.testing.assert_allclose(weights, [[1.5, 1.0, 0.5, 1.5, 1.0]], rtol=1e-6)
    loss, m = policy(behavior_logprobs=behavior, tis_cap=1.5)
    per_token = np.array([-1.2, -0.5, 1.1, 4.0, 0.8]) * np.array([1.5, 1.0, 0.5, 1.5, 1.0])
    assert float(loss) == pytest.approx(per_token.mean(), rel=1e-6)
    assert float(m["actor/tis_weight_mean"]) == pytest.approx(5.5 / 5)
    assert float(m["actor/tis_clipfrac"]) == pytest.approx(2 / 5)
    # A ratio equal to the cap is not truncated (with equal log-probs every ratio is 1).
    _, m = policy(behavior_logprobs=old, tis_cap=1.0)
    assert float(m["actor/tis_clipfrac"]) == 0.0
    with pytest.raises(ValueError, match="tis_cap=1.5 needs behavior_logprobs"):
        policy(tis_cap=1.5)
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        truncated_importance_weights(old, behavior, 0.0)


def test_value_loss_hand_computed():
    values = np.array([[2.0, 0.1, -1.0]], np.float32)
    old = np.zeros((1, 3), np.float32)
    returns = np.array([[0.0, 1.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 0]], np.float32)
    loss, m = value_loss(values, old, returns, mask)
    assert float(loss) == pytest.approx(0.5 * (4.0 + 0.81) / 2)
    # eps = 0.5: token 0: max(4, (0.5-0)^2) = 4; token 1: max(0.81, (0.1-1)^2) = 0.81
    loss, m = value_loss(values, old, returns, mask, clip_range=0.5)
    assert float(loss) == pytest.approx(0.5 * (4.0 + 0.81) / 2)
    assert float(m["critic/vf_clipfrac"]) == 0.0
    # eps = 0.05 clips token 1 to 0.05: (0.05 - 1)^2 = 0.9025 > 0.81
    loss, m = value_loss(values, old, returns, mask, clip_range=0.05)
    assert float(loss) == pytest.approx(0.5 * (4.0 + 0.9025) / 2)
    assert float(m["critic/vf_clipfrac"]) == pytest.approx(0.5)
    assert float(m["critic/vpred_mean"]) == pytest.approx(1.05)
    # A value that fell by more than the clip range is clipped too: -2 -> -0.5, and
    # (-0.5 - (-3))^2 = 6.25 > (-2 - (-3))^2 = 1.
    loss, m = value_loss([[-2.0]], [[0.0]], [[-3.0]], np.ones((1, 1)), clip_range=0.5)
    assert float(loss) == pytest.approx(0.5 * 6.25)
    assert float(m["critic/vf_clipfrac"]) == 1.0
    with pytest.raises(ValueError, match="clip_range must be a number >= 0"):
        value_loss(values, old, returns, mask, clip_range=-1.0)


def test_values_inside_the_clip_range_count_as_unclipped():
    # old + (v - old) rounds away from v for some values; that is not clipping, and the loss
    # must be the unclipped one exactly (else it moves with how a batch is split).
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 0.01, (4, 64)).astype(np.float32)
    old = (values + rng.normal(0.0, 0.01, (4, 64))).astype(np.float32)
    returns = rng.normal(0.0, 1.0, (4, 64)).astype(np.float32)
    mask = np.ones((4, 64), np.float32)
    assert np.abs(values - old).max() < 0.2
    assert ((old + (values - old)) != values).any()  # the rounding this is about
    clipped, m = value_loss(values, old, returns, mask, clip_range=0.2)
    assert float(m["critic/vf_clipfrac"]) == 0.0
    assert float(clipped) == float(value_loss(values, old, returns, mask)[0])


def test_ppo_loss_is_the_sum_of_its_terms():
    params = tiny_params()
    batch = tiny_rollout_batch(params, seed=3)
    config = PPOLossConfig(vf_coef=0.3, entropy_coef=0.02, kl_coef=0.1, tis_cap=2.0,
                           dual_clip_c=3.0, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001,
                           loss_agg_mode="seq-mean-token-mean")  # fmt: skip
    loss, metrics = ppo_loss(params, batch, config, tiny_apply_fn)
    out = tiny_apply_fn(params, batch)
    mask = batch["response_mask"]
    pg, _ = ppo_policy_loss(out["logprobs"], batch["old_logprobs"], batch["advantages"], mask,
                            dual_clip_c=3.0, loss_agg_mode="seq-mean-token-mean",
                            behavior_logprobs=batch["behavior_logprobs"], tis_cap=2.0)  # fmt: skip
    vf, _ = value_loss(out["values"], batch["old_values"], batch["returns"], mask,
                       clip_range=0.2)  # fmt: skip
    entropy = aggregate(out["entropy"], mask, "seq-mean-token-mean")
    kl = aggregate(kl_penalty(out["logprobs"], batch["ref_logprobs"], "low_var_kl"), mask,
                   "seq-mean-token-mean")  # fmt: skip
    want = (pg + 0.3 * vf - 0.02 * entropy + 0.1 * kl + 0.01 * out["moe_aux_loss"]
            + 0.001 * out["moe_z_loss"])  # fmt: skip
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/kl_loss"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/entropy"], aggregate(out["entropy"], mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["critic/vf_loss"], vf, rtol=1e-5)
    assert all(np.shape(v) == () and v.dtype == jnp.float32 for v in metrics.values())
    grads = jax.jit(jax.grad(lambda p: ppo_loss(p, batch, config, tiny_apply_fn)[0]))(params)
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


def np_policy_terms(out, batch, config, *, sequence=False):
    """The clipped surrogate (with dual clip and TIS) minus the entropy bonus, in float64 from
    the documented formulas; also returns the aggregation the other terms use."""
    mask = np.asarray(batch["response_mask"]) != 0
    b = {k: np.asarray(v, np.float64) for k, v in batch.items() if k != "tokens"}

    def agg(x, mode=config.loss_agg_mode):
        return np_aggregate(x, mask, mode, config.loss_scale_factor)

    diff = np.where(mask, out["logprobs"] - b["old_logprobs"], 0.0)
    if sequence:  # GSPO: each row's length-normalised log-ratio on every one of its tokens
        diff = np.broadcast_to((diff.sum(1) / np.maximum(mask.sum(1), 1))[:, None], diff.shape)
    log_ratio = np.clip(np.where(mask, diff, 0.0), -20.0, 20.0)
    weights = None
    if config.tis_cap is not None:
        log_w = np.clip(b["old_logprobs"] - b["behavior_logprobs"], -20.0, 20.0)
        weights = np.minimum(np.exp(log_w), config.tis_cap)
    pg = np_policy_loss(log_ratio, np.zeros_like(log_ratio), np.where(mask, b["advantages"], 0),
                        mask, config.clip_ratio_low, config.clip_ratio_high, config.dual_clip_c,
                        weights)  # fmt: skip
    return agg(pg) - config.entropy_coef * agg(out["entropy"]), agg


@pytest.mark.parametrize(
    ("value_mode", "scale"), [("seq-mean-token-sum", None), ("seq-mean-token-sum-norm", 9.0)]
)
def test_ppo_loss_matches_numpy_float64(value_mode, scale):
    """Every term of ``ppo_loss`` against float64 formulas that call nothing of the library
    (the test above builds its reference from the library's own terms), including a value
    loss aggregated in its own mode (with the loss scale factor S where it reads one); eager,
    jitted and sharded over 8 devices."""
    params = tiny_params()
    batch = tiny_rollout_batch(params, batch_size=16, seed=12)
    moved = jax.tree.map(lambda x: 1.3 * x, params)  # ratios away from 1: the clips act
    config = PPOLossConfig(
        loss_agg_mode="seq-mean-token-mean", vf_coef=0.3, value_clip_range=0.2,
        value_loss_agg_mode=value_mode, loss_scale_factor=scale, entropy_coef=0.02, kl_coef=0.1,
        kl_kind="k3", tis_cap=2.0, dual_clip_c=3.0, clip_ratio_high=0.28, moe_aux_loss_coef=0.01,
        moe_z_loss_coef=0.001,
    )  # fmt: skip

    def np_loss(p):
        out = np_tiny_apply(p, batch["tokens"])
        policy_terms, agg = np_policy_terms(out, batch, config)
        v, old, ret = (np.asarray(x, np.float64) for x in (out["values"], batch["old_values"],
                                                            batch["returns"]))  # fmt: skip
        clipped = old + np.clip(v - old, -0.2, 0.2)
        vf = 0.5 * agg(np.maximum((v - ret) ** 2, (clipped - ret) ** 2), value_mode)
        kl = agg(np_kl(out["logprobs"], batch["ref_logprobs"], "k3"))
        return (policy_terms + 0.3 * vf + 0.1 * kl + 0.01 * out["moe_aux_loss"]
                + 0.001 * out["moe_z_loss"])  # fmt: skip

    check_loss_eager_jit_and_sharded(ppo_loss, config, moved, batch, np_loss)


def test_ppo_loss_adds_a_separate_critics_router_losses():
    """A separate MoE critic's router losses take the policy's coefficients and own metrics."""
    params = tiny_params()
    batch = tiny_rollout_batch(params, seed=5)
    critic_aux = lambda p: jnp.mean(jnp.abs(p["v"]))  # noqa: E731
    critic_z = lambda p: jnp.mean(p["v"] ** 4)  # noqa: E731

    def with_critic_routers(p, b):
        return {**tiny_apply_fn(p, b), "critic_moe_aux_loss": critic_aux(p),
                "critic_moe_z_loss": critic_z(p)}  # fmt: skip

    config = PPOLossConfig(vf_coef=0.3, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001)
    loss, metrics = ppo_loss(params, batch, config, with_critic_routers)
    base, base_metrics = ppo_loss(params, batch, config, tiny_apply_fn)
    want = 0.01 * critic_aux(params) + 0.001 * critic_z(params)
    np.testing.assert_allclose(loss - base, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["critic/moe_aux_loss"], critic_aux(params), rtol=1e-6)
    np.testing.assert_allclose(metrics["critic/moe_z_loss"], critic_z(params), rtol=1e-6)
    assert metrics["actor/moe_aux_loss"] == base_metrics["actor/moe_aux_loss"]
    assert "critic/moe_aux_loss" not in base_metrics
    # Their gradient is the critic routers' own: with every other term off it is exactly it.
    off = PPOLossConfig(vf_coef=0.0, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.0)
    grads = jax.grad(lambda p: ppo_loss(p, batch, off, with_critic_routers)[0])(params)
    only_pg = jax.grad(lambda p: ppo_loss(p, batch, off, tiny_apply_fn)[0])(params)
    np.testing.assert_allclose(
        grads["v"] - only_pg["v"], jax.grad(lambda p: 0.01 * critic_aux(p))(params)["v"],
        rtol=1e-5, atol=1e-8,
    )  # fmt: skip


def test_ppo_loss_accepts_a_namedtuple_batch():
    from typing import NamedTuple

    params = tiny_params()
    batch = tiny_rollout_batch(params, seed=4)
    fields = ("tokens", "response_mask", "old_logprobs", "advantages", "returns", "old_values")
    Batch = NamedTuple("Batch", [(f, jax.Array) for f in fields])
    as_tuple = Batch(**{f: batch[f] for f in fields})
    config = PPOLossConfig()
    want = ppo_loss(params, {f: batch[f] for f in fields}, config, tiny_apply_fn)[0]
    got = ppo_loss(params, as_tuple, config, lambda p, b: tiny_apply_fn(p, b._asdict()))[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ppo_loss_errors():
    params = tiny_params()
    batch = tiny_rollout_batch(params, seed=5)
    with pytest.raises(ValueError, match="config must be a PPOLossConfig"):
        ppo_loss(params, batch, object(), tiny_apply_fn)
    with pytest.raises(ValueError, match="batch has no 'returns'"):
        ppo_loss(params, {k: v for k, v in batch.items() if k != "returns"}, PPOLossConfig(),
                 tiny_apply_fn)  # fmt: skip
    with pytest.raises(ValueError, match="apply_fn's output has no 'values'"):
        ppo_loss(params, batch, PPOLossConfig(),
                 lambda p, b: {"logprobs": tiny_apply_fn(p, b)["logprobs"]})  # fmt: skip
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs apply_fn to return 'entropy'"):
        ppo_loss(params, batch, PPOLossConfig(vf_coef=0.0, entropy_coef=0.1),
                 lambda p, b: {"logprobs": tiny_apply_fn(p, b)["logprobs"]})  # fmt: skip
    no_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    with pytest.raises(ValueError, match="batch has no 'ref_logprobs'"):
        ppo_loss(params, no_ref, PPOLossConfig(kl_coef=0.1), tiny_apply_fn)
    no_behavior = {k: v for k, v in batch.items() if k != "behavior_logprobs"}
    with pytest.raises(ValueError, match="batch has no 'behavior_logprobs'"):
        ppo_loss(params, no_behavior, PPOLossConfig(tis_cap=2.0), tiny_apply_fn)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_loss(params, {**batch, "advantages": batch["advantages"][:, :2]}, PPOLossConfig(),
                 tiny_apply_fn)  # fmt: skip
    with pytest.raises(ValueError, match="batch must be a mapping or a NamedTuple"):
        ppo_loss(params, [1, 2], PPOLossConfig(), tiny_apply_fn)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"clip_ratio_low": 1.0}, r"clip_ratio_low must be in \[0, 1\)"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high must be a number >= 0"),
        ({"dual_clip_c": 1.0}, "dual_clip_c must be > 1 or None"),
        ({"loss_agg_mode": "sum"}, "loss_agg_mode='sum' is not one of"),
        ({"loss_scale_factor": 0}, "loss_scale_factor must be > 0 or None"),
        ({"vf_coef": -1.0}, "vf_coef must be a number >= 0"),
        ({"value_clip_range": -0.2}, "value_clip_range must be a number >= 0"),
        ({"value_loss_agg_mode": "x"}, "value_loss_agg_mode='x' is not one of"),
        ({"entropy_coef": -0.1}, "entropy_coef must be a number >= 0"),
        ({"kl_coef": -0.1}, "kl_coef must be a number >= 0"),
        ({"kl_kind": "k4"}, "kl_kind='k4' is not one of"),
        ({"tis_cap": 0.0}, "tis_cap must be > 0 or None"),
        ({"moe_aux_loss_coef": -1.0}, "moe_aux_loss_coef must be a number >= 0"),
        ({"moe_z_loss_coef": True}, "moe_z_loss_coef must be a number >= 0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOLossConfig(**kwargs)


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 3))
    for temperature in (1.0, 0.7):
        z = logits.astype(np.float64) / temperature
        log_softmax = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        log_softmax -= z.max(-1, keepdims=True)
        want_logp = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
        want_entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
        fn = jax.jit(token_logprobs_and_entropy, static_argnames="temperature")
        logp, entropy = fn(logits, targets, temperature=temperature)
        np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            entropy_from_logits(logits, temperature=temperature), want_entropy, rtol=1e-5,
            atol=1e-5,
        )  # fmt: skip


def test_logprobs_are_stable_for_huge_logits():
    logits = jnp.array([[[1e4, -1e4, 0.0], [3e4, 3e4, 3e4]]], jnp.float32)
    logp, entropy = token_logprobs_and_entropy(logits, jnp.array([[1, 2]]))
    assert np.all(np.isfinite(logp)) and np.all(np.isfinite(entropy))
    np.testing.assert_allclose(logp, [[-2e4, -np.log(3)]], rtol=1e-6)
    np.testing.assert_allclose(entropy, [[0.0, np.log(3)]], atol=1e-5)
    grad = jax.grad(lambda x: token_logprobs_and_entropy(x, jnp.array([[1, 2]]))[1].sum())(logits)
    assert np.all(np.isfinite(grad))


def test_entropy_of_logits_with_masked_tokens_is_that_of_the_rest():
    """-inf logits (a masked vocabulary), or a spread that overflows float32 once shifted:
    tokens of probability 0 add nothing (not 0 * -inf = NaN), to the value or the gradient."""
    logits = jnp.array([[0.0, 0.0, -jnp.inf], [3e38, -3e38, 0.0], [1.0, -jnp.inf, 2.0]])
    p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    want = [np.log(2), 0.0, -(p * np.log(p)).sum()]
    np.testing.assert_allclose(jax.jit(entropy_from_logits)(logits), want, rtol=1e-6, atol=1e-7)
    _, entropy = token_logprobs_and_entropy(logits[None], jnp.array([[0, 0, 2]]))
    np.testing.assert_allclose(entropy[0], want, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda x: entropy_from_logits(x).sum())(logits)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[0], [0.0, 0.0, 0.0])  # a maximum at the uniform pair
    assert grad[2, 1] == 0.0


def test_logprob_errors():
    with pytest.raises(ValueError, match="targets .* must match the leading dimensions"):
        token_logprobs_and_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        entropy_from_logits(jnp.zeros((2, 4)), temperature=0.0)


def test_log_ratio_is_clamped_at_20():
    # A log-ratio of 100 would overflow exp; the clamp at 20 keeps loss and metrics finite.
    one = jnp.ones((1, 1))
    loss, metrics = ppo_policy_loss(100.0 * one, 0.0 * one, 0.0 * one, one)
    assert float(loss) == 0.0
    np.testing.assert_allclose(float(metrics["actor/ratio_max"]), np.exp(20.0), rtol=1e-6)
    loss, _ = ppo_policy_loss(100.0 * one, 0.0 * one, -one, one)
    np.testing.assert_allclose(float(loss), np.exp(20.0), rtol=1e-6)


def test_no_gradient_flows_into_token_weights():
    from novarl_jax.algorithms.common import clipped_surrogate_loss

    rng = np.random.default_rng(0)
    log_ratio, advantages = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    mask = np.ones((2, 4))

    def loss(weights):
        return clipped_surrogate_loss(log_ratio, advantages, mask, token_weights=weights)[0]

    weights = jnp.asarray(rng.uniform(0.5, 1.5, (2, 4)))
    assert float(jnp.abs(jax.grad(loss)(weights)).max()) == 0.0
    assert float(loss(weights)) != float(loss(2 * weights))  # they do weight the loss


def test_public_helpers_refuse_token_arrays_of_another_shape():
    # A per-sequence [B] advantage with B == T used to broadcast along T without a word.
    from novarl_jax.algorithms.common import clipped_surrogate_loss, truncated_importance_weights
    from novarl_jax.algorithms.grpo import sequence_log_ratio

    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    zeros = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); every token array must"):
        clipped_surrogate_loss(zeros, np.array([1.0, -2.0, 3.0]), mask)
    with pytest.raises(ValueError, match=r"token_weights has shape \(3, 1\)"):
        clipped_surrogate_loss(zeros, zeros, mask, token_weights=np.ones((3, 1)))
    with pytest.raises(ValueError, match=r"behavior_logprobs has shape \(3,\)"):
        truncated_importance_weights(np.zeros((2, 3)), np.zeros(3), 2.0)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(3, 2\)"):
        sequence_log_ratio(zeros, np.zeros((3, 2)), mask)
    loss, _ = clipped_surrogate_loss(zeros, np.ones((3, 3)), mask)
    assert loss == -1.0  # ratio 1, advantage 1 on every valid token


def test_token_ids_outside_the_vocabulary_are_refused_when_known():
    logits = jnp.zeros((1, 2, 4))
    for bad in (-1, 4, -100):
        with pytest.raises(ValueError, match=rf"token ids in \[0, vocab_size=4\), got {bad}"):
            token_logprobs_and_entropy(logits, jnp.array([[0, bad]]))
    logp, _ = jax.jit(token_logprobs_and_entropy)(logits, jnp.array([[0, 3]]))
    np.testing.assert_allclose(logp, np.log(0.25), rtol=1e-6)
    # A float id was truncated: 1.7 read token 1.
    with pytest.raises(TypeError, match="targets must be integer token ids, got dtype float32"):
        token_logprobs_and_entropy(logits, jnp.array([[0.0, 1.7]]))


def test_an_empty_batch_gives_zero_losses_not_an_error():
    """Zero rows (every prompt filtered out upstream): 0 as ``aggregate`` documents, and the
    ratio's maximum is -inf (no token), eagerly and jitted."""
    empty = jnp.zeros((0, 4))
    for fn in (ppo_policy_loss, jax.jit(ppo_policy_loss)):
        loss, metrics = fn(empty, empty, empty, empty)
        assert float(loss) == 0.0 and float(metrics["actor/ppo_kl"]) == 0.0
        assert float(metrics["actor/ratio_max"]) == -np.inf
    loss, _ = value_loss(empty, empty, empty, empty, clip_range=0.2)
    assert float(loss) == 0.0
