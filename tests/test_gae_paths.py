"""GAE's two implementations (blocked matmul for contiguous masks, scan for holes) and the path
choice between them, against NumPy float64 references, eager, jitted, vmapped and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.sharding import batch_spec
from novarl_jax.core.utils import advantages as adv
from novarl_jax.core.utils.advantages import gae


def np_suffix_sums(x, c):
    """y_t = sum_{s >= t} c**(s - t) x_s, a float64 loop backwards over the last axis."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    running = np.zeros(x.shape[0])
    for t in reversed(range(x.shape[1])):
        running = x[:, t] + c * running
        out[:, t] = running
    return out


def np_gae_compacted(rewards, values, mask, gamma, lam):
    """GAE of each row's valid tokens gathered into one sequence, then scattered back.

    "Masked positions are skipped" read literally: the recursion runs over the compacted
    sequence of valid tokens, so this checks the skipping independently of how `gae` does it.
    """
    valid = np.asarray(mask) != 0
    advantages = np.zeros(valid.shape)
    for b in range(valid.shape[0]):
        where = np.nonzero(valid[b])[0]
        r = np.asarray(rewards, np.float64)[b, where]
        v = np.asarray(values, np.float64)[b, where]
        next_v = np.append(v[1:], 0.0)
        a, row = 0.0, np.zeros(len(where))
        for i in reversed(range(len(where))):
            a = r[i] + gamma * next_v[i] - v[i] + gamma * lam * a
            row[i] = a
        advantages[b, where] = row
    returns = np.where(valid, advantages + np.asarray(values, np.float64), 0.0)
    return advantages, returns


def inputs(seed, batch, num_tokens):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, num_tokens)).astype(np.float32)
    values = rng.normal(size=(batch, num_tokens)).astype(np.float32)
    return rewards, values, rng


def padded_mask(starts, ends, num_tokens):
    t = np.arange(num_tokens)[None]
    return ((t >= np.asarray(starts)[:, None]) & (t < np.asarray(ends)[:, None])).astype(np.float32)


# T: one short block, exactly one block, several blocks with a ragged last one, and more than
# 32 * 32 tokens, where the carries between blocks are themselves blocked suffix sums.
@pytest.mark.parametrize("num_tokens", [5, 32, 100, 1061])
@pytest.mark.parametrize("c", [0.0, 0.5, 0.9405, 1.0])
def test_discounted_suffix_sums_match_loop_for_constant_and_traced_c(num_tokens, c):
    x, _, _ = inputs(num_tokens, 3, num_tokens)
    want = np_suffix_sums(x, c)
    # Scale by the size of what is summed: c = 1 adds up to T terms of size ~1.
    tol = 2e-6 * (1 + np.sqrt(num_tokens) if c == 1.0 else 4)
    as_constant = jax.jit(lambda x: adv._discounted_suffix_sums(x, c))(x)
    as_traced = jax.jit(adv._discounted_suffix_sums)(x, jnp.float32(c))
    np.testing.assert_allclose(as_constant, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(as_traced, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("name", "starts", "ends", "want"),
    [
        ("right-padded", [0, 0, 0], [5, 9, 0], True),
        ("left-padded", [3, 0, 9], [9, 9, 9], True),
        ("one run inside", [2, 4, 1], [6, 5, 2], True),
        ("all empty", [0, 0, 0], [0, 0, 0], True),
    ],
)
def test_contiguity_check_accepts_one_run_per_row(name, starts, ends, want):
    mask = padded_mask(starts, ends, 9)
    assert bool(adv._valid_runs_are_contiguous(jnp.asarray(mask))) is want, name


def test_contiguity_check_rejects_any_hole():
    mask = padded_mask([0, 0, 0], [9, 9, 9], 9)
    assert bool(adv._valid_runs_are_contiguous(jnp.asarray(mask)))
    for row, col in [(0, 4), (1, 1), (2, 7)]:
        holed = mask.copy()
        holed[row, col] = 0.0
        assert not bool(adv._valid_runs_are_contiguous(jnp.asarray(holed))), (row, col)
    # Non-unit and negative weights count as valid; only exact zeros are padding.
    weights = mask * np.array([[0.5], [-2.0], [3.0]], np.float32)
    assert bool(adv._valid_runs_are_contiguous(jnp.asarray(weights)))


@pytest.mark.parametrize("num_tokens", [7, 64, 150])
@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.7)])
def test_gae_matches_compacted_reference_on_every_mask_kind(num_tokens, gamma, lam):
    rewards, values, rng = inputs(num_tokens, 8, num_tokens)
    starts = np.r_[0, 0, 0, rng.integers(0, num_tokens, size=5)]
    ends = np.r_[num_tokens, 0, 1, np.minimum(starts[3:] + rng.integers(1, num_tokens, 5), 200)]
    contiguous = padded_mask(starts, np.minimum(ends, num_tokens), num_tokens)
    holes = contiguous * (rng.random(contiguous.shape) > 0.3)
    gae_jit = jax.jit(gae, static_argnames=("gamma", "lam"))
    gae_traced = jax.jit(lambda r, v, m, g, lm: gae(r, v, m, gamma=g, lam=lm))
    for mask in (contiguous, holes):
        want_adv, want_ret = np_gae_compacted(rewards, values, mask, gamma, lam)
        for got_adv, got_ret in (
            gae(rewards, values, mask, gamma=gamma, lam=lam),
            gae_jit(rewards, values, mask, gamma=gamma, lam=lam),
            gae_traced(rewards, values, mask, gamma, lam),
        ):
            np.testing.assert_allclose(got_adv, want_adv, rtol=3e-5, atol=3e-5)
            np.testing.assert_allclose(got_ret, want_ret, rtol=3e-5, atol=3e-5)


