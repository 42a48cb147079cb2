"""Run outputs: metrics.jsonl names, TensorBoard and offline W&B writers, plots, DAPO options."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from quiet_train import train_quietly

from configs import base
from novarl_jax.trainer import loop
from novarl_jax.trainer.config import ConfigError, validate_config
from novarl_jax.trainer.metrics import MetricsWriter, read_metrics, wandb_run_id


def _tiny(steps=2, **sections):
    c = base.get_config()
    c.experiment.steps = steps
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 4
    c.logging.progress = False
    for path, value in sections.items():
        section, key = path.split("__")
        c[section][key] = value
    return c


def _train(config, workdir):
    lines = []
    return train_quietly(config, workdir, log=lines.append), lines


VERL_NAMES = (
    "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm",
    "critic/score/mean", "critic/score/std", "response_length/mean", "timing_s/gen",
    "timing_s/update", "perf/throughput", "actor/lr",
)  # fmt: skip


def test_the_learning_rate_is_logged_as_the_schedule_reaches_it(tmp_path):
    config = _tiny(steps=2, optim__schedule="linear", optim__warmup_steps=0,
                   optim__learning_rate=1e-3, optim__end_learning_rate=0.0)  # fmt: skip
    train_quietly(config, tmp_path, log=lambda _: None)
    rows = read_metrics(tmp_path)
    total = 2 * config.train.epochs * config.train.minibatches  # the decay: the whole run
    for r in rows:
        last = r["train/optimizer_step"] - 1  # update k runs at lr * (1 - k / total)
        assert r["actor/lr"] == pytest.approx(1e-3 * (1 - last / total), rel=1e-5)
    assert rows[1]["actor/lr"] < rows[0]["actor/lr"]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_metrics_jsonl_has_verl_names(tmp_path, algorithm, monkeypatch):
    penalties = []  # each step's (token rewards, response mask, valid) behind the KL metric
    reward_kl_penalty = loop.reward_kl_penalty

    def recorded(token_rewards, mask, valid, coef):
        penalties.append((token_rewards, mask, valid))
        return reward_kl_penalty(token_rewards, mask, valid, coef)

    monkeypatch.setattr(loop, "reward_kl_penalty", recorded)
    _, lines = _train(_tiny(experiment__algorithm=algorithm), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for name in VERL_NAMES:
        assert all(np.isfinite(r[name]) for r in rows), name
    if algorithm == "ppo":
        assert all(np.isfinite(r["critic/vf_loss"]) for r in rows)
        coef = _tiny().ppo.reward_kl_coef
        assert all(r["actor/reward_kl_penalty_coeff"] == pytest.approx(coef) for r in rows)
        assert len(penalties) == 2
        for r, (token_rewards, mask, valid) in zip(rows, penalties, strict=True):
            valid = valid > 0
            kl = -(token_rewards * mask).sum(1) / coef / mask.sum(1)
            assert r["actor/reward_kl_penalty"] == pytest.approx(kl[valid].mean(), rel=1e-5)
            # verl's critic/rewards: the score plus the summed KL penalty in the token rewards.
            want = r["critic/score/mean"] + token_rewards.sum(1)[valid].mean()
            assert r["critic/rewards/mean"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert np.abs(penalties[-1][0]).max() > 0  # so the two differ
        assert all(" kl " in line for line in lines if line.startswith("step "))
    else:
        assert all(np.isfinite(r["actor/kl_loss"]) for r in rows)
    done = next(line for line in lines if line.startswith("done: 2 steps"))
    scores = [r["critic/score/mean"] for r in rows]
    assert (
        f"last-step score {scores[-1]:.3f}, mean of the last 2 steps {np.mean(scores):.3f}, "
        in done
    ), done
    assert (tmp_path / "plots" / "training.png").stat().st_size > 1000


def test_plot_command(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 4):
        writer.write(step, {"critic/score/mean": 0.1 * step, "actor/entropy": 1.0 / step})
    writer.close()
    out = subprocess.run(
        [sys.executable, "-m", "novarl_jax.plot", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "plots" / "training.png").stat().st_size > 1000
    missing = subprocess.run(
        [sys.executable, "-m", "novarl_jax.plot", str(tmp_path / "nope")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2 and "metrics.jsonl" in missing.stderr


def test_plot_panels_follow_the_logged_metric_names():
    from novarl_jax.plot import choose_panels

    names = ("critic/score/mean", "actor/kl_loss", "actor/entropy", "actor/pg_loss",
             "critic/vf_loss", "moe/dropped_fraction", "actor/ppo_kl")  # fmt: skip
    rows = [{"step": 1, **dict.fromkeys(names, 0.5)}, {"step": 2, "val/score/mean": 0.25}]
    assert choose_panels(rows) == [
        ("reward", "critic/score/mean"),
        ("validation score", "val/score/mean"),
        ("KL to reference", "actor/kl_loss"),
        ("KL to the sampling policy", "actor/ppo_kl"),
        ("entropy", "actor/entropy"),
        ("policy loss", "actor/pg_loss"),
        ("value loss", "critic/vf_loss"),
        ("dropped fraction", "moe/dropped_fraction"),
    ]
    assert choose_panels([{"step": 1, "actor/entropy": 1.0}]) == [("entropy", "actor/entropy")]
    # Without a reference (grpo.beta=0) no panel calls the update's KL a KL to the reference.
    assert choose_panels([{"step": 1, "actor/ppo_kl": 0.1}]) == [
        ("KL to the sampling policy", "actor/ppo_kl")
    ]


def test_the_kl_panels_plot_the_reward_kl_penalty_and_the_kl_loss():
    from novarl_jax.plot import choose_panels

    # PPO with a KL penalty in the reward logs no actor/kl_loss; with ppo.kl_coef, both.
    assert choose_panels([{"step": 1, "actor/reward_kl_penalty": 0.1}]) == [
        ("KL to reference in the reward", "actor/reward_kl_penalty")
    ]
    assert choose_panels([{"step": 1, "actor/reward_kl_penalty": 0.1, "actor/kl_loss": 0.2}]) == [
        ("KL to reference", "actor/kl_loss"),
        ("KL to reference in the reward", "actor/reward_kl_penalty"),
    ]


def test_a_metric_logged_only_as_nan_gets_no_panel(tmp_path, capsys):
    from novarl_jax import plot

    rows = [{"step": 1, "actor/kl_loss": "nan", "actor/entropy": 1.0}]
    assert plot.choose_panels(rows) == [("entropy", "actor/entropy")]
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"critic/score/mean": float("nan")})  # written as "nan"
    writer.close()
    assert plot.main(["plot", str(tmp_path)]) == 2
    assert "has no finite value of any plotted metric" in capsys.readouterr().err


def _drawn(workdir, monkeypatch):
    """Draws ``workdir``'s curves: {panel title: [(x, y) of each line]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from novarl_jax import plot

    axes_drawn = []
    subplots = plt.subplots

    def recording(*args, **kwargs):
        fig, axes = subplots(*args, **kwargs)
        axes_drawn.extend(axes.flat)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", recording)
    assert os.path.isfile(plot.plot_training(str(workdir)))
    return {
        ax.get_title(): [
            ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for line in ax.get_lines()
        ]
        for ax in axes_drawn
        if ax.get_visible()
    }


