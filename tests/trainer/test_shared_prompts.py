"""Training with each group's prompt run once: same updates as running every row's prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_build import _checklist
from tiny_grpo import tiny_grpo_config

from novarl_jax.trainer import loop
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import (
    shared_prompt_group,
    updates_share_prompts,
    validate_config,
)


def _grpo_config(minibatches=1, micro_batches=2):
    return tiny_grpo_config(
        prompts_per_step=4, minibatches=minibatches, micro_batches=micro_batches
    )


def test_prompts_are_shared_only_where_rows_keep_their_groups():
    config = _grpo_config()  # 16 rows, one minibatch, micro-batches of 8 = 2 groups
    assert shared_prompt_group(config, pp=1) == 4
    assert updates_share_prompts(config, pp=1)
    assert shared_prompt_group(config, pp=2) == 1  # the pipelined forward runs whole rows
    assert not updates_share_prompts(config, pp=2)
    config.train.micro_batches = 8  # micro-batches of 2 rows split groups
    assert shared_prompt_group(config, pp=1) == 4 and not updates_share_prompts(config, pp=1)
    config.train.micro_batches, config.train.minibatches = 1, 2  # rows shuffled across two
    assert shared_prompt_group(config, pp=1) == 4 and not updates_share_prompts(config, pp=1)
    assert _checklist(config)["shared-prompt forward"] == (
        "on in scoring (each prompt runs once for its 4 samples)"
    )
    config.train.share_prompts = False
    assert shared_prompt_group(config, pp=1) == 1
    assert _checklist(config)["shared-prompt forward"] == "off (train.share_prompts=False)"
    ppo = _grpo_config()
    ppo.experiment.algorithm = "ppo"  # one sample per prompt: nothing to share
    assert shared_prompt_group(ppo, pp=1) == 1
    assert _checklist(_grpo_config())["shared-prompt forward"] == (
        "on in scoring and update (each prompt runs once for its 4 samples)"
    )
    assert build_run(validate_config(_grpo_config())).model.prompt_group == 4
    assert build_run(validate_config(ppo)).model.prompt_group == 1


def test_the_checklist_says_why_prompts_are_not_shared():
    ppo = _grpo_config()
    ppo.experiment.algorithm = "ppo"  # share_prompts is on, but one sample per prompt

    def row(config):
        return _checklist(config)["shared-prompt forward"]

    assert ppo.train.share_prompts
    assert row(ppo) == "off (one sample per prompt)"
    ppo.train.share_prompts = False
    assert row(ppo) == "off (train.share_prompts=False)"
    pipelined = _grpo_config()
    pipelined.experiment.update(world_size=2, pipeline_parallel_size=2)
    assert row(pipelined) == "off (the layers are pipelined, pp > 1)"


def test_minibatch_order():
    key = jax.random.key(3)
    np.testing.assert_array_equal(loop.minibatch_order(key, 16, 1), np.arange(16))
    np.testing.assert_array_equal(loop.minibatch_order(key, 16, 2), jax.random.permutation(key, 16))


def test_check_shared_prompts_names_the_group():
    tokens = jnp.asarray(np.repeat(np.arange(12).reshape(3, 4), 2, axis=0))
    batch = {"tokens": tokens, "attention_mask": jnp.ones_like(tokens), "positions": tokens}
    loop.check_shared_prompts(batch, prompt_length=4, group=2)
    loop.check_shared_prompts(batch, prompt_length=4, group=1)
    bad = {**batch, "attention_mask": batch["attention_mask"].at[3, 0].set(0)}
    with pytest.raises(RuntimeError, match=r"rows 2\.\.3 of the training batch .* attention_mask"):
        loop.check_shared_prompts(bad, prompt_length=4, group=2)


def _one_step(config):
    spec = validate_config(config)
    trainer = loop.Trainer(build_run(spec), "unused", mesh=spec.layout.make_mesh(jax.devices()[:1]))
    state, reference = trainer.initial_state()
    state, metrics, _ = trainer.iteration(state, reference, 0)
    return jax.device_get(state.params), metrics, trainer


@pytest.mark.parametrize("minibatches", [1, 2])
def test_a_shared_prompt_step_equals_the_full_step(minibatches):
    """One minibatch: scoring and update share prompts; two: scoring only."""
    config = _grpo_config(minibatches=minibatches, micro_batches=1)
    shared, shared_metrics, trainer = _one_step(config)
    assert trainer.run_.model.prompt_group == 4
    config.train.share_prompts = False
    full, full_metrics, trainer = _one_step(config)
    assert trainer.run_.model.prompt_group == 1
    # AdamW moves every weight by ~lr; the runs agree to float rounding of that step.
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    initial = jax.device_get(trainer.initial_state()[0].params)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(initial), strict=True)
    )
    assert moved > 1e-4
    names = ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "moe/expert_load_max")
    for name in names:
        assert shared_metrics[name] == pytest.approx(full_metrics[name], rel=1e-4, abs=1e-6)
