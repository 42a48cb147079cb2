"""Tasks and rewards: hand-made completions, reward loading, JSONL resumption."""

import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novarl_jax.rollout import rewards as R
from novarl_jax.rollout.tasks import (
    AdditionTask,
    CopyTask,
    JSONLTask,
    ReverseTask,
    SortTask,
    Task,
    make_task,
)
from novarl_jax.rollout.tokenizers import CharTokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "prompts_tiny.jsonl")


def scaled_reward(prompts, completions, metadata):
    """A reward function loaded by name in a test: 0.25 per character."""
    return [0.25 * len(c) for c in completions]


def test_copy_reverse_sort_prompts_and_scores():
    key = jax.random.key(3)
    for task, fn in [(CopyTask(), lambda s: s), (ReverseTask(), lambda s: s[::-1]),
                     (SortTask(), lambda s: "".join(sorted(s)))]:  # fmt: skip
        prompts, meta = task.sample_prompts(key, 6)
        assert isinstance(task, Task) and len(prompts) == len(meta) == 6
        for p, m in zip(prompts, meta, strict=True):
            assert p == f"{task.verb} {m['input']}:"
            assert m["answer"] == fn(m["input"])
        # Same key -> same prompts; the task's alphabet covers every prompt and answer.
        assert task.sample_prompts(key, 6) == (prompts, meta)
        tok = CharTokenizer(task.alphabet)
        for p, m in zip(prompts, meta, strict=True):
            tok.encode(p + m["answer"])
        rewards, info = task.score(prompts, [m["answer"] for m in meta], meta)
        assert rewards.dtype == np.float32 and rewards.tolist() == [1.0] * 6
        assert info[0]["reward"] == 1.0 and info[0]["answer"] == meta[0]["answer"]


def test_positional_partial_credit_hand_made():
    meta = [{"answer": "cba"}] * 5
    got = ReverseTask().score(["reverse abc:"] * 5, ["cba", "cbx", "cb", "cbaa", "xyz"], meta)[0]
    np.testing.assert_allclose(got, [1.0, 2 / 3, 2 / 3, 3 / 4, 0.0], rtol=1e-6)
    meta = [{"answer": "123"}] * 3
    got = SortTask().score(["sort 312:"] * 3, ["123", " 123 ", "321"], meta)[0]
    np.testing.assert_allclose(got, [1.0, 1.0, 1 / 3], rtol=1e-6)


def test_addition_hand_made():
    task = AdditionTask()
    prompts, meta = task.sample_prompts(jax.random.key(0), 50)
    for p, m in zip(prompts, meta, strict=True):
        a, b = m["operands"]
        assert p == f"{a}+{b}=" and m["answer"] == a + b and 0 <= a <= 9 and 0 <= b <= 9
    meta = [{"answer": 7}] * 6
    got = task.score(["3+4="] * 6, ["7", " 7", "8", "17", "seven", "07"], meta)[0]
    np.testing.assert_allclose(got, [1.0, 1.0, 0.45, 0.0, 0.0, 0.5], rtol=1e-6)


def test_task_constructor_errors():
    with pytest.raises(ValueError, match="symbols must be a string of >= 2 distinct"):
        CopyTask(symbols="aa")
    with pytest.raises(ValueError, match="max_length=1 must be >= min_length=2"):
        CopyTask(min_length=2, max_length=1)
    # NumPy failed on lengths like these (int64 overflow, an array too big) with a traceback.
    for huge in (2**70, 2**63 - 2):
        with pytest.raises(ValueError, match=r"max_length must be at most 1048576 \(a prompt"):
            CopyTask(max_length=huge)
    with pytest.raises(ValueError, match="max_operand must be an integer >= 1"):
        AdditionTask(max_operand=0)
    with pytest.raises(ValueError, match=r"max_operand must be at most 2\*\*63 - 2"):
        AdditionTask(max_operand=2**70)
    big = AdditionTask(max_operand=2**63 - 2)
    assert all(
        0 <= a <= 2**63 - 2
        for m in big.sample_prompts(jax.random.key(0), 4)[1]
        for a in m["operands"]
    )
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        CopyTask().sample_prompts(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="unknown task 'chess'; valid tasks"):
        make_task("chess")
    with pytest.raises(ValueError, match="key must be a jax.random key"):
        CopyTask().sample_prompts(np.zeros(2, np.float32), 1)


