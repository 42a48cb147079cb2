"""One rollout batch through every algorithm, switching only the algorithm's name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_policy import tiny_apply_fn, tiny_params, tiny_rollout_batch

from novarl_jax.algorithms import (
    ALGORITHMS,
    GRPOLossConfig,
    PPOLossConfig,
    kl_penalty_token_rewards,
    make_loss_config,
    make_loss_fn,
)
from novarl_jax.core.utils.advantages import make_advantage_estimator

GROUP_SIZE = 4
# What a run's config holds for every estimator; each estimator takes the arguments it has.
ESTIMATOR_ARGS = {"gae": {"gamma": 1.0, "lam": 0.95}, "grpo": {"group_size": GROUP_SIZE},
                  "dr_grpo": {"group_size": GROUP_SIZE}}  # fmt: skip


def rollout():
    """What the rollout loop produces, whatever the algorithm: one batch of 2 prompts x 4."""
    params = tiny_params(seed=0)
    batch = tiny_rollout_batch(params, batch_size=2 * GROUP_SIZE, num_tokens=6, seed=7,
                               lengths=[6, 3, 5, 2, 6, 6, 1, 4])  # fmt: skip
    batch["scores"] = jnp.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    batch["values"] = batch["old_values"]
    batch["token_rewards"] = kl_penalty_token_rewards(
        batch["old_logprobs"], batch["ref_logprobs"], batch["response_mask"], kl_coef=0.05
    )
    return params, batch


def train_batch(name, batch):
    """Advantages by the algorithm's estimator, then the loss batch: nothing else changes."""
    estimator_name = ALGORITHMS[name].advantage_estimator
    estimator = make_advantage_estimator(estimator_name, **ESTIMATOR_ARGS[estimator_name])
    advantages, returns = estimator(batch)
    out = {**batch, "advantages": advantages}
    if returns is not None:
        out["returns"] = returns
    return out


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_the_same_rollout_batch_trains_ppo_and_grpo(name):
    params, batch = rollout()
    batch = train_batch(name, batch)
    loss_fn = make_loss_fn(name)
    step = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, tiny_apply_fn), has_aux=True))
    (loss, metrics), grads = step(params, batch)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads["w"] != 0)
    assert np.any(grads["v"] != 0) == (name == "ppo")  # only PPO trains the value head
    assert ("critic/vf_loss" in metrics) == (name == "ppo")
    assert ("actor/kl_loss" in metrics) == (name == "grpo")  # GRPO's default beta = 0.04
    if name == "grpo":
        # group-relative: one advantage per response, on its valid tokens only
        adv, mask = np.asarray(batch["advantages"]), np.asarray(batch["response_mask"]) != 0
        for b in range(adv.shape[0]):
            assert np.allclose(adv[b][mask[b]], adv[b][mask[b]][0])
            assert np.all(adv[b][~mask[b]] == 0)

    # A few plain gradient steps raise the log-probs of the high-scoring responses.
    def mean_logprob_gap(p):
        logp = tiny_apply_fn(p, batch)["logprobs"]
        mask = batch["response_mask"]
        per_seq = jnp.sum(logp * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1)
        good = batch["scores"] == 1.0
        return jnp.mean(per_seq[good]) - jnp.mean(per_seq[~good])

    before = float(mean_logprob_gap(params))
    for _ in range(5):
        (_, _), grads = step(params, batch)
        params = jax.tree.map(lambda w, g: w - 0.5 * g, params, grads)
    assert float(mean_logprob_gap(params)) > before


@pytest.mark.parametrize("name", ["dapo", "dr_grpo", "gspo"])
def test_grpo_variants_run_on_the_same_batch(name):
    params, batch = rollout()
    batch = train_batch(name, batch)
    loss, metrics = make_loss_fn(name)(params, batch, tiny_apply_fn)
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["actor/pg_clipfrac"]))


def test_each_preset_is_the_documented_one():
    assert make_loss_config("dapo") == GRPOLossConfig(
        clip_ratio_high=0.28, beta=0.0, loss_agg_mode="token-mean"
    )
    assert make_loss_config("dr_grpo") == GRPOLossConfig(
        beta=0.0, loss_agg_mode="seq-mean-token-sum-norm"
    )
    assert make_loss_config("gspo") == GRPOLossConfig(
        importance_sampling_level="sequence", clip_ratio_low=3e-4, clip_ratio_high=4e-4,
        beta=0.0, loss_agg_mode="seq-mean-token-mean",
    )  # fmt: skip
    estimators = {name: spec.advantage_estimator for name, spec in ALGORITHMS.items()}
    assert estimators == {
        "ppo": "gae", "grpo": "grpo", "dapo": "grpo", "dr_grpo": "dr_grpo", "gspo": "grpo"
    }  # fmt: skip
    # Overrides win over the preset.
    assert make_loss_config("dapo", clip_ratio_high=0.3).clip_ratio_high == 0.3
    assert make_loss_config("gspo", beta=0.1).beta == 0.1


def test_presets_and_overrides():
    assert make_loss_config("ppo") == PPOLossConfig()
    assert make_loss_config("grpo", beta=0.0) == GRPOLossConfig(beta=0.0)
    dapo = make_loss_config("dapo", clip_ratio_low=0.1)
    assert (dapo.clip_ratio_low, dapo.clip_ratio_high, dapo.beta) == (0.1, 0.28, 0.0)
    assert make_loss_config("gspo").importance_sampling_level == "sequence"
    assert make_loss_config("dr_grpo").loss_agg_mode == "seq-mean-token-sum-norm"
    config = GRPOLossConfig(beta=0.0)
    assert make_loss_fn("grpo", config).config is config


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown algorithm 'a2c'"):
        make_loss_fn("a2c")
    with pytest.raises(ValueError, match=r"has no field\(s\) \['beta'\]"):
        make_loss_config("ppo", beta=0.1)
    with pytest.raises(ValueError, match="takes a GRPOLossConfig, got PPOLossConfig"):
        make_loss_fn("grpo", PPOLossConfig())
    with pytest.raises(ValueError, match="either a config or field overrides"):
        make_loss_fn("grpo", GRPOLossConfig(), beta=0.0)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        make_loss_config("dapo", dual_clip_c=0.5)


def test_the_loss_configs_defaults_are_the_trainer_configs_and_the_papers():
    """A library user's GRPOLossConfig(beta=0.04) gets what a run gets: k3, the GRPO paper's
    KL estimator (a changed default passed every other test, which all name the kind)."""
    import dataclasses

    from novarl_jax.algorithms import GRPOLossConfig, PPOLossConfig
    from novarl_jax.trainer.config import default_config

    assert (GRPOLossConfig().kl_kind, GRPOLossConfig().beta) == ("k3", 0.04)
    assert (PPOLossConfig().kl_kind, PPOLossConfig().value_clip_range) == ("low_var_kl", 0.2)
    config = default_config()
    for cls, section in ((GRPOLossConfig, config.grpo), (PPOLossConfig, config.ppo)):
        shared = [f.name for f in dataclasses.fields(cls) if f.name in section]
        assert len(shared) >= 10
        assert {n: getattr(cls(), n) for n in shared} == {n: section[n] for n in shared}
