"""Advantage estimators against plain NumPy float64 loops, jitted, eager and on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.sharding import batch_spec
from novarl_jax.core.utils import advantages as adv
from novarl_jax.core.utils.advantages import (
    ADVANTAGE_ESTIMATORS,
    GAEAdvantageEstimator,
    GRPOAdvantageEstimator,
    ReinforcePlusPlusAdvantageEstimator,
    RLOOAdvantageEstimator,
    discounted_returns,
    gae,
    group_relative_advantages,
    make_advantage_estimator,
    normalize_advantages,
    rloo_advantages,
    scores_to_token_rewards,
    sequence_scores,
)

# ----------------------------------------------------------------------------- references


def np_gae(rewards, values, mask, gamma, lam):
    """Double loop: rows, then time backwards, skipping masked positions."""
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    mask = np.asarray(mask) != 0
    advantages = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            advantages[b, t] = next_adv
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


def np_whiten(x, mask, eps=1e-8):
    mask = np.asarray(mask) != 0
    vals = np.asarray(x, np.float64)[mask]
    if vals.size == 0:
        return np.zeros(np.shape(x))
    mean, var = vals.mean(), vals.var()
    return np.where(mask, (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps), 0.0)


def np_grpo(scores, group_size, scale_by_std=True, eps=1e-6, sample_mask=None):
    """Over the samples that count (all, without a mask); others and groups of one get 0."""
    keep = np.ones(len(scores), bool) if sample_mask is None else np.asarray(sample_mask) != 0
    out = np.zeros(len(scores))
    for start in range(0, len(scores), group_size):
        members = [start + i for i in range(group_size) if keep[start + i]]
        if len(members) < 2:
            continue
        group = np.asarray([scores[j] for j in members], np.float64)
        for j, score in zip(members, group, strict=True):
            a = score - group.mean()
            if scale_by_std:
                a /= group.std(ddof=1) + eps
            out[j] = a
    return out


def np_rloo(scores, group_size, sample_mask=None):
    keep = np.ones(len(scores), bool) if sample_mask is None else np.asarray(sample_mask) != 0
    out = np.zeros(len(scores))
    for start in range(0, len(scores), group_size):
        members = [start + i for i in range(group_size) if keep[start + i]]
        if len(members) < 2:
            continue
        for i in members:
            others = [np.float64(scores[j]) for j in members if j != i]
            out[i] = np.float64(scores[i]) - sum(others) / len(others)
    return out


def np_place_scores(scores, mask):
    mask = np.asarray(mask) != 0
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        valid = np.nonzero(mask[b])[0]
        if len(valid):
            out[b, valid[-1]] = scores[b]
    return out


def right_padded_mask(lengths, num_tokens):
    return (np.arange(num_tokens)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def random_inputs(seed, batch, num_tokens, lengths=None, holes=False):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, num_tokens)).astype(np.float32)
    values = rng.normal(size=(batch, num_tokens)).astype(np.float32)
    if lengths is None:
        lengths = rng.integers(0, num_tokens + 1, size=batch)
    mask = right_padded_mask(lengths, num_tokens)
    if holes:
        mask = mask * (rng.random((batch, num_tokens)) > 0.3)
    return rewards, values, mask.astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
    return ParallelLayout(dp=2, ep=4).make_mesh()


def shard_rows(mesh, *arrays):
    """Places [B, ...] arrays with the batch split over ('dp', 'ep')."""
    out = []
    for a in arrays:
        a = jnp.asarray(a)
        spec = batch_spec(a.ndim, mesh, a.shape[0])
        out.append(jax.device_put(a, NamedSharding(mesh, spec)))
    return out


gae_jit = jax.jit(gae, static_argnames=("gamma", "lam"))
# lam as a traced argument: one compilation serves every lam.
GAE_TRACED_LAM = jax.jit(lambda r, v, m, lam: gae(r, v, m, gamma=0.97, lam=lam))

# ----------------------------------------------------------------------------- GAE


GAE_TRACED = jax.jit(lambda r, v, m, gamma, lam: gae(r, v, m, gamma=gamma, lam=lam))


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    num_tokens=st.integers(1, 9),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    holes=st.booleans(),
    data=st.data(),
)
def test_gae_matches_numpy_double_loop(batch, num_tokens, gamma, lam, seed, holes, data):
    lengths = data.draw(st.lists(st.integers(0, num_tokens), min_size=batch, max_size=batch))
    rewards, values, mask = random_inputs(seed, batch, num_tokens, lengths, holes)
    want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
    eager = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for got_adv, got_ret in (eager, GAE_TRACED(rewards, values, mask, gamma, lam)):
        np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-5)
        assert got_adv.dtype == jnp.float32 and got_adv.shape == (batch, num_tokens)


@pytest.mark.parametrize("num_tokens", [31, 32, 70])
@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_gae_both_paths_over_several_blocks(num_tokens, lam):
    """Matmul path (contiguous masks, right- and left-padded) and scan path (holes)."""
    rng = np.random.default_rng(num_tokens)
    rewards, values, _ = random_inputs(num_tokens, 6, num_tokens)
    starts = rng.integers(0, num_tokens, size=6)
    starts[:2] = 0
    ends = np.minimum(starts + rng.integers(0, num_tokens + 1, size=6), num_tokens)
    ends[0] = num_tokens  # a full row
    t = np.arange(num_tokens)[None]
    contiguous = ((t >= starts[:, None]) & (t < ends[:, None])).astype(np.float32)
    holes = contiguous * (rng.random(contiguous.shape) > 0.2)
    valid = jnp.asarray(contiguous != 0)
    gamma, gamma_lam = jnp.float32(0.97), jnp.float32(0.97 * lam)
    want_adv, _ = np_gae(rewards, values, contiguous, 0.97, lam)
    blocked = jax.jit(adv._gae_contiguous)(rewards, values, valid, gamma, gamma_lam)
    np.testing.assert_allclose(blocked, want_adv, rtol=2e-5, atol=2e-5)
    scanned = jax.jit(adv._gae_scan)(rewards, values, valid, gamma, gamma_lam)
    np.testing.assert_allclose(scanned, want_adv, rtol=2e-5, atol=2e-5)
    for mask in (contiguous, holes):
        want_adv, want_ret = np_gae(rewards, values, mask, 0.97, lam)
        got_adv, got_ret = GAE_TRACED_LAM(rewards, values, mask, lam)
        np.testing.assert_allclose(got_adv, want_adv, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(got_ret, want_ret, rtol=2e-5, atol=2e-5)


def test_gae_zero_and_full_length_rows():
    rewards, values, mask = random_inputs(0, 3, 6, lengths=[0, 6, 3])
    got_adv, got_ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    want_adv, want_ret = np_gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got_adv[0]) == 0) and np.all(np.asarray(got_ret[0]) == 0)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = random_inputs(1, 4, 7)
    got_adv, got_ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    m = mask != 0
    reward_to_go = np.flip(np.cumsum(np.flip(np.where(m, rewards, 0.0), 1), 1), 1)
    np.testing.assert_allclose(got_adv, np.where(m, reward_to_go - values, 0), atol=1e-5)
    np.testing.assert_allclose(got_ret, np.where(m, reward_to_go, 0), atol=1e-5)


def test_gae_lam_zero_is_one_step_td_error():
    rewards, values, _ = random_inputs(2, 2, 5)
    mask = np.ones((2, 5), np.float32)
    got, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = np.concatenate([values[:, 1:], np.zeros((2, 1))], 1)
    np.testing.assert_allclose(got, rewards + 0.9 * next_values - values, atol=1e-6)


def test_gae_hand_computed():
    # T = 3, all valid, V = [1, 2, 3], r = [0, 0, 1], gamma = 0.5, lam = 0.5:
    # delta_2 = 1 - 3 = -2; delta_1 = 0 + 0.5*3 - 2 = -0.5; delta_0 = 0 + 0.5*2 - 1 = 0
    # A_2 = -2; A_1 = -0.5 + 0.25*(-2) = -1; A_0 = 0 + 0.25*(-1) = -0.25
    got_adv, got_ret = gae([[0.0, 0.0, 1.0]], [[1.0, 2.0, 3.0]], [[1, 1, 1]], gamma=0.5, lam=0.5)
    np.testing.assert_allclose(got_adv, [[-0.25, -1.0, -2.0]], atol=1e-7)
    np.testing.assert_allclose(got_ret, [[0.75, 1.0, 1.0]], atol=1e-7)


def test_gae_padding_garbage_never_leaks():
    rewards, values, mask = random_inputs(3, 3, 6, lengths=[2, 6, 4])
    want_adv, want_ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    pad = mask == 0
    dirty_r = np.where(pad, np.nan, rewards)
    dirty_v = np.where(pad, 1e30, values)
    got_adv, got_ret = gae(dirty_r, dirty_v, mask, gamma=0.95, lam=0.9)
    np.testing.assert_array_equal(got_adv, want_adv)
    np.testing.assert_array_equal(got_ret, want_ret)


def test_gae_sharded_over_8_devices_equals_unsharded(mesh):
    rewards, values, mask = random_inputs(4, 16, 12, holes=True)
    want = gae_jit(rewards, values, mask, gamma=0.99, lam=0.95)
    r, v, m = shard_rows(mesh, rewards, values, mask)
    got = gae_jit(r, v, m, gamma=0.99, lam=0.95)
    assert len(got[0].sharding.device_set) == 8
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_gae_rejects_bad_inputs():
    ok = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B, T\]"):
        gae(np.zeros(3), ok, ok, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="must share one shape"):
        gae(ok, np.zeros((2, 4)), ok, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        gae(ok, ok, ok, gamma=1.5, lam=1.0)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        gae(ok, ok, ok, gamma=1.0, lam=-0.1)


def test_discounted_returns_matches_loop():
    rewards, _, mask = random_inputs(5, 3, 8, holes=True)
    got = discounted_returns(rewards, mask, gamma=0.9)
    want, _ = np_gae(rewards, np.zeros_like(rewards), mask, 0.9, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- normalisation


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), shift_mean=st.booleans())
def test_normalize_advantages_matches_numpy(seed, shift_mean):
    rewards, _, mask = random_inputs(seed, 4, 6)
    got = normalize_advantages(rewards, mask, shift_mean=shift_mean)
    m = mask != 0
    want = np_whiten(rewards, mask)
    if not shift_mean:  # the mean added back (lm-human-preferences, TRL, verl)
        want = np.where(m, want + (rewards[m].astype(np.float64).mean() if m.any() else 0.0), 0.0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(got)[~m] == 0)


def test_normalize_advantages_ignores_padding_values_and_empty_batch():
    x = np.array([[1.0, 3.0, 99.0], [5.0, -7.0, 1e9]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got = normalize_advantages(x, mask)
    mean, std = 3.0, np.sqrt(8 / 3)
    np.testing.assert_allclose(
        got, [[(1 - mean) / std, 0.0, 0.0], [(5 - mean) / std, 0.0, 0.0]], rtol=1e-5
    )
    np.testing.assert_array_equal(normalize_advantages(x, np.zeros((2, 3))), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="must have the same shape"):
        normalize_advantages(x, np.ones((2, 2)))


def test_normalize_advantages_statistics_are_global_under_a_mesh(mesh):
    x, _, mask = random_inputs(6, 16, 5)
    # Make the shards' statistics very different so per-shard whitening would be visible.
    x = x + np.arange(16, dtype=np.float32)[:, None] * 3.0
    fn = jax.jit(normalize_advantages)
    want = fn(x, mask)
    xs, ms = shard_rows(mesh, x, mask)
    got = fn(xs, ms)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, np_whiten(x, mask), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- groups


@settings(max_examples=20, deadline=None)
@given(
    group_size=st.integers(2, 5),
    num_groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    scale_by_std=st.booleans(),
)
def test_group_relative_advantages_matches_numpy(group_size, num_groups, seed, scale_by_std):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=group_size * num_groups).astype(np.float32)
    got = group_relative_advantages(scores, group_size, scale_by_std=scale_by_std)
    want = np_grpo(scores, group_size, scale_by_std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_jit = jax.jit(group_relative_advantages, static_argnums=1)(scores, group_size)
    np.testing.assert_allclose(got_jit, np_grpo(scores, group_size), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), perm=st.permutations(range(4)))
def test_permuting_a_group_permutes_its_advantages(seed, perm):
    scores = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    permuted = scores.copy()
    permuted[4:] = scores[4:][list(perm)]
    base = np.asarray(group_relative_advantages(scores, 4))
    got = np.asarray(group_relative_advantages(permuted, 4))
    np.testing.assert_allclose(got[:4], base[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[4:], base[4:][list(perm)], rtol=1e-5, atol=1e-6)
    rloo = np.asarray(rloo_advantages(permuted, 4))
    np.testing.assert_allclose(
        rloo[4:], np.asarray(rloo_advantages(scores, 4))[4:][list(perm)], rtol=1e-5, atol=1e-6
    )


def test_an_estimator_refuses_a_batch_that_is_not_a_mapping():
    from novarl_jax.core.utils.advantages import GRPOAdvantageEstimator

    with pytest.raises(TypeError, match=r"an estimator takes one batch mapping .*, got list"):
        GRPOAdvantageEstimator(group_size=2)([np.ones((2, 3)), np.ones(2)])


def test_normalize_advantages_adds_eps_to_the_variance():
    # eps inside the square root, as documented: sqrt(var + eps), not sqrt(var) + eps.
    x, mask = np.array([[0.0, 1.0]], np.float32), np.ones((1, 2))
    got = normalize_advantages(x, mask, eps=1.0)  # var 0.25
    np.testing.assert_allclose(got, [[-0.5 / np.sqrt(1.25), 0.5 / np.sqrt(1.25)]], rtol=1e-6)


def test_a_group_with_one_kept_sample_gets_zero_whatever_its_score():
    # Fewer than two kept samples: no baseline, so 0 for the group, even for an inf score
    # (inf - inf would make the whole group NaN, the excluded sample included).
    for scale_by_std in (True, False):
        got = group_relative_advantages(
            np.array([np.inf, 1.0, 0.0, 2.0]), 2, sample_mask=np.array([1, 0, 1, 1]),
            scale_by_std=scale_by_std,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got)[:2], [0.0, 0.0])
        assert np.isfinite(np.asarray(got)).all()


def test_group_relative_constant_group_gets_zero():
    got = group_relative_advantages(np.array([1.0, 1.0, 0.0, 2.0]), 2)
    np.testing.assert_allclose(got[:2], [0.0, 0.0])
    np.testing.assert_allclose(got[2:], [-1 / (np.sqrt(2) + 1e-6), 1 / (np.sqrt(2) + 1e-6)])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_score_without_a_mask_makes_its_group_non_finite_not_zero(bad):
    """Without sample_mask a NaN or inf score poisons its group visibly (as in RLOO and GAE),
    and the trainer's non-finite check sees it; it used to give the group silent zeros."""
    scores = np.array([1.0, 0.0, bad, 1.0, 0.0, 0.5])
    for scale_by_std in (True, False):
        got = np.asarray(jax.jit(lambda x, s=scale_by_std: group_relative_advantages(
            x, 3, scale_by_std=s))(scores))  # fmt: skip
        assert not np.isfinite(got[:3]).any(), (scale_by_std, got)
        assert np.isfinite(got[3:]).all()
    masked = group_relative_advantages(scores, 3, sample_mask=np.isfinite(scores))
    np.testing.assert_allclose(masked[:3], [1 / (np.sqrt(0.5) + 1e-6) * 0.5, -0.5 / (
        np.sqrt(0.5) + 1e-6), 0.0], rtol=1e-6)  # fmt: skip


