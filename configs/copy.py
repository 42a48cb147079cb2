"""Copy one character (``"copy b:"`` -> ``"b"``): a tiny policy learns it in ~60 GRPO steps.

Run (PPO instead: append ``experiment.algorithm=ppo experiment.steps=120
rollout.prompts_per_step=16``; PPO needs about twice the steps, see docs/learning.md):
    python -m novarl_jax.train --config=configs/copy.py --workdir=/tmp/copy
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 60
    config.task.name = "copy"
    config.task.options.symbols = "abc"
    config.task.options.min_length = 1
    config.task.options.max_length = 1
    config.rollout.max_new_tokens = 3
    config.grpo.beta = 0.0  # no KL to the reference (as DAPO): faster on toy tasks
    return config
