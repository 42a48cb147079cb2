"""Reverse a two-character string (``"reverse ab:"`` -> ``"ba"``), positional-match credit.

Run:
    python -m novarl_jax.train --config=configs/reverse.py --workdir=/tmp/reverse
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 100
    config.task.name = "reverse"
    config.task.options.symbols = "abc"
    config.task.options.min_length = 2
    config.task.options.max_length = 2
    config.rollout.max_new_tokens = 4
    config.grpo.beta = 0.0
    return config
