"""Config validation: every bad key or value is named in one message."""

import pytest

from configs import base, moe
from novarl_jax.trainer.config import (
    ConfigError,
    default_config,
    ignored_settings,
    validate_config,
)


def test_quickstart_moe_config_validates():
    spec = validate_config(moe.get_config())
    assert spec.layout.describe() == {"dp": 1, "tp": 2, "pp": 2, "ep": 2, "world": 8}
    assert (spec.router.num_experts, spec.router.top_k, spec.router.capacity_factor) == (4, 2, 1.25)
    assert spec.config.experiment.algorithm == "grpo"


def test_base_config_is_the_schema():
    assert base.get_config() == default_config()
    spec = validate_config(base.get_config())
    assert spec.router is None and spec.layout.world_size == 1


def _with(**overrides):
    config = moe.get_config()
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.mark.parametrize(
    "overrides,key,match",
    [
        (dict(experiment__world_size=6), "experiment.world_size", "not divisible by"),
        (dict(experiment__world_size=0), "experiment.world_size", "must be an integer >= 1"),
        # Each key's own range check.
        (dict(experiment__rollout_workers=0), "experiment.rollout_workers", ">= 1"),
        (dict(experiment__weight_sync_max_staleness=0), "experiment.weight_sync_max_staleness",
         ">= 1"),
        (dict(experiment__weight_sync_interval=0), "experiment.weight_sync_interval", ">= 1"),
        (dict(experiment__rollout_queue_size=-1), "experiment.rollout_queue_size", ">= 0"),
        (dict(experiment__seed=2**32 + 5), "experiment.seed",
         r"in \[0, 2\*\*32\), got 4294967301 .random keys take 32 bits: it would run the same "
         r"stream as seed 5\)"),
        (dict(experiment__seed=-1), "experiment.seed", "same stream as seed 4294967295"),
        (dict(optim__warmup_steps=3_000_000_000), "optim.warmup_steps",
         "must fit a 32-bit integer .within ±2,147,483,647., got 3,000,000,000"),
        (dict(model__hidden_size=-(2**40)), "model.hidden_size", "must fit a 32-bit integer"),
        (dict(rollout__top_k=-1), "rollout.top_k", ">= 0"),
        (dict(rollout__max_prompt_length=0), "rollout.max_prompt_length", ">= 1"),
        (dict(rollout__prompt_truncation="none"), "rollout.prompt_truncation",
         r"not one of \['error', 'left', 'right'\]"),
        (dict(optim__decay_steps=-1), "optim.decay_steps", ">= 0"),
        (dict(optim__weight_decay=-0.1), "optim.weight_decay", ">= 0"),
        (dict(optim__end_learning_rate=-1e-4), "optim.end_learning_rate", ">= 0"),
        (dict(optim__schedule="linear", optim__end_learning_rate=1.0), "optim.end_learning_rate",
         "a linear decay would"),
        (dict(model__max_position_embeddings=0), "model.max_position_embeddings", ">= 1"),
        (dict(experiment__tensor_parallel_size=0), "experiment.tensor_parallel_size", ">= 1"),
        (dict(experiment__top_k=5), "experiment.top_k", r"must be in \[1, num_experts=4\]"),
        (dict(experiment__capacity_factor=0.0), "experiment.capacity_factor", "> 0 or None"),
        (dict(experiment__eval_capacity_factor=0.0), "experiment.eval_capacity_factor",
         r"> 0 or None \(= capacity_factor\)"),
        (dict(experiment__min_capacity=-1), "experiment.min_capacity", ">= 0"),
        (dict(experiment__drop_policy="largest"), "experiment.drop_policy",
         r"not one of \['position', 'probs'\]"),
        (dict(experiment__num_experts=5), "experiment.num_experts", "do not split over"),
        (dict(experiment__num_experts=-1), "experiment.num_experts", ">= 0"),
        (dict(experiment__algorithm="dqn"), "experiment.algorithm", r"not one of \['ppo'"),
        (dict(experiment__grpo_group_size=1), "experiment.grpo_group_size", ">= 2 for grpo"),
        (dict(experiment__steps=0), "experiment.steps", ">= 1"),
        (dict(experiment__weight_sync_timeout_s=-1.0), "experiment.weight_sync_timeout_s", ">= 0"),
        (dict(experiment__num_experts=0), "experiment.expert_parallel_size", "model is dense"),
        (dict(model__num_key_value_heads=3), "model.num_key_value_heads", "does not divide"),
        (dict(model__num_hidden_layers=3), "experiment.pipeline_parallel_size", "do not split"),
        (dict(rollout__top_p=0.0), "rollout.top_p", r"in \(0, 1\]"),
        (dict(rollout__prompts_per_step=3, experiment__grpo_group_size=3),
         "rollout.prompts_per_step", "do not split over dp"),
        (dict(rollout__max_new_tokens=500), "rollout.max_new_tokens", "max_position_embeddings"),
        (dict(experiment__seed=None), "experiment.seed", "must not be None"),
        (dict(experiment__algorithm="ppo", dapo__dynamic_sampling=True),
         "dapo.dynamic_sampling", "filters GRPO groups"),
        (dict(model__router_z_loss_coef=-1.0), "model.router_z_loss_coef", ">= 0"),
        (dict(model__compute_dtype="float16"), "model.compute_dtype",
         r"'float16' is not one of \['float32', 'bfloat16'\] \(float16 would need loss"),
        (dict(logging__samples=-2), "logging.samples", ">= 0"),
        # keep=0 would delete every checkpoint a run writes.
        (dict(checkpoint__keep=0), "checkpoint.keep", ">= 1"),
        (dict(checkpoint__interval=0), "checkpoint.interval", ">= 1"),
        (dict(optim__learning_rate=-1e-3), "optim.learning_rate", "must be > 0"),
        (dict(optim__max_grad_norm=-1.0), "optim.max_grad_norm", ">= 0"),
        (dict(optim__warmup_steps=-1), "optim.warmup_steps", ">= 0"),
        (dict(optim__eps=-1e-8), "optim.eps", "must be > 0"),
        # Adam's 0/0 for weights with no gradient: every update skipped as non-finite.
        (dict(optim__eps=0.0), "optim.eps", "must be > 0 .Adam divides"),
        (dict(optim__learning_rate=0.0), "optim.learning_rate", "must be > 0"),
        (dict(optim__schedule="cosine", optim__end_learning_rate=1.0),
         "optim.end_learning_rate", "is above optim.learning_rate=0.003: a cosine decay would"),
        (dict(experiment__seed=2**64), "experiment.seed", r"in \[0, 2\*\*32\)"),
        # Greedy GRPO groups are identical: nothing to learn.
        (dict(rollout__temperature=0.0), "rollout.temperature", "0 samples greedily, so the 4 "
         "samples of a prompt would be identical"),
        (dict(rollout__top_k=1), "rollout.top_k", "1 samples greedily"),
        # Evaluation keeps the rollout's top_k: its samples would be identical too.
        (dict(experiment__algorithm="ppo", rollout__top_k=1, eval__interval=1, eval__samples=2,
              eval__temperature=1.0), "eval.samples", "under rollout.top_k=1"),
        (dict(optim__b1=1.5), "optim.b1", r"in \[0, 1\)"),
        (dict(optim__b2=1.0), "optim.b2", r"in \[0, 1\)"),
        (dict(dapo__overlong_buffer=-1), "dapo.overlong_buffer", ">= 0"),
        # W&B checks its project names only as the run starts: a traceback after the table.
        (dict(logging__wandb=True, logging__wandb_project="team/rl"), "logging.wandb_project",
         r"'team/rl' is not a W&B project name \(1 to 128 characters, none of / \\ # \? % :\); "
         r"it has '/'"),
        (dict(logging__wandb=True, logging__wandb_project=" "), "logging.wandb_project",
         "it is blank"),
        (dict(logging__wandb=True, logging__wandb_project="p" * 129), "logging.wandb_project",
         "it is 129 characters long"),
        (dict(dapo__overlong_buffer=99), "dapo.overlong_buffer", "exceed rollout.max_new_tokens"),
        (dict(dapo__overlong_penalty=-1.0), "dapo.overlong_penalty", ">= 0"),
        (dict(dapo__max_extra_batches=-1), "dapo.max_extra_batches", ">= 0"),
        (dict(ppo__reward_kl_coef=-0.1), "ppo.reward_kl_coef", ">= 0"),
        # inf passed every range check and turned the first update's weights to NaN.
        (dict(optim__learning_rate=float("inf")), "optim.learning_rate", "finite number, got inf"),
        (dict(grpo__beta=float("nan")), "grpo.beta", "must be a finite number, got nan"),
        (dict(experiment__capacity_factor=float("inf")), "experiment.capacity_factor", "finite"),
        # Finite in float64 but inf in float32: the update turned NaN at the first step.
        (dict(optim__learning_rate=1e300), "optim.learning_rate",
         r"finite float32 number \(at most 3.403e\+38\), got 1e\+300"),
        (dict(grpo__beta=-1e39), "grpo.beta", "finite float32 number"),
    ],
)  # fmt: skip
def test_validation_names_the_key(overrides, key, match):
    with pytest.raises(ConfigError, match=match) as info:
        validate_config(_with(**overrides))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_unknown_key_lists_valid_siblings():
    config = moe.get_config()
    config.experiment.unlock()
    config.experiment.wrld_size = 8
    with pytest.raises(ConfigError, match="valid keys under 'experiment': algorithm") as info:
        validate_config(config)
    assert info.value.key == "experiment.wrld_size"


