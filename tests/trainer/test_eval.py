"""Validation on held-out prompts (``eval.*``): metrics, prompts, no effect on training."""

import types

import jax
import numpy as np
import pytest
from quiet_train import train_quietly

from configs import copy, jsonl
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import ConfigError, validate_config
from novarl_jax.trainer.evaluate import Evaluator
from novarl_jax.trainer.metrics import read_metrics

VOLATILE = ("timing_s/", "perf/")


def _config(src=copy, steps=3, **eval_keys):
    c = src.get_config()
    c.experiment.steps = steps
    c.rollout.prompts_per_step = 4
    c.checkpoint.interval = 100
    c.logging.plot = False
    c.logging.progress = False
    c.eval.update(eval_keys)
    return c


def test_validation_is_logged_and_leaves_training_unchanged(tmp_path):
    config = _config(interval=2, prompts=6, samples=2, temperature=1.0)
    with_eval = train_quietly(config, tmp_path / "on")
    without = train_quietly(_config(), tmp_path / "off")
    for a, b in zip(
        jax.tree.leaves(with_eval["state"].params), jax.tree.leaves(without["state"].params),
        strict=True,
    ):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows_on, rows_off = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert [r["step"] for r in rows_on if "val/score/mean" in r] == [2, 3]  # interval, last
    for on, off in zip(rows_on, rows_off, strict=True):
        stripped = {k: v for k, v in on.items() if not k.startswith(("val/", *VOLATILE))}
        assert stripped == {k: v for k, v in off.items() if not k.startswith(VOLATILE)}
    row = rows_on[1]
    assert 0.0 <= row["val/score/mean"] <= 1.0 and row["val/score/std"] >= 0.0
    assert row["val/score/best_of_n/mean"] >= row["val/score/mean"]
    assert 1.0 <= row["val/response_length/mean"] <= 3.0  # copy.py: at most 3 new tokens
    # train() hands back the last step's metrics with its evaluation.
    assert with_eval["val/score/mean"] == rows_on[-1]["val/score/mean"]


def test_an_evaluation_scores_the_same_prompts_every_time():
    config = _config(interval=1, prompts=8)
    run = build_run(validate_config(config))
    evaluator = Evaluator(run)
    params = run.init_params(jax.random.key(0))["policy"]
    first = evaluator(params)
    assert evaluator(params) == first  # greedy on the same prompts
    # The scores are the task's own, on the prompts of the evaluation key.
    _, info = evaluator.sample(params)
    rewards, _ = run.eval_task.score(info.prompts, info.completions, info.metadata)
    assert first["val/score/mean"] == pytest.approx(float(np.mean(rewards)))
    training_prompts, _ = run.task.sample_prompts(jax.random.key(0), 8)
    assert info.prompts != training_prompts
    assert "val/score/best_of_n/mean" not in first  # one sample per prompt


def test_jsonl_validation_reads_its_own_file_from_the_start(tmp_path):
    lines = [f'{{"prompt": "{a} + 1 =", "answer": "{a + 1}"}}' for a in range(5)]
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(lines) + "\n")
    config = _config(jsonl, steps=2, interval=1, prompts=3, path=str(held_out))
    config.task.path = "tests/data/prompts_tiny.jsonl"
    run = build_run(validate_config(config))
    evaluator = Evaluator(run)
    params = run.init_params(jax.random.key(0))["policy"]
    evaluator(params)
    evaluator(params)
    _, info = evaluator.sample(params)
    assert info.prompts == ["0 + 1 =", "1 + 1 =", "2 + 1 ="]  # file order, from the start
    assert (
        run.task.get_state().items() >= {"epoch": 0, "index": 0, "seed": 0}.items()
    )  # training's untouched


@pytest.mark.parametrize(
    "src,keys,key,match",
    [
        (jsonl, dict(interval=5), "eval.path", "JSONL file of held-out prompts"),
        (copy, dict(interval=5, path="x.jsonl"), "eval.path", "only the 'jsonl' task"),
        (copy, dict(interval=-1), "eval.interval", "must be >= 0"),
        (copy, dict(interval=2, samples=0), "eval.samples", "must be >= 1"),
        (copy, dict(interval=2, temperature=-0.5), "eval.temperature", "must be >= 0"),
        (copy, dict(interval=2, samples=2), "eval.samples", "greedy completions"),
        (copy, dict(interval=2, prompts=0), "eval.prompts", "must be >= 1"),
        (copy, dict(interval=0, path="x.jsonl"), "eval.path", "only the 'jsonl' task"),
        (copy, dict(interval=2, prompts_per_batch=-1), "eval.prompts_per_batch", "must be >= 0"),
    ],
)
def test_bad_eval_keys_are_named(src, keys, key, match):
    config = _config(src, **keys)
    with pytest.raises(ConfigError, match=match) as info:
        validate_config(config)
    assert info.value.key == key


