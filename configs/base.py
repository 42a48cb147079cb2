"""Base configuration: a tiny dense policy trained with GRPO on one device.

Every key, its default and a comment on its meaning live in
``novarl_jax.trainer.config.default_config``; the variants in this directory import this file
and override only what differs. ``configs`` is this repository's directory, not an installed
package: a config kept elsewhere starts from ``default_config()`` itself::

    from novarl_jax.trainer.config import default_config

    def get_config():
        config = default_config()
        config.experiment.steps = 200
        return config

Run:
    python -m novarl_jax.train --config=configs/base.py --workdir=/tmp/run
"""

from novarl_jax.trainer.config import default_config


def get_config():
    return default_config()