def test_group_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        group_relative_advantages(np.zeros(4), 3)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        group_relative_advantages(np.zeros(4), 1)
    with pytest.raises(ValueError, match=r"scores must have shape \[B\]"):
        group_relative_advantages(np.zeros((4, 1)), 2)
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        rloo_advantages(np.zeros(6), 4)


@settings(max_examples=15, deadline=None)
@given(group_size=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_rloo_matches_leave_one_out_loop(group_size, seed):
    scores = np.random.default_rng(seed).normal(size=3 * group_size).astype(np.float32)
    np.testing.assert_allclose(
        rloo_advantages(scores, group_size), np_rloo(scores, group_size), rtol=1e-5, atol=1e-5
    )


def test_group_advantages_sharded_equal_unsharded(mesh):
    scores = np.random.default_rng(7).normal(size=16).astype(np.float32)
    mask = right_padded_mask(np.arange(16) % 5, 6)
    estimator = GRPOAdvantageEstimator(group_size=4)
    fn = jax.jit(lambda s, m: estimator({"scores": s, "response_mask": m})[0])
    want = fn(scores, mask)
    got = fn(*shard_rows(mesh, scores, mask))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        want, np.where(mask != 0, np_grpo(scores, 4)[:, None], 0.0), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=25, deadline=None)