@pytest.mark.parametrize(
    "lines,prompts,key,match",
    [
        (2, 3, "eval.prompts", "3 prompts asked but .* has 2"),
        (3, 3, "eval.path", "an evaluation prompt has 107 tokens .*prompt_truncation"),
    ],
)
def test_evaluation_prompts_that_cannot_run_fail_at_start(tmp_path, lines, prompts, key, match):
    text = [f'{{"prompt": "{i} + 1 =", "answer": "{i + 1}"}}' for i in range(lines - 1)]
    text.append('{"prompt": "' + "9" * 100 + ' + 1 =", "answer": "0"}')  # > 48 prompt tokens
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(text) + "\n")
    config = _config(jsonl, interval=1, prompts=prompts, path=str(held_out))
    run = build_run(validate_config(config))
    with pytest.raises(ConfigError, match=match) as info:
        Evaluator(run)
    assert info.value.key == key


def _evaluator(prompts, samples):
    ev = object.__new__(Evaluator)  # metrics() needs only these two fields
    ev.prompts, ev.samples = prompts, samples
    return ev


def _traj(valid, rewards, lengths, width=4):
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return types.SimpleNamespace(
        valid=np.asarray(valid, np.float32),
        rewards=np.asarray(rewards, np.float32),
        response_mask=mask,
    )


def test_validation_metrics_values():
    # 2 prompts x 2 samples, prompt-major rows; the last sample's reward was not finite.
    traj = _traj(valid=[1, 1, 1, 0], rewards=[0.0, 1.0, -1.0, 5.0], lengths=[1, 2, 3, 4])
    m = _evaluator(2, 2).metrics(traj)
    assert m["val/score/mean"] == pytest.approx(0.0)
    assert m["val/score/std"] == pytest.approx(np.sqrt(2 / 3))  # population std (ddof=0)
    assert m["val/response_length/mean"] == pytest.approx(2.0)  # valid rows only
    # best of prompt 0 is 1.0, of prompt 1 (its one valid sample) -1.0
    assert m["val/score/best_of_n/mean"] == pytest.approx(0.0)


def test_best_of_n_skips_prompts_without_a_valid_sample():
    traj = _traj(valid=[1, 1, 0, 0], rewards=[0.0, 1.0, 3.0, 3.0], lengths=[1, 2, 3, 4])
    m = _evaluator(2, 2).metrics(traj)
    assert m["val/score/best_of_n/mean"] == pytest.approx(1.0)
    assert m["val/score/mean"] == pytest.approx(0.5)


def test_a_large_evaluation_runs_in_batches_of_the_same_prompts(monkeypatch):
    # 7 prompts in batches of 3 (3 + 3 + 1) score the prompts a single batch of 7 does; the
    # engine never samples more than 3 prompts at once; groups count across the batches.
    config = _config(interval=1, prompts=7, samples=2, temperature=1.0)
    config.task.name, config.task.options = "addition", {"max_operand": 5}
    config.rollout.max_new_tokens = 3
    whole = Evaluator(build_run(validate_config(config)))
    config.eval.prompts_per_batch = 3
    run = build_run(validate_config(config))
    batched = Evaluator(run)
    # By default a batch has a training rollout's 4 x 4 rows: 8 prompts x 2 samples.
    assert (whole.prompts_per_batch, batched.prompts_per_batch) == (7, 3)
    sizes = []
    complete = batched.engine.complete
    monkeypatch.setattr(
        batched.engine,
        "complete",
        lambda p, k, v, encoded: sizes.append(len(encoded[0])) or complete(p, k, v, encoded),
    )
    params = run.init_params(jax.random.key(0))["policy"]
    traj, info = batched.sample(params, 5)
    assert sizes == [3, 3, 1]
    assert info.prompts == whole.sample(params)[1].prompts  # the same 7 prompts, in order
    assert info.prompts == [p for p in whole._encoded[0] for _ in range(2)]
    np.testing.assert_array_equal(traj.group_ids, np.repeat(np.arange(7), 2))
    np.testing.assert_array_equal(traj.policy_version, np.full(14, 5))
    assert traj.response_tokens.shape == (14, 3) and len(info.completions) == 14
    rewards, _ = run.eval_task.score(info.prompts, info.completions, info.metadata)
    np.testing.assert_allclose(traj.rewards, rewards, rtol=1e-6)
    assert batched.sample(params, 5)[1].completions == info.completions  # the same keys
    metrics = batched.metrics(traj)
    assert metrics["val/score/mean"] == pytest.approx(float(np.mean(rewards)), rel=1e-6)


