"""PPO and GRPO learn: mean reward rises from the untrained level to a clear target.

Fixed seeds, tiny policies, built-in tasks (see docs/learning.md for the curves).
"""

import jax
import numpy as np
import pytest

from configs import addition, copy
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.loop import train
from novarl_jax.trainer.metrics import read_metrics


def _scores(config, workdir):
    config.logging.plot = False
    config.logging.progress = False
    config.checkpoint.interval = 1000
    spec = validate_config(config)
    mesh = spec.layout.make_mesh(jax.devices()[:1])
    train(config, str(workdir), spec=spec, mesh=mesh, log=lambda line: None)
    return np.array([row["critic/score/mean"] for row in read_metrics(workdir)])


def _check(scores, *, before, after):
    """The first 10 steps score below ``before``; some later 10-step window above ``after``.

    The target is reached within the run rather than held at its last step: these short
    runs of tiny policies oscillate (PPO on copy has reached 0.87 and then fallen to 0.47),
    and which way the last steps swing changes with float rounding.
    """
    first = scores[:10].mean()
    windows = np.convolve(scores, np.ones(10) / 10, mode="valid")
    assert first < before, f"untrained policy already scores {first:.3f}"
    assert windows.max() > after, (
        f"mean score only rose from {first:.3f} to at most {windows.max():.3f} (10-step mean)"
    )


def test_grpo_learns_copy(tmp_path):
    _check(_scores(copy.get_config(), tmp_path), before=0.3, after=0.7)


@pytest.mark.slow
def test_ppo_learns_copy(tmp_path):
    # PPO on copy at this learning rate can rise past 0.85 and collapse again within a run,
    # and whether a given seed's rise falls inside 120 steps moves with float rounding: two
    # of three seeds must reach the target (each run alone takes a few seconds).
    reached = []
    for seed in range(3):
        config = copy.get_config()
        config.experiment.update(algorithm="ppo", steps=120, seed=seed)
        config.rollout.prompts_per_step = 16
        scores = _scores(config, tmp_path / str(seed))
        assert scores[:10].mean() < 0.3, f"seed {seed}: untrained policy already scores"
        reached.append(np.convolve(scores, np.ones(10) / 10, mode="valid").max())
    assert sorted(reached)[1] > 0.7, f"best 10-step means of seeds 0-2: {np.round(reached, 3)}"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_learns_addition(tmp_path, algorithm):
    config = addition.get_config()
    config.experiment.algorithm = algorithm
    if algorithm == "ppo":
        config.rollout.prompts_per_step = 16
    _check(_scores(config, tmp_path), before=0.25, after=0.5)
