"""RolloutEngine: trajectory layout, rewards, bad-reward exclusion, determinism, errors."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import ModelConfig, init_params, shard_params
from novarl_jax.rollout.engine import (
    RolloutEngine,
    RolloutInfo,
    SamplingConfig,
    Trajectory,
    take_info,
)
from novarl_jax.rollout.sampler import sample
from novarl_jax.rollout.tasks import AdditionTask, JSONLTask, TaskError
from novarl_jax.rollout.tokenizers import ByteTokenizer, CharTokenizer

BATCH, GROUP = 4, 2
SAMPLING = SamplingConfig(max_prompt_length=8, max_new_tokens=4, temperature=1.0, num_samples=GROUP)


@pytest.fixture(scope="module")
def setup():
    task = AdditionTask()
    tok = CharTokenizer(task.alphabet)
    config = ModelConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    params = init_params(config, jax.random.key(0))
    return config, params, task, tok


@pytest.fixture(scope="module")
def rolled(setup):
    config, params, task, tok = setup
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=SAMPLING)
    traj, info = engine.rollout(params, jax.random.key(5), policy_version=7, batch_size=BATCH)
    return engine, traj, info


def test_trajectory_layout_and_rewards(setup, rolled):
    config, params, task, tok = setup
    engine, traj, info = rolled
    rows = BATCH * GROUP
    assert isinstance(traj, Trajectory)
    assert traj.prompt_tokens.shape == traj.prompt_mask.shape == (rows, 8)
    assert traj.response_tokens.shape == traj.behavior_logprobs.shape == (rows, 4)
    np.testing.assert_array_equal(traj.group_ids, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(traj.policy_version, [7] * rows)
    assert traj.group_ids.dtype == jnp.int32 and traj.policy_version.dtype == jnp.int32
    assert traj.rewards.dtype == jnp.float32 and traj.valid.dtype == jnp.float32
    np.testing.assert_array_equal(traj.valid, np.ones(rows))
    assert traj.routing is None
    # Prompts are the task's, repeated per sample, and encoded left-padded.
    prompts, meta = task.sample_prompts(jax.random.split(jax.random.key(5))[0], BATCH)
    assert info.prompts == [p for p in prompts for _ in range(GROUP)]
    assert tok.decode_batch(traj.prompt_tokens, traj.prompt_mask)[::GROUP] == prompts
    assert (np.asarray(traj.prompt_mask)[:, -1] == 1).all()
    # Completions decode the response (stop token excluded); rewards are the task's scores.
    for r in range(rows):
        n = int(np.asarray(traj.response_mask)[r].sum())
        ids = np.asarray(traj.response_tokens)[r, :n]
        assert info.completions[r] == tok.decode([i for i in ids if i != tok.eos_id])
    expected, _ = task.score(info.prompts, info.completions, info.metadata)
    np.testing.assert_array_equal(traj.rewards, expected)
    assert info.invalid == [] and info.task_state == {}
    # Behaviour log-probs are the sampler's, for the same key split.
    tokens, mask = tok.encode_batch(prompts, max_length=8)
    out = sample(params, config, tokens, mask, jax.random.split(jax.random.key(5))[1],
                 max_new_tokens=4, stop_token_ids=(tok.eos_id,), pad_id=tok.pad_id,
                 num_samples=GROUP)  # fmt: skip
    np.testing.assert_array_equal(traj.response_tokens, out.response_tokens)
    np.testing.assert_array_equal(traj.behavior_logprobs, out.logprobs)
    np.testing.assert_array_equal(traj.policy_logprobs, out.policy_logprobs)


def test_a_trajectory_feeds_the_group_estimators_under_their_names(rolled):
    """estimator_batch() maps the rollout's names (rewards, valid) to the estimators' (scores,
    sample_mask), and its group_ids catch an estimator built for another group size, which
    otherwise computed baselines over the wrong rows without a word."""
    from novarl_jax.core.utils.advantages import make_advantage_estimator

    _, traj, _ = rolled
    batch = traj.estimator_batch()
    for name in ("grpo", "rloo", "reinforce_plus_plus_baseline"):
        advantages, _ = make_advantage_estimator(name, group_size=GROUP)(batch)
        assert advantages.shape == traj.response_mask.shape
        jitted = jax.jit(lambda b, n=name: make_advantage_estimator(n, group_size=GROUP)(b)[0])
        np.testing.assert_allclose(jitted(batch), advantages, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match=r"group_ids \[0, 0, 1, 1, 2, 2, 3, 3\] are not "
                           r"consecutive groups of group_size=4 rows"):  # fmt: skip
            make_advantage_estimator(name, group_size=4)(batch)
    # Any labels do, as long as each group's rows share one and neighbours differ.
    relabelled = {**batch, "group_ids": jnp.asarray([7, 7, 3, 3, 7, 7, 0, 0])}
    make_advantage_estimator("grpo", group_size=GROUP)(relabelled)
    interleaved = {**batch, "group_ids": jnp.asarray([0, 1, 0, 1, 2, 3, 2, 3])}
    with pytest.raises(ValueError, match="are not consecutive groups"):
        make_advantage_estimator("grpo", group_size=GROUP)(interleaved)
    # A group size smaller than the rollout's would baseline each half-group on its own.
    fours = {**batch, "group_ids": jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1])}
    with pytest.raises(ValueError, match=r"group_ids \[0, 0, 0, 0, 1, 1, 1, 1\] are not "
                       r"consecutive groups of group_size=2 rows"):  # fmt: skip
        make_advantage_estimator("grpo", group_size=GROUP)(fours)
    # The rollout's own name for the sample mask is refused, not ignored.
    renamed = {"response_mask": traj.response_mask, "scores": traj.rewards, "valid": traj.valid}
    with pytest.raises(ValueError, match="has 'valid' but no 'sample_mask'"):
        make_advantage_estimator("grpo", group_size=GROUP)(renamed)


def test_trajectory_is_a_jittable_pytree(rolled):
    _, traj, _ = rolled
    total = jax.jit(lambda t: jnp.sum(t.rewards * t.valid) + jnp.sum(t.response_mask))(traj)
    assert float(total) == pytest.approx(
        float(np.sum(traj.rewards)) + float(np.sum(traj.response_mask))
    )
    assert len(jax.tree.leaves(traj)) == 10  # routing None adds no leaf


def test_rollout_is_deterministic_for_a_key(setup, rolled):
    config, params, task, tok = setup
    engine, traj, _ = rolled
    again, _ = engine.rollout(params, jax.random.key(5), policy_version=7, batch_size=BATCH)
    for a, b in zip(traj, again, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_nan_rewards_are_reported_and_excluded(setup):
    config, params, _, tok = setup

    def flaky(prompts, completions, metadata):
        return [
            float("nan") if i == 3 else (float("inf") if i == 6 else 0.5)
            for i in range(len(prompts))
        ]

    task = AdditionTask(reward_fn=flaky)
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=SAMPLING)
    with pytest.warns(RuntimeWarning) as rec:
        traj, info = engine.rollout(params, jax.random.key(5), policy_version=0, batch_size=BATCH)
    messages = [str(w.message) for w in rec]
    assert len(messages) == 1  # one per rollout, not one per sample
    assert re.match(
        r"2 of 8 rewards are not finite: reward nan of sample 3 \(prompt index 1: '.*'\); "
        r"reward inf of sample 6 \(prompt index 3: '.*'\); those samples are excluded",
        messages[0],
    )
    assert info.invalid == [3, 6]
    np.testing.assert_array_equal(traj.valid, [1, 1, 1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(traj.rewards, [0.5, 0.5, 0.5, 0, 0.5, 0.5, 0, 0.5])
    mask = np.asarray(traj.response_mask)
    assert mask[3].sum() == 0 and mask[6].sum() == 0 and mask[[0, 1, 2, 4, 5, 7]].sum(1).min() >= 1
    assert np.isfinite(np.asarray(traj.rewards)).all()


@pytest.mark.parametrize("bad, more", [(3, ""), (4, "; and 1 more")])
def test_invalid_reward_warning_names_three_samples_and_counts_the_rest(setup, bad, more):
    config, params, _, tok = setup

    def flaky(prompts, completions, metadata):
        return [float("nan") if i < bad else 0.5 for i in range(len(prompts))]

    task = AdditionTask(reward_fn=flaky)
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=SAMPLING)
    with pytest.warns(RuntimeWarning) as rec:
        _, info = engine.rollout(params, jax.random.key(5), policy_version=0, batch_size=BATCH)
    (message,) = [str(w.message) for w in rec]
    assert message.startswith(f"{bad} of 8 rewards are not finite: reward nan of sample 0 ")
    assert "sample 2 (prompt index 1" in message and "sample 3 " not in message
    assert message.endswith(f"'){more}; those samples are excluded (from the loss, their "
                            "groups' baselines and validation scores)")  # fmt: skip
    assert info.invalid == list(range(bad))


def test_take_info_counts_invalid_rows_in_the_merged_batch():
    def info(name, invalid):
        return RolloutInfo(
            prompts=[f"{name}{i}" for i in range(4)],
            completions=[""] * 4,
            metadata=[{}] * 4,
            sample_info=[{}] * 4,
            invalid=invalid,
            task_state={},
        )

    # Rows 2, 3 of the first rollout (3 invalid), then rows 0, 1 of the second (0 invalid).
    merged = take_info([(info("a", [3]), np.arange(2, 4)), (info("b", [0]), np.arange(2))], {})
    assert merged.prompts == ["a2", "a3", "b0", "b1"]
    assert merged.invalid == [1, 2]


def _jsonl_engine(config, tmp_path):
    """An engine over a 5-line JSONL file of prompts "i+1=", in file order."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"prompt": "{i}+1=", "answer": "{i + 1}"}}\n' for i in range(5)))
    task = JSONLTask(path, reward="numeric", shuffle=False)
    tok = CharTokenizer(AdditionTask().alphabet)
    return RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=SAMPLING)


