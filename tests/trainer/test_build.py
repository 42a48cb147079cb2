"""Building a run from config: tokenizer files, stop tokens, errors naming their keys."""

import json
import pathlib

import jax
import numpy as np
import pytest

from configs import base
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.checklist import checklist_rows
from novarl_jax.trainer.config import ConfigError, validate_config


def _checklist(config, *, with_run=False):
    """The start-up checklist of ``config``: {item: value} (with the built run's rows)."""
    spec = validate_config(config)
    rows = checklist_rows(spec, None, build_run(spec)) if with_run else checklist_rows(spec)
    return {item: value for _, item, value in rows}


def _tokenizer_file(tmp_path, specials=("<pad>", "</s>", "<s>")):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([*specials, *"reve :abcd"])}
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


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_the_value_loss_is_aggregated_like_the_policy_loss(mode):
    from configs import ppo

    config = ppo.get_config()
    config.ppo.loss_agg_mode = mode
    loss_config = build_run(validate_config(config)).loss_config
    assert (loss_config.loss_agg_mode, loss_config.value_loss_agg_mode) == (mode, mode)


def test_default_stop_token_is_the_tokenizers_eos():
    run = build_run(validate_config(base.get_config()))
    assert run.sampling.stop_token_ids == (run.tokenizer.eos_id,)


def test_stop_tokens_may_be_named_by_their_strings(tmp_path):
    config = base.get_config()
    config.model.tokenizer = str(_tokenizer_file(tmp_path))
    config.rollout.stop_token_ids = ("<s>", 7, "</s>", 2)  # repeats are dropped
    assert build_run(validate_config(config)).sampling.stop_token_ids == (2, 7, 1)
    config.rollout.stop_token_ids = ("<|eot_id|>",)
    with pytest.raises(
        ConfigError, match=r"^rollout.stop_token_ids: '<\|eot_id\|>' is not a token"
    ):
        build_run(validate_config(config))


def test_bos_auto_takes_the_token_the_tokenizer_json_puts_first(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    path = _tokenizer_file(tmp_path)
    config = base.get_config()
    config.model.tokenizer = str(path)
    assert config.model.bos_token == "auto"
    rows = _checklist(config, with_run=True)  # the file adds nothing before a text
    assert rows["tokenizer"] == f"{path} (13 ids; no BOS before each prompt)"
    rust = Tokenizer.from_file(str(path))
    rust.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    rust.save(str(path))
    run = build_run(validate_config(config))
    assert (run.tokenizer.bos_token, run.tokenizer.bos_id, run.tokenizer.add_bos) == (
        "<s>",
        2,
        True,
    )
    rows = _checklist(config, with_run=True)
    assert rows["tokenizer"] == f"{path} (13 ids; BOS <s> (id 2) before each prompt)"
    config.model.bos_token = ""  # none, whatever the file adds
    assert not build_run(validate_config(config)).tokenizer.add_bos


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
        ("rollout", "stop_token_ids", (2, 200), r"rollout.stop_token_ids: 200 is not a token id"),
        ("model", "head_dim", 3, "model.head_dim: head_dim=3 must be an even integer"),
        ("ppo", "reward_kl_kind", "bogus", r"ppo.reward_kl_kind: 'bogus' is not one of \['k1'"),
    ],
)
def test_build_errors_name_the_key(section, key, value, match):
    config = base.get_config()
    if section == "ppo":
        config.experiment.algorithm = "ppo"
    config[section][key] = value
    with pytest.raises(ConfigError, match=match):
        build_run(validate_config(config))


def test_jsonl_task_errors_name_the_key(tmp_path):
    from configs import jsonl

    def error(**task):
        config = jsonl.get_config()
        config.task.update(task)
        with pytest.raises(ConfigError) as info:
            build_run(validate_config(config))
        return str(info.value)

    assert error(path=str(tmp_path)).startswith("task.path: JSONL file")  # a directory
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    assert error(path=str(tmp_path / "bad.jsonl")).startswith("task.path: ")
    assert "missing field 'answer'" in error(path=str(tmp_path / "bad.jsonl"))
    assert error(reward_fn="nomodule:fn").startswith("task.reward_fn: reward function")
    assert error(reward_fn="mod.fn") == (
        "task.reward_fn: 'mod.fn' must look like 'module.path:function'"
    )
    assert error(reward_fn="mod:fn", options={"reward": "numeric"}) == (
        "task.reward_fn: and task.options.reward='numeric' both choose the task's reward; set "
        "one of them"
    )
    config = base.get_config()  # the copy task
    config.task.update(reward_fn="mod:fn", options={"reward_fn": "other:fn"})
    with pytest.raises(ConfigError, match=r"and task.options.reward_fn='other:fn' both"):
        build_run(validate_config(config))


def test_head_dim_sets_the_heads_width():
    config = base.get_config()
    config.model.num_attention_heads, config.model.num_key_value_heads = 3, 1
    with pytest.raises(ConfigError, match=r"^model.head_dim: head_dim=None needs hidden_size"):
        build_run(validate_config(config))
    config.model.head_dim = 8
    assert build_run(validate_config(config)).model.policy.head_dim == 8