def test_each_panel_draws_its_metric_against_the_logged_steps(tmp_path, monkeypatch):
    writer = MetricsWriter(str(tmp_path))
    writer.write(2, {"critic/score/mean": 0.25, "actor/entropy": 0.75})  # no step 1 logged
    writer.write(4, {"critic/score/mean": 0.5, "actor/entropy": 0.5, "val/score/mean": 0.125})
    writer.write(6, {"critic/score/mean": 0.75, "actor/entropy": 0.25, "val/score/mean": 0.375})
    writer.close()
    assert _drawn(tmp_path, monkeypatch) == {
        "reward\n(critic/score/mean)": [([2, 4, 6], [0.25, 0.5, 0.75])],
        "validation score\n(val/score/mean)": [([4, 6], [0.125, 0.375])],
        "entropy\n(actor/entropy)": [([2, 4, 6], [0.75, 0.5, 0.25])],
    }


def test_non_finite_values_are_left_out_of_a_curve(tmp_path, monkeypatch):
    writer = MetricsWriter(str(tmp_path))
    for step, score in ((1, 0.25), (2, float("nan")), (3, 0.75)):
        writer.write(step, {"critic/score/mean": score})
    writer.close()
    assert _drawn(tmp_path, monkeypatch) == {
        "reward\n(critic/score/mean)": [([1, 3], [0.25, 0.75])]
    }


