"""The trainer's pure pieces against NumPy float64 references, jitted and on 8 devices."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.core.sharding import batch_spec
from novarl_jax.trainer.steps import model_inputs, shaped_rewards


class _Traj(NamedTuple):
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array


def _trajectory(rng, rows=8, prompt=5, response=4):
    prompt_len = rng.integers(1, prompt + 1, size=rows)
    response_len = rng.integers(0, response + 1, size=rows)
    prompt_mask = (np.arange(prompt)[None, :] >= prompt - prompt_len[:, None]).astype(np.int32)
    response_mask = (np.arange(response)[None, :] < response_len[:, None]).astype(np.int32)
    return _Traj(
        prompt_tokens=jnp.asarray(rng.integers(0, 50, size=(rows, prompt)), jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask),
        response_tokens=jnp.asarray(rng.integers(0, 50, size=(rows, response)), jnp.int32),
        response_mask=jnp.asarray(response_mask),
    )


def _positions_reference(mask):
    out = np.zeros(mask.shape, np.int64)
    for b in range(mask.shape[0]):
        seen = 0
        for t in range(mask.shape[1]):
            out[b, t] = max(seen + mask[b, t] - 1, 0)
            seen += mask[b, t]
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_model_inputs_matches_numpy(jit):
    traj = _trajectory(np.random.default_rng(0))
    fn = jax.jit(model_inputs) if jit else model_inputs
    out = fn(traj)
    mask = np.concatenate([np.asarray(traj.prompt_mask), np.asarray(traj.response_mask)], 1)
    np.testing.assert_array_equal(np.asarray(out["attention_mask"]), mask)
    np.testing.assert_array_equal(np.asarray(out["positions"]), _positions_reference(mask))
    tokens = np.concatenate([np.asarray(traj.prompt_tokens), np.asarray(traj.response_tokens)], 1)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), tokens)
    # The first real token of every row sits at rotary position 0.
    first = mask.argmax(1)
    assert (np.asarray(out["positions"])[np.arange(len(first)), first] == 0).all()


def test_steps_on_the_8_device_mesh(devices):
    mesh = ParallelLayout(dp=4, ep=2).make_mesh()
    traj = _trajectory(np.random.default_rng(1))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(x.ndim, mesh, x.shape[0])))
    sharded = _Traj(*(put(x) for x in traj))
    out = jax.jit(model_inputs)(sharded)
    ref = model_inputs(traj)
    for name in ref:
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(ref[name]))
    rewards = put(jnp.linspace(0.0, 1.0, 8))
    shaped = jax.jit(
        lambda r, m: shaped_rewards(r, m, max_new_tokens=4, overlong_buffer=2, overlong_penalty=1.0)
    )(rewards, sharded.response_mask)
    length = np.asarray(traj.response_mask).sum(1)
    expected = np.linspace(0.0, 1.0, 8) + np.minimum((2 - length) / 2, 0.0)
    np.testing.assert_allclose(np.asarray(shaped), expected, rtol=1e-6, atol=1e-7)


def test_informative_groups_for_dynamic_sampling():
    from novarl_jax.trainer.loop import informative_groups

    rewards = np.array([1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 1.0, np.nan, 0.0, 1.0, 1.0])
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1])
    got = informative_groups(rewards, valid, 4)
    # [1, 1, 1, 0] differ; [0.5, 0.5, 0, 1] differ; [nan (invalid), 0, 1 (invalid), 1]: the
    # valid ones (0, 1) differ, the invalid ones do not count.
    np.testing.assert_array_equal(got, [True, True, True])
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1])  # valid 1.0, 1.0: agree
    np.testing.assert_array_equal(informative_groups(rewards, valid, 4), [True, True, False])
    valid = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # one valid sample: no spread
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(informative_groups(rewards, valid, 4), [False, False, False])


def test_a_steps_metrics_combine_its_updates_max_min_and_mean():
    from novarl_jax.trainer.loop import combine_update_metrics

    updates = [
        {"actor/ratio_max": 1.0, "moe/expert_load_min": 0.2, "actor/pg_loss": 1.0},
        {"actor/ratio_max": 1.5, "moe/expert_load_min": 0.1, "actor/pg_loss": 3.0},
    ]
    assert combine_update_metrics(updates) == {
        "actor/ratio_max": 1.5,
        "moe/expert_load_min": 0.1,
        "actor/pg_loss": 2.0,
    }
