"""GRPO on the base policy (the base config's algorithm), spelled out for discoverability.

Run:
    python -m novarl_jax.train --config=configs/grpo.py --workdir=/tmp/grpo
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.algorithm = "grpo"  # group-relative advantages, no critic
    config.experiment.grpo_group_size = 4  # completions per prompt: the relative baseline
    return config
