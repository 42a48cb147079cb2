"""PPO with a value head on the policy trunk, GAE and an InstructGPT KL penalty in the reward.

Run:
    python -m novarl_jax.train --config=configs/ppo.py --workdir=/tmp/ppo
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.algorithm = "ppo"  # value head, GAE, KL penalty in the reward
    config.rollout.prompts_per_step = 16  # one sample per prompt: more prompts per step
    return config