def test_an_empty_metrics_file_is_said_to_have_no_rows(tmp_path, capsys):
    from novarl_jax import plot

    (tmp_path / "metrics.jsonl").write_text("")
    assert plot.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"novarl_jax.plot: error: {tmp_path / 'metrics.jsonl'} has no rows to plot\n"


def test_truncate_after_keeps_earlier_rows(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, {"x": float(step), "bad": float("nan")})
    writer.close()
    MetricsWriter(str(tmp_path)).truncate_after(3)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["bad"] == "nan"  # non-finite values stay valid JSON


def test_each_row_is_on_disk_before_the_writer_closes(tmp_path):
    # A process killed mid-run (SIGKILL, out of memory) never reaches close().
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"x": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "x": 1.0}]
    writer.write(2, {"x": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    writer.close()


def test_a_row_cut_off_by_a_killed_process_is_dropped_on_resume(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 4):
        writer.write(step, {"x": float(step)})
    writer.close()
    path = tmp_path / "metrics.jsonl"
    whole = path.read_text()
    with open(path, "a") as f:
        f.write('{"step": 4, "actor/gr')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the plot reads on
    writer = MetricsWriter(str(tmp_path))
    writer.truncate_after(3)
    assert path.read_text() == whole
    # A whole last row whose newline was cut off: kept, and the next row starts a new line.
    path.write_text(whole.rstrip("\n"))
    writer.truncate_after(3)
    writer.write(4, {"x": 4.0})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    # Damage before the last line is reported, not dropped.
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON row"):
        read_metrics(tmp_path)
    MetricsWriter(str(tmp_path)).truncate_after(2)
    assert path.read_text() == '{"step": 1}\n{"ste\n{"step": 2}\n'


def test_tensorboard_writer(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    writer.write(1, {"critic/score/mean": 0.5})
    writer.close()
    events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_tensorboard_points_reach_the_disk_within_seconds_not_at_close(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    try:
        for step in (1, 2, 3):
            writer.write(step, {"x": float(step)})
        deadline = time.monotonic() + 20
        while True:  # the writer's thread may still be writing: read what is whole
            got = _tensorboard_scalars(tmp_path / "tensorboard", "x")
            if [s for s, _ in got] == [1, 2, 3] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == [(1, 1.0), (2, 2.0), (3, 3.0)]  # read before close()
    finally:
        writer.close()


def _tensorboard_scalars(directory, tag):
    """``(step, value)`` of ``tag`` as TensorBoard reads the event files: in file order, a
    SessionLog START at step s discards the points read before it at steps >= s."""
    import struct

    from tensorboardX.proto import event_pb2

    points = []
    for name in sorted(os.listdir(directory)):
        data, i = (directory / name).read_bytes(), 0
        while i + 12 <= len(data):  # TFRecord: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[i : i + 8])
            if i + 16 + n > len(data):
                break  # a record the writer's thread has not finished
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                points = [p for p in points if p[0] < event.step]
            points += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return points


def test_tensorboard_gets_non_finite_values_and_forgets_steps_a_resume_redoes(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": float("nan") if step == 2 else float(step)})
    writer.close()
    got = _tensorboard_scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [1, 2, 3] and np.isnan(got[1][1])
    # A resume from step 2's checkpoint redoes step 3: TensorBoard keeps the new value only.
    time.sleep(1.1)  # a later process: event files are named by the second they start
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    writer.truncate_after(2)
    writer.write(3, {"train/loss": 30.0})
    writer.close()
    got = _tensorboard_scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [1, 2, 3] and got[2] == (3, 30.0)
    # A resume that writes no step (the checkpoint is already at experiment.steps) still
    # forgets the later steps.
    time.sleep(1.1)
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    writer.truncate_after(1)
    writer.close()
    assert [s for s, _ in _tensorboard_scalars(tmp_path / "tensorboard", "train/loss")] == [1]


def test_plot_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from novarl_jax import plot

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "timing_s/gen": 0.1}\n')
    assert plot.main(["plot", str(tmp_path)]) == 2  # no panel to draw
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no finite value of any plotted metric" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
    usage = "usage: python -m novarl_jax.plot WORKDIR [--out=DIR]\n"
    for args in (["--help"], ["-h"]):
        assert plot.main(["plot", *args]) == 0
        assert capsys.readouterr().out.startswith(usage)
    for args in ([], ["--verbose"], ["a", "b"], ["a", "--out="], ["a", "--out=x", "--out=y"]):
        assert plot.main(["plot", *args]) == 2
        assert capsys.readouterr().err == usage
    monkeypatch.undo()  # matplotlib back
    # Files where directories belong, and the reverse: one line each (they were tracebacks).
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "critic/score/mean": 0.5}\n')
    (tmp_path / "plots").write_text("")
    a_file = tmp_path / "metrics.jsonl"
    for workdir, want in (
        (tmp_path, f"{tmp_path}/plots: File exists"),
        (a_file, f"{a_file}/metrics.jsonl: Not a directory"),
        (tmp_path / "missing", f"{tmp_path}/missing/metrics.jsonl: No such file or directory"),
    ):
        assert plot.main(["plot", str(workdir)]) == 2
        assert capsys.readouterr().err == f"novarl_jax.plot: error: {want}\n"
    # Elsewhere with --out (a workdir this user cannot write); a permission error says so.
    assert plot.main(["plot", str(tmp_path), f"--out={tmp_path / 'mine'}"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'mine' / 'training.png'}\n"
    assert (tmp_path / "mine" / "training.png").stat().st_size > 0

    def refused(path, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(plot.os, "makedirs", refused)
    assert plot.main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"novarl_jax.plot: error: {tmp_path}/plots: Permission denied; pass --out=DIR to write "
        "the plot elsewhere\n"
    )


def test_a_plot_that_cannot_be_drawn_does_not_fail_the_run(tmp_path, capsys):
    config = _tiny(steps=1)
    config.logging.plot = True
    lines = []
    import novarl_jax.plot as plot

    def broken(workdir):
        raise ValueError("metrics.jsonl:2: not a JSON row")

    original = plot.plot_training
    plot.plot_training = broken
    try:
        loop.train(config, str(tmp_path), log=lines.append)
    finally:
        plot.plot_training = original
    assert "plot: skipped (metrics.jsonl:2: not a JSON row)" in lines


def test_wandb_offline_writer(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(str(tmp_path / "run"), wandb=True, run_config={"seed": 0})
    writer.write(1, {"critic/score/mean": 0.5})
    writer.close()
    offline = [d for d in os.listdir(tmp_path / "run" / "wandb") if d.startswith("offline-run")]
    assert offline


def test_missing_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(RuntimeError, match=r"logging.tensorboard=True needs the tensorboard extra"):
        MetricsWriter(str(tmp_path), tensorboard=True)
    # The config check names the key before anything is built.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r'^logging.wandb: needs the wandb extra .*".\[wandb\]"'):
        validate_config(_tiny(logging__wandb=True))


def test_wandb_run_id_is_one_per_workdir(tmp_path):
    a, b = wandb_run_id(str(tmp_path / "a" / "copy")), wandb_run_id(str(tmp_path / "b" / "copy"))
    assert a.startswith("copy-") and b.startswith("copy-") and a != b
    assert wandb_run_id(str(tmp_path / "a" / "copy")) == a  # a resume finds its run


def test_progress_line_shows_kl_only_when_logged():
    metrics = {"critic/score/mean": 0.5, "perf/total_num_tokens": 40.0, "timing_s/step": 2.0,
               "perf/throughput": 2.5, "actor/entropy": 1.0}  # fmt: skip
    assert " kl " not in loop._progress_line(1, 2, metrics)
    assert "tok/s 20" in loop._progress_line(1, 2, metrics)  # the whole run's, not per device
    assert " kl 0.0100 " in loop._progress_line(1, 2, {**metrics, "actor/kl_loss": 0.01})


@pytest.mark.slow
def test_dapo_options_and_router_replay(tmp_path):
    config = _tiny(
        steps=2, experiment__num_experts=4, dapo__dynamic_sampling=True,
        dapo__overlong_buffer=2, dapo__mask_truncated=True, train__router_replay=True,
    )  # fmt: skip
    _train(config, tmp_path)
    rows = read_metrics(tmp_path)
    for row in rows:
        assert 0 <= row["dapo/extra_batches"] <= config.dapo.max_extra_batches
        # Masked: the valid samples that ran to max_new_tokens, none of whose tokens train.
        assert row["dapo/masked_samples"] == 8 * row["response_length/clip_ratio"]
        assert row["train/response_tokens"] <= 4 * 8 * (1 - row["response_length/clip_ratio"])
        assert 0 <= row["dapo/kept_groups"] <= config.rollout.prompts_per_step
        # Overlong shaping only lowers rewards.
        assert row["critic/rewards/mean"] <= row["critic/score/mean"] + 1e-6
        assert np.isfinite(row["moe/dropped_fraction"])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_a_step_with_every_completion_masked_says_it_trained_nothing(tmp_path, monkeypatch):
    # A policy that never stops: every completion runs to max_new_tokens and is masked.
    init = loop.Trainer.__init__

    def never_stopping(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.engine.stop_token_ids = ()

    monkeypatch.setattr(loop.Trainer, "__init__", never_stopping)
    _, lines = _train(_tiny(steps=1, dapo__mask_truncated=True), tmp_path)
    row = read_metrics(tmp_path)[0]
    assert row["train/response_tokens"] == 0 and row["dapo/masked_samples"] == 8  # 2 x 4
    assert row["response_length/clip_ratio"] == 1.0
    assert (
        "step 1: nothing was trained: dapo.mask_truncated masked every completion with a "
        "finite reward (8 ran to rollout.max_new_tokens; 0 had a reward that was not finite)"
        in lines
    )
    # Steps that train nothing in a row stop the run (it finished with score nan, exit 0),
    # counted across a resume.
    with pytest.raises(loop.TrainingError) as info:  # resumes at step 1, whose streak is 1
        _train(_tiny(steps=5, dapo__mask_truncated=True), tmp_path)
    assert str(info.value).startswith(
        "stopped at step 3: 3 consecutive steps trained nothing (the last: dapo.mask_truncated "
        "masked every completion with a finite reward (8 ran to rollout.max_new_tokens; 0 had a "
        "reward that was not finite); train.max_consecutive_skips=3); the last checkpoint (step "
    )


def test_steps_that_train_nothing_stop_the_run_only_in_a_row(tmp_path, monkeypatch):
    record = loop.Session.record

    def every_other_step_empty(self, i, state, metrics, host, rollout=None):
        if i % 2 == 0:  # steps 1, 3, 5 trained nothing
            metrics = {**metrics, "train/response_tokens": 0}
        return record(self, i, state, metrics, host, rollout)

    monkeypatch.setattr(loop.Session, "record", every_other_step_empty)
    _, lines = _train(_tiny(steps=5, train__max_consecutive_skips=2), tmp_path)
    assert sum(line.startswith("step ") and "nothing was trained" in line for line in lines) == 3
    assert len(read_metrics(tmp_path)) == 5


def test_overlong_shaping_matches_numpy():
    import jax.numpy as jnp

    from novarl_jax.trainer.steps import shaped_rewards

    rewards = np.array([1.0, 1.0, 0.5, 0.0, 1.0], np.float32)
    lengths = np.array([0, 5, 6, 7, 8])
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int32)

    def reference(r, n, max_new=8, buffer=3, penalty=0.5):
        start = max_new - buffer
        return r + (min((start - n) / buffer, 0.0) * penalty)

    got = np.asarray(
        jax.jit(
            lambda r, m: shaped_rewards(
                r, m, max_new_tokens=8, overlong_buffer=3, overlong_penalty=0.5
            )
        )(jnp.asarray(rewards), jnp.asarray(mask))
    )
    expected = [reference(float(r), int(n)) for r, n in zip(rewards, lengths, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[-1] == pytest.approx(0.5)  # full length: the whole penalty
    unshaped = shaped_rewards(
        jnp.asarray(rewards), jnp.asarray(mask), max_new_tokens=8, overlong_buffer=0,
        overlong_penalty=0.5,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(unshaped), rewards)


def test_a_fresh_start_replaces_the_rows_of_a_run_that_left_no_checkpoint(tmp_path):
    # The earlier run stopped before its first checkpoint: its steps are redone from 0.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (tmp_path / "samples.jsonl").write_text('{"step": 1}\n')
    config = _tiny(steps=1, logging__samples=1, logging__plot=False)
    _train(config, tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert "critic/score/mean" in read_metrics(tmp_path)[0]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and "completion" in samples[0]


def test_reward_kl_penalty_is_a_per_sample_token_mean_over_valid_samples():
    coef = 0.5
    kl = np.array([[0.2, 0.4, 9.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    token_rewards = -coef * kl * mask
    value = loop.reward_kl_penalty(token_rewards, mask, np.array([1.0, 1.0, 0.0]), coef)
    assert value == pytest.approx((0.3 + 1.0) / 2)  # the invalid third sample is left out
    assert np.isnan(loop.reward_kl_penalty(token_rewards, mask, np.zeros(3), coef))
    # A valid sample whose tokens are all masked (dapo.mask_truncated) is not a KL of 0.
    mask[1] = 0
    value = loop.reward_kl_penalty(token_rewards * mask, mask, np.ones(3), coef)
    assert value == pytest.approx((0.3 + 5.0) / 2)


def test_many_panels_wrap_into_rows_of_four_with_whole_step_ticks(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from novarl_jax import plot

    writer = MetricsWriter(str(tmp_path))
    names = ("critic/score/mean", "actor/kl_loss", "actor/reward_kl_penalty", "actor/entropy",
             "actor/pg_loss", "critic/vf_loss")  # fmt: skip
    for step in (1, 2):
        writer.write(step, dict.fromkeys(names, 0.5 * step))
    writer.close()
    made = []
    subplots = plt.subplots

    def recording(*args, **kwargs):
        fig, axes = subplots(*args, **kwargs)
        made.append((args, axes))
        return fig, axes

    monkeypatch.setattr(plt, "subplots", recording)
    plot.plot_training(str(tmp_path))
    ((shape, axes),) = made
    assert shape == (2, 4)
    assert [ax.get_visible() for ax in axes.flat] == [True] * 6 + [False] * 2
    for low, high in ((1, 2), (9.945, 10.055)):  # the second: a panel of one point, step 10
        ticks = axes.flat[0].xaxis.get_major_locator().tick_values(low, high)
        assert all(float(t).is_integer() for t in ticks), ticks


def test_the_closing_scores_average_the_finite_scores_of_the_last_ten_steps(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step, score in enumerate([0.0] * 5 + [1, float("nan"), 0.5, 1.0, 0.5, 0.5, 1.0], 1):
        writer.write(step, {"critic/score/mean": score})
    writer.close()
    text = loop._scores({"critic/score/mean": 1.0, "val/score/mean": 0.75}, str(tmp_path))
    assert text == (
        "last-step score 1.000, mean of the last 10 steps (9 finite) 0.500, validation 0.750"
    )
    assert loop._scores({"critic/score/mean": 0.25}, str(tmp_path / "none")) == (
        "last-step score 0.250"
    )