def test_wrong_type_is_named():
    config = moe.get_config()
    config.experiment.unlock()
    del config.experiment["algorithm"]
    config.experiment.algorithm = 3
    with pytest.raises(ConfigError, match="experiment.algorithm: expected str, got int 3"):
        validate_config(config)


def test_missing_key_is_named():
    config = moe.get_config()
    del config.rollout["top_p"]
    with pytest.raises(ConfigError, match="rollout.top_p: missing"):
        validate_config(config)


def test_dropless_capacity_factor_is_allowed():
    spec = validate_config(_with(experiment__capacity_factor=None))
    assert spec.router.dropless


def test_settings_a_run_does_not_read_are_reported(tmp_path):
    config = default_config()
    config.experiment.rollout_workers = 4
    config.experiment.weight_sync_interval = 7
    config.train.router_replay = True
    config.model.bos_token = "<s>"
    assert ignored_settings(config) == [
        "experiment.rollout_workers=4, experiment.weight_sync_interval=7 are not used: "
        "experiment.async_rollouts=False: each step samples with the weights it trains",
        "train.router_replay=True is not used: the model is dense (experiment.num_experts=0): "
        "it has no router",
        "model.bos_token='<s>' is not used: special tokens are named in a tokenizer.json "
        "(model.tokenizer, or one beside model.init_from); the built-in tokenizer has its own",
    ]
    config.experiment.weight_sync_timeout_s = 5.0
    assert ignored_settings(config)[0].startswith(
        "experiment.rollout_workers=4, experiment.weight_sync_interval=7, "
        "experiment.weight_sync_timeout_s=5.0 are not used"
    )
    # train_async runs asynchronously whatever experiment.async_rollouts says.
    assert ignored_settings(config, asynchronous=True)[0].startswith("train.router_replay")
    config.experiment.num_experts = 1  # one expert still has a router
    assert ignored_settings(config, asynchronous=True)[0].startswith("model.bos_token")
    config.model.init_from = str(tmp_path)  # without a tokenizer.json: the built-in one
    assert ignored_settings(config, asynchronous=True)[0].startswith("model.bos_token")
    (tmp_path / "tokenizer.json").write_text("{}")  # its tokenizer names the special tokens
    assert ignored_settings(config, asynchronous=True) == []
    config.model.update(rope_theta=5e5, hidden_size=64, tie_word_embeddings=True)
    assert ignored_settings(config, asynchronous=True) == [
        "model.hidden_size=64, model.rope_theta=500000.0, model.tie_word_embeddings=True are "
        "not used: the checkpoint model.init_from fixes the architecture (its config.json)"
    ]
    config.model.update(rope_theta=1e4, hidden_size=32, tie_word_embeddings=False)
    config.model.init_from = ""
    config.experiment.update(async_rollouts=True, num_experts=4)
    config.model.tokenizer = "tokenizer.json"
    assert ignored_settings(config) == []


