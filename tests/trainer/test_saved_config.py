"""A resumed run's config is checked against the one its workdir started with."""

import json

import pytest
from quiet_train import train_quietly

from configs import base, copy
from novarl_jax.trainer import saved_config
from novarl_jax.trainer.checkpoint import CheckpointMismatchError
from novarl_jax.trainer.config import ConfigError
from novarl_jax.trainer.loop import train
from novarl_jax.trainer.saved_config import (
    ConfigChangedError,
    check_resume_config,
    config_changes,
    may_change,
    write_config,
)


def test_changes_are_listed_and_only_run_changing_keys_block(tmp_path):
    config = copy.get_config()
    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert config_changes(saved, config) == []
    assert saved["task"]["options"]["max_length"] == 1  # free-form sections as written
    config.experiment.steps += 5
    config.experiment.tensor_parallel_size = 2
    config.logging.progress = False
    lines = []
    changes = check_resume_config(str(tmp_path), config, log=lines.append)  # all allowed
    assert [key for key, *_ in changes] == [
        "experiment.steps", "experiment.tensor_parallel_size", "logging.progress",
    ]  # fmt: skip
    assert lines == [
        "resuming with a changed config: experiment.steps 60 -> 65, "
        "experiment.tensor_parallel_size 1 -> 2, logging.progress True -> False"
    ]
    config.optim.learning_rate = 0.5
    config.task.options.max_length = 2
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(tmp_path), config)
    assert info.value.key == "optim.learning_rate"
    assert "optim.learning_rate 0.003 -> 0.5, task.options.max_length 1 -> 2" in str(info.value)
    assert "--allow_config_change" in str(info.value)
    lines = []
    check_resume_config(str(tmp_path), config, allow_change=True, log=lines.append)
    assert len(lines) == 1 and lines[0].endswith(
        "logging.progress True -> False, optim.learning_rate 0.003 -> 0.5, "
        "task.options.max_length 1 -> 2"
    )
    assert may_change("checkpoint.keep") and not may_change("experiment.seed")
    assert check_resume_config(str(tmp_path / "elsewhere"), config) == []  # no config.json
    (tmp_path / "elsewhere" / "checkpoints" / "4").mkdir(parents=True)  # but checkpoints
    lines = []
    assert check_resume_config(str(tmp_path / "elsewhere"), config, log=lines.append) == []
    assert lines == [
        f"warning: {tmp_path}/elsewhere/config.json is missing: the config is not compared with "
        "the one the checkpoints were trained with"
    ]


def _refusal(workdir, config, **kwargs) -> ConfigChangedError:
    """The error a resume of ``config`` in ``workdir`` is refused with."""
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(workdir), config, **kwargs)
    return info.value


def test_more_steps_may_not_silently_stretch_a_decaying_learning_rate(tmp_path):
    config = copy.get_config()
    config.optim.schedule = "cosine"  # decay_steps=0: the whole run, 60 steps x 4 updates
    write_config(str(tmp_path), config)
    config.experiment.steps = 120
    error = _refusal(tmp_path, config)
    assert error.key == "optim.decay_steps"
    assert "optim.decay_steps '240 updates' -> '480 updates'" in str(error)
    assert (
        "set optim.decay_steps=240 to keep the one the checkpoint was trained on (its decay ends "
        "at update 240; later updates train at optim.end_learning_rate=0.0)"
    ) in str(error)
    config.optim.decay_steps = 240  # the same schedule, written out
    lines = []
    check_resume_config(str(tmp_path), config, log=lines.append)
    assert "optim.decay_steps 0 -> 240" in lines[0] and "experiment.steps 60 -> 120" in lines[0]
    config.optim.decay_steps = 300  # a different one
    with pytest.raises(ConfigChangedError, match="'240 updates' -> '300 updates'"):
        check_resume_config(str(tmp_path), config)
    # A saved config that does not say its decay length (written before these keys existed)
    # cannot be assumed to match.
    config.optim.decay_steps = 0
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["optim"]["decay_steps"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigChangedError, match=r"'None updates' -> '480 updates'") as info:
        check_resume_config(str(tmp_path), config, allow_change=False)
    assert "set optim.decay_steps=" not in str(info.value)  # no old length to advise
    # A constant learning rate has nothing to stretch.
    config = copy.get_config()
    write_config(str(tmp_path), config)
    config.experiment.steps = 120
    assert [k for k, *_ in check_resume_config(str(tmp_path), config)] == ["experiment.steps"]


