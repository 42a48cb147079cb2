"""Base configuration: a tiny dense policy trained with GRPO on one device.

Every key, its default and a comment on its meaning live in
``novarl_jax.trainer.config.default_config``; variants import this file and override only
what differs.

Run:
    python -m novarl_jax.train --config=configs/base.py --workdir=/tmp/run
"""

from novarl_jax.trainer.config import default_config


def get_config():
    return default_config()
