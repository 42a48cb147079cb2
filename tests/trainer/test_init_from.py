"""Training from a Hugging Face checkpoint directory (``model.init_from``)."""

import jax
import numpy as np
import pytest

from configs import copy
from novarl_jax.models import load_hf_model
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import ConfigError, validate_config
from novarl_jax.trainer.loop import Trainer

HF = "tests/data/hf"


def _config(path, algorithm="grpo", num_experts=4):
    c = copy.get_config()
    c.model.init_from = path
    c.experiment.algorithm = algorithm
    c.experiment.num_experts = num_experts
    c.experiment.top_k = 2
    c.experiment.steps = 1
    c.rollout.prompts_per_step = 2
    c.logging.progress = False
    return c


def _one_step(config):
    spec = validate_config(config)
    run = build_run(spec)
    trainer = Trainer(run, "unused", mesh=spec.layout.make_mesh(jax.devices()[:1]))
    state, reference = trainer.initial_state()
    start = jax.device_get(state.params)
    state, metrics, _ = trainer.iteration(state, reference, 0)
    return run, start, jax.device_get(state.params), metrics


def test_grpo_starts_from_the_mixtral_checkpoint():
    run, start, end, metrics = _one_step(_config(f"{HF}/mixtral"))
    want_config, want = load_hf_model(f"{HF}/mixtral")
    policy = run.model.policy
    assert (policy.hidden_size, policy.num_local_experts, policy.vocab_size) == (32, 4, 64)
    # Training settings come from the run's config, not the checkpoint.
    assert policy.capacity_factor == 1.25 and policy.router_aux_loss_coef == 0.01
    assert want_config.router_aux_loss_coef == 0.001
    for a, b in zip(jax.tree.leaves(start["policy"]), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(metrics["actor/grad_norm"]) and metrics["actor/grad_norm"] > 0
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(end["policy"]), jax.tree.leaves(want), strict=True)
    )
    assert moved > 1e-4


def test_the_runs_precision_and_checkpointing_apply_to_the_checkpoints_model():
    config = _config(f"{HF}/mixtral", algorithm="ppo")
    config.experiment.grpo_group_size = 1
    config.ppo.critic = "separate"
    config.model.compute_dtype = "bfloat16"
    config.train.gradient_checkpointing = True
    run = build_run(validate_config(config))
    for model in (run.model.policy, run.model.critic):
        assert (model.dtype, model.compute_dtype, model.remat) == ("float32", "bfloat16", True)


def test_ppo_adds_a_zero_value_head_to_the_dense_llama_checkpoint():
    run, start, _, metrics = _one_step(_config(f"{HF}/llama", algorithm="ppo", num_experts=0))
    policy = run.model.policy
    assert policy.num_local_experts == 0 and policy.tie_word_embeddings and policy.value_head
    np.testing.assert_array_equal(start["policy"]["value_head"]["kernel"], 0.0)
    _, want = load_hf_model(f"{HF}/llama")
    np.testing.assert_array_equal(
        start["policy"]["embed_tokens"]["embedding"], want["embed_tokens"]["embedding"]
    )
    assert np.isfinite(metrics["critic/vf_loss"])