def test_raw_uint32_key_and_typed_key_agree():
    task = AdditionTask()
    typed = jax.random.key(5)
    raw = jax.random.key_data(typed)
    assert task.sample_prompts(typed, 4) == task.sample_prompts(raw, 4)


def test_reward_fn_from_config_string():
    task = make_task("copy", reward_fn=f"{__name__}:scaled_reward")
    rewards, _ = task.score(["p", "q"], ["ab", "abcde"], [{"answer": "x"}] * 2)
    np.testing.assert_array_equal(rewards, np.float32([0.5, 1.25]))  # floats, not truncated
    fn = R.load_reward_fn("novarl_jax.rollout.rewards:numeric_reward")
    assert fn is R.numeric_reward
    with pytest.raises(ValueError, match="must be a string 'module.path:function'"):
        R.load_reward_fn("no_colon")
    with pytest.raises(ValueError, match="cannot import 'no_such_mod'"):
        R.load_reward_fn("no_such_mod:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        R.load_reward_fn("novarl_jax.rollout.rewards:nope")
    with pytest.raises(ValueError, match="is not callable"):
        R.load_reward_fn("novarl_jax.rollout.rewards:_NUMBER")


def test_bad_reward_fn_output_is_rejected():
    task = CopyTask(reward_fn=lambda p, c, m: [1.0])
    with pytest.raises(ValueError, match=r"returned \(1,\) rewards for 2 completions"):
        task.score(["a", "b"], ["a", "b"], [{"answer": "a"}] * 2)
    task = CopyTask(reward_fn=lambda p, c, m: ["x", "y"])
    with pytest.raises(ValueError, match="must return a list of floats"):
        task.score(["a", "b"], ["a", "b"], [{"answer": "a"}] * 2)
    task = CopyTask(reward_fn=lambda p, c, m: ["1", "0"])  # text, even if it reads as numbers
    with pytest.raises(ValueError, match="must return a list of floats, got text"):
        task.score(["a", "b"], ["a", "b"], [{"answer": "a"}] * 2)
    for value in (None, 1.0):  # a per-sample function, or none at all
        task = CopyTask(reward_fn=lambda p, c, m, value=value: value)
        with pytest.raises(ValueError, match=r"not a list; it is called once per batch and must "
                           r"return 2 floats"):  # fmt: skip
            task.score(["a", "b"], ["a", "b"], [{"answer": "a"}] * 2)
    with pytest.raises(ValueError, match="same length"):
        CopyTask().score(["a"], ["a", "b"], [{"answer": "a"}])


def test_a_reward_function_that_raises_is_named_with_its_task():
    def boom(prompts, completions, metadata):
        raise KeyError("answer")

    def parses(prompts, completions, metadata):
        import json

        return [json.loads(c) for c in completions]  # raises inside the json module

    with pytest.raises(R.RewardFunctionError) as info:  # the user's line, not json's
        CopyTask(reward_fn=parses).score(["a"], ["a"], [{}])
    assert str(info.value).endswith(f"(at {__file__}:{parses.__code__.co_firstlineno + 3})")
    line = boom.__code__.co_firstlineno + 1  # where it raised: the user's file and line
    with pytest.raises(R.RewardFunctionError) as info:
        CopyTask(reward_fn=boom).score(["a"], ["a"], [{}])
    assert str(info.value) == (
        "reward function 'test_a_reward_function_that_raises_is_named_with_its_task.<locals>"
        f".boom' of task 'copy' raised KeyError: 'answer' (at {__file__}:{line})"
    )
    assert isinstance(info.value.__cause__, KeyError)
    spec = "novarl_jax.rollout.rewards:numeric_reward"  # needs metadata['answer']
    with pytest.raises(R.RewardFunctionError, match=rf"reward function '{spec}' of task 'copy' "
                       r"raised ValueError: metadata\[0\] has no 'answer'"):  # fmt: skip
        CopyTask(reward_fn=spec).score(["a"], ["1"], [{}])

    class Short(CopyTask):
        def default_reward(self, prompts, completions, metadata):
            return [1.0]

    with pytest.raises(R.RewardFunctionError, match=r"^the default reward function of task "
                       r"'copy' returned \(1,\) rewards for 2"):  # fmt: skip
        Short().score(["a", "b"], ["a", "b"], [{"answer": "a"}] * 2)


def test_boxed_extraction_and_numbers():
    assert R.extract_boxed(r"x \boxed{12} and \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert R.extract_boxed(r"\boxed {a{b}c}") == "a{b}c"
    assert R.extract_boxed(r"no box") is None
    assert R.extract_boxed(r"\boxed{unclosed") is None
    # A truncated last box is no answer (an earlier box does not stand in for it).
    assert R.extract_boxed(r"\boxed{7} then \boxed{oops") is None
    assert R.extract_boxed(r"\fbox{5}") == "5" and R.extract_boxed(r"so \boxed 5$.") == "5"
    assert R.last_number("total: 1,234.5 apples") == 1234.5
    assert R.parse_number("total: 1,234.5 apples") is None  # not one number
    assert R.parse_number(r"\frac{3}{4}") == 0.75
    assert R.parse_number("3/4") == 0.75
    assert R.parse_number("-2e3") == -2000.0
    assert R.parse_number("none") is None


def test_numeric_reward_gives_no_credit_for_a_number_inside_an_expression():
    boxes = [r"\boxed{x \neq 5}", r"\boxed{2^{10}}", r"\boxed{3, 5}", r"\boxed{-\frac{1}{2}}",
             r"\boxed{5} and then \boxed{"]  # fmt: skip
    answers = ["5", "10", "5", "1/2", "5"]
    meta = [{"answer": a} for a in answers]
    assert R.numeric_reward([""] * 5, boxes, meta) == [0.0] * 5
    assert R.numeric_reward([""], [r"\boxed{-\frac{1}{2}}"], [{"answer": "-0.5"}]) == [1.0]
    # Long digit runs take linear time (a quadratic regex took ~1 s per 8,000 digits).
    start = time.perf_counter()
    assert R.numeric_reward([""], ["1" * 20000 + "x"], [{"answer": "5"}]) == [0.0]
    assert time.perf_counter() - start < 0.5


def test_exact_match_normalises_latex_that_does_not_change_the_answer():
    pairs = [(r"\boxed{x + 1}", "x+1"), (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
             (r"\boxed{\left(1,2\right)}", "(1,2)"), (r"\boxed{10\%}", "10"),
             (r"\boxed{90^\circ}", "90"), (r"\boxed{x=5}", "5"), (r"\fbox{5}", "5"),
             ("New York", "New York")]  # fmt: skip
    completions, answers = zip(*pairs, strict=True)
    meta = [{"answer": a} for a in answers]
    assert R.exact_match_reward([""] * len(pairs), list(completions), meta) == [1.0] * len(pairs)
    # Words keep their spaces; a JSON number answer is compared as written (5.0 -> "5").
    meta = [{"answer": "New York"}, {"answer": 5.0}]
    assert R.exact_match_reward(["", ""], ["NewYork", "5"], meta) == [0.0, 1.0]


def test_exact_and_numeric_rewards_hand_made():
    meta = [{"answer": "27"}] * 6
    completions = [r"so \boxed{27}", "27.", " 27 ", r"\boxed{27.0}", "28", r"\boxed{ 27 }"]
    assert R.exact_match_reward([""] * 6, completions, meta) == [1, 1, 1, 0, 0, 1]
    assert R.numeric_reward([""] * 6, completions, meta) == [1, 1, 1, 1, 0, 1]
    # Numeric: the number in the box wins over later numbers outside it.
    assert R.numeric_reward([""], [r"\boxed{27} (not 28)"], [{"answer": 27}]) == [1.0]
    assert R.numeric_reward([""], ["I think 26 or 27"], [{"answer": 27}]) == [1.0]
    assert R.numeric_reward([""], ["no idea"], [{"answer": 27}]) == [0.0]
    with pytest.raises(ValueError, match=r"metadata\[0\]\['answer'\]='abc' is not a number"):
        R.numeric_reward([""], ["1"], [{"answer": "abc"}])
    with pytest.raises(ValueError, match=r"metadata\[0\] has no 'answer' key"):
        R.exact_match_reward([""], ["1"], [{}])


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="abcAB", max_size=5), st.text(alphabet="abcAB", max_size=5))
def test_positional_match_against_reference(completion, target):
    longest = max(len(completion), len(target))
    expected = (
        1.0
        if longest == 0
        else sum(1 for i in range(min(len(completion), len(target))) if completion[i] == target[i])
        / longest
    )
    got = R.positional_match(completion, target)
    assert got == pytest.approx(expected)
    assert (got == 1.0) == (completion == target)


def test_jsonl_task_resumes_exactly():
    task = JSONLTask(DATA, reward="numeric", seed=7)
    assert len(task) == 12
    first, _ = task.sample_prompts(None, 5)
    state = task.get_state()
    assert state.items() >= {"epoch": 0, "index": 5, "seed": 7}.items()
    json.dumps(state)  # a small JSON-able state
    # The original continues across the epoch boundary (5 + 10 > 12).
    expected = [task.sample_prompts(jax.random.key(i), 5) for i in range(3)]
    resumed = JSONLTask(DATA, reward="numeric", seed=7)
    resumed.set_state(state)
    got = [resumed.sample_prompts(jax.random.key(100 + i), 5) for i in range(3)]
    assert got == expected
    assert resumed.get_state() == task.get_state()
    assert task.get_state().items() >= {"epoch": 1, "index": 8, "seed": 7}.items()
    # A position saved before the state named its examples is taken as it is.
    resumed.set_state({"epoch": 1, "index": 8, "seed": 7})
    assert resumed.get_state() == task.get_state()
    # Each epoch visits every example once; epochs differ in order.
    fresh = JSONLTask(DATA, seed=7)
    e0 = [m["example_index"] for m in fresh.sample_prompts(None, 12)[1]]
    e1 = [m["example_index"] for m in fresh.sample_prompts(None, 12)[1]]
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1
    assert e0[:5] == [
        m["example_index"] for m in JSONLTask(DATA, seed=7).sample_prompts(None, 5)[1]
    ]
    assert first[0] == JSONLTask(DATA, seed=7).examples[e0[0]][0]


def test_jsonl_task_scores_with_boxed_answers():
    task = JSONLTask(DATA, reward="numeric", shuffle=False, prompt_template="Q: {prompt}\nA:")
    prompts, meta = task.sample_prompts(None, 2)
    assert prompts[0].startswith("Q: What is 13+14?") and meta[0]["answer"] == "27"
    rewards, info = task.score(prompts, [r"\boxed{27}", "maybe 12"], meta)
    assert rewards.tolist() == [1.0, 0.0] and info[1]["completion"] == "maybe 12"
    exact = JSONLTask(DATA, reward="exact", shuffle=False)
    assert exact.score(prompts, [r"\boxed{27}", "12"], meta)[0].tolist() == [1.0, 0.0]


def test_jsonl_task_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"missing.jsonl' does not exist$"):
        JSONLTask(tmp_path / "missing.jsonl")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"'data/x.jsonl' does not exist \(relative to the working directory {tmp_path}\)",
    ):
        JSONLTask("data/x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'answer'"):
        JSONLTask(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        JSONLTask(bad)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        JSONLTask(bad)
    # Python's json reads these; every completion then scored 0 against a NaN answer.
    for constant in ("NaN", "Infinity", "-Infinity", "1e999"):
        bad.write_text(f'{{"prompt": "a", "answer": "1"}}\n{{"prompt": "b", "answer": {constant}}}')
        match = (
            rf"bad.jsonl:2: {constant} is not a finite number \(NaN, Infinity and numbers too "
            r"large for a float cannot be answers or fields\)$"
        )
        with pytest.raises(ValueError, match=match):
            JSONLTask(bad, reward="exact")
    bad.write_text("\n")
    with pytest.raises(ValueError, match="has no examples"):
        JSONLTask(bad)
    with pytest.raises(ValueError, match="reward='fuzzy' must be one of"):
        JSONLTask(DATA, reward="fuzzy")
    with pytest.raises(ValueError, match="must contain '{prompt}'"):
        JSONLTask(DATA, prompt_template="no field")
    with pytest.raises(ValueError, match="must contain '{prompt}'"):
        JSONLTask(DATA, prompt_template="{{prompt}}")  # literal text, no field
    # Bad templates fail at construction (they used to fail at the first sample_prompts).
    cases = [
        ("Q: {prompt}. Answer in \\boxed{}", r"field\(s\) {}; .* braces doubled"),
        ("{prompt} {answer}", r"field\(s\) {answer}; the only field allowed is {prompt}"),
        ("{prompt", "is not a valid format string"),
        ("{prompt:d}", "cannot be formatted with a prompt"),
        (None, "prompt_template must be a str"),
    ]
    for template, match in cases:
        with pytest.raises(ValueError, match=match):
            JSONLTask(DATA, prompt_template=template)
    boxed = JSONLTask(DATA, shuffle=False, prompt_template="Q: {prompt} \\boxed{{}}")
    prompt = boxed.sample_prompts(None, 1)[0][0]
    assert prompt.startswith("Q: ") and prompt.endswith(" \\boxed{}")
    task = JSONLTask(DATA)
    with pytest.raises(ValueError, match="keys \\['epoch', 'index', 'seed'\\]"):
        task.set_state({"epoch": 0})
    with pytest.raises(ValueError, match=r"state\['index'\]=99 is past the dataset's 12"):
        task.set_state({"epoch": 0, "index": 99, "seed": 0})
    with pytest.raises(ValueError, match=r"state\['epoch'\] must be an integer >= 0"):
        task.set_state({"epoch": -1, "index": 0, "seed": 0})
    with pytest.raises(ValueError, match="has no state"):
        CopyTask().set_state({"epoch": 0})


def test_a_jsonl_position_saved_for_other_examples_is_refused(tmp_path):
    """A file edited between a run's starts: its saved position (and its epoch's shuffle
    order) belong to other data, so resuming would skip or repeat examples silently."""
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    task = JSONLTask(path, reward="numeric")
    task.sample_prompts(None, 5)
    state = task.get_state()
    assert state["examples"] == 12
    for edited in (lines + [lines[0]], lines[:6], [lines[1], lines[0], *lines[2:]]):
        path.write_text("\n".join(edited) + "\n")
        with pytest.raises(ValueError, match=r"data\.jsonl has changed since this position in "
                           r"it was saved \(12 examples then, \d+ now\)"):  # fmt: skip
            JSONLTask(path, reward="numeric").set_state(state)
    surrogate = tmp_path / "surrogate.jsonl"  # valid JSON: half of an emoji's pair
    surrogate.write_text('{"prompt": "p", "answer": "2 \\ud83d"}\n')
    assert len(JSONLTask(surrogate).get_state()["digest"]) == 16
    path.write_text("\n".join(lines) + "\n")  # the same examples again
    same = JSONLTask(path, reward="numeric")
    same.set_state(state)
    assert same.get_state() == state


JSONL_DATA = str(pathlib.Path(__file__).resolve().parents[1] / "data" / "prompts_tiny.jsonl")


# -- JSONLTask.set_state must rebuild the order of the state's epoch (J2) -----------------------
def test_jsonl_set_state_in_a_later_epoch_resumes_exactly():
    from novarl_jax.rollout.tasks import JSONLTask

    task = JSONLTask(JSONL_DATA, seed=7)  # 12 examples
    task.sample_prompts(None, 15)  # into epoch 1, index 3
    state = task.get_state()
    assert state.items() >= {"epoch": 1, "index": 3, "seed": 7}.items()
    want = task.sample_prompts(None, 5)
    resumed = JSONLTask(JSONL_DATA, seed=7)  # its order is epoch 0's until set_state
    resumed.set_state(state)
    assert resumed.sample_prompts(None, 5) == want
    # A state whose seed differs from the constructor's is honoured as well.
    other = JSONLTask(JSONL_DATA, seed=0)
    other.set_state(state)
    assert other.sample_prompts(None, 5) == want


def test_jsonl_rows_must_hold_a_text_prompt_and_a_string_or_number_answer(tmp_path):
    bad = {
        '{"prompt": {"role": "user", "content": "2+3?"}, "answer": "5"}': "'prompt' must be a "
        "string .* or a list of {'role', 'content'} messages, got dict",
        '{"prompt": [{"role": "user", "text": "2+3?"}], "answer": "5"}': "'prompt': message 0 "
        "of the conversation must be an object with string 'role' and 'content'",
        '{"prompt": [], "answer": "5"}': "'prompt': a conversation must be a non-empty list",
        '{"prompt": "2+3?", "answer": null}': "'answer' must be a string or a number, got NoneType",
        '{"prompt": "2+3?", "answer": ["5", "five"]}': "'answer' must be a string or a number",
        '{"prompt": "2+3?", "answer": true}': "'answer' must be a string or a number, got bool",
    }
    for line, message in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "1+1?", "answer": "2"}\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: field {message}"):
            JSONLTask(str(path))
    # With reward='numeric' every answer must be a number, checked when the file is read.
    path.write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": "Capital?", "answer": "Paris"}\n')
    JSONLTask(str(path))  # exact match: fine
    with pytest.raises(ValueError, match=r"bad.jsonl:2: answer 'Paris' is not a number"):
        JSONLTask(str(path), reward="numeric")
    with pytest.raises(ValueError, match=r"shuffle must be True or False, got 'false'"):
        JSONLTask(str(path), shuffle="false")


