"""train.gradient_checkpointing reaches every trained model.

That the numbers stay the same and the memory shrinks: tests/models/test_remat.py.
"""

from tiny_grpo import tiny_grpo_config

from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.checklist import checklist_rows
from novarl_jax.trainer.config import validate_config


def _built(on: bool, **experiment):
    c = tiny_grpo_config()
    c.experiment.update(experiment)
    c.ppo.critic = "separate"
    c.train.gradient_checkpointing = on
    spec = validate_config(c)
    run = build_run(spec)
    return run, {(s, i): v for s, i, v in checklist_rows(spec, None, run)}


def test_policy_and_separate_critic_are_checkpointed_and_the_checklist_says_so():
    run, rows = _built(True, algorithm="ppo", grpo_group_size=1)
    assert run.model.policy.remat and run.model.critic.remat
    assert rows[("model", "gradient checkpointing")] == (
        "on (each layer recomputed in the backward pass)"
    )
    run, rows = _built(False, algorithm="ppo", grpo_group_size=1)
    assert not run.model.policy.remat and not run.model.critic.remat
    assert rows[("model", "gradient checkpointing")] == "off"
