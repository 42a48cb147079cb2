"""Non-finite updates are skipped and reported; too many in a row stop the run cleanly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from novarl_jax.trainer import loop
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.checkpoint import Checkpointer
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.state import init_train_state
from novarl_jax.trainer.steps import make_update_step


def _square_loss(params, batch, apply_fn):
    del apply_fn
    mask = batch["response_mask"]
    err = (params["w"] - batch["target"]) ** 2 * mask
    loss = err.sum() / batch["loss_denominators"].num_tokens
    loss = jnp.where(batch["poison"].sum() > 0, jnp.nan, loss)
    return loss, {"actor/pg_loss": loss}


def test_update_skips_non_finite_then_continues():
    optimizer = optax.sgd(0.1)
    params = {"w": jnp.zeros((3,))}
    state = init_train_state(params, optimizer, jax.random.key(0))
    update = jax.jit(make_update_step(_square_loss, None, optimizer, micro_batches=2))
    batch = {
        "response_mask": jnp.ones((4, 3)),
        "target": jnp.ones((4, 3)),
        "poison": jnp.array([0, 0, 0, 1]),
    }
    skipped, metrics = update(state, batch)
    assert float(metrics["train/skipped"]) == 1.0
    assert not np.isfinite(float(metrics["train/loss"]))
    np.testing.assert_array_equal(np.asarray(skipped.params["w"]), 0.0)
    assert int(skipped.step) == 0 and int(skipped.policy_version) == 0

    clean = dict(batch, poison=jnp.zeros(4, jnp.int32))
    updated, metrics = update(skipped, clean)
    assert float(metrics["train/skipped"]) == 0.0
    # loss = mean over 12 tokens of (w - 1)^2; grad = 2 (w - 1) * 4 / 12 per entry.
    np.testing.assert_allclose(np.asarray(updated.params["w"]), 0.1 * 2 * 4 / 12, rtol=1e-6)
    assert int(updated.step) == 1 and int(updated.policy_version) == 1


def test_a_skipped_update_leaves_the_optimizer_state_as_it_was():
    # Adam keeps moments: a NaN gradient folded into them would poison every later update.
    optimizer = optax.adam(0.1)
    state = init_train_state({"w": jnp.zeros((3,))}, optimizer, jax.random.key(0))
    update = jax.jit(make_update_step(_square_loss, None, optimizer, micro_batches=1))
    batch = {
        "response_mask": jnp.ones((2, 3)),
        "target": jnp.ones((2, 3)),
        "poison": jnp.array([0, 1]),
    }
    skipped, metrics = update(state, batch)
    assert float(metrics["train/skipped"]) == 1.0
    for a, b in zip(
        jax.tree.leaves(skipped.opt_state), jax.tree.leaves(state.opt_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    updated, metrics = update(skipped, dict(batch, poison=jnp.zeros(2, jnp.int32)))
    assert float(metrics["train/skipped"]) == 0.0
    # Adam's first step moves every weight by the learning rate, towards the target.
    np.testing.assert_allclose(np.asarray(updated.params["w"]), 0.1, rtol=1e-5)


def test_an_update_without_a_valid_token_moves_nothing():
    # Its gradient is zero, but Adam's momentum would still move the parameters (0.0067 in
    # one review's case), and the step count and schedule would advance.
    def loss_fn(params, batch, apply_fn):
        mask = batch["response_mask"]
        err = (params["w"] - batch["target"]) ** 2 * mask
        return err.sum() / jnp.maximum(batch["loss_denominators"].num_tokens, 1), {}

    optimizer = optax.adam(0.1)
    state = init_train_state({"w": jnp.zeros((3,))}, optimizer, jax.random.key(0))
    update = jax.jit(make_update_step(loss_fn, None, optimizer, micro_batches=2))
    batch = {"response_mask": jnp.ones((2, 3)), "target": jnp.ones((2, 3))}
    state, _ = update(state, batch)
    empty, metrics = update(state, dict(batch, response_mask=jnp.zeros((2, 3))))
    assert float(metrics["train/skipped"]) == 0.0 and float(metrics["train/loss"]) == 0.0
    assert int(empty.step) == 1 and int(empty.policy_version) == 1
    for a, b in zip(jax.tree.leaves(empty), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_step_without_tokens_reports_its_extremes_as_zero():
    updates = [{"actor/ratio_max": -np.inf, "x/y_min": np.inf, "actor/pg_loss": 0.0}] * 2
    assert loop.combine_update_metrics(updates) == {
        "actor/ratio_max": 0.0, "x/y_min": 0.0, "actor/pg_loss": 0.0
    }  # fmt: skip
    updates[1] = {"actor/ratio_max": 1.5, "x/y_min": 0.25, "actor/pg_loss": 1.0}
    assert loop.combine_update_metrics(updates)["actor/ratio_max"] == 1.5


def test_accumulated_gradient_equals_full_batch():
    optimizer = optax.sgd(1.0)
    params = {"w": jnp.arange(3.0)}
    batch = {
        "response_mask": jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], jnp.float32),
        "target": jnp.linspace(-1, 1, 12).reshape(4, 3),
        "poison": jnp.zeros(4, jnp.int32),
    }
    results = []
    for micro in (1, 2, 4):
        state = init_train_state(params, optimizer, jax.random.key(0))
        new, metrics = jax.jit(
            make_update_step(_square_loss, None, optimizer, micro_batches=micro)
        )(state, batch)
        results.append((np.asarray(new.params["w"]), float(metrics["train/loss"])))
    mask = np.asarray(batch["response_mask"])
    expected_grad = (2 * (np.arange(3.0) - np.asarray(batch["target"])) * mask).sum(0) / mask.sum()
    for w, loss in results:
        np.testing.assert_allclose(w, np.arange(3.0) - expected_grad, rtol=1e-6)
        assert loss == pytest.approx(results[0][1], rel=1e-6)


@pytest.mark.slow
def test_run_stops_after_consecutive_skips(tmp_path, monkeypatch):
    config = base.get_config()
    config.experiment.steps = 6
    config.rollout.prompts_per_step = 2
    config.rollout.max_new_tokens = 4
    config.train.max_consecutive_skips = 2
    config.train.epochs = config.train.minibatches = 1  # one update per step
    config.checkpoint.interval = 1
    config.logging.plot = False

    def poisoned_build(spec):
        run = build_run(spec)

        def nan_loss(params, batch, apply_fn):
            loss, metrics = run.loss_fn(params, batch, apply_fn)
            return loss * jnp.nan, metrics

        return dataclasses.replace(run, loss_fn=nan_loss)

    monkeypatch.setattr(loop, "build_run", poisoned_build)
    lines = []
    with pytest.raises(loop.TrainingError, match=r"stopped at step 2: 2 consecutive non-finite"):
        loop.train(config, str(tmp_path), spec=validate_config(config), log=lines.append)
    assert "step 1: skipped 1 update(s) with non-finite train/loss, actor/grad_norm" in lines
    # The checkpoint of step 1 (written before the stop) restores, with unchanged parameters.
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    assert ckpt.latest_step() == 1
    spec = validate_config(config)
    trainer = loop.Trainer(
        build_run(spec), str(tmp_path), mesh=spec.layout.make_mesh(jax.devices()[:1])
    )
    fresh, _ = trainer.initial_state()
    restored, host = ckpt.restore(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    )
    assert host["iteration"] == 1
    assert host["skip_streak"] == 1  # a resumed run goes on counting from here
    for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(restored.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.policy_version) == 0
    # Rerunning resumes at step 1 with its streak of 1: the redone step 2 is the second skip
    # in a row again, not the first.
    with pytest.raises(loop.TrainingError, match=r"stopped at step 2: 2 consecutive non-finite"):
        loop.train(config, str(tmp_path), spec=validate_config(config), log=lines.append)


@pytest.mark.slow
def test_a_run_of_skips_inside_a_step_stops_the_run(tmp_path, monkeypatch):
    """Updates 1-3 of 4 non-finite, the 4th finite: three in a row, although the step ends
    with a finite update."""
    config = base.get_config()
    config.experiment.steps = 2
    config.experiment.algorithm = "ppo"
    config.rollout.prompts_per_step = 4
    config.rollout.max_new_tokens = 4
    config.train.epochs, config.train.minibatches = 1, 4
    config.train.max_consecutive_skips = 3
    config.logging.plot = False
    monkeypatch.setattr(loop, "minibatch_order", lambda key, rows, parts: jnp.arange(rows))
    training_batch = loop.Trainer._training_batch

    def poisoned_batch(self, state, reference, traj):
        batch, stats = training_batch(self, state, reference, traj)
        return {**batch, "poison": jnp.asarray([1.0, 1.0, 1.0, 0.0])}, stats  # rows 0-2

    def poisoned_build(spec):
        run = build_run(spec)

        def loss(params, batch, apply_fn):
            value, metrics = run.loss_fn(params, batch, apply_fn)
            return jnp.where(batch["poison"].sum() > 0, jnp.nan, value), metrics

        return dataclasses.replace(run, loss_fn=loss)

    monkeypatch.setattr(loop.Trainer, "_training_batch", poisoned_batch)
    monkeypatch.setattr(loop, "build_run", poisoned_build)
    with pytest.raises(loop.TrainingError, match=r"stopped at step 1: 3 consecutive non-finite"):
        loop.train(config, str(tmp_path), spec=validate_config(config), log=lambda line: None)


def test_skip_streak_counts_updates_in_a_row_across_steps():
    assert loop.skip_runs([]) == (0, 0, 0)
    assert loop.skip_runs([True, False]) == (1, 1, 0)
    assert loop.skip_runs([False, True, True]) == (0, 2, 2)
    assert loop.skip_runs([True, True]) == (2, 2, 2)
    assert loop.skip_runs([True, False, True, True, True, False, True]) == (1, 3, 1)

    def streak(previous, flags):
        return loop.skip_streak(previous, *loop.skip_runs(flags), updates=len(flags))

    # A finite update inside a step ends the run: skip, ok, skip is one in a row.
    assert streak(1, [False, True]) == (1, 1)
    assert streak(2, [True, False]) == (3, 0)  # the run before goes on into the step
    # A step whose every update was skipped carries the run on.
    assert streak(1, [True, True]) == (3, 3)
    assert streak(0, [False]) == (0, 0)
    # A run in the middle of a step counts although the step ends with a finite update.
    assert streak(0, [False, True, True, True, False]) == (3, 0)
    assert streak(2, [True, False, False, True]) == (3, 1)  # the most is the one carried in


def _sqrt_loss(params, batch, apply_fn):
    del apply_fn
    # Loss 0 at w = 0 (finite), gradient 0.5 / sqrt(0) = inf.
    loss = jnp.sum(jnp.sqrt(params["w"]) * batch["response_mask"])
    return loss, {"actor/pg_loss": loss}


def test_update_skips_a_non_finite_gradient_with_a_finite_loss():
    from novarl_jax.trainer.state import init_train_state
    from novarl_jax.trainer.steps import make_update_step

    optimizer = optax.sgd(0.1)
    state = init_train_state({"w": jnp.zeros((3,))}, optimizer, jax.random.key(0))
    update = jax.jit(make_update_step(_sqrt_loss, None, optimizer, micro_batches=2))
    new, metrics = update(state, {"response_mask": jnp.ones((4, 3))})
    assert np.isfinite(float(metrics["train/loss"]))
    assert not np.isfinite(float(metrics["actor/grad_norm"]))
    assert float(metrics["train/skipped"]) == 1.0
    np.testing.assert_array_equal(np.asarray(new.params["w"]), 0.0)
    assert int(new.step) == 0 and int(new.policy_version) == 0