def test_prompts_that_do_not_fit_are_refused_before_training_unless_truncated():
    from novarl_jax.trainer.loop import check_startup

    config = base.get_config()
    config.rollout.max_prompt_length = 4
    run = build_run(validate_config(config))
    with pytest.raises(ConfigError, match=r"^rollout.max_prompt_length: a prompt has \d+ tokens"):
        check_startup(run)
    config.rollout.prompt_truncation = "left"
    run = build_run(validate_config(config))
    (warning,) = check_startup(run)  # the first step's prompts, all cut
    prompts = config.rollout.prompts_per_step
    assert warning == (
        f"{prompts} of the {prompts} prompts of step 1 have more than "
        "rollout.max_prompt_length=4 tokens; rollout.prompt_truncation='left' keeps their "
        "last tokens, while the task scores the whole prompt"
    )
    tokens, mask = run.tokenizer.encode_batch(["reverse abc:"], max_length=4)
    assert run.tokenizer.decode(tokens[0]) == "bc:"  # BOS, then the prompt's last tokens


def test_every_jsonl_prompt_is_checked_before_training_with_its_line(tmp_path):
    from configs import jsonl
    from novarl_jax.trainer.loop import check_startup

    path = tmp_path / "long.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)]
    rows.insert(30, {"prompt": "x" * 200, "answer": "0"})  # far past the first step's prompts
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = jsonl.get_config()
    config.task.path = str(path)
    config.task.options.shuffle = False
    run = build_run(validate_config(config))
    match = rf"^rollout\.max_prompt_length: the prompt at {path}:31 has \d+ tokens"
    with pytest.raises(ConfigError, match=match):
        check_startup(run)
    config.rollout.prompt_truncation = "right"
    (warning,) = check_startup(build_run(validate_config(config)))  # cut when it comes up
    assert warning.startswith(
        "1 of the 41 prompts in task.path have more than rollout.max_prompt_length=48 tokens; "
        "rollout.prompt_truncation='right' keeps their first tokens"
    )
    config.rollout.max_prompt_length = 201  # BOS and the 200 characters fit: no warning
    config.model.max_position_embeddings = 512
    assert check_startup(build_run(validate_config(config))) == []


