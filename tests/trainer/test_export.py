"""Exporting a run's policy as a Hugging Face model, and checkpoints of another model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quiet_train import train_quietly
from test_build import _tokenizer_file
from tiny_grpo import tiny_grpo_config

from novarl_jax.models import load_hf_model
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.checkpoint import Checkpointer, CheckpointMismatchError
from novarl_jax.trainer.config import ConfigError, validate_config
from novarl_jax.trainer.export import ExportError, export_policy


def _config(steps=2, **ppo):
    c = tiny_grpo_config(prompts_per_step=2)
    c.experiment.steps = steps
    c.checkpoint.interval = 1
    c.checkpoint.async_save = False
    c.logging.plot = False
    if ppo:
        c.experiment.algorithm = "ppo"
        c.ppo.update(ppo)
    return c


def _assert_same(params, want):
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_writes_the_checkpointed_policy(tmp_path):
    config = _config()
    tokenizer = _tokenizer_file(tmp_path)
    config.model.tokenizer = str(tokenizer)
    run = train_quietly(config, tmp_path / "run")
    with pytest.raises(ExportError, match="is the run's own workdir"):
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "run"))
    out = tmp_path / "hf"
    written = export_policy(config, str(tmp_path / "run"), str(out))
    assert written == {"step": 2, "policy": str(out), "critic": None, "capacity_factor": None}
    hf_config, params = load_hf_model(out)
    assert hf_config.num_local_experts == 4 and hf_config.hidden_size == 32
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    _assert_same(params, run["state"].params["policy"])
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(tokenizer.read_text())
    # The run's special tokens travel with the model (eos 1, pad 0 in this tokenizer).
    ids = {"eos_token_id": 1, "pad_token_id": 0}
    assert json.loads((out / "generation_config.json").read_text()) == ids
    assert ids.items() <= json.loads((out / "config.json").read_text()).items()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == ("</s>", "<pad>")

    # An earlier step, and the errors that name what is wrong.
    first = export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf1"), step=1)
    assert first["step"] == 1
    earlier = jax.tree.leaves(load_hf_model(tmp_path / "hf1")[1])
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(earlier, jax.tree.leaves(params), strict=True)
    ]
    assert max(moved) > 0
    with pytest.raises(ExportError, match="no checkpoint of step 7; it has \\[1, 2\\]"):
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf7"), step=7)
    with pytest.raises(ExportError, match="already holds a model \\(config.json\\)"):
        export_policy(config, str(tmp_path / "run"), str(out))
    with pytest.raises(ExportError, match="no checkpoints directory"):
        export_policy(config, str(tmp_path / "elsewhere"), str(tmp_path / "hf2"))
    other = config.copy_and_resolve_references()
    other.model.hidden_size = 64
    with pytest.raises(ConfigError, match="model.hidden_size: the run in .* 32 -> 64"):
        export_policy(other, str(tmp_path / "run"), str(tmp_path / "hf3"))
    with pytest.raises(
        ExportError,
        match="params/policy/embed_tokens/embedding: the checkpoint has \\(\\d+, 32\\), this "
        "run \\(\\d+, 64\\).*; if one of the allowed config changes "
        "\\(model.hidden_size 32 -> 64\\) changes what the state holds .*, undo it; pass the "
        "run's own config and overrides$",
    ):
        export_policy(other, str(tmp_path / "run"), str(tmp_path / "hf3"), allow_config_change=True)
    assert not (tmp_path / "hf3").exists()
    # A change the checkpoint's shapes do not show is refused too: the export would carry it.
    other = config.copy_and_resolve_references()
    other.model.rope_theta = 500000.0
    with pytest.raises(ConfigError, match="model.rope_theta: .*export with the run's own config"):
        export_policy(other, str(tmp_path / "run"), str(tmp_path / "hf4"))
    assert not (tmp_path / "hf4").exists()
    # Completions that ended at other ids than they end at now (a changed EOS): refused.
    record_file = tmp_path / "run" / "config.json"
    record = json.loads(record_file.read_text())
    record["_how_read"]["stop_ids"] += [5]
    record_file.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"^rollout\.stop_token_ids: .*'ends at \[\d+, 5\]'"):
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf6"))
    assert not (tmp_path / "hf6").exists()
    # The tokenizer.json edited in place (two tokens swap ids, same vocabulary size): the
    # export would pair the trained weights with other tokens; refused, even when allowed.
    edited = json.loads(tokenizer.read_text())
    vocab = edited["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tokenizer.write_text(json.dumps(edited))
    with pytest.raises(
        ConfigError, match=r"^model\.tokenizer: the tokenizer gives other ids than the one the "
        r"run in .* trained with \('a' 9 -> 10, 'b' 10 -> 9; its record of 12 tokens: "
    ):  # fmt: skip
        export_policy(
            config, str(tmp_path / "run"), str(tmp_path / "hf5"), allow_config_change=True
        )
    assert not (tmp_path / "hf5").exists()


def test_export_writes_a_separate_critic_beside_the_policy(tmp_path):
    config = _config(steps=1, critic="separate")
    run = train_quietly(config, tmp_path / "run")
    written = export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"))
    assert written["critic"] == str(tmp_path / "hf" / "critic")
    critic_config, critic = load_hf_model(written["critic"])
    assert critic_config.value_head and critic_config.num_local_experts == 4
    _assert_same(critic, run["state"].params["critic"])
    policy_config, policy = load_hf_model(written["policy"])
    assert not policy_config.value_head
    _assert_same(policy, run["state"].params["policy"])


def test_restoring_another_models_checkpoint_names_the_arrays(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, {"iteration": 1}, force=True)
    ckpt.wait()
    shape = jax.ShapeDtypeStruct
    with pytest.raises(CheckpointMismatchError, match="w: the checkpoint has \\(3, 2\\), this run"):
        ckpt.restore({"w": shape((4, 2), jnp.float32), "b": shape((2,), jnp.float32)})
    with pytest.raises(CheckpointMismatchError, match="c: not in the checkpoint; b: not in this"):
        ckpt.restore({"w": shape((3, 2), jnp.float32), "c": shape((2,), jnp.float32)})
    state, host = ckpt.restore({"w": shape((3, 2), jnp.float32), "b": shape((2,), jnp.float32)})
    assert state["w"].shape == (3, 2) and host == {"iteration": 1}
    ckpt.close()


def test_export_writes_bos_id_and_the_critics_tokenizer(tmp_path):
    config = _config(steps=1, critic="separate")
    config.model.tokenizer = str(_tokenizer_file(tmp_path))  # has <s>
    config.model.bos_token = "<s>"
    # Named, not the file's ('auto' would take its eos_token, which is not in the vocabulary).
    config.model.pad_token, config.model.eos_token = "<pad>", "</s>"
    # The source's tokenizer settings are carried over, with the run's special tokens.
    source = {"chat_template": "{{ messages }}", "model_max_length": 64, "eos_token": "<x>",
              "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True,
              "auto_map": {}}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(source))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    # Stop tokens replace EOS as the end of a completion, so generate() must stop at them.
    config.rollout.stop_token_ids = (1, 3)
    train_quietly(config, tmp_path / "run")
    out = tmp_path / "hf"
    written = export_policy(config, str(tmp_path / "run"), str(out))
    ids = {"eos_token_id": [1, 3], "pad_token_id": 0, "bos_token_id": 2}
    assert json.loads((out / "generation_config.json").read_text()) == ids
    critic = tmp_path / "hf" / "critic"
    assert written["critic"] == str(critic)
    # The separate critic gets the tokenizer files too.
    assert (critic / "tokenizer.json").exists()
    for target in (out, critic):
        tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
        assert tokenizer_config == {
            "chat_template": "{{ messages }}", "model_max_length": 64, "eos_token": "</s>",
            "pad_token": "<pad>", "bos_token": "<s>", "tokenizer_class": "PreTrainedTokenizerFast",
        }  # fmt: skip
        assert (target / "chat_template.jinja").read_text() == "{{ messages }}"
    # Settings that cannot be read stop the export, which leaves nothing behind.
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ExportError, match=r"tokenizer_config.json: expected a JSON object, got"):
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf2"))
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("bos", [True, False])
def test_the_exported_tokenizer_adds_bos_exactly_as_training_did(tmp_path, bos):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    # Training ignores the file's post-processor: with bos_token it prepends BOS, without it
    # nothing. The file here adds BOS (a post-processor) when the run does not, and the other
    # way round; the exported file must encode as training did.
    path = _tokenizer_file(tmp_path)
    if not bos:
        tok = Tokenizer.from_file(str(path))
        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        tok.save(str(path))
    config = _config(steps=1)
    config.model.tokenizer = str(path)
    config.model.bos_token = "<s>" if bos else ""
    train_quietly(config, tmp_path / "run")
    export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"))
    exported = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    text = "reverse: abc"
    tokens, mask = build_run(validate_config(config)).tokenizer.encode_batch([text], max_length=32)
    trained = [int(t) for t, m in zip(tokens[0], mask[0], strict=True) if m]
    assert trained[0] == 2 if bos else trained[0] != 2
    assert exported.encode(text).ids == trained


@pytest.mark.slow
def test_a_step_copied_in_from_another_run_is_named_with_the_step_before_it(tmp_path):
    """With the run's own config, a checkpoint that does not fit is likelier another run's
    than a changed config: the advice to rerun with the run's own config was no way out."""
    import shutil

    from novarl_jax.trainer.checkpoint import CheckpointMismatchError
    from novarl_jax.trainer.loop import train

    config = _config(steps=1)
    train_quietly(config, tmp_path / "run")
    other = _config(steps=2)
    other.model.hidden_size *= 2
    train_quietly(other, tmp_path / "other")
    step = tmp_path / "run" / "checkpoints" / "2"
    shutil.copytree(tmp_path / "other" / "checkpoints" / "2", step)
    with pytest.raises(CheckpointMismatchError) as info:
        train(_config(steps=3), str(tmp_path / "run"), log=lambda _: None)
    assert str(info.value).endswith(
        f"; if that step is not this run's (copied in?), move {step} out to resume from step 1"
    )
    with pytest.raises(ExportError) as info:
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"))
    assert str(info.value).endswith(
        "; if step 2 is not this run's (copied in?), export another with --export_step=1; pass "
        "the run's own config and overrides"
    )
    written = export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"), step=1)
    assert written["step"] == 1
