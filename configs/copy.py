"""Copy one character (``"copy b:"`` -> ``"b"``): a tiny policy learns it in ~60 GRPO steps.

Run (PPO instead: append ``experiment.algorithm=ppo experiment.steps=120
rollout.prompts_per_step=16``; PPO needs about twice the steps, see docs/learning.md):
    python -m novarl_jax.train --config=configs/copy.py --workdir=/tmp/copy
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 60  # training iterations
    config.task.name = "copy"  # novarl_jax.rollout.tasks.CopyTask
    config.task.options.symbols = "abc"  # the characters strings are drawn from
    config.task.options.min_length = 1  # string length, from...
    config.task.options.max_length = 1  # ...to (one character)
    config.rollout.max_new_tokens = 3  # room for the answer, the end token and a stray one
    config.grpo.beta = 0.0  # no KL to the reference (as DAPO): faster on toy tasks
    return config
