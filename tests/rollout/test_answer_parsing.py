"""Each step of reading an answer: boxes, normalisation, numbers in boxes and in free text,
the reward functions' tolerances and reference answers, and loading reward functions."""

import pytest

from novarl_jax.rollout import rewards as R


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed  {7}", "7"),  # spaces before the brace, however many
        ("\\boxed {7}", "7"),
        ("\\boxed 7.", "7"),  # no braces: the word after the space
    ],
)
def test_extract_boxed_skips_spaces_before_the_brace(text, expected):
    assert R.extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3\\!000", "3000"),  # LaTeX negative space
        ("\\mbox{east}", "east"),  # a whole-answer \mbox is its text
        ("\\mathrm{east}", "east"),
        ("5 \\text{cm}", "5"),  # a trailing unit goes ...
        ("5 \\text{cm} + 2", "5 \\text{cm}+2"),  # ... one in the middle stays
        ("X = 5", "5"),  # a one-letter variable, either case
        ("x = 5", "5"),
        ("x =", "x="),  # a prefix with nothing after it is the whole answer
        ("ab = 5", "ab=5"),  # a longer name is part of the answer
        ("x\u00b2", "x\u00b2"),  # composed (NFC), not compatibility-folded (x2)
        ("e\u0301", "\u00e9"),
        ("x \\neq 5", "x \\neq 5"),  # words (and commands) keep their spaces
        ("New   York", "New York"),  # runs of whitespace are one space
        ("a\n\tb", "a b"),
        ("42.", "42"),
    ],
)
def test_normalize_answer_steps(text, expected):
    assert R.normalize_answer(text) == expected


def test_exact_match_units_only_at_the_end_and_whitespace_runs():
    assert R.exact_match_reward([""], ["\\boxed{5 \\text{cm} + 2}"], [{"answer": "5+2"}]) == [0.0]
    assert R.exact_match_reward([""], ["New   York"], [{"answer": "New York"}]) == [1.0]
    assert R.exact_match_reward([""], ["\\boxed{X}"], [{"answer": "x"}]) == [0.0]  # case counts
    assert R.exact_match_reward([""], ["\\boxed{y=}"], [{"answer": ""}]) == [0.0]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (r"-\frac{1}{2}", -0.5), (r"\frac12", 0.5), (r"\dfrac{3}{4}", 0.75), ("\u22125", -5.0),
        (r"\$1,000", 1000.0), (r"50\%", 50.0), (r"90^\circ", 90.0), ("x = 5", 5.0),
        (r"5 \text{cm}", 5.0), (".5", 0.5), ("+7", 7.0), ("12,345,678", 12345678.0),
        # Not one number: a number inside a larger expression is not the answer.
        (r"x \neq 5", None), (r"2^{10}", None), ("(1,2)", None), ("1,2", None), ("3, 5", None),
        (r"\sqrt{2}", None), (r"2\frac{1}{2}", None), ("1/0", None), ("", None),
        # Nor a JSON true or false, a division by zero, an overflow to inf, commas that do not
        # group three digits, or a text too long to be one answer.
        (True, None), (False, None), (r"\frac{1}{0}", None), (r"\frac{0}{0}", None),
        ("1e999", None), ("-1e999", None), ("1,23", None), ("1,2345", None), ("1" * 150, None),
    ],
)  # fmt: skip
def test_parse_number_reads_one_whole_number(text, value):
    assert R.parse_number(text) == value


def test_numbers_that_are_not_answers_score_nothing_and_never_raise():
    assert R.numeric_reward([""], ["\\boxed{\\frac{1}{0}}"], [{"answer": 1}]) == [0.0]
    assert R.numeric_reward([""], ["\\boxed{1e999}"], [{"answer": 1}]) == [0.0]
    for answer in (True, "1e999"):
        with pytest.raises(ValueError, match=r"metadata\[0\]\['answer'\]=.* is not a number"):
            R.numeric_reward([""], ["1"], [{"answer": answer}])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", 42.0),  # the whole text is the word
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("answer is 3/4,", 0.75),  # trailing punctuation is not part of the word
        ("answer is 3/4!", 0.75),
        ("so (3/4)", 0.75),  # nor are brackets around it
        ("total: $1,000", 1000.0),
        ("x=8", 8.0),  # otherwise the last number alone
        ("**42**", 42.0),
        ("first 1\nthen\t-7", -7.0),
        (r"first \frac{1}{2}, finally \frac{3}{4}", 0.75),
        ("is 1e999", None),  # not finite
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert R.last_number(text) == expected