def test_jsonl_task_state_flows_through_info(setup, tmp_path):
    config, params, _, _ = setup
    engine = _jsonl_engine(config, tmp_path)
    _, info = engine.rollout(params, jax.random.key(0), policy_version=1, batch_size=BATCH)
    assert info.prompts[::GROUP] == ["0+1=", "1+1=", "2+1=", "3+1="]
    assert info.task_state.items() >= {"epoch": 0, "index": 4, "seed": 0}.items()
    _, info = engine.rollout(params, jax.random.key(1), policy_version=1, batch_size=BATCH)
    assert info.prompts[::GROUP] == ["4+1=", "0+1=", "1+1=", "2+1="]
    assert info.task_state.items() >= {"epoch": 1, "index": 3, "seed": 0}.items()


def test_engine_under_the_8_device_mesh(setup, rolled, devices):
    config, params, task, tok = setup
    _, traj, _ = rolled
    mesh = ParallelLayout(dp=2, tp=2, ep=2).make_mesh()
    engine = RolloutEngine(
        model_config=config, tokenizer=tok, task=task, sampling=SAMPLING, mesh=mesh
    )
    sharded = shard_params(params, config, mesh)
    got, _ = engine.rollout(sharded, jax.random.key(5), policy_version=7, batch_size=BATCH)
    np.testing.assert_array_equal(got.response_tokens, traj.response_tokens)
    np.testing.assert_allclose(got.policy_logprobs, traj.policy_logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.rewards, traj.rewards)
    # Params on devices the engine's mesh lacks: named, not JAX's incompatible-devices error.
    small = RolloutEngine(
        model_config=config, tokenizer=tok, task=task, sampling=SAMPLING,
        mesh=ParallelLayout(dp=4).make_mesh(devices[:4]),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"the params lie on 4 device\(s\) outside the engine's "
                       r"mesh of 4 \(.*\); place them on it"):  # fmt: skip
        small.rollout(sharded, jax.random.key(5), policy_version=7, batch_size=BATCH)
    # Uncommitted params (init_params' output on the default device) JAX moves itself.
    on_others = RolloutEngine(
        model_config=config, tokenizer=tok, task=task, sampling=SAMPLING,
        mesh=ParallelLayout(dp=4).make_mesh(devices[4:]),
    )  # fmt: skip
    assert not jax.tree.leaves(params)[0].committed
    got, _ = on_others.rollout(params, jax.random.key(5), policy_version=7, batch_size=BATCH)
    np.testing.assert_array_equal(got.response_tokens, traj.response_tokens)