@given(
    group_size=st.integers(2, 5),
    seed=st.integers(0, 2**16),
    scale_by_std=st.booleans(),
)
def test_excluded_samples_leave_their_groups_statistics(group_size, seed, scale_by_std):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=4 * group_size).astype(np.float32)
    keep = rng.random(4 * group_size) < 0.7
    keep[:group_size] = True  # one full group, one with a single sample left
    keep[group_size : 2 * group_size] = False
    keep[group_size] = True
    bad = np.where(keep, scores, np.nan).astype(np.float32)  # what excluded rows may hold
    want = np_grpo(scores, group_size, scale_by_std, sample_mask=keep)

    def grpo(s, m):
        return group_relative_advantages(s, group_size, scale_by_std=scale_by_std, sample_mask=m)

    np.testing.assert_allclose(grpo(bad, keep), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(grpo)(bad, keep), want, rtol=1e-5, atol=1e-5)
    got_rloo = rloo_advantages(bad, group_size, sample_mask=keep.astype(np.int32))
    np.testing.assert_allclose(got_rloo, np_rloo(scores, group_size, keep), rtol=1e-5, atol=1e-5)
    # All kept: the same numbers as no mask at all.
    full = np.ones_like(keep)
    np.testing.assert_allclose(
        group_relative_advantages(scores, group_size, sample_mask=full),
        group_relative_advantages(scores, group_size),
        rtol=1e-6,
        atol=1e-7,
    )