def test_numeric_reward_reads_a_bare_number_or_the_last_fraction():
    assert R.numeric_reward(["", ""], ["42", "3/4"], [{"answer": 42}, {"answer": 0.75}]) == [
        1.0,
        1.0,
    ]
    assert R.numeric_reward([""], [r"\frac{1}{2} no: \frac{3}{4}"], [{"answer": 0.75}]) == [1.0]


def test_numeric_reward_default_tolerances():
    def score(completion, answer):
        return R.numeric_reward([""], [completion], [{"answer": answer}])[0]

    assert score("1000.05", 1000) == 0.0  # 5e-5 relative: a miss
    assert score("1000.0000001", 1000) == 1.0  # 1e-10 relative: the same number
    assert score("x 0.0000000001", 0) == 1.0  # 1e-10 from zero: within abs_tol
    assert score("x 0.00000001", 0) == 0.0
    assert R.numeric_reward([""], ["1000.05"], [{"answer": 1000}], rel_tol=1e-4) == [1.0]
    # Integers are equal only when they are the same integer, at any size or tolerance.
    assert score("\\boxed{1000001}", 1000000) == 0.0
    assert score("\\boxed{123456900}", "123,456,789") == 0.0
    assert score("\\boxed{123456789}", "123,456,789") == 1.0
    assert score("\\boxed{5.0}", "5") == 1.0
    assert R.numeric_reward([""], ["1000001"], [{"answer": 1000000}], rel_tol=1e-3) == [0.0]
    # Whole numbers one side writes as a float compare as numbers, not within rel_tol.
    assert score("\\boxed{1000001.0}", 1000000) == 0.0
    assert R.numeric_reward([""], ["1000001"], [{"answer": 1e6}]) == [0.0]
    assert score("0.333", "\\frac{1}{3}") == 0.0  # a rounded answer is another number


def test_boxed_reference_answers():
    assert R.exact_match_reward([""], ["5"], [{"answer": "\\boxed{5}"}]) == [1.0]
    assert R.numeric_answer("\\boxed{5}") == 5.0
    assert R.numeric_answer("\\boxed{5") is None  # an unclosed box is no answer
    assert R.numeric_reward([""], ["so 5"], [{"answer": "\\boxed{5}"}]) == [1.0]


def test_an_unclosed_box_never_matches():
    # The target "None" is what str(None) would give for the unclosed box.
    assert R.exact_match_reward([""], ["\\boxed{oops"], [{"answer": "None"}]) == [0.0]


def test_float_reference_answers_as_text():
    assert R.answer_text(5.0) == "5"
    assert R.answer_text(5.5) == "5.5"
    assert R.answer_text(1e17) == "1e+17"
    assert R.exact_match_reward([""], ["5.5"], [{"answer": 5.5}]) == [1.0]
    assert R.exact_match_reward([""], ["5"], [{"answer": 5.5}]) == [0.0]


@pytest.mark.parametrize("fn", [R.exact_match_reward, R.numeric_reward, R.positional_match_reward])
def test_rewards_refuse_prompts_of_another_length(fn):
    with pytest.raises(ValueError, match="must have the same length, got 2, 1, 1"):
        fn(["", ""], ["5"], [{"answer": "5"}])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a:b:c", "must be a string 'module.path:function' or a callable"),
        ("novarl_jax.rollout.rewards:", "must look like 'module.path:function'"),
        (":exact_match_reward", "must look like 'module.path:function'"),
    ],
)
def test_malformed_reward_specs(spec, message):
    with pytest.raises(ValueError, match=f"reward function '{spec}' {message}"):
        R.load_reward_fn(spec)


