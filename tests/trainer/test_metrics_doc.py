"""docs/metrics.md names every metric the trainer writes, and nothing it does not write."""

import pathlib
import re

import numpy as np
import pytest
from quiet_train import train_quietly

from configs import base
from novarl_jax.trainer.async_loop import train_async
from novarl_jax.trainer.metrics import read_metrics

DOC = pathlib.Path(__file__).parents[2] / "docs" / "metrics.md"


def _documented() -> set[str]:
    """The names in the first column of the page's tables."""
    names = set()
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def _pattern(name: str) -> str:
    """``moe/layer<l>/load_max`` -> a regex matching ``moe/layer0/load_max``."""
    return "".join("[a-z0-9_]+" if part.startswith("<") else re.escape(part)
                   for part in re.split(r"(<[^>]+>)", name))  # fmt: skip


def _tiny(**sections):
    c = base.get_config()
    c.experiment.steps = 2
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 4
    c.logging.progress = False
    c.logging.plot = False
    c.checkpoint.async_save = False
    for path, value in sections.items():
        section, key = path.split("__")
        c[section][key] = value
    return c


# Between them these runs turn on every feature with metrics of its own.
RUNS = {
    "grpo": _tiny(
        experiment__num_experts=4,
        eval__interval=1,
        eval__samples=2,
        eval__temperature=1.0,
        dapo__dynamic_sampling=True,
        grpo__tis_cap=2.0,
    ),
    "ppo": _tiny(
        experiment__algorithm="ppo",
        experiment__num_experts=4,
        ppo__critic="separate",
        ppo__kl_coef=0.1,
        ppo__tis_cap=2.0,
        experiment__world_size=2,  # perf/throughput is per device
    ),
    "async": _tiny(experiment__async_rollouts=True, experiment__world_size=2),
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    rows = {}
    for name, config in RUNS.items():
        workdir = tmp_path_factory.mktemp(name)
        if config.experiment.async_rollouts:
            train_async(config, str(workdir), log=lambda _: None, synchronous=True)
        else:
            train_quietly(config, workdir)
        rows[name] = read_metrics(workdir)
    return rows


def test_every_logged_metric_is_documented(logged):
    patterns = [re.compile(_pattern(n) + "$") for n in _documented()]
    names = {k for rows in logged.values() for r in rows for k in r}
    missing = sorted(n for n in names if not any(p.match(n) for p in patterns))
    assert not missing, f"add to docs/metrics.md: {missing}"


def test_every_documented_metric_is_logged(logged):
    names = {k for rows in logged.values() for r in rows for k in r}
    unused = sorted(n for n in _documented()
                    if not any(re.fullmatch(_pattern(n), k) for k in names))  # fmt: skip
    assert not unused, f"docs/metrics.md names metrics no run writes: {unused}"


def test_documented_relations_hold(logged):
    for name, rows in logged.items():
        devices = RUNS[name].experiment.world_size
        for r in rows:
            assert r["perf/throughput"] == pytest.approx(
                r["perf/total_num_tokens"] / r["timing_s/step"] / devices, rel=1e-6
            )
            assert r["actor/ratio_max"] >= r["actor/ratio_mean"] > 0
            assert 0 <= r["actor/pg_clipfrac"] <= 1 and 0 <= r["response_length/clip_ratio"] <= 1
    for r in logged["ppo"]:
        assert r["actor/reward_kl_penalty_coeff"] == pytest.approx(0.02)
        assert np.isfinite(r["critic/grad_norm"]) and np.isfinite(r["critic/moe_aux_loss"])
    for r in logged["async"]:
        assert r["sync/broadcasts"] == sum(
            v for k, v in r.items() if k.startswith("sync/broadcasts/")
        )


def test_throughput_is_per_device_like_verls(devices):
    from novarl_jax.core.distributed import ParallelLayout
    from novarl_jax.trainer.loop import per_device_throughput

    mesh = ParallelLayout(dp=2, tp=2).make_mesh(devices[:4])
    assert per_device_throughput(100, 2.0, mesh) == 12.5
    assert per_device_throughput(100, 2.0, None) == 50.0
