"""Sort three digits ascending (``"sort 312:"`` -> ``"123"``), positional-match credit.

Run:
    python -m novarl_jax.train --config=configs/sort.py --workdir=/tmp/sort
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 150
    config.task.name = "sort"
    config.task.options.symbols = "0123"
    config.rollout.max_new_tokens = 5
    config.grpo.beta = 0.0
    return config
