"""The step's rollout metrics (verl names) against NumPy on a hand-made trajectory: scores over
valid rows, lengths and truncation, token means over real tokens only."""

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def trained_batch():
    return _hand_made_batch()


def _hand_made_batch(**dapo):
    """The training batch and step metrics of a hand-made 8-row trajectory (``dapo``: the
    config's dapo.* settings)."""
    from configs import base
    from novarl_jax.trainer import loop
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.config import validate_config

    c = base.get_config()
    c.dapo.update(dapo)
    c.experiment.steps = 1
    c.rollout.prompts_per_step = 2  # 2 prompts x 4 samples = 8 rows
    c.rollout.max_new_tokens = 4
    c.logging.progress = False
    trainer = loop.Trainer(build_run(validate_config(c)), "unused", mesh=None)
    state, reference = trainer.initial_state()
    traj, _, _ = trainer._rollout(state, trainer.rollout_key(0))
    stop = trainer.engine.stop_token_ids[0]
    other = next(i for i in range(3, 20) if i not in trainer.engine.stop_token_ids)
    lengths = np.array([4, 2, 3, 1, 4, 0, 2, 3])  # row 5 invalid (mask zeroed)
    ends_with_stop = np.array([0, 1, 1, 1, 0, 0, 1, 1], bool)
    tokens = np.zeros((8, 4), np.int32)
    mask = np.zeros((8, 4), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = other
        mask[r, :n] = 1
        if ends_with_stop[r]:
            tokens[r, n - 1] = stop
    rewards = np.array([1.0, 0.5, 0.0, 0.25, 0.75, 0.0, 1.0, 0.0], np.float32)
    valid = np.array([1, 1, 1, 1, 1, 0, 1, 1], np.float32)
    traj = traj._replace(
        response_tokens=jnp.asarray(tokens), response_mask=jnp.asarray(mask),
        rewards=jnp.asarray(rewards), valid=jnp.asarray(valid),
    )  # fmt: skip
    batch, stats = trainer._training_batch(state, reference, traj)
    entropy = np.asarray(trainer.apply_fn(state.params, batch)["entropy"])
    return dict(batch=batch, stats=stats, entropy=entropy, lengths=lengths, rewards=rewards,
                valid=valid.astype(bool), ends_with_stop=ends_with_stop)  # fmt: skip


def test_the_overlong_penalty_reaches_the_rewards_as_configured():
    """shaped_rewards is checked against NumPy on its own; this checks the step hands it the
    config's buffer and penalty (swapped, a buffer of 0.5 tokens and a penalty of 2)."""
    got = _hand_made_batch(overlong_buffer=2, overlong_penalty=0.5)
    n, r, v = got["lengths"], got["rewards"].astype(np.float64), got["valid"]
    start = 4 - 2  # max_new_tokens - overlong_buffer: the penalty grows over the last 2 tokens
    shaped = r + np.minimum((start - n) / 2, 0.0) * 0.5
    assert got["stats"]["critic/rewards/mean"] == pytest.approx(shaped[v].mean())
    assert got["stats"]["critic/score/mean"] == pytest.approx(r[v].mean())  # the task's own


def test_score_metrics_average_valid_rows_only(trained_batch):
    s, r, v = trained_batch["stats"], trained_batch["rewards"], trained_batch["valid"]
    assert s["critic/score/mean"] == pytest.approx(r[v].mean())  # 0.5, not 3.5 / 8
    assert s["critic/score/std"] == pytest.approx(r[v].std())
    assert s["rollout/invalid_samples"] == 1.0


def test_response_length_and_clip_ratio(trained_batch):
    s = trained_batch["stats"]
    # Over the 7 valid rows: the invalid row 5's zeroed mask is not an empty response.
    assert s["response_length/mean"] == pytest.approx(19 / 7)
    # Truncated = no stop token among the real tokens: rows 0 and 4.
    assert s["response_length/clip_ratio"] == pytest.approx(2 / 7)


def test_token_means_exclude_padding(trained_batch):
    s, batch = trained_batch["stats"], trained_batch["batch"]
    mask = np.asarray(batch["response_mask"]) > 0
    adv = np.asarray(batch["advantages"])
    assert not np.isclose(adv[mask].mean(), adv.mean())  # padding would change the mean
    assert s["critic/advantages/mean"] == pytest.approx(adv[mask].mean(), rel=1e-6)
    ent = trained_batch["entropy"]
    assert not np.isclose(ent[mask].mean(), ent.mean())
    assert s["actor/entropy_rollout"] == pytest.approx(ent[mask].mean(), rel=1e-5)


def test_an_invalid_sample_is_left_out_of_its_groups_baseline(trained_batch):
    # Group 2 is rows 4-7 with row 5 invalid: GRPO over the three valid scores only.
    adv = np.asarray(trained_batch["batch"]["advantages"])[:, 0]
    group = trained_batch["rewards"][[4, 6, 7]].astype(np.float64)
    want = (group - group.mean()) / (group.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(adv[[4, 6, 7]], want, rtol=1e-5)
    assert adv[5] == 0.0