class _NoDecode:  # encodes but cannot decode
    vocab_size = 32

    def encode_batch(self, texts, max_length=None):
        raise AssertionError("not reached")


class _DecodeNotCallable(_NoDecode):
    decode_batch = None


def test_engine_errors(setup):
    config, params, task, tok = setup
    with pytest.raises(ValueError, match="max_prompt_length must be an integer >= 1"):
        SamplingConfig(max_prompt_length=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        SamplingConfig(max_prompt_length=8, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingConfig(max_prompt_length=8, max_new_tokens=4, top_p=1.5)
    with pytest.raises(
        ValueError, match="tokenizer vocab_size=259 exceeds the model's vocab_size=32"
    ):
        RolloutEngine(model_config=config, tokenizer=ByteTokenizer(), task=task, sampling=SAMPLING)
    bad_stop = SamplingConfig(max_prompt_length=8, max_new_tokens=4, stop_token_ids=(40,))
    with pytest.raises(
        ValueError, match=r"stop_token_ids \[40\] are outside the model's vocabulary"
    ):
        RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=bad_stop)
    with pytest.raises(ValueError, match="sampling must be a SamplingConfig"):
        RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling={"max_new_tokens": 4})
    # Each of these was accepted, or an AttributeError, and failed at the first rollout.
    from novarl_jax.rollout.tasks import CopyTask

    cases = [
        (dict(task=AdditionTask), r"^task must be a task instance \(e.g. AdditionTask\(\)\), "
         r"got the class AdditionTask$"),
        (dict(model_config={"vocab_size": 32}), r"^model_config must be a ModelConfig, got dict$"),
        (dict(tokenizer="char"), r"^tokenizer must be a Tokenizer \(vocab_size, encode_batch, "
         r"decode_batch; e.g. CharTokenizer or HFTokenizer\), got str$"),
        (dict(tokenizer=_NoDecode()), r"^tokenizer must be a Tokenizer .*got _NoDecode$"),
        (dict(tokenizer=_DecodeNotCallable()), r"^tokenizer must be .*got _DecodeNotCallable$"),
        (dict(tokenizer=CharTokenizer(CopyTask().alphabet)), r"^the task's alphabet has "
         r"characters the tokenizer cannot encode: '\+0123456789=' \(the tokenizer's alphabet: "),
    ]  # fmt: skip
    for change, match in cases:
        kwargs = dict(model_config=config, tokenizer=tok, task=task, sampling=SAMPLING) | change
        with pytest.raises(ValueError, match=match):
            RolloutEngine(**kwargs)
    # A tokenizer without an EOS id and no stop ids: a TypeError comparing None and int.
    no_eos = copy.copy(tok)
    no_eos.eos_id = None
    with pytest.raises(ValueError, match=r"^the stop tokens \[None\] must be token ids; a "
                       r"tokenizer without an eos_id \(got None\) needs SamplingConfig\("
                       r"stop_token_ids=...\)$"):  # fmt: skip
        RolloutEngine(model_config=config, tokenizer=no_eos, task=task, sampling=SAMPLING)
    # Prompt + completion longer than the model's positions fails here, not at the first rollout.
    too_long = SamplingConfig(max_prompt_length=40, max_new_tokens=30)
    with pytest.raises(
        ValueError,
        match=r"40 \+ max_new_tokens 30 = 70 exceeds the model's max_position_embeddings=64",
    ):
        RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=too_long)
    # One stop token may be given as a bare int, as sample() accepts it.
    assert SamplingConfig(
        max_prompt_length=8, max_new_tokens=4, stop_token_ids=2
    ).stop_token_ids == (2,)
    assert SamplingConfig(
        max_prompt_length=8, max_new_tokens=4, stop_token_ids=np.int64(2)
    ).stop_token_ids == (2,)
    with pytest.raises(ValueError, match="stop_token_ids must be a sequence of token ids, one int"):
        SamplingConfig(max_prompt_length=8, max_new_tokens=4, stop_token_ids="2")
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite float >="):
        SamplingConfig(max_prompt_length=8, max_new_tokens=4, temperature=1e-30)
    short = SamplingConfig(max_prompt_length=3, max_new_tokens=4)
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=short)
    with pytest.raises(ValueError, match="more than max_length=3"):
        engine.rollout(params, jax.random.key(0), policy_version=0, batch_size=2)
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=SAMPLING)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        engine.rollout(params, jax.random.key(0), policy_version=0, batch_size=2, num_samples=0)
    with pytest.raises(ValueError, match="policy_version must be an integer"):
        engine.rollout(params, jax.random.key(0), policy_version="v1", batch_size=2)
    # Trajectory.policy_version is int32: negative or >= 2**31 versions are refused, not wrapped.
    for version in (-1, 2**31, 2**40):
        with pytest.raises(
            ValueError, match=r"policy_version must be an integer in \[0, 2\*\*31\)"
        ):
            engine.rollout(params, jax.random.key(0), policy_version=version, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        engine.rollout(params, jax.random.key(0), policy_version=0, batch_size=0)

    class ShortScores:
        """A task outside BaseTask whose score() returns too few rewards."""

        name = "short"

        def sample_prompts(self, key, batch_size):
            return ["1+1="] * batch_size, [{"answer": 2}] * batch_size

        def score(self, prompts, completions, metadata):
            return np.zeros(1, np.float32), []

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    engine = RolloutEngine(
        model_config=config, tokenizer=tok, task=ShortScores(), sampling=SAMPLING
    )
    with pytest.raises(ValueError, match=r"task 'short' score\(\) returned \(1,\) rewards for 8"):
        engine.rollout(params, jax.random.key(0), policy_version=0, batch_size=BATCH)

    class Raising(ShortScores):
        name = "raising"

        def score(self, prompts, completions, metadata):
            raise ConnectionError("reward server down")

    engine = RolloutEngine(model_config=config, tokenizer=tok, task=Raising(), sampling=SAMPLING)
    from novarl_jax.rollout.rewards import RewardFunctionError

    with pytest.raises(RewardFunctionError, match=r"^task 'raising' score\(\) raised "
                       r"ConnectionError: reward server down$"):  # fmt: skip
        engine.rollout(params, jax.random.key(0), policy_version=0, batch_size=BATCH)


def test_rollout_metadata_is_repeated_per_sample_like_the_prompts():
    from novarl_jax.models import ModelConfig, init_params
    from novarl_jax.rollout.engine import RolloutEngine, SamplingConfig
    from novarl_jax.rollout.tasks import AdditionTask
    from novarl_jax.rollout.tokenizers import CharTokenizer

    task = AdditionTask()
    tok = CharTokenizer(task.alphabet)
    config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)  # fmt: skip
    params = init_params(config, jax.random.key(0))
    sampling = SamplingConfig(max_prompt_length=8, max_new_tokens=4, num_samples=2)
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=sampling)
    traj, info = engine.rollout(params, jax.random.key(5), policy_version=0, batch_size=4)
    prompts, meta = task.sample_prompts(jax.random.split(jax.random.key(5))[0], 4)
    assert len({m["answer"] for m in meta}) > 1  # distinct answers make the check bite
    want_meta = [m for m in meta for _ in range(2)]
    assert info.metadata == want_meta
    for prompt, m in zip(info.prompts, info.metadata, strict=True):
        a, b = m["operands"]
        assert prompt == f"{a}+{b}="
    expected, _ = task.score(info.prompts, info.completions, want_meta)
    np.testing.assert_array_equal(traj.rewards, expected)