def test_ppo_separate_critic_starts_from_the_mixtral_checkpoint():
    config = _config(f"{HF}/mixtral", algorithm="ppo")
    config.ppo.critic = "separate"
    run, start, end, metrics = _one_step(config)
    assert run.model.critic.num_local_experts == 4 and run.model.critic.value_head
    _, want = load_hf_model(f"{HF}/mixtral")
    critic = dict(start["critic"])
    head = critic.pop("value_head")
    for a, b in zip(jax.tree.leaves(critic), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(head["kernel"], 0.0)  # as the shared critic's head starts
    for name in ("critic/vf_loss", "critic/moe_aux_loss", "critic/moe_z_loss"):
        assert np.isfinite(metrics[name]), name
    # Its routers train (their load-balancing and z-losses).
    router = np.asarray(end["critic"]["layers"]["moe"]["router"])
    assert np.abs(router - want["layers"]["moe"]["router"]).max() > 0


@pytest.mark.parametrize(
    "change,key,match",
    [
        (dict(path=f"{HF}/missing"), "model.init_from", "missing: does not exist; load_hf_"),
        (dict(num_experts=8), "experiment.num_experts", "has num_local_experts=4"),
        (dict(top_k=1), "experiment.top_k", "has num_experts_per_tok=2"),
        (dict(max_new_tokens=60), "rollout.max_new_tokens", "max_position_embeddings=64"),
        (dict(symbols=[chr(65 + i) for i in range(60)]), "model.tokenizer", "vocab_size=64"),
    ],
)
def test_checkpoint_mismatches_name_the_key(change, key, match):
    config = _config(change.get("path", f"{HF}/mixtral"), num_experts=change.get("num_experts", 4))
    if "top_k" in change:
        config.experiment.top_k = change["top_k"]
    if "max_new_tokens" in change:
        config.rollout.max_new_tokens = change["max_new_tokens"]
    if "symbols" in change:
        config.task.options.symbols = "".join(change["symbols"])
    with pytest.raises(ConfigError, match=match) as info:
        build_run(validate_config(config))
    assert info.value.key == key


def test_prompt_and_completion_may_fill_the_checkpoints_context():
    config = _config(f"{HF}/mixtral")  # max_position_embeddings=64
    # The config's own context limit is the checkpoint's to set: it is not the one checked.
    config.model.max_position_embeddings = 8
    config.rollout.max_new_tokens = 64 - config.rollout.max_prompt_length
    assert build_run(validate_config(config)).model.policy.max_position_embeddings == 64


def test_the_checkpoints_own_tokenizer_is_used_and_shown(tmp_path):
    import shutil

    from test_build import _tokenizer_file

    from novarl_jax.rollout.tokenizers import HFTokenizer
    from novarl_jax.trainer.checklist import checklist_rows

    spec, run = _spec_and_run(f"{HF}/llama")
    rows = dict(((s, i), v) for s, i, v in checklist_rows(spec, None, run))
    # Without one, the task's characters: the checklist says what that leaves out.
    assert rows[("model", "tokenizer")] == (
        "characters of the task (11 ids); the policy's ids 11-63 decode to nothing"
    )
    assert rows[("model", "initial weights")] == f"{HF}/llama"
    model = tmp_path / "llama"
    shutil.copytree(f"{HF}/llama", model)
    tokenizer = _tokenizer_file(model)  # model/tokenizer.json
    spec, run = _spec_and_run(str(model))
    assert isinstance(run.tokenizer, HFTokenizer)
    assert run.tokenizer.vocab_size == 13 and run.model.policy.vocab_size == 64
    rows = dict(((s, i), v) for s, i, v in checklist_rows(spec, None, run))
    assert rows[("model", "tokenizer")] == (
        f"{tokenizer} (13 ids; no BOS before each prompt); the policy's ids 13-63 decode to nothing"
    )
    assert (
        rows[("model", "architecture")]
        == "2 layers, hidden 32, 4 heads of width 8 (2 KV), dense MLP"
    )


def test_completions_stop_at_every_end_id_the_checkpoint_declares(tmp_path):
    import json
    import shutil

    from test_build import _tokenizer_file

    model = tmp_path / "llama"
    shutil.copytree(f"{HF}/llama", model)  # config.json: eos_token_id 2
    _tokenizer_file(model)  # '<pad>' 0, '</s>' 1 (the run's EOS), '<s>' 2

    def stops(**changes):
        config = _config(str(model), num_experts=0)
        for key, value in changes.items():
            config[key.split(".")[0]][key.split(".")[1]] = value
        run = build_run(validate_config(config))
        return run.sampling.stops(run.tokenizer)

    assert stops() == (1, 2)  # EOS, then the checkpoint's end id
    # generation_config.json says what generate() stops at; it takes precedence.
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9]}))
    assert stops() == (1, 7, 9)
    assert stops(**{"rollout.stop_token_ids": (5,)}) == (5,)  # the config's own replace them
    # Another tokenizer's ids need not be the checkpoint's tokens: EOS alone.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(model / "tokenizer.json", other / "tokenizer.json")
    assert stops(**{"model.tokenizer": str(other / "tokenizer.json")}) == (1,)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 64]}))
    with pytest.raises(ConfigError, match=r"^model.init_from: its eos_token_id holds \[64\], "):
        stops()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id must be an id"):
        stops()