def test_jsonl_prompts_may_be_conversations(tmp_path):
    """TRL's conversational layout: a prompt is a list of messages, passed on as it is (for
    the tokenizer's chat template); prompt_template applies to the last user message."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+3?"},
    ]
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": conversation, "answer": "5"}, {"prompt": "3+4?", "answer": 7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = JSONLTask(str(path), shuffle=False, prompt_template="Q: {prompt}")
    assert task.conversational
    prompts, metadata = task.sample_prompts(None, 2)
    assert prompts[0] == [*conversation[:3], {"role": "user", "content": "Q: 2+3?"}]
    assert prompts[1] == "Q: 3+4?" and [m["answer"] for m in metadata] == ["5", 7]
    assert task.examples[0][0] == conversation  # the template applies to a copy
    assert [p for _, p in task.all_prompts()] == prompts
    rewards, _ = task.score(prompts, ["\\boxed{5}", "7"], metadata)
    np.testing.assert_array_equal(rewards, [1.0, 1.0])
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"prompt": "a", "answer": "a"}\n')
    assert not JSONLTask(str(texts)).conversational
    # A template needs a user message to apply to.
    prefilled = [{"role": "assistant", "content": "The answer is"}]
    path.write_text(json.dumps({"prompt": prefilled, "answer": "5"}) + "\n")
    JSONLTask(str(path))
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the conversation has no user message "
                       r"for prompt_template='Q: \{prompt\}' to apply to"):  # fmt: skip
        JSONLTask(str(path), prompt_template="Q: {prompt}")
    # The model answers a user or a tool, or continues its own message: not a system one.
    path.write_text(json.dumps({"prompt": conversation[:1], "answer": "5"}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: field 'prompt': the conversation ends "
                       r"with a 'system' message"):  # fmt: skip
        JSONLTask(str(path))


def test_reward_fn_modules_are_checked_when_loaded(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(
        "def two_args(prompts, completions):\n    return [0.0] * len(prompts)\n"
        "def good(prompts, completions, metadata):\n    return [1.0] * len(prompts)\n"
    )
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    # The working directory, as `novarl-train` runs (its script puts no '' on the path).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert R.load_reward_fn("user_rewards:good")(["q"], ["c"], [{}]) == [1.0]
    with pytest.raises(ValueError, match=r"'user_rewards:two_args' cannot be called as "
                       r"fn\(prompts, completions, metadata\)"):  # fmt: skip
        R.load_reward_fn("user_rewards:two_args")
    with pytest.raises(ValueError, match=r"^reward function 'broken_rewards:f': importing "
                       r"'broken_rewards' raised RuntimeError: no GPU here$"):  # fmt: skip
        R.load_reward_fn("broken_rewards:f")


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The best move is e4.", 4), ("She has 16 eggs and eats 3. So 9*2=$18", 18),
        ("We have 5 and 3. Total: 5+3=8", 8), ("Step 1: 3 apples. Answer: **42**", 42),
        ("There are 2 cases. The answer is 42km", 42), ("2 of them; answer [42]", 42),
        ("The answer is 42. " + "Let me check this reasoning once more. " * 20, 42),
        ("so -5.", -5), ("total 1,234 apples", 1234),
        (r"first \frac{1}{2}, then \frac{3}{4}", 0.75),
    ],
)  # fmt: skip
def test_free_text_answers_are_the_last_number_written(completion, answer):
    assert R.numeric_reward([""], [completion], [{"answer": answer}]) == [1.0]


def test_text_answers_in_latex_and_odd_numbers():
    pairs = [(r"\boxed{\text{(A)}}", r"\text{(C)}", 0.0), (r"\boxed{}", r"\text{east}", 0.0),
             (r"\boxed{\text{yes}}", "yes", 1.0), (r"\boxed{5 \text{cm}}", "5", 1.0)]  # fmt: skip
    for completion, answer, want in pairs:
        assert R.exact_match_reward([""], [completion], [{"answer": answer}]) == [want], completion
    assert R.parse_number("e5") is None and R.parse_number(10**400) is None
    assert R.parse_number(str(10**400)) is None


def test_jsonl_task_takes_reward_fn_like_the_other_tasks():
    from novarl_jax.rollout.tasks import make_task

    task = make_task("jsonl", path=DATA, reward_fn="novarl_jax.rollout.rewards:numeric_reward")
    assert task.score(["q"], ["\\boxed{5}"], [{"answer": "5"}])[0].tolist() == [1.0]
    with pytest.raises(ValueError, match="pass reward= or reward_fn=, not both"):
        JSONLTask(DATA, reward="numeric", reward_fn="novarl_jax.rollout.rewards:numeric_reward")


class _MyCopy(CopyTask):
    """A task of one's own that inherits the built-in's name."""

    def sample_prompts(self, key, batch_size):
        return {}["missing"], []


class _Named(_MyCopy):
    name = "mine"


class _BadName(_MyCopy):
    @property
    def name(self):
        raise AttributeError("no name")


def test_task_errors_name_the_task_and_its_line_through_a_wrapper():
    from novarl_jax.rollout.tasks import TaskError
    from novarl_jax.rollout.tasks.base import sample_task_prompts, task_label
    from novarl_jax.trainer.async_loop import _SerializedTask

    here = f"{__name__}:"
    assert task_label(CopyTask()) == "copy"
    assert task_label(_MyCopy()) == here + "_MyCopy"  # not the inherited 'copy'
    assert task_label(_Named()) == "mine"
    assert task_label(_BadName()) == here + "_BadName"
    for task in (_MyCopy(), _SerializedTask(_MyCopy())):  # the threaded runs' lock around it
        with pytest.raises(TaskError) as info:
            sample_task_prompts(task, jax.random.key(0), 2)
        line = _MyCopy.sample_prompts.__code__.co_firstlineno + 1
        assert str(info.value) == (
            f"task '{here}_MyCopy' sample_prompts() raised KeyError: 'missing' "
            f"(at {__file__}:{line})"
        )


def test_numeric_reward_gives_near_misses_nothing():
    meta = [{"answer": 27}, {"answer": 100}, {"answer": 1000}]
    completions = [r"\boxed{27.1}", "so 100.5", r"\boxed{1001}"]
    assert R.numeric_reward([""] * 3, completions, meta) == [0.0, 0.0, 0.0]
    # Float noise in a written answer still counts.
    assert R.numeric_reward([""], [r"\boxed{27.0000001}"], [{"answer": 27}]) == [1.0]


def test_thousands_commas_only_group_three_digits():
    assert R.parse_number("1000,000") is None and R.parse_number("1234,567") is None
    assert R.parse_number("1,000") == 1000.0
    assert R.numeric_reward([""], [r"\boxed{1000,000}"], [{"answer": 1000000}]) == [0.0]


def test_exact_match_rewards_are_python_floats():
    got = R.exact_match_reward(["", ""], ["5", "6"], [{"answer": "5"}] * 2)
    assert got == [1.0, 0.0] and all(type(r) is float for r in got)


def test_arithmetic_partial_credit_is_never_negative():
    rewards, _ = AdditionTask().score(["3+4="] * 3, ["30", "-100", "17"], [{"answer": 7}] * 3)
    assert rewards.tolist() == [0.0, 0.0, 0.0]


def test_addition_operands_reach_max_operand():
    _, meta = AdditionTask(max_operand=1).sample_prompts(jax.random.key(0), 64)
    assert {a for m in meta for a in m["operands"]} == {0, 1}
    _, meta = AdditionTask().sample_prompts(jax.random.key(0), 200)
    assert max(a for m in meta for a in m["operands"]) == 9


def test_jsonl_position_at_the_end_of_an_epoch_resumes():
    # A run whose checkpoint falls exactly where an epoch ends (index == len).
    task = JSONLTask(DATA, seed=3)
    task.sample_prompts(None, len(task))
    state = task.get_state()
    assert state["epoch"] == 0 and state["index"] == len(task)
    resumed = JSONLTask(DATA, seed=3)
    resumed.set_state(state)
    assert resumed.sample_prompts(None, 5) == task.sample_prompts(None, 5)
    with pytest.raises(ValueError, match="past the dataset"):
        resumed.set_state({**state, "index": len(task) + 1})


@pytest.mark.parametrize(
    "task",
    [
        CopyTask(min_length=2, max_length=5),
        ReverseTask(min_length=2, max_length=5),
        SortTask(min_length=2, max_length=5),
        AdditionTask(max_operand=12),
    ],
    ids=lambda task: type(task).__name__,
)
def test_the_longest_answer_is_as_long_as_the_longest_answer_sampled(task):
    _, metadata = task.sample_prompts(jax.random.key(0), 512)
    assert len(task.longest_answer()) == max(len(str(m["answer"])) for m in metadata)
