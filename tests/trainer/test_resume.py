"""Exact resume: 2N steps == N steps + restart + N steps, also across a layout change."""

import jax
import numpy as np
import pytest
from quiet_train import train_quietly

from configs import base
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.checkpoint import Checkpointer, abstract_like
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.loop import Trainer
from novarl_jax.trainer.metrics import read_metrics

VOLATILE = ("timing_s/", "perf/")


def _config(steps, **experiment):
    c = base.get_config()
    c.experiment.steps = steps
    c.experiment.update(experiment)
    c.rollout.prompts_per_step = 4
    c.rollout.max_new_tokens = 4
    c.train.minibatches = 2
    c.checkpoint.interval = 2
    c.checkpoint.async_save = True
    c.logging.plot = False
    c.logging.progress = False
    return c


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_resume_is_bit_exact(tmp_path, algorithm):
    full = train_quietly(_config(4, algorithm=algorithm), tmp_path / "full")
    first = train_quietly(_config(2, algorithm=algorithm), tmp_path / "split")
    assert first["resumed_from"] is None
    second = train_quietly(_config(4, algorithm=algorithm), tmp_path / "split")
    assert second["resumed_from"] == 2
    leaves_full = jax.tree.leaves(full["state"].params)
    leaves_split = jax.tree.leaves(second["state"].params)
    for a, b in zip(leaves_full, leaves_split, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config = _config(4)
    updates = 4 * config.train.epochs * config.train.minibatches
    assert int(second["state"].policy_version) == int(full["state"].policy_version) == updates
    rows_full = _stable(read_metrics(tmp_path / "full"))
    rows_split = _stable(read_metrics(tmp_path / "split"))
    assert [r["step"] for r in rows_split] == [1, 2, 3, 4]
    assert rows_full == rows_split


@pytest.mark.slow
def test_resume_onto_another_layout(tmp_path):
    """A dp8 checkpoint restores bit-exactly onto tp2 ep2 dp2 and training continues.

    The continued run matches an all-dp8 run to float tolerance. Adam's epsilon is raised to
    1e-3 here: with the default 1e-8, Adam divides each gradient entry by its own running RMS,
    so an entry whose gradient is ~1e-9 (float rounding, different on each layout) moves by
    a full learning rate in a random direction, and "float tolerance" would mean nothing.
    Routing is dropless: with a capacity limit, which tokens are dropped depends on the
    routing groups (the tokens of one data shard), which differ between layouts.
    """
    moe = dict(num_experts=4, world_size=8, capacity_factor=None)

    def config(steps, **layout):
        c = _config(steps, **moe, **layout)
        c.optim.eps = 1e-3
        return c

    reference = train_quietly(config(4), tmp_path / "dp8")
    saved = train_quietly(config(2), tmp_path / "switch")["state"]

    switched = config(4, tensor_parallel_size=2, expert_parallel_size=2)
    spec = validate_config(switched)
    mesh = spec.layout.make_mesh(jax.devices()[:8])
    run = build_run(spec)
    fresh = Trainer(run, str(tmp_path / "switch"), mesh=mesh).initial_state()[0]
    restored, host = Checkpointer(str(tmp_path / "switch" / "checkpoints")).restore(
        abstract_like(fresh)
    )
    assert host["iteration"] == 2
    for a, b, f in zip(
        jax.tree.leaves(saved), jax.tree.leaves(restored), jax.tree.leaves(fresh), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == f.sharding  # placed for the new layout
    expert_weights = restored.params["policy"]["layers"]["moe"]["w_gate_up"]
    assert expert_weights.sharding.spec[1] == "ep"
    assert expert_weights.sharding.mesh.devices.shape == ParallelLayout(dp=2, tp=2, ep=2).mesh_shape

    resumed = train_quietly(switched, tmp_path / "switch", mesh=mesh)
    assert resumed["resumed_from"] == 2
    ref_rows = _stable(read_metrics(tmp_path / "dp8"))
    new_rows = _stable(read_metrics(tmp_path / "switch"))
    assert [r["step"] for r in new_rows] == [1, 2, 3, 4]
    for r, n in zip(ref_rows, new_rows, strict=True):
        assert r["critic/score/mean"] == pytest.approx(n["critic/score/mean"], rel=1e-6)
        assert r["actor/pg_loss"] == pytest.approx(n["actor/pg_loss"], rel=1e-4, abs=1e-6)
    for a, b in zip(
        jax.tree.leaves(reference["state"].params),
        jax.tree.leaves(resumed["state"].params),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_resume_onto_an_edited_jsonl_file_stops_naming_task_path(tmp_path):
    import shutil

    from configs import jsonl
    from novarl_jax.trainer.config import ConfigError

    data = tmp_path / "prompts.jsonl"
    shutil.copy(jsonl.get_config().task.path, data)
    config = _config(1)
    config.task, config.rollout.max_prompt_length = jsonl.get_config().task, 48
    config.task.path = str(data)
    train_quietly(config, tmp_path / "run")
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    config.experiment.steps = 2
    with pytest.raises(ConfigError, match=r"cannot resume the task's position: .*prompts\.jsonl "
                       r"has changed since this position") as info:  # fmt: skip
        train_quietly(config, tmp_path / "run")
    assert info.value.key == "task.path"
    # Another file, allowed explicitly: it is read from its first example.
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    config.task.path = str(other)
    lines = []
    train_quietly(config, tmp_path / "run", log=lines.append, allow_config_change=True)
    assert f"task.path changed: {other} is read from its first example" in lines


def test_a_resume_allowed_a_new_seed_keeps_the_reference_it_started_from(tmp_path):
    """The KL reference is the initial policy: a seed changed at a resume (allowed
    explicitly) must not swap it for another random network."""
    from novarl_jax.trainer.loop import Session, seed_keys

    config = _config(2)
    config.grpo.beta = 0.1  # a KL loss, so a reference model
    train_quietly(config, tmp_path / "run")
    config.experiment.update(seed=1, steps=3)
    with Session(config, str(tmp_path / "run"), log=lambda _: None, allow_config_change=True) as s:
        reference = jax.device_get(s.reference)
        trainer = s.trainer
        assert s.init_seed == 0 and s.start == 2
        # ... while what is sampled from here on follows the new seed.
        loop_key = np.asarray(jax.device_get(s.state.key))
    np.testing.assert_array_equal(loop_key, jax.random.key_data(seed_keys(1)[1]))
    assert not np.array_equal(loop_key, jax.random.key_data(seed_keys(0)[1]))
    want = jax.device_get(trainer.initial_state(seed=0)[1])
    other = jax.device_get(trainer.initial_state(seed=1)[1])
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(b, c)
        for b, c in zip(jax.tree.leaves(want), jax.tree.leaves(other), strict=True)
    )


def test_a_resume_restores_onto_shapes_not_onto_a_second_state(tmp_path, monkeypatch):
    """A resume used to build a fresh random state (parameters and Adam's moments) and hold it
    on the devices while the checkpoint restored beside it: twice the state's memory, where
    training needs it once."""
    import gc

    from novarl_jax.trainer.loop import Session

    config = _config(1, num_experts=4, world_size=8, tensor_parallel_size=2)
    config.grpo.beta = 0.1  # a reference too, built after the restore
    train_quietly(config, tmp_path / "run")
    live_before, original = [], Checkpointer.restore
    gc.collect()
    earlier = {id(x) for x in jax.live_arrays()}  # other tests' arrays in this process

    def restore(self, target, step=None):
        live_before.append(sum(x.nbytes for x in jax.live_arrays() if id(x) not in earlier))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target))
        return original(self, target, step)

    monkeypatch.setattr(Checkpointer, "restore", restore)
    config.experiment.steps = 2
    with Session(config, str(tmp_path / "run"), log=lambda _: None) as s:
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(s.state))
        fresh, reference = s.trainer.initial_state()
        # The target is the fresh state's shapes and placement, computed without it.
        target = s.trainer.abstract_state()
        for a, f in zip(jax.tree.leaves(target), jax.tree.leaves(fresh), strict=True):
            assert (a.shape, a.dtype, a.sharding) == (f.shape, f.dtype, f.sharding)
        for a, b in zip(jax.tree.leaves(s.reference), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(live_before) == 1 and live_before[0] < 0.2 * state_bytes, (live_before, state_bytes)


def test_a_resume_whose_schedule_has_ended_warns_that_nothing_more_is_learned(tmp_path):
    from novarl_jax.trainer.loop import Session

    config = _config(2)  # 4 updates a step
    config.optim.update(schedule="linear", warmup_steps=2)  # then 6 updates of decay to 0
    train_quietly(config, tmp_path / "run")
    config.experiment.steps = 3
    config.optim.decay_steps = 6  # keeps the schedule the checkpoint was trained on
    lines = []
    with Session(config, str(tmp_path / "run"), log=lines.append):
        pass
    assert lines[-1] == (
        "warning: the learning-rate schedule is at 0 from update 8 to the run's last, 11: "
        "nothing the remaining steps sample will be learned from (optim.schedule='linear', "
        "optim.decay_steps=6, optim.end_learning_rate=0.0)"
    )
    config.optim.decay_steps = 7  # a longer decay (allowed explicitly): not all at 0
    lines = []
    with Session(config, str(tmp_path / "run"), log=lines.append, allow_config_change=True):
        pass
    assert not [line for line in lines if "learning-rate schedule" in line]


def test_a_host_record_that_does_not_fit_its_step_is_refused(tmp_path):
    import json

    from novarl_jax.trainer.checkpoint import CheckpointUnreadableError
    from novarl_jax.trainer.loop import Session

    config = _config(2)
    train_quietly(config, tmp_path / "run")
    record = next((tmp_path / "run" / "checkpoints" / "2" / "host").glob("metadata"))
    saved = json.loads(record.read_text())
    del saved["checksums"]["<host record>"]  # as written before records had a checksum
    for change, what in (({"iteration": 5}, "its iteration is 5"), ({}, "it has no task_state")):
        edited = {k: v for k, v in saved.items() if change or k != "task_state"}
        record.write_text(json.dumps({**edited, **change}))
        config.experiment.steps = 3
        with pytest.raises(
            CheckpointUnreadableError, match=rf"host record does not fit step 2: {what}"
        ):
            Session(config, str(tmp_path / "run"), log=lambda _: None)


def test_a_resume_may_not_reorder_the_jsonl_epoch_it_is_in(tmp_path):
    from configs import jsonl
    from novarl_jax.trainer.config import ConfigError
    from novarl_jax.trainer.loop import Session

    config = jsonl.get_config()
    config.experiment.steps = 1
    config.rollout.prompts_per_step = 2
    config.update(logging=dict(plot=False, progress=False), checkpoint=dict(async_save=False))
    train_quietly(config, tmp_path / "run")
    config.experiment.steps = 2
    for key, value in (("seed", 7), ("shuffle", False)):
        changed = config.copy_and_resolve_references()
        changed.task.options[key] = value
        with pytest.raises(ConfigError) as info:
            Session(changed, str(tmp_path / "run"), log=lambda _: None, allow_config_change=True)
        assert info.value.key == f"task.options.{key}"
        assert (
            "the run resumes after 2 examples of epoch 0 in the order its checkpoint's seed"
            in str(info.value)
        )