def test_keys_of_a_feature_that_is_off_are_reported():
    config = default_config()
    config.experiment.update(algorithm="ppo", grpo_group_size=8, top_k=1, num_microbatches=8)
    config.experiment.update(capacity_factor=2.0, drop_policy="probs")
    config.eval.prompts = 64
    config.eval.path = "held_out.jsonl"  # the likeliest way to expect validation on
    config.dapo.update(max_extra_batches=5, overlong_penalty=0.5)
    config.ppo.update(reward_kl_kind="k3", reward_kl_coef=0.0, kl_kind="k2")
    config.grpo.kl_kind = "k1"
    assert ignored_settings(config) == [
        "grpo.kl_kind='k1' is not used: experiment.algorithm='ppo' reads the ppo.* settings",
        "experiment.top_k=1, experiment.capacity_factor=2.0, experiment.drop_policy='probs' are "
        "not used: the model is dense "
        "(experiment.num_experts=0): it has no router",
        "experiment.grpo_group_size=8 is not used: experiment.algorithm='ppo' samples one "
        "completion per prompt",
        "experiment.num_microbatches=8 is not used: there is no pipeline "
        "(experiment.pipeline_parallel_size=1)",
        "dapo.max_extra_batches=5 is not used: dapo.dynamic_sampling=False: no group is "
        "dropped, so none is sampled again",
        "dapo.overlong_penalty=0.5 is not used: dapo.overlong_buffer=0: no length penalty",
        "ppo.reward_kl_kind='k3' is not used: ppo.reward_kl_coef=0: no KL penalty in the rewards",
        "ppo.kl_kind='k2' is not used: ppo.kl_coef=0: no KL loss",
        "eval.prompts=64, eval.path='held_out.jsonl' are not used: eval.interval=0: no validation",
    ]
    config.experiment.update(algorithm="grpo", num_experts=4, pipeline_parallel_size=2)
    config.eval.interval = 5
    config.dapo.update(dynamic_sampling=True, overlong_buffer=2)
    config.grpo.beta = 0.0
    assert ignored_settings(config) == [
        "ppo.kl_kind='k2', ppo.reward_kl_coef=0.0, ppo.reward_kl_kind='k3' are not used: "
        "experiment.algorithm='grpo' reads the grpo.* settings",
        "grpo.kl_kind='k1' is not used: grpo.beta=0: no KL loss",
    ]