def test_completions_are_the_trained_tokens_when_eos_is_not_a_stop(setup):
    """With stops that leave EOS out, an EOS is sampled and trained like any other token, so
    the text the reward scores must go on past it (only the stop tokens are dropped)."""
    config, _, task, tok = setup
    params = jax.tree.map(jnp.zeros_like, init_params(config, jax.random.key(0)))  # uniform
    eq = tok.encode("=")[0]
    sampling = SamplingConfig(
        max_prompt_length=8, max_new_tokens=8, num_samples=4, stop_token_ids=(eq,)
    )
    engine = RolloutEngine(model_config=config, tokenizer=tok, task=task, sampling=sampling)
    traj, info = engine.rollout(params, jax.random.key(0), policy_version=0, batch_size=4)
    tokens, mask = np.asarray(traj.response_tokens), np.asarray(traj.response_mask)
    inner_eos = 0
    for b in range(tokens.shape[0]):
        ids = tokens[b][mask[b] != 0].tolist()
        inner_eos += tok.eos_id in ids[:-1]
        kept = [i for i in ids if i not in (eq, tok.eos_id)]
        assert info.completions[b] == tok.decode(kept), b
    assert inner_eos > 0  # some row has text after an EOS, so the check bites


def test_encode_prompts_gives_the_prompts_a_rollout_with_the_key_samples(setup, rolled):
    # The start-up checks the first step's prompts this way: with another key split, it
    # would check prompts the step never samples (a JSONL task, which ignores the key, could
    # not tell).
    engine, _, info = rolled
    prompts, metadata, tokens, mask = engine.encode_prompts(jax.random.key(5), BATCH)
    assert prompts == info.prompts[::GROUP] and metadata == info.metadata[::GROUP]
    other, _, _, _ = engine.encode_prompts(jax.random.key(6), BATCH)
    assert other != prompts


