"""Single-digit addition (``"2+1="`` -> ``"3"``) with closeness credit for near answers.

Run:
    python -m novarl_jax.train --config=configs/addition.py --workdir=/tmp/addition
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 100
    config.task.name = "addition"
    config.task.options.max_operand = 3
    config.rollout.max_new_tokens = 2
    config.grpo.beta = 0.0
    return config
