"""DAPO's dynamic sampling: which groups a step keeps and how many extra batches it samples."""

import jax.numpy as jnp
import numpy as np

from novarl_jax.rollout.engine import RolloutInfo, Trajectory
from novarl_jax.trainer.loop import dynamic_sampling

GROUP, PROMPTS, T = 2, 2, 3


def _batch(rewards, tag):
    """A rollout of len(rewards) rows (groups of GROUP) whose rows are named b{tag}r{row}."""
    rewards = np.asarray(rewards, np.float32)
    n = len(rewards)
    zeros = jnp.zeros((n, T), jnp.float32)
    rows = np.arange(n)
    traj = Trajectory(
        prompt_tokens=jnp.full((n, 2), tag, jnp.int32),
        prompt_mask=jnp.ones((n, 2), jnp.int32),
        response_tokens=jnp.asarray(np.repeat(rows[:, None], T, 1), jnp.int32),
        response_mask=jnp.ones((n, T), jnp.int32),
        behavior_logprobs=zeros,
        policy_logprobs=zeros,
        rewards=jnp.asarray(rewards),
        valid=jnp.ones((n,), jnp.float32),
        group_ids=jnp.asarray(np.repeat(np.arange(n // GROUP), GROUP), jnp.int32),
        policy_version=jnp.zeros((n,), jnp.int32),
        # Router choices are layer-major, [L, rows, T, K]: rows on axis 1.
        routing=jnp.asarray(10 * tag + rows, jnp.int32).reshape(1, n, 1, 1),
    )
    info = RolloutInfo(
        prompts=[f"b{tag}r{i}" for i in range(n)],
        completions=[""] * n,
        metadata=[{}] * n,
        sample_info=[{}] * n,
        invalid=[],
        task_state={"position": tag},
    )
    return traj, info


def _run(batches, max_extra_batches=2):
    """dynamic_sampling over canned batches; returns its result and the extra batches drawn."""
    drawn = []

    def more(extra):
        drawn.append(extra)
        return _batch(*batches[extra])

    out = dynamic_sampling(
        *_batch(*batches[0]), more, group=GROUP, prompts=PROMPTS,
        max_extra_batches=max_extra_batches,
    )  # fmt: skip
    return (*out, drawn)


def test_informative_groups_come_first_in_sampling_order():
    # Batch 0: group 0 all-equal, group 1 informative; batch 1: group 0 informative.
    traj, info, stats, drawn = _run([([1, 1, 0, 1], 0), ([0, 1, 1, 1], 1), ([1, 1, 1, 1], 2)])
    assert drawn == [1]  # two informative groups after one extra batch: no more sampled
    assert stats == {"dapo/extra_batches": 1.0, "dapo/kept_groups": 2.0}
    assert info.prompts == ["b0r2", "b0r3", "b1r0", "b1r1"]
    np.testing.assert_array_equal(traj.rewards, [0, 1, 0, 1])
    np.testing.assert_array_equal(traj.response_tokens[:, 0], [2, 3, 0, 1])
    np.testing.assert_array_equal(traj.routing.reshape(-1), [2, 3, 10, 11])
    np.testing.assert_array_equal(traj.group_ids, [0, 0, 1, 1])
    assert info.task_state == {"position": 1}  # the task moved past every batch drawn


def test_an_informative_first_batch_draws_nothing_more():
    traj, info, stats, drawn = _run([([0, 1, 1, 0], 0), ([0, 1, 0, 1], 1)])
    assert drawn == [] and stats == {"dapo/extra_batches": 0.0, "dapo/kept_groups": 2.0}
    assert info.prompts == ["b0r0", "b0r1", "b0r2", "b0r3"]
    assert info.task_state == {"position": 0}


def test_extra_batches_stop_at_the_limit_and_fill_with_uninformative_groups():
    uniform = [1, 1, 1, 1]
    batches = [(uniform, 0), ([1, 1, 0, 1], 1), (uniform, 2), ([0, 1, 0, 1], 3)]
    traj, info, stats, drawn = _run(batches, max_extra_batches=2)
    assert drawn == [1, 2]
    assert stats == {"dapo/extra_batches": 2.0, "dapo/kept_groups": 1.0}
    # The one informative group, then the first uninformative one, keeping the shape.
    assert info.prompts == ["b1r2", "b1r3", "b0r0", "b0r1"]
    assert info.task_state == {"position": 2}


def test_each_extra_batch_of_a_step_samples_with_its_own_key():
    """The trainer's refill draws each extra batch with a key of its own: with one key for
    all, every extra batch repeated the same prompts and samples (the tests above give
    dynamic_sampling their own batches, so none could tell)."""
    import jax

    from configs import base
    from novarl_jax.trainer import loop
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.config import validate_config

    c = base.get_config()
    c.experiment.steps = 1
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 2
    c.dapo.update(dynamic_sampling=True, max_extra_batches=2)
    trainer = loop.Trainer(build_run(validate_config(c)), "unused", mesh=None)
    state, _ = trainer.initial_state()
    rollout, keys = trainer.engine.rollout, []

    def uninformative(params, key, version, prompts):
        keys.append(tuple(np.asarray(jax.random.key_data(key)).tolist()))
        traj, info = rollout(params, key, version, prompts)
        return traj._replace(rewards=jnp.zeros_like(traj.rewards)), info

    trainer.engine.rollout = uninformative
    _, _, stats = trainer._rollout(state, trainer.rollout_key(0))
    assert stats["dapo/extra_batches"] == 2.0
    assert len(keys) == 3 and len(set(keys)) == 3