def test_encode_prompts_leaves_the_task_position_alone(setup, tmp_path):
    config, _, _, _ = setup
    engine = _jsonl_engine(config, tmp_path)
    task = engine.task
    prompts, _, _, _ = engine.encode_prompts(jax.random.key(3), BATCH)
    assert task.get_state().items() >= {"epoch": 0, "index": 0, "seed": 0}.items()
    params = init_params(config, jax.random.key(0))
    _, info = engine.rollout(params, jax.random.key(3), policy_version=0, batch_size=BATCH)
    assert info.prompts[::GROUP] == prompts == ["0+1=", "1+1=", "2+1=", "3+1="]


def test_sampling_config_accepts_numpy_integers():
    sampling = SamplingConfig(max_prompt_length=np.int64(8), max_new_tokens=np.int32(4))
    assert type(sampling.max_prompt_length) is int and sampling.max_prompt_length == 8
    with pytest.raises(ValueError, match="max_prompt_length must be an integer >= 1, got 0"):
        SamplingConfig(max_prompt_length=0, max_new_tokens=4)


def test_a_tokenizer_with_the_documented_decode_batch_signature_rolls_out(setup, rolled):
    """RolloutEngine takes any tokenizer with the documented interface, whose decode_batch
    is ``(tokens, mask=None)``."""
    config, params, task, tok = setup

    class Plain:
        vocab_size, pad_id, bos_id, eos_id = tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id

        def encode_batch(self, texts, **kwargs):
            return tok.encode_batch(texts, **kwargs)

        def decode_batch(self, tokens, mask=None):
            return tok.decode_batch(tokens, mask)

    engine = RolloutEngine(model_config=config, tokenizer=Plain(), task=task, sampling=SAMPLING)
    _, info = engine.rollout(params, jax.random.key(5), policy_version=7, batch_size=BATCH)
    assert info.completions == rolled[2].completions


