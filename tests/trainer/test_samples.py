"""``logging.samples``: rollout samples in samples.jsonl, and exact resume with DAPO refills."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quiet_train import train_quietly

from configs import jsonl
from novarl_jax.rollout.engine import RolloutInfo, Trajectory
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.metrics import JsonLines, read_metrics
from novarl_jax.trainer.samples import sample_rows

VOLATILE = ("timing_s/", "perf/")
STOP = 9


def _rollout():
    rewards = [0.5, 0.0, 1.0]
    tokens = [[4, 5, STOP, 0], [6, 6, 6, 6], [STOP, 0, 0, 0]]
    mask = [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # row 2: a non-finite reward
    traj = Trajectory(
        prompt_tokens=jnp.zeros((3, 2), jnp.int32),
        prompt_mask=jnp.ones((3, 2), jnp.int32),
        response_tokens=jnp.asarray(tokens, jnp.int32),
        response_mask=jnp.asarray(mask, jnp.int32),
        behavior_logprobs=jnp.zeros((3, 4)),
        policy_logprobs=jnp.zeros((3, 4)),
        rewards=jnp.asarray(rewards),
        valid=jnp.asarray([1.0, 1.0, 0.0]),
        group_ids=jnp.asarray([0, 0, 1], jnp.int32),
        policy_version=jnp.asarray([7, 7, 6], jnp.int32),
    )
    info = RolloutInfo(
        prompts=["p0", "p0", "p1"],
        completions=["ab", "cccc", ""],
        metadata=[{"answer": "ab"}, {"answer": "ab"}, {"answer": ("x", 1)}],
        sample_info=[{}, {}, {}],
        invalid=[2],
        task_state={},
    )
    return traj, info


def test_sample_rows_describe_each_sample():
    traj, info = _rollout()
    rows = sample_rows(traj, info, 10, step=3, split="train", stop_token_ids=(STOP,))
    assert len(rows) == 3  # at most the rollout's rows
    assert rows[0] == {
        "step": 3, "split": "train", "row": 0, "prompt_index": 0, "prompt": "p0",
        "completion": "ab", "response_tokens": [4, 5, STOP], "score": 0.5,
        "response_length": 3, "stopped": True, "policy_version": 7, "metadata": {"answer": "ab"},
    }  # fmt: skip
    assert (rows[1]["stopped"], rows[1]["response_length"], rows[1]["score"]) == (False, 4, 0.0)
    # A sample whose reward was not finite: no score, never a made-up length.
    assert (rows[2]["score"], rows[2]["response_length"], rows[2]["stopped"]) == (None, None, None)
    assert rows[2]["response_tokens"] is None and rows[1]["response_tokens"] == [6, 6, 6, 6]
    assert sample_rows(traj, info, 1, step=1, split="val", stop_token_ids=(STOP,))[0]["row"] == 0
    assert sample_rows(traj, info, 0, step=1, split="val", stop_token_ids=(STOP,)) == []


def test_json_lines_truncate_after_keeps_earlier_steps(tmp_path):
    lines = JsonLines(str(tmp_path / "rows.jsonl"))
    lines.write([{"step": s, "v": (1, 2)} for s in (1, 2, 2, 3)])
    lines.close()
    lines.truncate_after(2)
    rows = [json.loads(x) for x in open(tmp_path / "rows.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert rows[0]["v"] == [1, 2]
    assert not list(tmp_path.glob("*.truncating"))


def test_a_truncation_that_cannot_be_written_keeps_the_file_and_leaves_nothing(
    tmp_path, monkeypatch
):
    """A full disk while a resume truncates: the old rows stay and no empty
    rows.jsonl.truncating is left beside them."""
    from novarl_jax.trainer import saved_config

    path = tmp_path / "rows.jsonl"
    lines = JsonLines(str(path))
    lines.write([{"step": s} for s in (1, 2, 3)])
    lines.close()
    before = path.read_text()
    real_open = open

    class FullDisk:
        """The file is made; writing into it fails, as on a full disk."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def writelines(self, lines):
            raise OSError(28, "No space left on device")

    def full_disk(name, mode="r", **kwargs):
        f = real_open(name, mode, **kwargs)
        return FullDisk(f) if str(name).endswith(".truncating") else f

    monkeypatch.setattr(saved_config, "open", full_disk, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        lines.truncate_after(1)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def _dapo_config(steps):
    """GRPO on the JSONL task, refilling uninformative groups from up to 2 extra batches:
    an untrained policy scores 0 everywhere, so every step samples both extra batches and
    the task's position moves 3 batches per step."""
    c = jsonl.get_config()
    c.experiment.algorithm = "grpo"
    c.experiment.grpo_group_size = 2
    c.experiment.steps = steps
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 4
    c.dapo.dynamic_sampling = True
    c.dapo.max_extra_batches = 2
    c.eval.interval = 2
    c.eval.prompts = 2
    c.eval.path = c.task.path
    c.checkpoint.interval = 1
    c.logging.samples = 3
    c.logging.plot = False
    c.logging.progress = False
    return c


def _read(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_samples_are_logged_and_resume_is_exact_with_dapo_refills(tmp_path):
    full = train_quietly(_dapo_config(3), tmp_path / "full")
    # Stopping at an evaluated step: a run also evaluates its last step, which would add a
    # validation row at the stop that the uninterrupted run does not have.
    train_quietly(_dapo_config(2), tmp_path / "split")
    split = train_quietly(_dapo_config(3), tmp_path / "split")
    assert split["resumed_from"] == 2
    for a, b in zip(
        jax.tree.leaves(full["state"].params), jax.tree.leaves(split["state"].params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stable = [
        [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(d)]
        for d in (tmp_path / "full", tmp_path / "split")
    ]
    assert stable[0] == stable[1]
    assert [r["dapo/extra_batches"] for r in stable[0]] == [2.0, 2.0, 2.0]

    samples = _read(tmp_path / "full" / "samples.jsonl")
    assert samples == _read(tmp_path / "split" / "samples.jsonl")
    train = [r for r in samples if r["split"] == "train"]
    val = [r for r in samples if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [r["step"] for r in val] == [2, 2, 3, 3]  # eval.prompts=2, interval 2 and the last
    # Each step goes on where the last one's three batches of 2 prompts left the file.
    task = build_run(validate_config(_dapo_config(1))).task
    expected = task.sample_prompts(None, 18)[0]
    assert [r["prompt"] for r in train[::3]] == [expected[0], expected[6], expected[12]]
    assert [r["prompt_index"] for r in train[:3]] == [0, 0, 1]
    # Rows are the task's own scores of their prompt and completion.
    rewards, _ = task.score(
        [r["prompt"] for r in samples],
        [r["completion"] for r in samples],
        [r["metadata"] for r in samples],
    )
    np.testing.assert_array_equal(rewards, [r["score"] for r in samples])
    assert all(1 <= r["response_length"] <= 4 for r in samples)


STOP = 9


def test_sample_rows_stop_token_outside_the_mask_and_per_row_versions():
    traj = Trajectory(
        prompt_tokens=jnp.zeros((3, 2), jnp.int32),
        prompt_mask=jnp.ones((3, 2), jnp.int32),
        # row 1 is padded with the stop id after a completion that ran out of budget
        response_tokens=jnp.asarray([[4, STOP, 0, 0], [6, 6, STOP, STOP], [5, 5, 5, 5]], jnp.int32),
        response_mask=jnp.asarray([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.int32),
        behavior_logprobs=jnp.zeros((3, 4)),
        policy_logprobs=jnp.zeros((3, 4)),
        rewards=jnp.asarray([1.0, 0.0, 0.5]),
        valid=jnp.asarray([1.0, 1.0, 1.0]),
        group_ids=jnp.asarray([0, 0, 1], jnp.int32),
        policy_version=jnp.asarray([3, 4, 5], jnp.int32),
    )
    info = RolloutInfo(
        prompts=["a", "a", "b"], completions=["x", "yy", "zzzz"],
        metadata=[{}, {}, {}], sample_info=[{}, {}, {}], invalid=[], task_state={},
    )  # fmt: skip
    rows = sample_rows(traj, info, 3, step=1, split="train", stop_token_ids=(STOP,))
    assert [r["stopped"] for r in rows] == [True, False, False]
    assert [r["policy_version"] for r in rows] == [3, 4, 5]
    assert [r["prompt_index"] for r in rows] == [0, 0, 1]


def test_any_stop_id_counts_as_stopping():
    traj, info = _rollout()
    # Row 0 ends with STOP: with another id listed first, it still stopped.
    rows = sample_rows(traj, info, 10, step=1, split="train", stop_token_ids=(3, STOP))
    assert [row["stopped"] for row in rows] == [True, False, None]
    rows = sample_rows(traj, info, 10, step=1, split="train", stop_token_ids=(3,))
    assert [row["stopped"] for row in rows] == [False, False, None]


def test_a_resume_that_logs_no_samples_still_drops_the_rows_of_steps_it_redoes(tmp_path):
    import shutil

    from tiny_grpo import tiny_grpo_config

    config = tiny_grpo_config()
    config.experiment.steps = 2
    config.checkpoint.update(interval=1, async_save=False)
    config.logging.update(samples=1, plot=False, progress=False)
    train_quietly(config, tmp_path)
    assert [r["step"] for r in _read(tmp_path / "samples.jsonl")] == [1, 2]
    shutil.rmtree(tmp_path / "checkpoints" / "2")  # step 2 is redone from step 1's checkpoint
    config.logging.samples = 0
    config.experiment.steps = 1
    train_quietly(config, tmp_path)
    assert [r["step"] for r in _read(tmp_path / "samples.jsonl")] == [1]
