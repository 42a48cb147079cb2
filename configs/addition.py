"""Single-digit addition (``"2+1="`` -> ``"3"``) with closeness credit for near answers.

Run:
    python -m novarl_jax.train --config=configs/addition.py --workdir=/tmp/addition
"""

from configs import base


def get_config():
    config = base.get_config()
    config.experiment.steps = 100  # training iterations
    config.task.name = "addition"  # novarl_jax.rollout.tasks.AdditionTask
    config.task.options.max_operand = 3  # operands 0..3: sums up to 6, one digit
    config.rollout.max_new_tokens = 2  # the digit and the end token
    config.grpo.beta = 0.0  # no KL to the reference (as DAPO): faster on toy tasks
    return config