def test_the_decay_length_a_resume_keeps_counts_from_the_warmups_end(tmp_path):
    config = copy.get_config()
    config.optim.schedule = "linear"
    config.optim.warmup_steps = 40  # decay_steps=0: the 240 updates less the warmup
    write_config(str(tmp_path), config)
    config.experiment.steps = 120
    with pytest.raises(ConfigChangedError, match=r"set optim.decay_steps=200 to keep .*\(its "
                       r"decay ends at update 240; "):  # fmt: skip
        check_resume_config(str(tmp_path), config)
    config.optim.decay_steps = 200
    assert check_resume_config(str(tmp_path), config)  # allowed, and logged
    # A config.json written before the warmup was left out of the decay: its run decayed over
    # all 240 updates, so the same config now would shorten the decay; refused, and the hint
    # gives the length that keeps it.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["_how_read"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config.experiment.steps, config.optim.decay_steps = 60, 0
    with pytest.raises(ConfigChangedError, match=r"'240 updates' -> '200 updates'.* set "
                       r"optim.decay_steps=240 to keep"):  # fmt: skip
        check_resume_config(str(tmp_path), config)
    config.optim.decay_steps = 240
    assert [k for k, *_ in check_resume_config(str(tmp_path), config)] == ["optim.decay_steps"]


def _config(steps, **experiment):
    c = base.get_config()
    c.experiment.steps = steps
    c.experiment.update(experiment)
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 4
    c.checkpoint.interval = 1
    c.logging.plot = False
    c.logging.progress = False
    return c


@pytest.mark.slow
def test_a_resume_that_changes_the_run_is_refused_unless_allowed(tmp_path):
    train_quietly(_config(1), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["experiment"]["steps"] == 1
    with pytest.raises(ConfigChangedError, match=r"^experiment\.algorithm: the run in "):
        train_quietly(_config(2, algorithm="ppo"), tmp_path)
    lines = []
    result = train(_config(2, seed=3), str(tmp_path), log=lines.append, allow_config_change=True)
    assert result["resumed_from"] == 1
    changed = "resuming with a changed config: experiment.seed 0 -> 3, experiment.steps 1 -> 2"
    assert changed in lines
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["experiment"]["steps"], saved["experiment"]["seed"]) == (2, 3)
    # A task alphabet of the same size with other characters: the checkpoint's shapes fit,
    # its ids would not; refused even with --allow_config_change, naming the key.
    assert json.loads((tmp_path / "tokenizer_vocab.json").read_text())["vocabulary"]["a"] == 5
    other = _config(2, seed=3)
    other.task.options.symbols = "xbcde"  # alphabet ' :abcdersv' -> ' :bcdersvx'
    with pytest.raises(
        ConfigChangedError, match=r"^task\.options\.symbols: the tokenizer gives other ids .*"
        r"\('a' 5 -> None, 'b' 6 -> 5, 'c' 7 -> 6, 'd' 8 -> 7 \(and 4 more\); its record of 10 "
    ):  # fmt: skip
        train(other, str(tmp_path), log=lambda _: None, allow_config_change=True)
    lines = []
    train(_config(2, seed=3), str(tmp_path), log=lines.append)
    assert any(line.startswith("nothing to train: the checkpoint is at step 2") for line in lines)
    # An allowed change that the checkpoint itself refuses (another model) leaves the record
    # of the config it was trained with, so that config still resumes.
    bigger = _config(3, seed=3)
    bigger.model.hidden_size *= 2
    with pytest.raises(
        CheckpointMismatchError, match=r"if one of the allowed config changes \(model\.hidden_size "
    ):
        train(bigger, str(tmp_path), log=lambda _: None, allow_config_change=True)
    assert json.loads((tmp_path / "config.json").read_text()) == saved
    # Turning clipping off drops its part of the optimizer state: the key is named.
    unclipped = _config(3, seed=3)
    unclipped.optim.max_grad_norm = 0.0
    with pytest.raises(CheckpointMismatchError) as info:
        train(unclipped, str(tmp_path), log=lambda _: None, allow_config_change=True)
    assert str(info.value).endswith(
        "; if one of the allowed config changes (optim.max_grad_norm 1.0 -> 0.0) changes what "
        "the state holds (a model size, optim.max_grad_norm to or from 0), undo it"
    )
    assert json.loads((tmp_path / "config.json").read_text()) == saved


