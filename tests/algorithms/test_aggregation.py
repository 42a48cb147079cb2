"""Aggregation modes: NumPy references, and invariance to micro-batches, shards and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from tiny_policy import tiny_apply_fn, tiny_params, tiny_rollout_batch

from novarl_jax.algorithms import (
    LOSS_AGG_MODES,
    GRPOLossConfig,
    PPOLossConfig,
    aggregate,
    combine_micro_batch_metrics,
    grpo_loss,
    loss_denominators,
    masked_max,
    ppo_loss,
    split_micro_batches,
)
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.sharding import batch_spec


def np_aggregate(loss_mat, mask, mode, scale=None):
    """Loops over rows and tokens, float64."""
    loss_mat, mask = np.asarray(loss_mat, np.float64), np.asarray(mask) != 0
    num_rows, num_tokens = loss_mat.shape
    row_sums, row_counts = [], []
    for b in range(num_rows):
        s, n = 0.0, 0
        for t in range(num_tokens):
            if mask[b, t]:
                s += loss_mat[b, t]
                n += 1
        row_sums.append(s)
        row_counts.append(n)
    n_tok = sum(row_counts)
    n_seq = sum(1 for n in row_counts if n > 0)
    if mode == "token-mean":
        return sum(row_sums) / max(n_tok, 1)
    if mode == "seq-mean-token-sum":
        return sum(row_sums) / max(n_seq, 1)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(row_sums, row_counts, strict=True) if n) / max(n_seq, 1)
    return sum(row_sums) / (max(n_seq, 1) * (num_tokens if scale is None else scale))


def random_case(seed, batch_size=8, num_tokens=6):
    rng = np.random.default_rng(seed)
    loss_mat = rng.normal(size=(batch_size, num_tokens)).astype(np.float32)
    lengths = rng.integers(0, num_tokens + 1, size=batch_size)
    mask = (np.arange(num_tokens)[None] < lengths[:, None]).astype(np.float32)
    return loss_mat, mask


def test_hand_computed_modes():
    loss_mat = np.array([[1.0, 3.0, 7.0], [5.0, 0.0, 0.0], [9.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert float(aggregate(loss_mat, mask, "token-mean")) == pytest.approx(9 / 3)
    assert float(aggregate(loss_mat, mask, "seq-mean-token-sum")) == pytest.approx(9 / 2)
    assert float(aggregate(loss_mat, mask, "seq-mean-token-mean")) == pytest.approx((2 + 5) / 2)
    assert float(aggregate(loss_mat, mask, "seq-mean-token-sum-norm")) == pytest.approx(9 / 6)
    assert float(
        aggregate(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=10)
    ) == pytest.approx(9 / 20)
    assert float(aggregate(loss_mat, np.zeros((3, 3)), "token-mean")) == 0.0


@settings(max_examples=15, deadline=None)
@given(mode=st.sampled_from(LOSS_AGG_MODES), seed=st.integers(0, 2**16))
def test_modes_match_numpy_jit_and_eager(mode, seed):
    loss_mat, mask = random_case(seed)
    want = np_aggregate(loss_mat, mask, mode)
    np.testing.assert_allclose(aggregate(loss_mat, mask, mode), want, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(aggregate, static_argnums=2)(loss_mat, mask, mode)
    np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    mode=st.sampled_from(LOSS_AGG_MODES),
    seed=st.integers(0, 2**16),
    num_micro=st.sampled_from([1, 2, 4, 8]),
)
def test_sum_over_micro_batches_equals_full_batch(mode, seed, num_micro):
    loss_mat, mask = random_case(seed)
    full = aggregate(loss_mat, mask, mode)
    denominators = loss_denominators(mask)
    parts = [
        aggregate(lm, m, mode, denominators=denominators)
        for lm, m in zip(np.split(loss_mat, num_micro), np.split(mask, num_micro), strict=True)
    ]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_padding_rows_and_masked_nan_change_nothing(mode):
    loss_mat, mask = random_case(3)
    want = aggregate(loss_mat, mask, mode)
    padded_loss = np.concatenate([loss_mat, np.full((3, 6), np.nan, np.float32)])
    padded_mask = np.concatenate([mask, np.zeros((3, 6), np.float32)])
    np.testing.assert_allclose(aggregate(padded_loss, padded_mask, mode), want, rtol=1e-6)


def test_sharded_over_8_devices_equals_unsharded():
    mesh = ParallelLayout(dp=4, ep=2).make_mesh()
    loss_mat, mask = random_case(4, batch_size=16)
    sharding = NamedSharding(mesh, batch_spec(2, mesh, 16))
    for mode in LOSS_AGG_MODES:
        fn = jax.jit(lambda x, m, mode=mode: aggregate(x, m, mode))
        got = fn(jax.device_put(loss_mat, sharding), jax.device_put(mask, sharding))
        np.testing.assert_allclose(got, fn(loss_mat, mask), rtol=1e-6)
        np.testing.assert_allclose(got, np_aggregate(loss_mat, mask, mode), rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="mode='mean' is not one of"):
        aggregate(np.zeros((2, 2)), np.ones((2, 2)), "mean")
    with pytest.raises(ValueError, match=r"must both have shape \[B, T\]"):
        aggregate(np.zeros((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="loss_scale_factor must be > 0"):
        aggregate(np.zeros((2, 2)), np.ones((2, 2)), "seq-mean-token-sum-norm",
                  loss_scale_factor=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\]"):
        loss_denominators(np.ones(3))
    batch = {"response_mask": np.ones((4, 3)), "x": np.ones((4,))}
    with pytest.raises(ValueError, match="does not divide the batch size 4"):
        split_micro_batches(batch, 3)
    with pytest.raises(ValueError, match="num_micro_batches must be an integer >= 1"):
        split_micro_batches(batch, 0)
    with pytest.raises(ValueError, match="batch has no 'response_mask'"):
        split_micro_batches({"x": np.ones(4)}, 2)
    with pytest.raises(ValueError, match=r"\['y'\] has shape \(3,\)"):
        split_micro_batches({**batch, "y": np.ones(3)}, 2)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        combine_micro_batch_metrics([])


def test_micro_batch_extremes_combine_as_extremes():
    parts = [{"a_min": 1.0, "a_max": 1.0}, {"a_min": 0.5, "a_max": 3.0}]
    combined = combine_micro_batch_metrics(parts)
    assert (float(combined["a_min"]), float(combined["a_max"])) == (0.5, 3.0)


def test_split_micro_batches_layout():
    batch = {"response_mask": np.array([[1, 1], [1, 0], [0, 0], [1, 1]]), "id": np.arange(4)}
    out = split_micro_batches(batch, 2)
    np.testing.assert_array_equal(out["id"], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(out["loss_denominators"].num_tokens, [5.0, 5.0])
    np.testing.assert_array_equal(out["loss_denominators"].num_sequences, [3.0, 3.0])
    assert float(masked_max(np.array([[1.0, 5.0]]), np.array([[1, 0]]))) == 1.0
    # Masked entries never count, not even against values below zero; none valid: -inf.
    assert float(masked_max(np.array([[-1.0, 5.0]]), np.array([[1, 0]]))) == -1.0
    assert float(masked_max(np.ones((1, 2)), np.zeros((1, 2)))) == -np.inf
    with pytest.raises(TypeError, match="denominators must be a LossDenominators .*, got tuple"):
        aggregate(np.ones((2, 3)), np.ones((2, 3)), "token-mean", denominators=(1.0,))
    with pytest.raises(ValueError, match=r"x \(2, 3\) and mask \(2, 1\) must have one shape"):
        masked_max(np.ones((2, 3)), np.ones((2, 1)))  # broadcast before: every token valid


# ----------------------------------------------------------------------------- full losses


def accumulate(value_and_grad, params, batch, num_micro):
    """Sums loss, gradient and metrics over the micro-batches of one mini-batch.

    Each micro-batch is padded back to B rows with all-padding rows, so one compiled function
    serves every split (padding rows count for nothing, which this also checks).
    """
    stacked = split_micro_batches(batch, num_micro)
    batch_size = batch["response_mask"].shape[0]
    total, grads, metrics = 0.0, None, []
    for i in range(num_micro):
        micro = {k: v[i] for k, v in stacked.items() if k != "loss_denominators"}
        micro = jax.tree.map(
            lambda x: jnp.pad(x, [(0, batch_size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)), micro
        )
        micro["loss_denominators"] = jax.tree.map(lambda d, i=i: d[i], stacked["loss_denominators"])
        (value, aux), g = value_and_grad(params, micro)
        total = total + value
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics.append(aux)
    return total, grads, combine_micro_batch_metrics(metrics)


CASES = [
    (ppo_loss, PPOLossConfig(loss_agg_mode=mode, entropy_coef=0.01, kl_coef=0.1, tis_cap=2.0,
                             dual_clip_c=3.0, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001))
    for mode in LOSS_AGG_MODES
] + [
    (grpo_loss, GRPOLossConfig(loss_agg_mode=mode, importance_sampling_level=level,
                               clip_ratio_high=0.28))
    for mode, level in (("seq-mean-token-mean", "sequence"), ("seq-mean-token-sum-norm", "token"))
]  # fmt: skip


@pytest.mark.parametrize("loss,config", CASES, ids=lambda c: getattr(c, "loss_agg_mode", ""))
def test_gradient_accumulation_over_1_2_4_micro_batches_is_exact(loss, config):
    params = tiny_params()
    # Unequal lengths, empty rows, and a shifted policy so clipping is active.
    batch = tiny_rollout_batch(params, lengths=[5, 0, 2, 5, 1, 0, 3, 4], seed=1)
    moved = jax.tree.map(lambda x: x * 1.3, params)
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda p, b: loss(p, b, config, tiny_apply_fn), has_aux=True)
    )
    full_batch = {**batch, "loss_denominators": loss_denominators(batch["response_mask"])}
    (full_loss, full_metrics), full_grads = value_and_grad(moved, full_batch)
    assert float(full_metrics["actor/pg_clipfrac"]) > 0
    for num_micro in (1, 2, 4):
        total, grads, metrics = accumulate(value_and_grad, moved, batch, num_micro)
        np.testing.assert_allclose(total, full_loss, rtol=1e-5, atol=1e-6)
        for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads), strict=True):
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
        for name, value in full_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_averaging_micro_batch_means_would_differ():
    """The invariance test can fail: local denominators give a different gradient."""
    params = tiny_params()
    batch = tiny_rollout_batch(params, lengths=[5, 0, 2, 5, 1, 0, 3, 4], seed=1)
    config = PPOLossConfig()
    full = ppo_loss(params, batch, config, tiny_apply_fn)[0]
    # Without 'loss_denominators' a batch is divided by its own counts.
    explicit = {**batch, "loss_denominators": loss_denominators(batch["response_mask"])}
    assert float(ppo_loss(params, explicit, config, tiny_apply_fn)[0]) == float(full)
    halves = [jax.tree.map(lambda x, i=i: x[4 * i : 4 * i + 4], batch) for i in range(2)]
    averaged = sum(ppo_loss(params, h, config, tiny_apply_fn)[0] for h in halves) / 2
    assert abs(float(averaged) - float(full)) > 1e-3


def test_loss_sharded_over_8_devices_equals_unsharded():
    mesh = ParallelLayout(dp=2, ep=4).make_mesh()
    params = tiny_params()
    batch = tiny_rollout_batch(params, batch_size=16, seed=2)
    config = PPOLossConfig(loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01, kl_coef=0.1)
    fn = jax.jit(jax.value_and_grad(lambda p, b: ppo_loss(p, b, config, tiny_apply_fn)[0]))
    want_loss, want_grads = fn(params, batch)
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, batch_spec(v.ndim, mesh, v.shape[0])))
        for k, v in batch.items()
    }
    got_loss, got_grads = fn(params, sharded)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_a_traced_loss_scale_factor_is_used_under_jit():
    """S differs from the padded length T = 6 (S = T would give the default's value), as a
    traced argument, against NumPy; unsharded and sharded over 8 devices."""
    loss_mat, mask = random_case(5, batch_size=16)
    mode = "seq-mean-token-sum-norm"
    f = jax.jit(lambda x, m, s: aggregate(x, m, mode, loss_scale_factor=s))
    mesh = ParallelLayout(dp=4, ep=2).make_mesh()
    sharding = NamedSharding(mesh, batch_spec(2, mesh, 16))
    placed = (jax.device_put(loss_mat, sharding), jax.device_put(mask, sharding))
    for scale in (2.5, 11.0):
        want = np_aggregate(loss_mat, mask, mode, scale=scale)
        np.testing.assert_allclose(f(loss_mat, mask, scale), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(f(*placed, scale), want, rtol=1e-5, atol=1e-7)