def test_builtins_without_a_signature_load():
    assert R.load_reward_fn("builtins:dict") is dict


def test_a_failing_import_inside_the_module_is_a_cannot_import(tmp_path, monkeypatch):
    (tmp_path / "badimport_mod.py").write_text("from os import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="cannot import 'badimport_mod' \\(cannot import name"):
        R.load_reward_fn("badimport_mod:f")


def test_an_empty_reference_matches_nothing():
    for answer in ("", "  ", "$", "\\boxed{5"):
        assert R.exact_match_reward([""] * 3, ["", " ", "\\boxed{}"], [{"answer": answer}] * 3) == [
            0.0,
            0.0,
            0.0,
        ]


def test_integer_closeness_reads_integer_answers_and_refuses_the_rest():
    def score(completion, answer):
        return R.integer_closeness_reward([""], [completion], [{"answer": answer}])[0]

    assert score("7", "7.0") == 1.0 and score("7", 7.0) == 1.0 and score("7", "7") == 1.0
    assert score("6", 7) == 0.45
    for answer in (7.5, "7.5", "seven", None):
        with pytest.raises(ValueError, match=r"metadata\[0\]\['answer'\]=.* is not an integer"):
            score("7", answer)


def test_prose_about_boxes_is_not_a_box():
    text = "The answer is \\boxed{42}; I wrote it in \\boxed notation."
    assert R.extract_boxed(text) == "42"
    assert R.extract_boxed("\\boxed x") == "x" and R.extract_boxed("\\boxed 12.") == "12"
    # Any script, closing brackets; a word after the only box is the answer, as written.
    assert R.extract_boxed("\\boxed{42}, mit \\boxed über Zahlen") == "42"
    assert R.extract_boxed("Ответ \\boxed{42}, в \\boxed нотации") == "42"
    assert R.extract_boxed("\\boxed{42} (in \\boxed notation)") == "42"
    assert R.extract_boxed("\\fbox{42}, in \\boxed notation") == "42"  # fbox is a box too
    # One letter is an answer (a multiple-choice one), not prose: the last box is it.
    assert R.extract_boxed("\\boxed{B} no wait, \\boxed A") == "A"
    assert R.exact_match_reward([""], ["so \\boxed yes"], [{"answer": "yes"}]) == [1.0]
    # Thousands of them neither recurse nor take quadratic time to pass over.
    assert R.exact_match_reward(
        [""], ["\\boxed{1} " + "\\boxed ab " * 5000], [{"answer": "1"}]
    ) == [1.0]


def test_integers_compare_exactly_beyond_float_precision():
    big = 2**53
    assert R.numeric_reward([""], [f"\\boxed{{{big + 1}}}"], [{"answer": big}]) == [0.0]
    assert R.numeric_reward([""], [f"so {big + 1}"], [{"answer": str(big + 1)}]) == [1.0]
    assert R.parse_number(str(big + 1)) == big + 1 and R.last_number(f"x {big + 1}") == big + 1
    assert R.integer_closeness_reward([""], [str(big + 1)], [{"answer": str(big + 1)}]) == [1.0]
    assert R.integer_closeness_reward([""], [str(big)], [{"answer": big + 1}]) == [0.45]
    # Whole numbers written as floats still match (to float64 precision), as before.
    completions = ["\\boxed{602000000000000000000000}", "\\boxed{6.02e23}", "\\boxed{1e23}"]
    answers = [{"answer": "6.02e23"}, {"answer": "602,000,000,000,000,000,000,000"},
               {"answer": 10**23}]  # fmt: skip
    assert R.numeric_reward([""] * 3, completions, answers) == [1.0] * 3
    assert R.numeric_reward([""], ["12345678901234567"], [{"answer": 12345678901234567.0}]) == [1.0]


def test_composed_unicode_and_latex_thousands():
    assert R.exact_match_reward([""], ["caf\u00e9"], [{"answer": "cafe\u0301"}]) == [1.0]
    assert R.numeric_reward([""], ["\\boxed{1{,}000}"], [{"answer": 1000}]) == [1.0]
