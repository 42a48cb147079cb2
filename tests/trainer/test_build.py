"""Building a run from config: tokenizer files, stop tokens, errors naming their keys."""

import json

import pytest

from configs import base
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import ConfigError, validate_config


def _tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<s>", *"reve :abcd"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    json.loads(path.read_text())  # a valid file
    return path


def test_tokenizer_file_and_stop_tokens(tmp_path):
    config = base.get_config()
    config.model.tokenizer = str(_tokenizer_file(tmp_path))
    config.rollout.stop_token_ids = (1, 3)
    run = build_run(validate_config(config))
    assert run.tokenizer.eos_id == 1 and run.tokenizer.pad_id == 0
    assert run.model.policy.vocab_size == run.tokenizer.vocab_size
    assert run.sampling.stop_token_ids == (1, 3)


def test_default_stop_token_is_the_tokenizers_eos():
    run = build_run(validate_config(base.get_config()))
    assert run.sampling.stop_token_ids is None


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("eos_token", "<eos>", "model.eos_token: eos_token='<eos>' is not in"),
        ("tokenizer", "/nonexistent/tokenizer.json", "model.tokenizer: tokenizer file"),
    ],
)
def test_tokenizer_errors_name_the_key(tmp_path, key, value, match):
    config = base.get_config()
    config.model.tokenizer = str(_tokenizer_file(tmp_path))
    config.model[key] = value
    with pytest.raises(ConfigError, match=match):
        build_run(validate_config(config))


@pytest.mark.parametrize(
    "section,key,value,match",
    [
        ("task", "name", "chess", "task.name: unknown task 'chess'"),
        ("task", "path", "x.jsonl", "task.path: only the 'jsonl' task reads a file"),
        ("optim", "schedule", "step", "optim.schedule: 'step' is not one of"),
        ("ppo", "critic", "twin", "ppo.critic: 'twin' is not one of"),
        ("grpo", "advantage_estimator", "gae", "grpo.advantage_estimator: 'gae' is not one of"),
        ("grpo", "clip_ratio_low", 1.5, "grpo.clip_ratio_low"),
        ("train", "minibatches", 3, "train.minibatches: 3 does not divide the 32 rollouts"),
    ],
)
def test_build_errors_name_the_key(section, key, value, match):
    config = base.get_config()
    config[section][key] = value
    with pytest.raises(ConfigError, match=match):
        build_run(validate_config(config))
