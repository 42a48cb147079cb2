"""The quickstart's demo layout (tp2 pp2 ep2) trains like the same run without pipelining."""

import jax
import numpy as np
import pytest

from configs import moe
from novarl_jax.trainer.config import ConfigError, validate_config
from novarl_jax.trainer.loop import train
from novarl_jax.trainer.metrics import read_metrics


def _config(pp):
    c = moe.get_config()
    c.experiment.update(steps=3, pipeline_parallel_size=pp, world_size=4 * pp,
                        capacity_factor=None, num_microbatches=2)  # fmt: skip
    c.rollout.prompts_per_step = 4
    c.rollout.max_new_tokens = 4
    c.optim.eps = 1e-3  # see test_resume.test_resume_onto_another_layout
    c.logging.plot = False
    c.logging.progress = False
    return c


@pytest.mark.slow
def test_pp2_matches_pp1(tmp_path):
    results = {}
    for pp in (1, 2):
        config = _config(pp)
        spec = validate_config(config)
        mesh = spec.layout.make_mesh(jax.devices()[: spec.layout.world_size])
        state = train(config, str(tmp_path / f"pp{pp}"), spec=spec, mesh=mesh,
                      log=lambda line: None)["state"]  # fmt: skip
        results[pp] = (state, read_metrics(tmp_path / f"pp{pp}"))
    (state1, rows1), (state2, rows2) = results[1], results[2]
    for r1, r2 in zip(rows1, rows2, strict=True):
        assert r1["critic/score/mean"] == r2["critic/score/mean"]
        for name in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/grad_norm"):
            assert r1[name] == pytest.approx(r2[name], rel=1e-4, abs=1e-6), name
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    layers = state2.params["policy"]["layers"]["attn"]["q_proj"]
    assert layers.sharding.spec[0] == "pp"  # the layer stack is split into stages


def test_num_microbatches_must_divide_the_update_batch():
    from novarl_jax.trainer.build import build_run

    config = _config(2)
    config.experiment.num_microbatches = 3
    with pytest.raises(ConfigError, match="experiment.num_microbatches: 3 pipeline microbatches"):
        build_run(validate_config(config))


def test_training_forwards_run_the_configured_pipeline_microbatches(monkeypatch):
    # experiment.num_microbatches reaches the pipeline schedule of the scoring and update
    # forwards (with 1 the bubble would be half the time at pp = 2, and the routing groups
    # would not be the ones the checklist shows).
    from novarl_jax.models import pipeline
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.loop import Trainer
    from novarl_jax.trainer.steps import make_apply_fn, model_inputs

    seen = []
    real = pipeline.pipeline_apply

    def spy(*args, num_microbatches, **kwargs):
        seen.append(num_microbatches)
        return real(*args, num_microbatches=num_microbatches, **kwargs)

    monkeypatch.setattr(pipeline, "pipeline_apply", spy)
    config = _config(2)
    spec = validate_config(config)
    mesh = spec.layout.make_mesh(jax.devices()[: spec.layout.world_size])
    run = build_run(spec)
    trainer = Trainer(run, "unused", mesh=mesh)
    state, _ = trainer.initial_state()
    traj, _, _ = trainer._rollout(state, trainer.rollout_key(0))
    seen.clear()  # the rollout's own (cached) forwards do not pipeline microbatches
    make_apply_fn(run.model, mesh)(state.params, model_inputs(traj))
    assert seen == [2]


def test_the_optimizer_moments_start_sharded_like_their_parameters():
    # Adam's moments are zeros that do not depend on the parameters' values: left to XLA,
    # they started whole on every device (6.5x the memory at tp2 pp2 ep2), and the first
    # update compiled a second time for the sharded moments it returns.
    import optax

    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.loop import Trainer

    spec = validate_config(_config(2))
    mesh = spec.layout.make_mesh(jax.devices()[: spec.layout.world_size])
    state, _ = Trainer(build_run(spec), "unused", mesh=mesh).initial_state()
    adam = [
        s
        for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    params = jax.tree.leaves(state.params)
    assert any(not p.sharding.is_fully_replicated for p in params)
    for moments in (adam[0].mu, adam[0].nu):
        for m, p in zip(jax.tree.leaves(moments), params, strict=True):
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim), (m.sharding, p.sharding)
    assert adam[0].count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