def test_schedule_router_loss_and_length_scale_keys_that_are_off_are_reported():
    config = default_config()  # dense, GRPO, constant schedule, token-mean
    config.optim.update(decay_steps=100, end_learning_rate=1e-5)
    config.model.update(router_aux_loss_coef=0.02, router_z_loss_coef=0.0)
    config.grpo.loss_scale_factor = 512.0
    assert ignored_settings(config) == [
        "model.router_aux_loss_coef=0.02, model.router_z_loss_coef=0.0 are not used: the model "
        "is dense (experiment.num_experts=0): it has no router losses",
        "optim.decay_steps=100, optim.end_learning_rate=1e-05 are not used: "
        "optim.schedule='constant' keeps optim.learning_rate after the warmup",
        "grpo.loss_scale_factor=512.0 is not used: only "
        "grpo.loss_agg_mode='seq-mean-token-sum-norm' divides by it",
    ]
    config.optim.schedule = "cosine"
    config.experiment.num_experts = 4
    config.grpo.loss_agg_mode = "seq-mean-token-sum-norm"
    assert ignored_settings(config) == []


def test_the_other_algorithms_settings_are_reported_not_refused(tmp_path):
    from tiny_grpo import tiny_grpo_config

    from novarl_jax.trainer.loop import Session

    config = default_config()  # GRPO
    assert ignored_settings(config) == []
    config.ppo.clip_ratio_high = 0.28
    config.ppo.vf_coef = 1.0
    validate_config(config)  # not an error: a config may keep both sections tuned
    assert ignored_settings(config) == [
        "ppo.clip_ratio_high=0.28, ppo.vf_coef=1.0 are not used: "
        "experiment.algorithm='grpo' reads the grpo.* settings"
    ]
    config.experiment.update(algorithm="ppo", grpo_group_size=1)
    assert ignored_settings(config) == []
    config.grpo.beta = 0.1
    assert ignored_settings(config) == [
        "grpo.beta=0.1 is not used: experiment.algorithm='ppo' reads the ppo.* settings"
    ]
    # A run says so as it starts.
    config = tiny_grpo_config()
    config.ppo.vf_coef = 1.0
    lines = []
    with Session(config, str(tmp_path), log=lines.append):
        pass
    assert lines[0] == (
        "warning: ppo.vf_coef=1.0 is not used: experiment.algorithm='grpo' reads the grpo.* "
        "settings"
    )


def test_rollouts_not_prompts_must_split_over_the_data_shards():
    # 3 prompts x 4 samples = 12 rollouts over 2 data shards.
    spec = validate_config(_with(rollout__prompts_per_step=3, experiment__grpo_group_size=4))
    assert spec.layout.dense_data_parallel_size == 2