def test_a_nan_reward_does_not_shape_its_siblings_advantages():
    # The loop zeroes a non-finite reward and its mask row: the group [x, 1, 1, 1] must then
    # look like three equal scores (advantage 0), not like a 0 beside three 1s.
    mask = np.array([[0, 0], [1, 1], [1, 1], [1, 1]])
    batch = {"scores": np.array([0.0, 1.0, 1.0, 1.0]), "response_mask": mask,
             "sample_mask": np.array([0, 1, 1, 1])}  # fmt: skip
    for name in ("grpo", "dr_grpo", "rloo"):
        advantages, _ = make_advantage_estimator(name, group_size=4)(batch)
        np.testing.assert_array_equal(advantages, 0.0, err_msg=name)
        without = make_advantage_estimator(name, group_size=4)(
            {k: v for k, v in batch.items() if k != "sample_mask"}
        )[0]
        assert np.all(np.asarray(without)[1:] > 0), name  # the bias the mask removes
    rpp = make_advantage_estimator("reinforce_plus_plus_baseline", group_size=4)
    _, returns = rpp(batch)
    np.testing.assert_array_equal(returns, 0.0)
    with pytest.raises(ValueError, match=r"sample_mask must have shape \[B\]=\(4,\) like the"):
        group_relative_advantages(np.zeros(4), 2, sample_mask=np.ones(3))
    with pytest.raises(ValueError, match=r"sample_mask must have shape \[B\]=\(4,\) .* \(4, 1\)"):
        rloo_advantages(np.zeros(4), 2, sample_mask=np.ones((4, 1)))