def test_gae_over_more_than_32_blocks():
    rewards, values, _ = inputs(0, 4, 1061)
    mask = padded_mask([0, 0, 0, 40], [1061, 1000, 33, 1061], 1061)
    want_adv, want_ret = np_gae_compacted(rewards, values, mask, 0.99, 0.95)
    got_adv, got_ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.float32])
def test_gae_mask_dtypes_and_weights(dtype):
    rewards, values, _ = inputs(1, 3, 40)
    mask = padded_mask([0, 5, 0], [40, 30, 12], 40)
    want = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    got = gae(rewards, values, mask.astype(dtype), gamma=0.97, lam=0.9)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    weighted = gae(rewards, values, mask * np.float32(-0.5), gamma=0.97, lam=0.9)
    np.testing.assert_array_equal(weighted[0], want[0])


@pytest.mark.parametrize("holes", [False, True])
def test_gae_left_padding_and_holes_never_see_padding_garbage(holes):
    rewards, values, rng = inputs(2, 4, 70)
    mask = padded_mask([0, 10, 33, 69], [70, 60, 70, 70], 70)
    if holes:
        mask = mask * (rng.random(mask.shape) > 0.2)
    want_adv, want_ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    pad = mask == 0
    dirty_r = np.where(pad, np.nan, rewards)
    dirty_v = np.where(pad, -np.inf, values)
    got_adv, got_ret = gae(dirty_r, dirty_v, mask, gamma=0.95, lam=0.9)
    np.testing.assert_array_equal(got_adv, want_adv)
    np.testing.assert_array_equal(got_ret, want_ret)
    assert np.all(np.asarray(got_adv)[pad] == 0) and np.all(np.asarray(got_ret)[pad] == 0)


def test_gae_vmapped_over_gamma_equals_one_call_per_gamma():
    rewards, values, _ = inputs(3, 4, 80)
    mask = padded_mask([0, 0, 7, 0], [80, 50, 80, 0], 80)
    gammas = jnp.array([0.5, 0.9, 1.0])
    batched = jax.vmap(lambda g: gae(rewards, values, mask, gamma=g, lam=0.95))(gammas)
    for i, g in enumerate([0.5, 0.9, 1.0]):
        want_adv, want_ret = np_gae_compacted(rewards, values, mask, g, 0.95)
        np.testing.assert_allclose(batched[0][i], want_adv, rtol=3e-5, atol=3e-5)
        np.testing.assert_allclose(batched[1][i], want_ret, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("holes", [False, True])
def test_gae_sharded_over_8_devices_on_both_paths(holes):
    mesh = ParallelLayout(dp=2, ep=4).make_mesh()
    rewards, values, rng = inputs(4, 16, 100)
    mask = padded_mask(np.zeros(16, int), rng.integers(0, 101, size=16), 100)
    if holes:
        mask = mask * (rng.random(mask.shape) > 0.2)
    want_adv, want_ret = np_gae_compacted(rewards, values, mask, 0.99, 0.95)
    placed = [
        jax.device_put(jnp.asarray(a), NamedSharding(mesh, batch_spec(2, mesh, 16)))
        for a in (rewards, values, mask)
    ]
    got_adv, got_ret = jax.jit(lambda r, v, m: gae(r, v, m, gamma=0.99, lam=0.95))(*placed)
    assert len(got_adv.sharding.device_set) == 8
    np.testing.assert_allclose(got_adv, want_adv, rtol=3e-5, atol=3e-5)
    np.testing.assert_allclose(got_ret, want_ret, rtol=3e-5, atol=3e-5)