def test_prompts_that_begin_with_the_bos_token_are_warned_about(tmp_path):
    from tokenizers import Tokenizer

    from configs import jsonl
    from novarl_jax.trainer.loop import check_startup

    path = tmp_path / "bos.jsonl"
    rows = [{"prompt": f"{'<s>' if i % 3 == 0 else ''}ab:", "answer": "ba"} for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = jsonl.get_config()
    config.task.path = str(path)
    tokenizer = Tokenizer.from_file(str(_tokenizer_file(tmp_path)))
    tokenizer.add_special_tokens(["<s>"])  # so '<s>' in a text is that token
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config.model.tokenizer = str(tmp_path / "tokenizer.json")
    config.model.bos_token = "<s>"
    assert check_startup(build_run(validate_config(config))) == [
        "3 of the 9 prompts in task.path begin with the BOS token <s>, and the tokenizer puts "
        "another before each (model.bos_token='<s>'); drop it from the prompts, or set "
        "model.bos_token=''"
    ]
    config.model.bos_token = ""
    assert check_startup(build_run(validate_config(config))) == []


def test_a_prompt_length_that_leaves_only_bos_is_refused():
    config = base.get_config()
    config.rollout.update(max_prompt_length=1, prompt_truncation="left")
    with pytest.raises(ConfigError, match=r"^rollout.max_prompt_length: 1 leaves no room for a "
                       r"prompt after the tokenizer's BOS token .*; give at least 2$"):  # fmt: skip
        build_run(validate_config(config))
    config.rollout.max_prompt_length = 2
    build_run(validate_config(config))


def test_an_empty_prompt_without_bos_is_refused_before_training_with_its_line(tmp_path):
    """It reached the sampler as a row of padding and stopped the run mid-way."""
    from configs import jsonl
    from novarl_jax.rollout.engine import EmptyPromptError
    from novarl_jax.trainer.loop import check_startup

    path = tmp_path / "empty.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]
    rows[9]["prompt"] = rows[11]["prompt"] = ""  # the first is named
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = jsonl.get_config()
    config.task.path = str(path)
    config.task.options.shuffle = False
    config.model.tokenizer = str(_tokenizer_file(tmp_path))
    config.model.bos_token = ""
    run = build_run(validate_config(config))
    with pytest.raises(ConfigError) as info:
        check_startup(run)
    assert str(info.value) == (
        f"task.path: {path}:10: the prompt '' encodes to no token (the tokenizer adds no BOS "
        "token); every prompt needs at least one: give it text, or set model.bos_token"
    )
    with pytest.raises(EmptyPromptError) as drawn:  # what a rollout drawing it raises
        run.rollout_engine(None).encode_prompts(jax.random.key(0), 12)
    assert drawn.value.index == 9
    config.model.bos_token = "<s>"  # with BOS the empty prompt has a token
    check_startup(build_run(validate_config(config)))


def test_an_unknown_task_option_is_named_with_the_valid_ones():
    from configs import addition, jsonl

    config = addition.get_config()
    config.task.options.bogus = 3
    with pytest.raises(ConfigError) as info:
        build_run(validate_config(config))
    assert str(info.value) == (
        "task.options.bogus: task 'addition' has no option 'bogus'; its options: max_operand"
    )
    config = jsonl.get_config()
    config.task.options.reward = "numeric"  # the JSONL task's own reward option is fine
    build_run(validate_config(config))
    config.task.options.shuffel = False
    with pytest.raises(ConfigError, match=r"^task.options.shuffel: .*its options: reward, "
                       r"prompt_field, answer_field, prompt_template, shuffle, seed$"):  # fmt: skip
        build_run(validate_config(config))


@pytest.mark.parametrize("option", ["prompt_field", "answer_field"])
def test_a_missing_jsonl_field_is_blamed_on_the_option_naming_it(option):
    from configs import jsonl

    config = jsonl.get_config()
    config.task.options[option] = "solution"
    with pytest.raises(ConfigError, match=rf"^task.options.{option}: .*missing field 'solution'"):
        build_run(validate_config(config))


def test_checklist_capacity_is_capped_at_the_group_tokens():
    # The MoE block never gives an expert more slots than the group has tokens.
    from configs import moe

    config = moe.get_config()
    config.experiment.update(world_size=2, tensor_parallel_size=1, pipeline_parallel_size=1,
                             expert_parallel_size=1, capacity_factor=3.0)  # fmt: skip
    config.train.update(minibatches=1, epochs=1)
    rows = _checklist(config)
    groups = [
        int(g) for g in rows["positions per group (update), prompts / completions"].split(" / ")
    ]
    capacities = [int(c) for c in rows["capacity per expert (C, at most)"].split(" / ")]
    assert capacities == groups  # factor 3 x top-2 / 4 experts = 1.5 x tokens, capped


@pytest.mark.parametrize("microbatches", [8, 16])
def test_checklist_routing_group_of_a_microbatch_the_shards_do_not_divide(microbatches):
    # configs/moe.py (tp2 pp2 ep2: 2 data shards): 16 update rows of 24 tokens. 16 pipeline
    # microbatches of one row each are padded to a row per shard: 24 tokens, not 12.
    from configs import moe

    config = moe.get_config()
    config.experiment.num_microbatches = microbatches
    rows = _checklist(config)
    assert rows["positions per group (update)"] == "24"
    assert rows["capacity per expert (C, at most)"] == "15"


def test_checklist_describes_the_experts_on_each_shard_and_the_drop_policy():
    from configs import moe

    config = moe.get_config()  # 4 experts over ep 2
    rows = _checklist(config)
    assert rows["experts (E)"] == "4"
    assert rows["experts per shard (E / ep)"] == "2"
    assert (rows["capacity factor"], rows["drop policy"]) == ("1.25", "position")
    config.experiment.capacity_factor = None
    rows = _checklist(config)
    assert (rows["capacity factor"], rows["drop policy"]) == ("dropless", "none (dropless)")
    assert "min capacity" not in rows
    config.experiment.update(eval_capacity_factor=2.0, drop_policy="probs", min_capacity=4)
    rows = _checklist(config)
    assert (rows["capacity factor"], rows["drop policy"]) == ("dropless (rollout: 2)", "probs")
    assert rows["min capacity"] == "4"
    # The routing keys reach the policy's router (the sampler and the update read it there).
    router = build_run(validate_config(config)).model.policy.router
    assert (router.eval_capacity_factor, router.drop_policy, router.min_capacity) == (
        2.0,
        "probs",
        4,
    )


def test_checklist_says_how_far_asynchronous_rollouts_sample_ahead():
    config = base.get_config()
    config.experiment.update(algorithm="ppo", grpo_group_size=1, async_rollouts=True,
                             rollout_workers=2, rollout_queue_size=4)  # fmt: skip

    def rollouts():
        return _checklist(config)["rollouts"]

    assert rollouts() == "asynchronous: 2 workers, 4 sampled ahead"
    config.experiment.rollout_queue_size = 0  # one per worker
    assert rollouts() == "asynchronous: 2 workers, 2 sampled ahead"


def test_checklist_names_the_seed_of_random_initial_weights():
    config = base.get_config()
    config.experiment.seed = 3
    assert _checklist(config, with_run=True)["initial weights"] == "random (experiment.seed=3)"


@pytest.mark.parametrize(
    "algorithm,key,value,match",
    [
        ("grpo", "ppo.gamma", 5.0, r"gamma must be in \[0, 1\]"),
        ("grpo", "ppo.reward_kl_kind", "bogus", "'bogus' is not one of"),
        ("grpo", "ppo.vf_coef", -3.0, "vf_coef must be a number >= 0"),
        ("ppo", "grpo.clip_ratio_low", 5.0, r"clip_ratio_low must be in \[0, 1\)"),
        ("ppo", "grpo.advantage_estimator", "bogus", "'bogus' is not one of"),
    ],
)
def test_the_other_algorithms_section_is_checked_too(algorithm, key, value, match):
    """Its values go into the run's config.json and apply the day it switches algorithm."""
    config = base.get_config()
    config.experiment.algorithm = algorithm
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=match) as info:
        build_run(validate_config(config))
    assert info.value.key == key


