"""One update per rollout batch: the loss's own forward gives the old log-probs exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_grpo import tiny_grpo_config

from novarl_jax.algorithms.grpo import GRPOLossConfig, grpo_loss
from novarl_jax.algorithms.ppo import PPOLossConfig, ppo_loss
from novarl_jax.trainer import loop
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.steps import moe_stats, on_policy_loss


def _toy(rows=4, tokens=5):
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(rows, tokens, 3)), jnp.float32)
    mask = np.ones((rows, tokens), np.float32)
    mask[1, 3:] = 0
    batch = {
        "feats": feats,
        "response_mask": jnp.asarray(mask),
        "advantages": jnp.asarray(rng.normal(size=(rows, tokens)), jnp.float32),
        "ref_logprobs": jnp.asarray(-rng.uniform(0.5, 2.0, size=(rows, tokens)), jnp.float32),
        "behavior_logprobs": jnp.asarray(-rng.uniform(0.5, 2.0, size=(rows, tokens)), jnp.float32),
        # Deliberately wrong: the on-policy loss must not read it.
        "old_logprobs": jnp.full((rows, tokens), 7.0),
    }

    def apply_fn(params, b):
        logits = b["feats"] @ params["w"]
        return {
            "logprobs": -jax.nn.softplus(logits),
            "entropy": jnp.abs(logits),
            "moe_dropped_fraction": jnp.asarray([0.5, 0.0], jnp.float32),  # per layer
            "moe_expert_load": jnp.asarray([[0.5, 0.5], [0.75, 0.25]], jnp.float32),
        }

    return {"w": jnp.asarray([0.3, -0.2, 0.5])}, batch, apply_fn


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda p, b, f: grpo_loss(p, b, GRPOLossConfig(beta=0.1), f),
        lambda p, b, f: grpo_loss(
            p, b, GRPOLossConfig(importance_sampling_level="sequence", tis_cap=2.0), f
        ),
        lambda p, b, f: ppo_loss(p, b, PPOLossConfig(vf_coef=0.0, kl_coef=0.1), f),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_on_policy_loss_equals_the_loss_with_recomputed_old_logprobs(loss_fn, jit):
    params, batch, apply_fn = _toy()
    recomputed = dict(batch, old_logprobs=apply_fn(params, batch)["logprobs"])

    def grads(fn, b):
        return jax.value_and_grad(lambda p: fn(p, b, apply_fn), has_aux=True)(params)

    wrapped = on_policy_loss(loss_fn, micro_batches=2)
    if jit:
        grads = jax.jit(grads, static_argnums=0)
    (want, want_metrics), want_grad = grads(loss_fn, recomputed)
    (got, got_metrics), got_grad = grads(wrapped, batch)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad["w"]), np.asarray(want_grad["w"]), rtol=1e-5)
    assert np.abs(np.asarray(got_grad["w"])).max() > 1e-3  # a real gradient flows
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(got_metrics[name]), float(value), rtol=1e-5, atol=1e-7)
    # The wrong old log-probs in the batch would have changed the loss.
    (ignored, _), _ = grads(loss_fn, batch)
    assert abs(float(ignored) - float(want)) > 1e-3
    # MoE statistics of the forward, the dropped fraction split over 2 micro-batches.
    assert float(got_metrics["moe/dropped_fraction"]) == pytest.approx(0.125)
    assert float(got_metrics["moe/expert_load_max"]) == pytest.approx(0.75)
    assert float(got_metrics["moe/layer0/load_max"]) == pytest.approx(0.5)
    assert float(got_metrics["moe/layer0/dropped_fraction"]) == pytest.approx(0.25)
    assert float(got_metrics["moe/layer1/dropped_fraction"]) == 0.0


def test_moe_stats_match_numpy():
    load = np.random.default_rng(1).uniform(size=(3, 4)).astype(np.float32)
    dropped = np.asarray([0.1, 0.0, 0.35], np.float32)
    stats = jax.jit(moe_stats)(jnp.asarray(dropped), jnp.asarray(load))
    assert float(stats["moe/expert_load_max"]) == pytest.approx(load.max())
    assert float(stats["moe/expert_load_min"]) == pytest.approx(load.min())
    for layer in range(3):
        assert float(stats[f"moe/layer{layer}/load_max"]) == pytest.approx(load[layer].max())
        assert float(stats[f"moe/layer{layer}/dropped_fraction"]) == pytest.approx(dropped[layer])
    assert float(stats["moe/dropped_fraction"]) == pytest.approx(dropped.mean())


def _grpo_config():
    return tiny_grpo_config(prompts_per_step=2, micro_batches=2)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_trainer_step_without_policy_scoring_matches_the_scored_step(monkeypatch, micro_batches):
    config = _grpo_config()
    config.train.micro_batches = micro_batches
    spec = validate_config(config)
    mesh = spec.layout.make_mesh(jax.devices()[: spec.layout.world_size])
    results = []
    for skip in (True, False):
        monkeypatch.setattr(loop, "takes_old_logprobs_from_update", lambda c, r, s=skip: s)
        trainer = loop.Trainer(build_run(spec), "unused", mesh=mesh)
        assert trainer.on_policy is skip
        state, reference = trainer.initial_state()
        state, metrics, _ = trainer.iteration(state, reference, 0)
        results.append((jax.device_get(state.params), metrics))
    (fast, fast_metrics), (scored, scored_metrics) = results
    # AdamW moves every weight by ~lr = 3e-3; the two paths agree to float rounding of that
    # step (Adam's normalisation magnifies rounding in near-zero gradients).
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(scored), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(
            jax.tree.leaves(fast), jax.tree.leaves(trainer.initial_state()[0].params), strict=True
        )
    )
    assert moved > 1e-4  # the step really changed the parameters
    for name in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "critic/score/mean"):
        assert fast_metrics[name] == pytest.approx(scored_metrics[name], rel=1e-4, abs=1e-6)
    assert fast_metrics["actor/entropy_rollout"] == pytest.approx(
        scored_metrics["actor/entropy_rollout"], rel=1e-4
    )
    for name in ("moe/dropped_fraction", "moe/expert_load_max", "moe/layer0/load_max"):
        assert name in fast_metrics and np.isfinite(fast_metrics[name]), name


def test_on_policy_is_chosen_only_for_one_update_per_batch():
    config = _grpo_config()
    run = build_run(validate_config(config))
    assert loop.takes_old_logprobs_from_update(config, run)
    config.train.epochs = 2
    assert not loop.takes_old_logprobs_from_update(config, run)
    config.train.epochs, config.train.minibatches = 1, 2
    assert not loop.takes_old_logprobs_from_update(config, run)
    ppo = _grpo_config()
    ppo.experiment.algorithm = "ppo"
    assert not loop.takes_old_logprobs_from_update(ppo, build_run(validate_config(ppo)))


def test_the_trainer_scores_rollouts_at_the_rollout_temperature():
    # verl and TRL divide the logits by the rollout temperature before the log-probs: the loss
    # then optimises the policy the rollouts came from, and the sampler's behaviour log-probs
    # (the policy at that temperature, without top-k / top-p) equal the trainer's.
    from novarl_jax.trainer.steps import make_apply_fn, model_inputs

    c = tiny_grpo_config()
    c.rollout.temperature = 0.6
    run = build_run(validate_config(c))
    assert run.model.temperature == 0.6
    trainer = loop.Trainer(run, "unused", mesh=None)
    state, _ = trainer.initial_state()
    traj, _, _ = trainer._rollout(state, trainer.rollout_key(0))
    batch = model_inputs(traj)
    mask = np.asarray(batch["response_mask"], bool)
    scored = np.asarray(make_apply_fn(run.model)(state.params, batch)["logprobs"])
    behaviour = np.asarray(traj.policy_logprobs)
    np.testing.assert_allclose(scored[mask], behaviour[mask], rtol=1e-5, atol=1e-6)
    untempered = make_apply_fn(dataclasses.replace(run.model, temperature=1.0))
    assert (
        np.abs(np.asarray(untempered(state.params, batch)["logprobs"])[mask] - scored[mask]).max()
        > 0.01
    )
    # Greedy rollouts (PPO's: GRPO's groups would be identical) are scored by the policy.
    c.experiment.algorithm, c.rollout.temperature = "ppo", 0.0
    assert build_run(validate_config(c)).model.temperature == 1.0
