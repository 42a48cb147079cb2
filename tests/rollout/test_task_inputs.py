"""What the built-in and JSONL tasks accept and refuse, their documented defaults, how keys
and seeds reach the prompts, and how task errors are named."""

import json
import pathlib

import jax
import numpy as np
import pytest

from novarl_jax.rollout import rewards as R
from novarl_jax.rollout.tasks import AdditionTask, CopyTask, JSONLTask, SortTask
from novarl_jax.rollout.tasks.base import numpy_rng, task_label

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "prompts_tiny.jsonl"


def _helper_raises():
    raise ValueError("deep")


def _calls_helper(prompts, completions, metadata):
    return _helper_raises()


def test_a_reward_error_names_the_line_that_raised_not_the_outermost():
    with pytest.raises(R.RewardFunctionError) as info:
        CopyTask(reward_fn=_calls_helper).score(["a"], ["a"], [{}])
    line = _helper_raises.__code__.co_firstlineno + 1
    assert str(info.value).endswith(f"(at {__file__}:{line})")


class _Wrapper:
    def __init__(self, task):
        self.__wrapped__ = task


class _Mine(CopyTask):
    pass


class _NamedOnTheInstance(CopyTask):
    def __init__(self):
        super().__init__()
        self.name = "inst"


def test_task_labels_see_through_every_wrapper_and_take_an_instance_name():
    assert task_label(_Wrapper(_Wrapper(_Mine()))) == f"{__name__}:_Mine"
    assert task_label(_NamedOnTheInstance()) == "inst"


def test_keys_reach_the_prompts_whole():
    # jax.random.key(i)'s data is [0, i]: a seed read from its first word alone is always 0.
    task = AdditionTask()
    assert task.sample_prompts(jax.random.key(0), 8) != task.sample_prompts(jax.random.key(1), 8)
    with pytest.raises(ValueError, match="key must be a jax.random key"):
        numpy_rng(np.zeros(0, np.uint32))


def test_a_bool_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got True"):
        CopyTask().sample_prompts(jax.random.key(0), True)


@pytest.mark.parametrize(
    "output, message",
    [
        ([[1.0, 2.0], [3.0]], r"must return a list of floats, got \[\[1.0"),  # ragged
        ([b"1", b"0"], "got text among them"),
        ([[1.0], [0.0]], r"returned \(2, 1\) rewards for 2"),
        ([1.0, None], r"returned None for completion 1 \(a missing return\?\); it must return"),
        ((None, None), r"returned None for completion 0 "),
    ],
)
def test_reward_outputs_that_are_not_one_float_per_completion(output, message):
    task = CopyTask(reward_fn=lambda p, c, m: output)
    with pytest.raises(R.RewardFunctionError, match=message):
        task.score(["a", "b"], ["a", "b"], [{}] * 2)


def test_score_checks_metadata_length_and_reads_no_answer_as_none():
    task = CopyTask(reward_fn=lambda p, c, m: [1.0])
    with pytest.raises(ValueError, match=r"same length, got 1, 1, 0"):
        task.score(["a"], ["a"], [])
    _, info = task.score(["a"], ["a"], [{}])
    assert info[0]["answer"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(symbols="a"), "symbols must be a string of >= 2 distinct"),
        (dict(symbols="aab"), "symbols must be a string of >= 2 distinct"),
        (dict(symbols=" ab"), "must not hold whitespace or ':'"),
        (dict(symbols="ab\t"), "must not hold whitespace or ':'"),
        (dict(symbols="a:b"), "must not hold whitespace or ':'"),
        (dict(min_length=0), "min_length must be an integer >= 1, got 0"),
        (dict(max_length=True), "max_length must be an integer >= 1, got True"),
    ],
)
def test_string_task_options_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CopyTask(**kwargs)


def test_documented_option_limits():
    CopyTask(max_length=2**20)  # the largest allowed
    task = AdditionTask(max_operand=2**63 - 2)
    prompts, meta = task.sample_prompts(jax.random.key(0), 4)  # sums far beyond 2**53
    assert task.score(prompts, [str(m["answer"]) for m in meta], meta)[0].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match=r"at most 2\*\*63 - 2"):
        AdditionTask(max_operand=2**63 - 1)
    with pytest.raises(ValueError, match="max_operand must be an integer"):
        AdditionTask(max_operand=True)


def test_default_lengths_digits_and_alphabets():
    _, meta = SortTask().sample_prompts(jax.random.key(0), 200)
    assert {len(m["input"]) for m in meta} == {3}
    assert set("".join(m["input"] for m in meta)) == set("0123456789")
    _, meta = CopyTask().sample_prompts(jax.random.key(0), 200)
    assert {len(m["input"]) for m in meta} == {2, 3, 4}
    # Token ids follow the sorted alphabet: a saved tokenizer or checkpoint depends on it.
    assert CopyTask().alphabet == " :abcdeopy"
    assert SortTask().alphabet == " 0123456789:orst"


def test_jsonl_seed_must_be_non_negative_and_orders_the_shuffle():
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        JSONLTask(DATA, seed=-1, shuffle=False)

    def order(seed):
        return [m["example_index"] for m in JSONLTask(DATA, seed=seed).sample_prompts(None, 12)[1]]

    assert order(1) != order(2)
    assert order(1) == order(1)


def test_a_jsonl_file_with_only_an_answer_edited_is_a_changed_file(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    task = JSONLTask(path)
    task.sample_prompts(None, 2)
    state = task.get_state()
    lines[3] = json.dumps({"prompt": "3+1=", "answer": "5"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="has changed since"):
        JSONLTask(path).set_state(state)


def test_jsonl_state_keys_and_zero_d_array_values():
    with pytest.raises(ValueError, match=r"keys \['epoch', 'index', 'seed'\]"):
        JSONLTask(DATA).set_state({"epoch": 0, "index": 0, "seed": 0, "bogus": 1})
    task = JSONLTask(DATA, seed=7)
    task.sample_prompts(None, 5)
    want = task.sample_prompts(None, 3)
    resumed = JSONLTask(DATA)
    resumed.set_state({"epoch": np.array(0), "index": np.array(5), "seed": np.array(7)})
    assert resumed.sample_prompts(None, 3) == want


def test_jsonl_float_answers_and_non_utf8_files(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "half?", "answer": 0.5}\n')
    assert JSONLTask(path, reward="numeric").examples == [("half?", 0.5)]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        JSONLTask(path)


def test_jsonl_files_with_a_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "2+2?", "answer": "4"}\r\n')
    assert JSONLTask(path, reward="numeric").examples == [("2+2?", "4")]


@pytest.mark.parametrize("answer", ["", "  ", "$", "\\boxed{5", "\\boxed{}"])
@pytest.mark.parametrize("reward", ["exact", "novarl_jax.rollout.rewards:exact_match_reward"])
def test_jsonl_answers_nothing_could_match_are_refused_with_their_line(tmp_path, answer, reward):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": answer}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: answer .* is empty once normalised"):
        JSONLTask(path, reward=reward)


def test_jsonl_numeric_check_also_when_the_reward_is_named_by_its_path(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "q1", "answer": "5"}, {"prompt": "q2", "answer": "five"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = "novarl_jax.rollout.rewards:numeric_reward"
    for kwargs in (dict(reward=spec), dict(reward_fn=spec), dict(reward="numeric")):
        with pytest.raises(ValueError, match=r"d.jsonl:2: answer 'five' is not a number"):
            JSONLTask(path, **kwargs)