def test_may_change_covers_every_documented_key_and_nothing_else():
    allowed = [
        "experiment.steps", "experiment.world_size", "experiment.tensor_parallel_size",
        "experiment.pipeline_parallel_size", "experiment.expert_parallel_size",
        "experiment.num_microbatches", "experiment.rollout_workers",
        "experiment.rollout_queue_size", "train.micro_batches",
        "train.gradient_checkpointing", "checkpoint.keep",
        "logging.samples", "eval.prompts",
    ]  # fmt: skip
    assert [k for k in allowed if not saved_config.may_change(k)] == []
    blocked = [
        "experiment.seed", "experiment.algorithm", "ppo.kl_coef", "optim.learning_rate",
        "rollout.temperature", "rollout.max_new_tokens", "train.epochs", "train.minibatches",
        "experiment.steps_extra", "evaluation.x", "grpo.clip_ratio_low",
        "grpo.advantage_estimator", "dapo.dynamic_sampling",
    ]  # fmt: skip
    assert [k for k in blocked if saved_config.may_change(k)] == []


def test_config_changes_lists_keys_only_in_the_saved_config():
    from configs import copy

    config = copy.get_config()
    saved = saved_config._plain(config)
    saved["optim"]["old_option"] = 1
    changes = saved_config.config_changes(saved, config)
    assert changes == [("optim.old_option", 1, None)]


def test_a_key_added_since_the_workdir_was_written_counts_as_its_default(tmp_path):
    """A workdir from before ``model.compute_dtype`` existed trained in float32: resuming it
    with the default is no change, with bfloat16 it is one."""
    config = copy.get_config()
    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["compute_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert config_changes(saved, config) == [("model.compute_dtype", None, "float32")]
    assert check_resume_config(str(tmp_path), config) == []
    config.model.compute_dtype = "bfloat16"
    with pytest.raises(ConfigChangedError, match="model.compute_dtype 'float32' -> 'bfloat16'"):
        check_resume_config(str(tmp_path), config)


def _reward_a(prompts, completions, metadata):
    return [0.0] * len(prompts)


def _reward_b(prompts, completions, metadata):
    return [1.0] * len(prompts)


def test_a_function_in_the_config_is_recorded_by_name_not_by_address(tmp_path):
    """A reward given as a function object: its text holds a memory address that differs in
    every process, which made every resume look like a config change."""
    config = copy.get_config()
    config.task.options.reward = _reward_a
    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    name = f"{__name__}:_reward_a"
    assert saved["task"]["options"]["reward"] == name
    # What another process sees: the same name, whatever the address.
    assert config_changes(saved, config) == []
    config.task.options.reward = _reward_b
    assert config_changes(saved, config) == [("task.options.reward", name, f"{__name__}:_reward_b")]
    assert saved_config._describe(object()) == "<object object>"


def test_a_damaged_record_is_named_not_a_traceback(tmp_path):
    config = copy.get_config()
    (tmp_path / "config.json").write_text('{"experim')
    with pytest.raises(ConfigError, match=r"config\.json: cannot be read .*delete it to resume"):
        check_resume_config(str(tmp_path), config)
    write_config(str(tmp_path), config)
    (tmp_path / "model_config.json").write_text("[]")
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.config import validate_config

    policy = build_run(validate_config(config)).model.policy
    with pytest.raises(ConfigError, match=r"model_config\.json: does not hold a JSON object"):
        check_resume_config(str(tmp_path), config, model=policy)


def test_a_refusal_lists_four_changed_keys_and_counts_the_rest(tmp_path):
    config = copy.get_config()
    write_config(str(tmp_path), config)
    config.experiment.seed = 1
    config.optim.learning_rate = 0.5
    config.ppo.kl_coef = 0.1
    config.rollout.max_new_tokens = 4
    config.rollout.temperature = 0.5  # the fifth in key order: counted, not listed
    config.train.epochs = 3
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(tmp_path), config)
    message = str(info.value)
    assert (
        "experiment.seed 0 -> 1, optim.learning_rate 0.003 -> 0.5, ppo.kl_coef 0.0 -> 0.1, "
        "rollout.max_new_tokens 3 -> 4 (and 2 more) (its config: "
    ) in message
    assert "rollout.temperature" not in message and "train.epochs" not in message


