"""Sort three digits ascending (``"sort 312:"`` -> ``"123"``), positional-match credit.

Run:
    python -m novarl_jax.train --config=configs/sort.py --workdir=/tmp/sort
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 150  # training iterations
    config.task.name = "sort"  # novarl_jax.rollout.tasks.SortTask (three digits by default)
    config.task.options.symbols = "0123"  # the digits strings are drawn from
    config.rollout.max_new_tokens = 5  # the answer, the end token and some slack
    config.grpo.beta = 0.0  # no KL to the reference (as DAPO): faster on toy tasks
    return config