def test_masked_group_advantages_sharded_match_numpy(mesh):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=16).astype(np.float32)
    keep = (rng.random(16) < 0.75).astype(np.float32)
    scores[keep == 0] = np.nan  # excluded samples must not reach their groups' statistics
    mask = right_padded_mask(np.arange(16) % 5 + 1, 6)
    cases = (
        (GRPOAdvantageEstimator(group_size=4), np_grpo(scores, 4, sample_mask=keep)),
        (make_advantage_estimator("rloo", group_size=4), np_rloo(scores, 4, keep)),
    )
    for estimator, per_sample in cases:

        def fn(s, m, k, e=estimator):
            return e({"scores": s, "response_mask": m, "sample_mask": k})[0]

        want = np.where(mask != 0, np.nan_to_num(per_sample)[:, None], 0.0)
        for got in (
            jax.jit(fn)(scores, mask, keep),
            jax.jit(fn)(*shard_rows(mesh, scores, mask, keep)),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- token rewards


def test_scores_go_on_the_last_valid_token():
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    scores = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    got = scores_to_token_rewards(scores, mask)
    np.testing.assert_array_equal(got, np_place_scores(scores, mask))
    np.testing.assert_array_equal(got[1], np.zeros(4))  # an empty row drops its score
    with pytest.raises(ValueError, match=r"scores must have shape \[B\]"):
        scores_to_token_rewards(np.zeros(3), mask)


def test_sequence_scores_sum_scores_and_token_rewards():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    token_rewards = np.array([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]], np.float32)
    got = sequence_scores(
        {"scores": np.array([1.0, 2.0]), "token_rewards": token_rewards, "response_mask": mask}
    )
    np.testing.assert_allclose(got, [1.75, 3.0])
    empty = {"scores": np.array([1.0, 2.0]), "response_mask": np.zeros((2, 3))}
    np.testing.assert_allclose(sequence_scores(empty), [1.0, 2.0])  # empty rows keep scores