def test_checkpoint_steps_are_in_numeric_order(tmp_path):
    for name in ("10", "9", "100"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "11").write_text("")  # a file, not a finished step
    (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp").mkdir()
    assert saved_config.checkpoint_steps(str(tmp_path)) == [9, 10, 100]
    assert saved_config.has_checkpoint(str(tmp_path))
    assert saved_config.checkpoint_steps(str(tmp_path / "elsewhere")) == []


def test_an_allowed_change_of_the_model_is_logged(tmp_path):
    import dataclasses

    from novarl_jax.models.config import ModelConfig

    config = copy.get_config()
    model = ModelConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    write_config(str(tmp_path), config, model=model)
    changed = dataclasses.replace(model, rope_theta=500000.0)
    lines = []
    assert check_resume_config(str(tmp_path), config, model=model, log=lines.append) == []
    assert lines == []
    with pytest.raises(ConfigChangedError, match="rope_theta 10000.0 -> 500000.0"):
        check_resume_config(str(tmp_path), config, model=changed, log=lines.append)
    check_resume_config(str(tmp_path), config, allow_change=True, model=changed, log=lines.append)
    assert len(lines) == 1
    assert lines[0].startswith("resuming with a changed model: ")
    assert "rope_theta 10000.0 -> 500000.0" in lines[0]


def test_a_tokenizer_that_gives_a_recorded_token_another_id_is_refused(tmp_path):
    """Even with changes allowed: the checkpoint's ids would mean other tokens. New tokens
    may be added; a record lacking, or no tokenizer given, compares nothing."""
    from novarl_jax.rollout.tokenizers import ByteTokenizer, CharTokenizer

    config = copy.get_config()
    write_config(str(tmp_path), config, tokenizer=CharTokenizer("abc"))
    record = json.loads((tmp_path / "tokenizer_vocab.json").read_text())
    assert record == {
        "tokenizer": "CharTokenizer",
        "special_ids": {"bos_id": 1, "eos_id": 2, "pad_id": 0},
        "vocabulary": {"a": 3, "b": 4, "c": 5},
    }
    assert check_resume_config(str(tmp_path), config, tokenizer=CharTokenizer("abcd")) == []
    assert check_resume_config(str(tmp_path), config) == []  # no tokenizer: nothing compared
    for allow in (False, True):
        with pytest.raises(ConfigChangedError) as info:
            check_resume_config(
                str(tmp_path), config, tokenizer=CharTokenizer("acb"), allow_change=allow
            )
        assert info.value.key == "task.name"
        assert str(info.value) == (
            f"task.name: the tokenizer gives other ids than the one the run in {tmp_path} "
            f"trained with ('b' 4 -> 5, 'c' 5 -> 4; its record of 3 tokens: "
            f"{tmp_path}/tokenizer_vocab.json), so the trained policy would read them as other "
            "tokens; use the run's tokenizer (task alphabet or tokenizer.json), or delete "
            f"{tmp_path}/tokenizer_vocab.json to go on anyway"
        )
    with pytest.raises(ConfigChangedError, match=r"\('a' 3 -> None, 'b' 4 -> None, 'c' 5 -> None;"):
        check_resume_config(str(tmp_path), config, tokenizer=ByteTokenizer())

    specials = CharTokenizer("abc")
    specials.eos_id = 0
    with pytest.raises(ConfigChangedError, match=r"\(eos_id 2 -> 0; its record of 3 tokens"):
        check_resume_config(str(tmp_path), config, tokenizer=specials)
    # A tokenizer.json's key is named: model.tokenizer.
    config.model.tokenizer = "/somewhere/tokenizer.json"
    with pytest.raises(ConfigChangedError, match=r"^model\.tokenizer: the tokenizer gives "):
        check_resume_config(str(tmp_path), config, tokenizer=CharTokenizer("b"), allow_change=True)
    (tmp_path / "tokenizer_vocab.json").write_text('{"vocabulary": []}')
    with pytest.raises(ConfigError, match=r"tokenizer_vocab\.json: does not hold a tokenizer "):
        check_resume_config(
            str(tmp_path), config, tokenizer=CharTokenizer("abc"), allow_change=True
        )
    (tmp_path / "tokenizer_vocab.json").unlink()
    changes = check_resume_config(
        str(tmp_path), config, tokenizer=CharTokenizer("b"), allow_change=True
    )
    assert [key for key, *_ in changes] == ["model.tokenizer"]


def test_moved_tokens_are_named_in_id_order_and_under_the_key_that_chose_the_tokenizer(tmp_path):
    from novarl_jax.rollout.tokenizers import CharTokenizer

    config = copy.get_config()
    write_config(str(tmp_path), config, tokenizer=CharTokenizer("cab"))  # c 3, a 4, b 5
    with pytest.raises(ConfigChangedError, match=r"\('c' 3 -> 4, 'a' 4 -> 5, 'b' 5 -> 3;"):
        check_resume_config(str(tmp_path), config, tokenizer=CharTokenizer("bca"))
    # A tokenizer.json that comes with model.init_from's checkpoint: that key is named.
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "tokenizer.json").write_text("{}")
    config.model.init_from = str(tmp_path / "init")
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(tmp_path), config, tokenizer=CharTokenizer("bca"))
    assert info.value.key == "model.init_from"