def _spec_and_run(path):
    spec = validate_config(_config(path, num_experts=0))
    return spec, build_run(spec)


def test_pipeline_stages_must_split_the_checkpoints_layers_not_the_configs():
    # The checkpoint (2 layers) fixes the depth: model.num_hidden_layers is not used.
    config = _config(f"{HF}/mixtral")
    config.model.num_hidden_layers = 3
    config.experiment.update(world_size=2, pipeline_parallel_size=2)
    build_run(validate_config(config))  # 2 stages of 1 layer
    config.experiment.update(world_size=4, pipeline_parallel_size=4, num_microbatches=1)
    with pytest.raises(ConfigError, match="4 pipeline stages do not split the checkpoint "
                       "model.init_from's num_hidden_layers=2") as info:  # fmt: skip
        build_run(validate_config(config))
    assert info.value.key == "experiment.pipeline_parallel_size"


def test_an_edited_init_from_config_is_refused_on_resume_and_export(tmp_path):
    """The architecture of an init_from run lives in the checkpoint directory's config.json,
    which the run's config only names: an edit there must not resume or export silently."""
    import json
    import shutil

    from quiet_train import train_quietly

    from novarl_jax.trainer.export import export_policy
    from novarl_jax.trainer.saved_config import ConfigChangedError

    source = tmp_path / "mixtral"
    shutil.copytree(f"{HF}/mixtral", source)
    config = _config(str(source))
    config.checkpoint.async_save = False
    train_quietly(config, tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert recorded["rope_theta"] == load_hf_model(source)[0].rope_theta

    hf = json.loads((source / "config.json").read_text())
    hf["rope_parameters"]["rope_theta"] = 1234.0
    (source / "config.json").write_text(json.dumps(hf))
    config.experiment.steps = 2
    match = r"rope_theta .* -> 1234\.0 .*mixtral/config\.json changed since the run started"
    with pytest.raises(ConfigChangedError, match=match) as error:
        train_quietly(config, tmp_path / "run")
    assert error.value.key == "model.init_from"
    config.experiment.steps = 1
    with pytest.raises(ConfigChangedError, match=match):
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"))
    export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"), allow_config_change=True)
    assert load_hf_model(tmp_path / "hf")[0].rope_theta == 1234.0  # as explicitly allowed
    # A start allowed the new architecture that stops before its first checkpoint keeps the
    # record of the old one, so the old checkpoint does not resume under the new model
    # without the flag.
    config.experiment.steps = 2

    def crash(*args, **kwargs):
        raise RuntimeError("stopped before its first checkpoint")

    original = Trainer.iteration
    Trainer.iteration = crash
    try:
        with pytest.raises(RuntimeError, match="stopped before its first checkpoint"):
            train_quietly(config, tmp_path / "run", allow_config_change=True)
    finally:
        Trainer.iteration = original
    assert json.loads((tmp_path / "run" / "model_config.json").read_text()) == recorded
    with pytest.raises(ConfigChangedError, match=match):
        train_quietly(config, tmp_path / "run")


def test_checkpoint_weights_wait_in_host_memory_and_go_to_the_mesh_in_parts(devices):
    """A model that fits only when split must not land whole on one device first: the
    checkpoint's weights stay NumPy until the trainer shards them."""
    from jax.sharding import NamedSharding

    config = _config(f"{HF}/mixtral", algorithm="ppo")
    config.ppo.critic = "separate"
    config.experiment.update(world_size=4, tensor_parallel_size=2, expert_parallel_size=2)
    spec = validate_config(config)
    run = build_run(spec)
    initial = run.init_params(jax.random.key(0))
    for name in ("policy", "critic"):
        trunk = {k: v for k, v in initial[name].items() if k != "value_head"}
        assert all(type(x) is np.ndarray for x in jax.tree.leaves(trunk)), name
    trainer = Trainer(run, "unused", mesh=spec.layout.make_mesh(devices[:4]))
    state, _ = trainer.initial_state()
    w = state.params["policy"]["layers"]["moe"]["w_gate_up"]
    assert isinstance(w.sharding, NamedSharding) and len(w.sharding.device_set) == 4
    assert not w.sharding.is_fully_replicated
    _, want = load_hf_model(f"{HF}/mixtral")
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params["policy"])), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(a, b)