def test_checklist_names_the_optimizer_and_a_warmup_longer_than_the_run():
    config = base.get_config()  # 20 steps x 2 epochs x 2 minibatches = 80 updates

    def row():
        return _checklist(config)["optimizer"]

    assert row() == "AdamW, lr 0.003 constant, 80 updates"
    config.optim.warmup_steps = 10
    assert row() == "AdamW, lr 0.003 constant, 80 updates, warmup 10"
    config.optim.warmup_steps = 1000
    assert row().endswith("warmup 1000 (longer than the run: the peak rate is never reached)")
    config.optim.warmup_steps = 80  # as long as the run: its last update still warms up
    assert row().endswith("warmup 80 (longer than the run: the peak rate is never reached)")


def test_checklist_describes_the_validation():
    config = base.get_config()  # 8 prompts x 4 samples per step: batches of 32 rows

    assert "validation" not in _checklist(config)
    config.eval.update(interval=5, prompts=8)
    assert _checklist(config)["validation"] == "every 5 steps and the last: 8 x 1, greedy"
    config.eval.update(prompts=20, samples=4, temperature=0.7)
    assert _checklist(config)["validation"] == (
        "every 5 steps and the last: 20 x 4, temperature 0.7, in batches of 8 prompts"
    )
    config.eval.prompts_per_batch = 32
    assert _checklist(config)["validation"].endswith("20 x 4, temperature 0.7")
    config.rollout.update(top_k=5, top_p=0.9)  # evaluation samples with them too
    assert _checklist(config)["validation"].endswith(
        "20 x 4, temperature 0.7 (rollout's top-k 5, top-p 0.9)"
    )


def test_a_dense_model_ignores_experiment_top_k():
    config = base.get_config()
    assert config.experiment.num_experts == 0
    config.experiment.top_k = 0
    assert build_run(validate_config(config)).model.policy.num_local_experts == 0


def test_checklist_names_the_dapo_options_that_are_on():
    config = base.get_config()

    assert "DAPO" not in _checklist(config)
    config.dapo.update(dynamic_sampling=True, overlong_buffer=4, mask_truncated=True)
    assert _checklist(config)["DAPO"] == (
        "dynamic sampling (up to 2 extra batches), overlong penalty up to 1 in the last 4 tokens, "
        "truncated completions masked"
    )


def test_ppo_may_leave_grpo_group_size_at_one():
    config = base.get_config()
    config.experiment.update(algorithm="ppo", grpo_group_size=1)
    build_run(validate_config(config))  # GRPO's own checks need a group of 2; PPO has none


_WORD_TASK = '''
import numpy as np

from novarl_jax.rollout.tasks import BaseTask, numpy_rng


class WordLength(BaseTask):
    """Answer with the length of a word (1-3 letters)."""

    name = "word_length"
    alphabet = "abc123:"

    def __init__(self, *, letters="abc", reward_fn=None):
        super().__init__(reward_fn)
        self.letters = letters

    def sample_prompts(self, key, batch_size):
        rng = numpy_rng(key)
        words = ["".join(rng.choice(list(self.letters), int(rng.integers(1, 4))))
                 for _ in range(batch_size)]
        return [w + ":" for w in words], [{"answer": str(len(w))} for w in words]

    def default_reward(self, prompts, completions, metadata):
        return [float(c.strip() == m["answer"]) for c, m in zip(completions, metadata)]


class EmptyFrom(WordLength):
    """Its second prompt is empty from its ``empty_from``-th draw on."""

    def __init__(self, *, letters="abc", empty_from=1):
        super().__init__(letters=letters)
        self.empty_from, self.draws = empty_from, 0

    def sample_prompts(self, key, batch_size):
        self.draws += 1
        prompts, metadata = super().sample_prompts(key, batch_size)
        if self.draws >= self.empty_from:
            prompts[1] = ""
        return prompts, metadata


class NoState:
    def __init__(self):
        pass

    def sample_prompts(self, key, batch_size):
        return ["a:"] * batch_size, [{}] * batch_size

    def score(self, prompts, completions, metadata):
        return np.zeros(len(prompts), np.float32), [{}] * len(prompts)


class Plain:  # no task, and no constructor of its own
    pass


class Delegating:  # a task by delegation: its methods are found only on instances
    def __init__(self, *, letters="abc"):
        self._inner = WordLength(letters=letters)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class NumpyState(WordLength):
    def get_state(self):
        return {"position": np.int64(3)}


class FromFile(BaseTask):
    """Prompts read in order from a file of lines (the task's own dataset)."""

    alphabet = "abc123:"

    def __init__(self, path, reward_fn=None):
        super().__init__(reward_fn)
        self.path = path
        with open(path) as f:
            self.lines = f.read().split()

    def sample_prompts(self, key, batch_size):
        return self.lines[:batch_size], [{"answer": "1"}] * batch_size

    def default_reward(self, prompts, completions, metadata):
        return [0.0] * len(prompts)


class NoReward(FromFile):
    def __init__(self, path):
        super().__init__(path)
'''