def _reward_fails(prompts, completions, metadata):
    raise RuntimeError("this reward fails")


@pytest.mark.slow
def test_steps_no_checkpoint_kept_are_replaced_only_by_the_same_run(tmp_path):
    """A start without a checkpoint redoes the steps metrics.jsonl holds (a run stopped before
    its first checkpoint, or whose checkpoints were removed): with another config it would
    have erased another run's metrics and config without a word."""
    import shutil

    train_quietly(_config(1), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    rows, record = (tmp_path / n for n in ("metrics.jsonl", "config.json"))
    before = rows.read_text(), record.read_text()
    other = _config(1)
    other.optim.learning_rate = 0.1
    with pytest.raises(
        ConfigChangedError, match=r"^optim\.learning_rate: the run in .*; its metrics\.jsonl "
        r"holds 1 step that no checkpoint kept, which this start would replace: rerun with that "
        r"config, train in a new --workdir, or pass --allow_config_change$"
    ):  # fmt: skip
        train_quietly(other, tmp_path)
    assert (rows.read_text(), record.read_text()) == before
    result = train_quietly(_config(1), tmp_path)  # the same run: its step is redone
    assert result["resumed_from"] is None and len(rows.read_text().splitlines()) == 1

    # A resume allowed a change keeps the record of the config its checkpoints were trained
    # with until one of the new config lands: a start that fails before that leaves the old
    # record, so the old config resumes without --allow_config_change and the new one does
    # not.
    failing = _config(2)
    failing.task.reward_fn = f"{__name__}:_reward_fails"
    with pytest.raises(Exception, match="this reward fails"):
        train_quietly(failing, tmp_path, allow_config_change=True)
    assert json.loads(record.read_text())["task"]["reward_fn"] == ""
    with pytest.raises(ConfigChangedError, match=r"^task\.reward_fn: "):
        train_quietly(failing, tmp_path)
    changed = _config(2)
    changed.optim.learning_rate = 0.01
    train_quietly(changed, tmp_path, allow_config_change=True)
    assert json.loads(record.read_text())["optim"]["learning_rate"] == 0.01  # its step landed
    # The same when no key that may change changes (experiment.steps did above).
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    failing = _config(2)
    failing.optim.learning_rate = 0.02
    failing.task.reward_fn = f"{__name__}:_reward_fails"
    with pytest.raises(Exception, match="this reward fails"):
        train_quietly(failing, tmp_path, allow_config_change=True)
    saved = json.loads(record.read_text())
    assert (saved["optim"]["learning_rate"], saved["task"]["reward_fn"]) == (0.01, "")


def test_a_record_from_before_sliding_windows_were_kept_still_matches(tmp_path):
    # A dense model read from a Mistral checkpoint with a window was recorded as Llama
    # without the window, a Mixtral with "sliding_window": null; both describe the same
    # computation as the model now read with its window.
    from novarl_jax.models import ModelConfig
    from novarl_jax.trainer.saved_config import MODEL_FILE, model_changes

    sizes = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    for experts in (0, 4):
        old = ModelConfig(**sizes, num_local_experts=experts)
        (tmp_path / MODEL_FILE).write_text(json.dumps(old.to_hf_config()))
        now = old.replace(sliding_window=32)
        assert model_changes(str(tmp_path), now) == []
        shorter = now.replace(max_position_embeddings=16)  # a real change is still one
        assert [c[0] for c in model_changes(str(tmp_path), shorter)] == ["max_position_embeddings"]
    (tmp_path / MODEL_FILE).write_text(json.dumps({**old.to_hf_config(), "model_type": ["x"]}))
    assert ("model_type", ["x"], "mixtral") in model_changes(str(tmp_path), now)
    # A record with the window, as written now, is compared with it.
    for window in (32, 64):
        (tmp_path / MODEL_FILE).write_text(json.dumps(now.to_hf_config()))
        changes = model_changes(str(tmp_path), now.replace(sliding_window=window))
        assert changes == ([] if window == 32 else [("sliding_window", 32, 64)])


def test_special_tokens_are_compared_by_the_ids_they_name(tmp_path):
    """model.bos_token's default became 'auto': a config.json saved with '' resumes as long
    as the tokenizer's ids are the same (a tokenizer that adds no BOS, or the built-in one)."""
    from novarl_jax.rollout.tokenizers import CharTokenizer

    config = copy.get_config()
    config.model.bos_token = ""
    write_config(str(tmp_path), config, tokenizer=CharTokenizer("abc"))
    config.model.bos_token = "auto"
    lines = []
    changes = check_resume_config(
        str(tmp_path), config, tokenizer=CharTokenizer("abc"), log=lines.append
    )
    assert [key for key, *_ in changes] == ["model.bos_token"] and len(lines) == 1
    with pytest.raises(ConfigChangedError, match=r"^model.bos_token: .* '' -> 'auto'"):
        check_resume_config(str(tmp_path), config)  # no tokenizer to compare ids with
    other = CharTokenizer("abc")
    other.bos_id = 7  # the ids do differ: refused, saying how to resume as the run trained
    error = _refusal(tmp_path, config, tokenizer=other, allow_change=True)
    assert error.key == "model.bos_token" and "(bos_id 1 -> 7; its record of 3" in str(error)
    assert (
        "an empty model.bos_token (model.bos_token= on the command line) resumes without one, "
        "as the run trained"
    ) in str(error)


def test_a_file_named_relatively_or_absolutely_is_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    saved = {"task": {"path": "data/p.jsonl"}, "eval": {"path": ""}}
    now = {"task": {"path": str(tmp_path / "data" / "p.jsonl")}, "eval": {"path": ""}}
    assert config_changes(saved, now) == []
    now["task"]["path"] = str(tmp_path / "other.jsonl")
    assert config_changes(saved, now) == [("task.path", "data/p.jsonl", now["task"]["path"])]
    now["task"]["path"] = str(tmp_path / "other" / "p.jsonl")  # the same name elsewhere
    assert config_changes(saved, now) == [("task.path", "data/p.jsonl", now["task"]["path"])]


def test_seeds_are_one_stream_only_when_equal_modulo_2_to_the_32():
    saved = {"experiment": {"seed": 0}}
    for seed, changed in ((2**32, False), (2**31, True), (1, True)):
        assert config_changes(saved, {"experiment": {"seed": seed}}) == (
            [("experiment.seed", 0, seed)] if changed else []
        )


def test_fewer_ids_ending_completions_are_a_change_too(tmp_path):
    config = copy.get_config()
    write_config(str(tmp_path), config, stops=(2, 7))
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(tmp_path), config, stops=(2,))
    assert info.value.key == "rollout.stop_token_ids"