# ----------------------------------------------------------------------------- estimators


def test_gae_estimator_matches_primitives():
    rewards, values, mask = random_inputs(8, 4, 6, lengths=[6, 3, 1, 0])
    scores = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
    batch = {"scores": scores, "token_rewards": rewards, "values": values, "response_mask": mask}
    got_adv, got_ret = GAEAdvantageEstimator(gamma=0.99, lam=0.9)(batch)
    total = np.where(mask != 0, rewards, 0.0) + np_place_scores(scores, mask)
    want_adv, want_ret = np_gae(total, values, mask, 0.99, 0.9)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_adv, np_whiten(want_adv, mask), rtol=1e-4, atol=1e-5)
    raw_adv, _ = GAEAdvantageEstimator(gamma=0.99, lam=0.9, normalize=False)(batch)
    np.testing.assert_allclose(raw_adv, want_adv, rtol=1e-5, atol=1e-5)


def test_reinforce_plus_plus_matches_numpy():
    rewards, _, mask = random_inputs(9, 4, 5, lengths=[5, 2, 4, 3])
    scores = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    batch = {"scores": scores, "token_rewards": 0.1 * rewards, "response_mask": mask}
    got_adv, got_ret = ReinforcePlusPlusAdvantageEstimator(gamma=0.9)(batch)
    total = np.where(mask != 0, 0.1 * rewards, 0.0) + np_place_scores(scores, mask)
    want_ret, _ = np_gae(total, np.zeros_like(total), mask, 0.9, 1.0)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_adv, np_whiten(want_ret, mask), rtol=1e-4, atol=1e-5)

    base = ReinforcePlusPlusAdvantageEstimator(gamma=1.0, baseline=True, group_size=2)
    got_adv, got_ret = base({"scores": scores, "response_mask": mask})
    centred = np.array([0.5, -0.5, 0.0, 0.0])
    want_ret, _ = np_gae(np_place_scores(centred, mask), np.zeros((4, 5)), mask, 1.0, 1.0)
    np.testing.assert_allclose(got_ret, want_ret, atol=1e-6)
    np.testing.assert_allclose(got_adv, np_whiten(want_ret, mask), rtol=1e-4, atol=1e-5)


def test_sequence_estimators_broadcast_over_valid_tokens():
    mask = right_padded_mask([3, 1, 2, 0], 3)
    scores = np.array([1.0, 0.0, 3.0, 1.0], np.float32)
    batch = {"scores": scores, "response_mask": mask}
    for estimator, want in (
        (GRPOAdvantageEstimator(group_size=2), np_grpo(scores, 2)),
        (make_advantage_estimator("dr_grpo", group_size=2), np_grpo(scores, 2, False)),
        (RLOOAdvantageEstimator(group_size=2), np_rloo(scores, 2)),
    ):
        got, returns = jax.jit(estimator.__call__)(batch)
        assert returns is None
        np.testing.assert_allclose(got, np.where(mask != 0, want[:, None], 0), atol=1e-5)