def test_prompt_and_completion_may_fill_the_context():
    config = moe.get_config()
    total = config.rollout.max_prompt_length + config.rollout.max_new_tokens
    config.model.max_position_embeddings = total
    validate_config(config)
    config.model.max_position_embeddings = total - 1
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert info.value.key == "rollout.max_new_tokens"


@pytest.mark.parametrize("key", ["experiment__steps", "rollout__prompts_per_step"])
def test_a_bool_is_not_an_int(key):
    # ml_collections lets a config file assign True to an int field.
    name = key.replace("__", ".")
    with pytest.raises(ConfigError, match=rf"^{name}: expected int, got bool True"):
        validate_config(_with(**{key: True}))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(optim__b1=0.0),  # momentum off
        dict(experiment__seed=2**32 - 1),  # the largest seed a 32-bit key tells apart
        dict(optim__warmup_steps=2**31 - 1),  # int32's largest
        dict(optim__schedule="cosine", optim__end_learning_rate=0.003),  # ends at the peak
        dict(ppo__value_clip_range=None),  # every nullable key: None means off or default
        dict(ppo__dual_clip_c=None),
        dict(ppo__tis_cap=None),
        dict(grpo__dual_clip_c=None),
        dict(grpo__tis_cap=None),
        dict(grpo__loss_scale_factor=None),
        dict(experiment__capacity_factor=None),
        dict(model__head_dim=None),
    ],
)
def test_values_at_the_edge_of_their_range_are_valid(overrides):
    config = _with(**overrides)
    assert config.optim.learning_rate == 0.003
    validate_config(config)


def test_an_overlong_buffer_may_span_all_new_tokens():
    config = moe.get_config()
    config.dapo.overlong_buffer = config.rollout.max_new_tokens
    validate_config(config)


def test_a_setting_equal_to_its_default_is_not_reported_as_ignored():
    config = moe.get_config()  # GRPO
    config.ppo.vf_coef = float(str(config.ppo.vf_coef))  # equal, another object
    assert ignored_settings(config) == []


@pytest.mark.parametrize(
    "key,module", [("tensorboard", "tensorboardX"), ("wandb", "wandb")]
)  # fmt: skip
def test_a_logger_without_its_extra_is_named(monkeypatch, key, module):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name)
    )
    config = moe.get_config()
    config.logging[key] = True
    with pytest.raises(ConfigError, match=f"needs the {key} extra") as info:
        validate_config(config)
    assert info.value.key == f"logging.{key}"


def test_a_section_set_to_a_value_is_named_as_a_section():
    config = default_config()
    config.eval = None
    with pytest.raises(
        ConfigError, match=r"^eval: is a section, not a value; set its keys, e\.g\. eval\."
    ):
        validate_config(config)


def test_an_unknown_section_inside_a_known_one_is_named_where_it_starts():
    import ml_collections

    config = default_config()
    config.experiment.foo = ml_collections.ConfigDict({"bar": 1})
    with pytest.raises(ConfigError, match=r"^experiment\.foo: unknown key; valid keys under "
                       r"'experiment': algorithm, "):  # fmt: skip
        validate_config(config)
    config = default_config()
    del config.experiment["steps"]  # a config file's own section where the schema has a value
    config.experiment.steps = ml_collections.ConfigDict({"x": 1})
    with pytest.raises(ConfigError, match=r"^experiment\.steps: is a value, not a section; it "
                       r"has no key 'x'$"):  # fmt: skip
        validate_config(config)


def test_a_too_long_prompt_says_bos_included_only_when_there_is_one():
    from novarl_jax.rollout.tokenizers import TextTooLongError
    from novarl_jax.trainer.config import prompt_too_long

    with_bos = str(prompt_too_long(TextTooLongError(0, "abc", 5, 4, with_bos=True)))
    assert "has 5 tokens (BOS included), more than rollout.max_prompt_length=4" in with_bos
    without = str(prompt_too_long(TextTooLongError(0, "abc", 5, 4)))
    assert "has 5 tokens, more than rollout.max_prompt_length=4" in without


def test_model_sizes_a_checkpoint_replaces_are_not_validated():
    # With model.init_from they are reported as not used, so they must not stop the run.
    for changes in (dict(num_attention_heads=5), dict(hidden_size=0)):
        config = default_config()
        config.model.update(changes)
        with pytest.raises(ConfigError, match=r"^model\.(num_key_value_heads|hidden_size): "):
            validate_config(config)
        config.model.init_from = "/models/policy"
        validate_config(config)