def test_the_ids_that_end_a_completion_are_compared_on_resume(tmp_path):
    """With rollout.stop_token_ids=() they come from outside the config (the tokenizer, an
    init_from checkpoint's generation_config.json): a change there must not go unseen."""
    config = copy.get_config()
    write_config(str(tmp_path), config, stops=(2,))
    assert json.loads((tmp_path / "config.json").read_text())["_how_read"]["stop_ids"] == [2]
    assert check_resume_config(str(tmp_path), config, stops=(2,)) == []
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(tmp_path), config, stops=(2, 7))
    assert info.value.key == "rollout.stop_token_ids"
    assert "rollout.stop_token_ids 'ends at [2]' -> 'ends at [2, 7]'" in str(info.value)
    lines = []
    changes = check_resume_config(
        str(tmp_path), config, stops=(2, 7), allow_change=True, log=lines.append
    )
    assert changes == [("rollout.stop_token_ids", "ends at [2]", "ends at [2, 7]")]
    with pytest.raises(ConfigChangedError) as info:
        check_resume_config(str(tmp_path), config, stops=(2, 7))
    assert "set rollout.stop_token_ids=(2,) to end them where the run did" in str(info.value)
    # Naming the run's ids in the config is no change of the ids.
    config.rollout.stop_token_ids = (2,)
    assert [k for k, *_ in check_resume_config(str(tmp_path), config, stops=(2,))] == [
        "rollout.stop_token_ids"
    ]  # logged, not refused
    config.rollout.stop_token_ids = ()
    # A config.json written before they were recorded: that version ended completions at the
    # listed ids, else at the tokenizer's EOS.
    from novarl_jax.rollout.tokenizers import CharTokenizer

    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "stop_ids" not in saved["_how_read"]
    eos = CharTokenizer("abc").eos_id
    assert check_resume_config(str(tmp_path), config, stops=(eos, 7)) == []  # no tokenizer
    with pytest.raises(ConfigChangedError, match=rf"'ends at \[{eos}\]' -> 'ends at \[{eos}, 7\]'"):
        check_resume_config(str(tmp_path), config, stops=(eos, 7), tokenizer=CharTokenizer("abc"))
    check_resume_config(str(tmp_path), config, stops=(eos,), tokenizer=CharTokenizer("abc"))
    # A config.json with no record at all (older still): which ids ended completions cannot
    # be told, so none is compared.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["_how_read"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume_config(str(tmp_path), config, stops=(eos, 7), tokenizer=CharTokenizer("abc"))