def test_registry_builds_every_name_and_estimators_are_static_hashable():
    for name in ADVANTAGE_ESTIMATORS:
        kwargs = {} if name in ("gae", "reinforce_plus_plus") else {"group_size": 2}
        first, second = (
            make_advantage_estimator(name, **kwargs),
            make_advantage_estimator(name, **kwargs),
        )
        assert first == second and hash(first) == hash(second)
    assert make_advantage_estimator("dr_grpo", group_size=2).scale_by_std is False
    assert make_advantage_estimator("reinforce_plus_plus_baseline", group_size=4).baseline
    mask = np.ones((2, 3), np.float32)
    batch = {"scores": np.array([1.0, 0.0]), "values": np.zeros((2, 3)), "response_mask": mask}
    run = jax.jit(lambda est, b: est(b), static_argnums=0)
    got, _ = run(make_advantage_estimator("gae", lam=1.0, normalize=False), batch)
    np.testing.assert_allclose(got, [[1, 1, 1], [0, 0, 0]], atol=1e-6)


def test_estimator_errors():
    with pytest.raises(ValueError, match=r"unknown advantage estimator \['gae'\]; valid names"):
        make_advantage_estimator(["gae"])  # was TypeError: unhashable type: 'list'
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        make_advantage_estimator("ppo")
    with pytest.raises(ValueError, match=r"has no argument\(s\) \['lam'\]"):
        make_advantage_estimator("grpo", group_size=2, lam=0.9)
    with pytest.raises(ValueError, match=r"needs the argument\(s\) \['group_size'\]"):
        make_advantage_estimator("rloo")
    with pytest.raises(ValueError, match="'dr_grpo' is GRPO with scale_by_std=False"):
        make_advantage_estimator("dr_grpo", group_size=2, scale_by_std=True)
    with pytest.raises(ValueError, match="use 'reinforce_plus_plus_baseline'"):
        make_advantage_estimator("reinforce_plus_plus", baseline=True, group_size=2)
    with pytest.raises(ValueError, match="use 'reinforce_plus_plus' for baseline=False"):
        make_advantage_estimator("reinforce_plus_plus_baseline", baseline=False)
    with pytest.raises(ValueError, match="group_size is required when baseline=True"):
        ReinforcePlusPlusAdvantageEstimator(baseline=True)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        GAEAdvantageEstimator(lam=2.0)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        GRPOAdvantageEstimator(group_size=1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        GRPOAdvantageEstimator(group_size=2, eps=-1.0)
    mask = np.ones((2, 3))
    with pytest.raises(ValueError, match="GAE needs the critic's 'values'"):
        GAEAdvantageEstimator()({"scores": np.zeros(2), "response_mask": mask})
    with pytest.raises(ValueError, match="needs 'scores' .* and/or 'token_rewards'"):
        GRPOAdvantageEstimator(group_size=2)({"response_mask": mask})
    with pytest.raises(ValueError, match="needs 'response_mask'"):
        RLOOAdvantageEstimator(group_size=2)({"scores": np.zeros(2)})
    with pytest.raises(ValueError, match="REINFORCE\\+\\+-baseline needs the sequence 'scores'"):
        ReinforcePlusPlusAdvantageEstimator(baseline=True, group_size=2)(
            {"token_rewards": np.zeros((2, 3)), "response_mask": mask}
        )
    with pytest.raises(ValueError, match="must share one shape"):
        adv._token_rewards({"token_rewards": np.zeros((2, 4))}, jnp.ones((2, 3)))


def test_equal_scores_give_zero_advantage_even_without_eps():
    got = make_advantage_estimator("grpo", group_size=2, eps=0.0)(
        {"scores": jnp.array([1.0, 1.0, 0.0, 2.0]), "response_mask": jnp.ones((4, 2))}
    )[0]
    np.testing.assert_allclose(np.asarray(got)[:, 0], [0.0, 0.0, -0.70710677, 0.70710677])
    with pytest.raises(ValueError, match="eps must be > 0"):
        normalize_advantages(jnp.ones((1, 2)), jnp.ones((1, 2)), eps=0.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        group_relative_advantages(jnp.ones(2), 2, eps=-1e-3)


@pytest.mark.parametrize("score", [0.1, 0.7, 1 / 3, 2.1, -0.3])
@pytest.mark.parametrize("group_size", [3, 7, 16])
def test_scores_that_all_agree_give_exactly_zero_whatever_their_rounding(score, group_size, mesh):
    """A float32 mean of equal scores that are no binary fraction misses them by a rounding
    step; divided by the group's near-zero spread that gave every sample of the group the
    same sizeable advantage (0.1 at eps=1e-6, ~1 at eps=0)."""
    equal = np.full(group_size, score, np.float32)
    spread = np.arange(group_size, dtype=np.float32) / 10
    scores = jnp.asarray(np.concatenate([equal, spread]))
    mask = np.ones(2 * group_size, bool)
    mask[-1] = False
    for kwargs in ({}, {"eps": 0.0}, {"scale_by_std": False}, {"sample_mask": mask}):

        def fn(s, kwargs=kwargs):
            return group_relative_advantages(s, group_size, **kwargs)

        for got in (fn(scores), jax.jit(fn)(scores)):
            got = np.asarray(got)
            np.testing.assert_array_equal(got[:group_size], 0.0)
            assert np.abs(got[group_size:-1]).max() > 0.1  # the other group is unaffected
    # An excluded sample inside the equal group (its score NaN): the kept ones still agree.
    with_nan = scores.at[1].set(jnp.nan)
    excluded = np.ones(2 * group_size, bool)
    excluded[1] = False
    got = np.asarray(group_relative_advantages(with_nan, group_size, sample_mask=excluded))
    np.testing.assert_array_equal(got[:group_size], 0.0)
    # Over every valid token of a batch (PPO's whitening), and under an 8-device mesh.
    advantages = np.full((8, 4), score, np.float32)
    advantages[:, 3] = 50.0  # padding
    valid = np.arange(4) < 3
    token_mask = np.broadcast_to(valid, (8, 4))
    np.testing.assert_array_equal(normalize_advantages(advantages, token_mask), 0.0)
    got = jax.jit(normalize_advantages)(*shard_rows(mesh, advantages, token_mask))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got), 0.0)
    # A non-finite group stays non-finite (never a silent 0).
    assert np.isnan(group_relative_advantages(jnp.full(group_size, jnp.inf), group_size)).all()


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: GAEAdvantageEstimator(gamma="1.5"), "gamma must be a number in"),
        (lambda: GAEAdvantageEstimator(lam=np.float32(2.0)), r"lam must be in \[0, 1\]"),
        (lambda: GAEAdvantageEstimator(normalize="no"), "normalize must be True or False"),
        (lambda: GRPOAdvantageEstimator(group_size=2, scale_by_std="false"), "scale_by_std"),
        (lambda: GRPOAdvantageEstimator(group_size=2, eps=None), "eps must be a number"),
        (lambda: ReinforcePlusPlusAdvantageEstimator(gamma="abc"), "gamma must be a number"),
    ],
)
def test_estimator_fields_are_checked(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_numbers_are_accepted_and_stored_hashable():
    estimator = GAEAdvantageEstimator(gamma=jnp.float32(0.5), lam=np.float64(1.0))
    assert estimator.gamma == 0.5 and isinstance(estimator.gamma, float)
    hash(estimator)  # a static argument of jit
    assert GRPOAdvantageEstimator(group_size=np.int64(4)).group_size == 4


def test_constant_advantages_whiten_to_zero():
    # Zero variance (every response failed alike): eps keeps the result 0, not NaN.
    np.testing.assert_array_equal(
        np.asarray(normalize_advantages(jnp.ones((2, 3)), jnp.ones((2, 3)))), np.zeros((2, 3))
    )
    # Without the shift they come back as they were (no division by sqrt(eps)); padding is 0.
    for value, rows in ((0.7, 2), (0.1, 3), (0.3, 4)):  # some float32 means miss the value
        mask = jnp.ones((rows, 3)).at[0, 2].set(0)
        got = normalize_advantages(jnp.full((rows, 3), value), mask, shift_mean=False)
        np.testing.assert_array_equal(np.asarray(got), np.where(mask, np.float32(value), 0.0))
    batch = {"scores": jnp.zeros(4), "response_mask": jnp.ones((4, 3))}
    advantages, _ = ReinforcePlusPlusAdvantageEstimator()(batch)
    np.testing.assert_array_equal(np.asarray(advantages), np.zeros((4, 3)))