def test_a_task_missing_part_of_the_protocol_is_refused_at_once(setup):
    config, _, task, tok = setup

    class NoState:
        sample_prompts, score = task.sample_prompts, task.score

    with pytest.raises(ValueError, match="task lacks get_state, set_state of the Task protocol"):
        RolloutEngine(model_config=config, tokenizer=tok, task=NoState(), sampling=SAMPLING)


def test_a_bad_policy_version_is_named_as_given(setup, rolled):
    _, params, _, _ = setup
    engine = rolled[0]
    for bad in (True, 2.5, -3, 2**31):
        with pytest.raises(ValueError, match=rf"in \[0, 2\*\*31\) .*, got {re.escape(repr(bad))}$"):
            engine.rollout(params, jax.random.key(0), policy_version=bad, batch_size=BATCH)


def test_engine_bounds_are_inclusive_where_they_should_be(setup):
    config, params, task, tok = setup

    def engine(model_config=config, **sampling):
        kwargs = {"max_prompt_length": 8, "max_new_tokens": 4, "num_samples": GROUP, **sampling}
        return RolloutEngine(model_config=model_config, tokenizer=tok, task=task,
                             sampling=SamplingConfig(**kwargs))  # fmt: skip

    engine(config.replace(vocab_size=tok.vocab_size))  # a tokenizer that fills the vocabulary
    engine(max_prompt_length=60, max_new_tokens=4)  # exactly the model's 64 positions
    with pytest.raises(ValueError, match=r"stop_token_ids \[32\] are outside the model's vocab"):
        engine(stop_token_ids=(32,))
    # None stops at EOS; () never stops.
    assert engine(stop_token_ids=None).stop_token_ids == (tok.eos_id,)
    assert engine(stop_token_ids=()).stop_token_ids == ()


def test_rollout_and_complete_check_their_counts(setup, rolled):
    config, params, task, tok = setup
    engine = rolled[0]
    key = jax.random.key(0)
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            engine.rollout(params, key, 0, 2, num_samples=bad)
    p, m, t, k = engine.encode_prompts(key, 4)
    for encoded in ((p, m, t[:3], k), (p, m, t, k[:3]), (p, m[:3], t, k)):
        with pytest.raises(ValueError, match="encoded prompts need as many"):
            engine.complete(params, key, 0, encoded)

    class ShortMetadata(AdditionTask):
        def sample_prompts(self, key, batch_size):
            prompts, metadata = super().sample_prompts(key, batch_size)
            return prompts, metadata[:-1]

    short = RolloutEngine(model_config=config, tokenizer=tok, task=ShortMetadata(),
                          sampling=SAMPLING)  # fmt: skip
    with pytest.raises(TaskError, match="returned 4 prompts and 3 metadata for batch_size=4"):
        short.rollout(params, key, 0, 4)