def test_a_seed_outside_32_bits_saved_by_an_earlier_version_resumes_as_its_stream(tmp_path):
    """Seed -1 was valid once and ran seed 4294967295's stream; it is refused now, with that
    seed as the fix, which a resume of the old workdir must take as no change."""
    config = copy.get_config()
    config.experiment.seed = -1
    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    config.experiment.seed = 2**32 - 1
    assert config_changes(saved, config) == []
    assert check_resume_config(str(tmp_path), config) == []
    config.experiment.seed = 5  # another stream
    assert config_changes(saved, config) == [("experiment.seed", -1, 5)]


@pytest.mark.parametrize(
    "key, value, kind",
    [("warmup_steps", "2", "int"), ("warmup_steps", None, "int"), ("learning_rate", True, "float")],
)
def test_a_recorded_value_of_the_wrong_type_names_the_file_and_key(tmp_path, key, value, kind):
    # A TypeError from comparing the old schedule's warmup with 0 before.
    config = copy.get_config()
    config.optim.schedule = "cosine"
    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["optim"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError) as info:
        check_resume_config(str(tmp_path), config)
    assert str(info.value) == (
        f"{tmp_path / 'config.json'}: records optim.{key}={value!r}, not a value of its type "
        f"({kind}): the file was edited or damaged; restore it, or delete it to resume without "
        f"comparing against it"
    )
    saved["optim"][key] = copy.get_config().optim[key]
    saved["ppo"]["tis_cap"] = 2  # nullable floats take an int, as the config does
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume_config(str(tmp_path), config, allow_change=True)


def test_logged_steps_past_a_save_without_a_checkpoint_are_not_replaced(tmp_path):
    """Two saves' worth of logged steps and no checkpoint: the checkpoints were removed (or
    their volume is not mounted). Rerunning the command restarted from step 1 without a
    word, replacing every logged row."""
    from novarl_jax.trainer.saved_config import check_start_config

    config = copy.get_config()
    config.checkpoint.interval = 2
    write_config(str(tmp_path), config)
    rows = tmp_path / "metrics.jsonl"
    rows.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    # Up to 3 steps: the first save (step 2) may have been cut short by the stop.
    assert check_start_config(str(tmp_path), config, resuming=False) == []
    rows.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    config.checkpoint.interval = 10  # the recorded interval is the one that saved
    with pytest.raises(ConfigError) as info:
        check_start_config(str(tmp_path), config, resuming=False)
    assert str(info.value) == (
        f"--workdir: {rows} logs 4 steps, but {tmp_path / 'checkpoints'} holds no checkpoint, "
        "although the run saved one every 2 steps: were they removed, or is their volume not "
        "mounted? Restore them to resume; to start again instead, move metrics.jsonl and "
        "samples.jsonl out of the workdir (a new start replaces their rows)"
    )