def test_the_default_batch_holds_a_training_rollouts_rows():
    from novarl_jax.trainer.config import eval_prompts_per_batch

    config = _config(interval=1, prompts=100)  # GRPO, 4 prompts x 4 samples per step
    assert eval_prompts_per_batch(config) == 16
    config.eval.update(samples=3, temperature=1.0)
    assert eval_prompts_per_batch(config) == 5  # 16 // 3
    config.eval.samples = 40
    assert eval_prompts_per_batch(config) == 1
    config.eval.prompts_per_batch = 30
    assert eval_prompts_per_batch(config) == 30
    config.eval.prompts = 20
    assert eval_prompts_per_batch(config) == 20


def test_batched_greedy_evaluation_equals_one_batch():
    # Greedy on a dense policy: batching changes nothing but memory.
    config = _config(interval=1, prompts=5, prompts_per_batch=5)
    run = build_run(validate_config(config))
    params = run.init_params(jax.random.key(1))["policy"]
    one = Evaluator(run).sample(params)
    config.eval.prompts_per_batch = 2
    batched = Evaluator(build_run(validate_config(config))).sample(params)
    for a, b in zip(one[0], batched[0], strict=True):
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), b)
    assert one[1].completions == batched[1].completions


def test_joined_batches_count_invalid_rows_and_groups_across_batches():
    from novarl_jax.rollout.engine import RolloutInfo, Trajectory
    from novarl_jax.trainer.evaluate import _joined

    def part(rows, invalid, tag):
        arrays = {f: np.zeros((rows,), np.float32) for f in Trajectory._fields[:-1]}
        arrays["group_ids"] = np.repeat(np.arange(rows // 2), 2).astype(np.int32)
        info = RolloutInfo(
            prompts=[f"{tag}{i // 2}" for i in range(rows)],
            completions=[""] * rows,
            metadata=[{}] * rows,
            sample_info=[{"row": (tag, i)} for i in range(rows)],
            invalid=invalid,
            task_state={"tag": tag},
        )
        return Trajectory(**arrays), info

    traj, info = _joined([part(4, [1], "a"), part(4, [0, 3], "b"), part(2, [1], "c")], 2)
    np.testing.assert_array_equal(traj.group_ids, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert info.invalid == [1, 4, 7, 9]
    assert info.prompts[4] == "b0" and info.sample_info[9] == {"row": ("c", 1)}
    assert info.task_state == {"tag": "c"} and traj.routing is None


def test_the_evaluation_key_is_the_seed_folded_with_the_eval_tag():
    from novarl_jax.trainer.evaluate import EVAL_KEY_TAG

    config = _config(interval=1, prompts=3)
    config.experiment.seed = 3
    evaluator = Evaluator(build_run(validate_config(config)))
    want = jax.random.fold_in(jax.random.key(3), EVAL_KEY_TAG)
    np.testing.assert_array_equal(jax.random.key_data(evaluator.key), jax.random.key_data(want))
    assert EVAL_KEY_TAG == int.from_bytes(b"eval", "big")


def test_each_evaluation_batch_samples_with_its_own_key(monkeypatch):
    from novarl_jax.trainer import evaluate

    config = _config(interval=1, prompts=7, samples=2, temperature=1.0, prompts_per_batch=3)
    evaluator = Evaluator(build_run(validate_config(config)))
    keys = []
    monkeypatch.setattr(
        evaluator.engine, "complete", lambda p, key, v, encoded: keys.append(key) or len(keys)
    )
    monkeypatch.setattr(evaluate, "_joined", lambda parts, per_batch: parts)
    assert evaluator.sample(None) == [1, 2, 3]  # 3 + 3 + 1 prompts
    # The first batch samples as a rollout with the evaluation key would; the others fold in
    # their batch's index.
    first = jax.random.split(evaluator.key)[1]
    want = [first, jax.random.fold_in(first, 1), jax.random.fold_in(first, 2)]
    data = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys]
    assert data == [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in want]
    assert len(set(data)) == 3


def test_validation_metrics_without_a_valid_sample():
    traj = _traj(valid=[0, 0, 0, 0], rewards=[1.0, 1.0, 1.0, 1.0], lengths=[1, 2, 3, 4])
    m = _evaluator(2, 2).metrics(traj)
    assert np.isnan(m["val/score/mean"]) and np.isnan(m["val/score/std"])
    assert np.isnan(m["val/score/best_of_n/mean"])
    assert np.isnan(m["val/response_length/mean"])  # as the training metric: no sample