def test_an_empty_prompt_a_task_of_ones_own_draws_names_task_name(tmp_path, monkeypatch):
    """Such a task cannot list its prompts: the start-up check sees the first step's, and a
    later step's is named alike (it was a raw ValueError from the encoder)."""
    from quiet_train import train_quietly

    from novarl_jax.trainer.loop import check_startup

    (tmp_path / "word_tasks.py").write_text(_WORD_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = base.get_config()
    config.task.name = "word_tasks:EmptyFrom"
    config.task.options.update(letters="ab", empty_from=1)
    config.model.update(tokenizer=str(_tokenizer_file(tmp_path)), bos_token="")
    config.experiment.steps = 2
    config.checkpoint.async_save = False
    config.logging.update(plot=False, progress=False)
    message = (
        "task.name: the prompt '' encodes to no token (the tokenizer adds no BOS token); every "
        "prompt needs at least one: give it text, or set model.bos_token"
    )
    with pytest.raises(ConfigError) as info:
        check_startup(build_run(validate_config(config)))
    assert str(info.value) == message
    config.task.options.empty_from = 3  # the start-up check's draw and step 1's are not empty
    with pytest.raises(ConfigError) as info:
        train_quietly(config, tmp_path / "run")
    assert str(info.value) == message
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_task_of_ones_own_runs_by_module_and_class(tmp_path, monkeypatch):
    from quiet_train import train_quietly

    (tmp_path / "word_tasks.py").write_text(_WORD_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = base.get_config()
    config.task.name = "word_tasks:WordLength"
    config.task.options.letters = "ab"
    config.experiment.steps = 1
    config.checkpoint.async_save = False
    config.logging.update(plot=False, progress=False)
    run = build_run(validate_config(config))
    assert run.task.letters == "ab" and run.tokenizer.vocab_size == 3 + 7  # its alphabet
    result = train_quietly(config, tmp_path / "run")
    assert np.isfinite(result["critic/score/mean"])

    def error(name, **options):
        import ml_collections

        config.task.name, config.task.options = name, ml_collections.ConfigDict(options)
        with pytest.raises(ConfigError) as info:
            build_run(validate_config(config))
        return info.value

    e = error("word_tasks:WordLength", colour=1)
    assert e.key == "task.options.colour" and "its options: letters" in str(e)
    e = error("word_tasks:NoState")
    assert e.key == "task.name" and "lacks get_state, set_state of the Task protocol" in str(e)
    e = error("word_tasks:Plain", letters="ab")  # was the constructor's TypeError
    assert e.key == "task.name" and "lacks sample_prompts, score, get_state, set_state" in str(e)
    config.task.name, config.task.options = "word_tasks:Delegating", {"letters": "ab"}
    assert build_run(validate_config(config)).task.letters == "ab"  # checked once built
    e = error("word_tasks:Missing")
    assert e.key == "task.name" and "has no attribute 'Missing'" in str(e)
    e = error("word_tasks:WordLength.sample_prompts")
    assert e.key == "task.name" and "is not a class" in str(e)
    # A dataset of one's own takes task.path, and eval.path for its validation task.
    (tmp_path / "train.txt").write_text("a: b: c: a: b: c: a: b:")
    (tmp_path / "eval.txt").write_text("c: c: c: c:")
    config.task.name, config.task.path = "word_tasks:FromFile", str(tmp_path / "train.txt")
    config.task.options = {}
    config.eval.update(interval=1, path=str(tmp_path / "eval.txt"), prompts=4)
    run = build_run(validate_config(config))
    assert run.task.path.endswith("train.txt") and run.eval_task.path.endswith("eval.txt")
    config.task.reward_fn = "novarl_jax.rollout.rewards:exact_match_reward"
    e = error("word_tasks:NoReward")
    assert e.key == "task.reward_fn" and "takes no reward_fn= argument" in str(e)
    config.task.reward_fn, config.task.path, config.eval.path = "", "", ""
    config.eval.interval = 0
    e = error("word_tasks:NumpyState")
    assert e.key == "task.name" and "get_state() must return plain JSON values" in str(e)


def test_a_stop_id_must_lie_below_the_vocabulary_size():
    config = base.get_config()
    vocab = build_run(validate_config(config)).model.policy.vocab_size
    config.rollout.stop_token_ids = (vocab - 1,)
    build_run(validate_config(config))
    config.rollout.stop_token_ids = (vocab,)
    with pytest.raises(ConfigError, match=f"rollout.stop_token_ids: {vocab} is not a token id"):
        build_run(validate_config(config))


@pytest.mark.parametrize("key", ["epochs", "minibatches", "micro_batches", "max_consecutive_skips"])
def test_train_counts_must_be_at_least_one(key):
    config = base.get_config()
    config.train[key] = 0
    with pytest.raises(ConfigError, match=f"train.{key}: must be >= 1, got 0"):
        build_run(validate_config(config))


def test_micro_batches_must_divide_each_minibatch_not_only_the_step():
    config = base.get_config()  # 32 rollouts per step
    config.train.minibatches, config.train.micro_batches = 4, 16
    with pytest.raises(
        ConfigError, match="train.micro_batches: 16 does not divide the minibatch of 8 rollouts"
    ):
        build_run(validate_config(config))


def test_grpo_keeps_a_reference_policy_only_for_a_kl_term():
    config = base.get_config()
    config.grpo.beta = 0.0
    assert build_run(validate_config(config)).needs_reference is False
    config.grpo.beta = 0.1
    assert build_run(validate_config(config)).needs_reference is True


def test_a_tensor_parallel_size_that_splits_no_weight_is_warned_of(devices):
    """tp=8 with 4 heads, 2 KV heads, 36 hidden units and 13 tokens: every weight stays
    replicated and the 8 devices compute the same, which ran without a word."""
    from novarl_jax.trainer.loop import Trainer, default_mesh, unsplit_tensor_parallelism

    warnings = {}
    for tp in (8, 2):
        config = base.get_config()
        config.experiment.update(world_size=8, tensor_parallel_size=tp)
        config.model.intermediate_size = 36
        spec = validate_config(config)
        run, mesh = build_run(spec), default_mesh(spec)
        state, _ = Trainer(run, "", mesh=mesh).initial_state()
        warnings[tp] = unsplit_tensor_parallelism(state.params["policy"], mesh, run)
    assert warnings == {
        8: "experiment.tensor_parallel_size=8 splits no weight of the policy (4 heads, 2 KV "
        "heads, intermediate_size 36, vocabulary 13: none is a multiple of 8), so the 8 "
        "tensor-parallel devices all compute the same; use a tensor_parallel_size that divides "
        "them",
        2: None,
    }


def test_checklist_says_what_tensor_parallelism_splits_and_what_stays_replicated():
    from configs import moe

    config = moe.get_config()  # tp2: 4 heads, 2 KV heads, experts' hidden 64, 13 task ids
    rows = _checklist(config, with_run=True)
    assert rows["split over tp=2"] == (
        "attention heads, KV heads, expert hidden; replicated, as tp does not divide them: "
        "vocab (13)"
    )
    config.experiment.update(tensor_parallel_size=1, expert_parallel_size=4)
    assert not any(key.startswith("split over") for key in _checklist(config, with_run=True))


def test_checklist_shows_the_sampling_and_the_ids_that_end_a_completion():
    config = base.get_config()
    assert _checklist(config)["sampling"] == "temperature 1, top-k off, top-p off"
    config.rollout.update(temperature=0.5, top_k=5, top_p=0.9, stop_token_ids=(3, 4))
    rows = _checklist(config, with_run=True)
    assert rows["sampling"] == "temperature 0.5, top-k 5, top-p 0.9, stop ids 3, 4"
    config.rollout.stop_token_ids = ()  # the tokenizer's end of sequence
    rows = _checklist(config, with_run=True)
    assert rows["sampling"].endswith(", stop ids 2")


def test_checklist_names_the_stop_tokens_of_a_tokenizer_file(tmp_path):
    config = base.get_config()
    config.model.tokenizer = str(_tokenizer_file(tmp_path))
    config.rollout.stop_token_ids = (1, "a")
    assert _checklist(config, with_run=True)["sampling"].endswith(", stop ids 1 </s>, 9 a")


def test_chat_template_makes_each_prompt_a_user_turn(tmp_path):
    from tokenizers import Tokenizer

    from configs import jsonl
    from novarl_jax.trainer.loop import check_startup

    tokenizer = Tokenizer.from_file(str(_tokenizer_file(tmp_path)))
    tokenizer.add_special_tokens(["<s>", "[INST]", "[/INST]"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}[INST]{{ messages[-1]['content'] }}[/INST]"
    settings = {"chat_template": template, "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"ab{c}", "answer": "a"}) + "\n" for c in "cd"))
    config = jsonl.get_config()
    config.task.path = str(path)
    config.model.tokenizer = str(tmp_path / "tokenizer.json")
    config.rollout.chat_template = True
    run = build_run(validate_config(config))
    tok = run.tokenizer
    # The template writes BOS: 'auto' adds none of its own.
    assert not tok.add_bos
    ids = {t: tokenizer.token_to_id(t) for t in ("<s>", "[INST]", "[/INST]", "a", "b", "c")}
    want = [ids[t] for t in ("<s>", "[INST]", "a", "b", "c", "[/INST]")]
    tokens, mask = tok.encode_batch(["abc"], max_length=8)
    assert tokens[0][mask[0] == 1].tolist() == want
    assert check_startup(run) == []
    rows = _checklist(config, with_run=True)
    assert rows["tokenizer"].endswith(
        "the chat template's own BOS before each prompt); prompts as user turns of "
        f"{tmp_path}/tokenizer_config.json"
    )
    config.model.bos_token = "<s>"  # a second BOS before the template's: warned about
    (warning,) = check_startup(build_run(validate_config(config)))
    assert warning == (
        "2 of the 2 prompts in task.path begin, as the chat template renders them, with the BOS "
        "token <s>, and the tokenizer puts another before each (model.bos_token='<s>'); set "
        "model.bos_token='auto' (the template's BOS alone) or ''"
    )
    config.model.bos_token = "auto"
    config.rollout.system_prompt = "Be brief."  # (this template leaves it out)
    assert _checklist(config, with_run=True)["tokenizer"].endswith("after a system message")
    config.rollout.prompt_truncation = "left"  # would cut the template's markup
    with pytest.raises(ConfigError, match=r"^rollout.prompt_truncation: 'left' would cut the chat"):
        build_run(validate_config(config))
    config.rollout.prompt_truncation = "error"
    config.rollout.max_prompt_length = 4  # too short, and not to be cut: the fix offered
    with pytest.raises(ConfigError) as info:
        check_startup(build_run(validate_config(config)))
    assert str(info.value).startswith(
        f"rollout.max_prompt_length: the prompt at {path}:1 has 6 tokens as the chat template "
        "renders it, more than rollout.max_prompt_length=4: 'abc'; raise "
        "rollout.max_prompt_length or shorten the prompts"
    )
    config.rollout.max_prompt_length = 48
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ConfigError, match=r"^rollout.chat_template: .* has no chat template"):
        build_run(validate_config(config))  # the template's fault, not the system prompt's
    settings["pad_token"] = {"content": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    config.model.pad_token = "<|pad|>"  # another model's
    with pytest.raises(ConfigError) as info:
        build_run(validate_config(config))
    assert str(info.value) == (
        "model.pad_token: pad_token='<|pad|>' is not in the tokenizer's vocabulary; the "
        "tokenizer_config.json beside it names pad_token '<pad>'"
    )
    config.model.pad_token = "<pad>"
    config.model.tokenizer = ""  # the built-in tokenizer has no template
    with pytest.raises(ConfigError, match=r"^rollout.chat_template: needs a tokenizer.json"):
        build_run(validate_config(config))


def test_conversation_prompts_are_laid_out_by_the_chat_template(tmp_path):
    from tokenizers import Tokenizer

    from configs import jsonl
    from novarl_jax.rollout.tokenizers import HFTokenizer
    from novarl_jax.trainer.loop import check_startup

    tokenizer = Tokenizer.from_file(str(_tokenizer_file(tmp_path)))
    tokenizer.add_special_tokens(["[S]", "[U]", "[A]"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ '[' + m['role'][0] | upper + ']' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[A]{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    conversation = [{"role": "system", "content": "ab"}, {"role": "user", "content": "cd"}]
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": conversation, "answer": "a"}, {"prompt": "dc", "answer": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = jsonl.get_config()
    config.task.path = str(path)
    config.model.tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError) as info:
        build_run(validate_config(config))
    assert str(info.value) == (
        "rollout.chat_template: the prompts of task.path include conversations (lists of "
        "messages), which only a chat template lays out: set rollout.chat_template=True, with a "
        "tokenizer.json that has one beside it"
    )
    config.rollout.chat_template = True
    run = build_run(validate_config(config))
    assert check_startup(run) == []
    prompts, _ = run.task.sample_prompts(None, 2)
    tokens, mask = run.tokenizer.encode_batch(prompts, max_length=12)
    ids = {t: tokenizer.token_to_id(t) for t in ("[S]", "[U]", "[A]", "a", "b", "c", "d")}
    assert tokens[0][mask[0] == 1].tolist() == [ids[t] for t in ("[S]", *"ab", "[U]", *"cd", "[A]")]
    assert tokens[1][mask[1] == 1].tolist() == [ids[t] for t in ("[U]", *"dc", "[A]")]
    row = _checklist(config, with_run=True)["tokenizer"]
    assert "no BOS before each prompt); prompts (texts as user turns, conversations as" in row
    # A system prompt beside a conversation's own system message: the line is named.
    config.rollout.system_prompt = "Hi."
    with pytest.raises(ConfigError) as info:
        check_startup(build_run(validate_config(config)))
    assert str(info.value).startswith(
        f"rollout.system_prompt: the prompt at {path}:1: {tmp_path}/tokenizer_config.json: the "
        "conversation has its own system message, and the system prompt would add a second"
    )
    config.rollout.system_prompt = ""
    config.rollout.max_prompt_length = 4  # the message quotes the conversation's last turn
    with pytest.raises(ConfigError) as info:
        check_startup(build_run(validate_config(config)))
    assert str(info.value).startswith(
        f"rollout.max_prompt_length: the prompt at {path}:1 has 7 tokens as the chat template "
        "renders it, more than rollout.max_prompt_length=4: 'cd'; raise"
    )
    # Validation prompts are checked alike.
    config.rollout.max_prompt_length = 12
    config.rollout.chat_template = False
    config.task.path = str(path.with_name("texts.jsonl"))
    path.with_name("texts.jsonl").write_text(json.dumps(rows[1]) + "\n")
    config.eval.interval, config.eval.path, config.eval.prompts = 1, str(path), 2
    with pytest.raises(ConfigError, match=r"^rollout.chat_template: the prompts of eval.path "):
        build_run(validate_config(config))
    # A validation conversation with its own system message beside rollout.system_prompt.
    config.rollout.chat_template, config.rollout.system_prompt = True, "Hi."
    with pytest.raises(ConfigError) as info:
        check_startup(build_run(validate_config(config)))
    assert str(info.value).startswith(
        "rollout.system_prompt: an evaluation prompt: "
    ) and "has its own system message" in str(info.value)
    config.rollout.chat_template, config.rollout.system_prompt = False, ""
    # A task of one's own that hands out conversations, and no chat template: named alike.
    config.eval.interval = 0
    run = build_run(validate_config(config))
    run.task.all_prompts = lambda: [("mine:1", conversation)]
    with pytest.raises(ConfigError) as info:
        check_startup(run)
    assert str(info.value).startswith(
        "rollout.chat_template: the prompt at mine:1: texts[0] is a conversation (a list of "
        "messages), which only a tokenizer with a chat template encodes"
    )
    # A tokenizer without a template refuses a conversation it is asked to encode.
    with pytest.raises(ValueError, match=r"texts\[0\] is a conversation \(a list of messages\)"):
        HFTokenizer(
            str(tmp_path / "tokenizer.json"), pad_token="<pad>", eos_token="</s>"
        ).encode_batch([conversation])


def test_checklist_names_a_scaled_rotary_embedding():
    from configs import copy

    config = copy.get_config()
    config.model.init_from = str(pathlib.Path(__file__).parents[1] / "data" / "hf" / "llama3_rope")
    row = _checklist(config, with_run=True)["architecture"]
    assert row.endswith("dense MLP; rotary scaled x8 from 64 positions (llama3)")
    config.model.init_from = config.model.init_from.replace("llama3_rope", "llama")
    assert _checklist(config, with_run=True)["architecture"].endswith("dense MLP")
    config.model.init_from = config.model.init_from.replace("llama", "qwen2")
    row = _checklist(config, with_run=True)["architecture"]
    assert row.endswith("4 heads of width 8 (2 KV, q/k/v biases), dense MLP")
    config.model.init_from = config.model.init_from.replace("qwen2", "qwen3")
    row = _checklist(config, with_run=True)["architecture"]
    assert row.endswith("4 heads of width 16 (2 KV, q/k norms), dense MLP")


def test_auto_special_tokens_are_those_tokenizer_config_json_names(tmp_path):
    path = _tokenizer_file(tmp_path, specials=("<|endoftext|>", "<|im_end|>", "<pad>", "</s>"))
    config = base.get_config()
    config.model.tokenizer = str(path)
    # Without a tokenizer_config.json: the conventional tokens.
    tok = build_run(validate_config(config)).tokenizer
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "</s>")
    # With one (Qwen's names): its tokens.
    settings = {"pad_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    tok = build_run(validate_config(config)).tokenizer
    assert (tok.pad_token, tok.eos_token, tok.pad_id, tok.eos_id) == (
        "<|endoftext|>", "<|im_end|>", 0, 1
    )  # fmt: skip
    config.model.eos_token = "</s>"  # a named token wins
    assert build_run(validate_config(config)).tokenizer.eos_token == "</s>"
    # A token the file names that the vocabulary lacks, and no file with no fallback.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    with pytest.raises(ConfigError) as info:
        build_run(validate_config(config))
    assert str(info.value) == (
        "model.pad_token: 'auto' takes the '<|pad|>' its tokenizer_config.json names, which is "
        f"not in the vocabulary of {path}: name the token (a model without a padding token can "
        "pad with its EOS)"
    )
    (tmp_path / "tokenizer_config.json").unlink()
    _tokenizer_file(tmp_path, specials=("<|endoftext|>", "<|im_end|>"))
    config.model.eos_token = "<|im_end|>"
    with pytest.raises(ConfigError) as info:
        build_run(validate_config(config))
    assert str(info.value).startswith(
        "model.pad_token: 'auto' takes its fallback '<pad>' (no tokenizer_config.json beside it "
        "names one), which is not in the vocabulary"
    )


def test_bos_auto_that_finds_no_single_bos_names_model_bos_token(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_file(
        str(_tokenizer_file(tmp_path, specials=("<pad>", "</s>", "<s>", "<x>")))
    )
    tok.post_processor = TemplateProcessing(
        single="<s> <x> $A", special_tokens=[("<s>", 2), ("<x>", 3)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    config = base.get_config()
    config.model.tokenizer = str(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"^model.bos_token: bos_token='auto': the tokenizer's "
                       r"post-processor puts 2 tokens"):  # fmt: skip
        build_run(validate_config(config))


def test_a_prompt_with_characters_the_tokenizer_would_drop_names_the_file_line(tmp_path):
    from tokenizers import Tokenizer, models

    from configs import jsonl
    from novarl_jax.trainer.loop import check_startup

    # A BPE without an unknown token would encode "abd" as "ab".
    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4}
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"ab{c}", "answer": "a"}) + "\n" for c in "cd"))
    config = jsonl.get_config()
    config.task.path = str(path)
    config.model.update(tokenizer=str(tmp_path / "tokenizer.json"), bos_token="")
    with pytest.raises(ConfigError) as info:
        check_startup(build_run(validate_config(config)))
    assert str(info.value).startswith(
        f"model.tokenizer: the prompt at {path}:2: characters 'd' of 'abd' have no token in the "
        "tokenizer's vocabulary, which has no unknown token, so they would be dropped silently"
    )


def test_a_completion_length_too_short_for_the_tasks_answers_is_warned_about():
    from configs import addition, reverse
    from novarl_jax.trainer.loop import check_startup

    config = reverse.get_config()  # strings of 2 of "abc"; 4 new tokens
    assert check_startup(build_run(validate_config(config))) == []
    config.rollout.max_new_tokens = 1
    assert check_startup(build_run(validate_config(config))) == [
        "rollout.max_new_tokens=1 is shorter than the task's longest answers ('ba': 2 tokens): "
        "their completions are cut before the end, so they cannot earn the full reward"
    ]
    config.rollout.max_new_tokens = 2  # fits, but leaves no room for the end token
    assert check_startup(build_run(validate_config(config))) == []
    config.dapo.mask_truncated = True
    (warning,) = check_startup(build_run(validate_config(config)))
    assert warning.startswith("rollout.max_new_tokens=2 leaves no room for the end token")
    config = addition.get_config()  # sums up to 6 in 2 new tokens
    config.task.options.max_operand = 50
    (warning,) = check_startup(build_run(validate_config(config)))
    assert warning.startswith("rollout.max_new_tokens=2 is shorter than the task's longest "
                              "answers ('100': 3 tokens)")  # fmt: skip
