"""Reverse a two-character string (``"reverse ab:"`` -> ``"ba"``), positional-match credit.

Run:
    python -m novarl_jax.train --config=configs/reverse.py --workdir=/tmp/reverse
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 100  # training iterations
    config.task.name = "reverse"  # novarl_jax.rollout.tasks.ReverseTask
    config.task.options.symbols = "abc"  # the characters strings are drawn from
    config.task.options.min_length = 2  # string length, from...
    config.task.options.max_length = 2  # ...to (two characters)
    config.rollout.max_new_tokens = 4  # the answer, the end token and some slack
    config.grpo.beta = 0.0  # no KL to the reference (as DAPO): faster on toy tasks
    return config
