"""Verifiable reward functions and the loader for reward functions named in a config.

A reward function has the signature::

    reward_fn(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]

one float per completion (B of each). A prompt is the task's text, or a conversation (a list
of ``{"role", "content"}`` messages) where the task's prompts are conversations (a JSONL file
in TRL's conversational layout); a completion is always the generated text. ``metadata[i]`` is
whatever the task attached to prompt ``i`` (the built-in tasks and the JSONL task put the
reference answer under ``'answer'``).
Rewards are floats and are never rounded; NaN or inf marks a completion that could not be
scored and is excluded from training by the rollout engine.

A config names a reward function as ``"module.path:function"``, loaded by
:func:`load_reward_fn`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


class RewardFunctionError(ValueError):
    """A reward function (or a task's ``score``) raised, or did not return one float per
    completion; the message names the function and the task."""


def load_object(spec: str, what: str, kind: str) -> Any:
    """The object ``"package.module:name"`` names (``name`` may be dotted: ``Class.method``).
    Modules in the working directory import as they do under ``python -m``.

    Args:
        spec: the ``"module.path:name"`` string.
        what, kind: for messages, e.g. ``"reward function"``, ``"function"``.

    Raises:
        ValueError: the spec is malformed, the module cannot be imported (or raised while
            importing), or it has no such attribute; the message names ``spec``.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{what} {spec!r} must be a string 'module.path:{kind}' or a callable")
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must look like 'module.path:{kind}'")
    # The `novarl-train` script does not put the working directory on the path.
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was removed
        cwd = None
    if cwd is not None and cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({err})") from err
    except Exception as err:  # noqa: BLE001 - the module's own code failed while importing
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"{what} {spec!r}: importing {module_name!r} raised {type(err).__name__}: {first}"
        ) from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
    """Resolves ``"module.path:function"`` (or a callable, returned as is) to a reward function.

    Args:
        spec: ``"package.module:function"`` or a callable with the reward signature.

    Raises:
        ValueError: the spec is malformed, the module cannot be imported, or the attribute is
            missing or not callable.

    Example:
        >>> fn = load_reward_fn("novarl_jax.rollout.rewards:exact_match_reward")
        >>> fn(["q"], ["\\\\boxed{4}"], [{"answer": "4"}])
        [1.0]
    """
    if callable(spec):
        return spec
    fn = load_object(spec, "reward function", "function")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError as err:
        raise ValueError(
            f"reward function {spec!r} cannot be called as fn(prompts, completions, metadata) "
            f"({err}); it is called once per batch and returns one float per completion"
        ) from None
    except ValueError:  # no signature to inspect (a builtin): found out when called
        pass
    return fn


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _has_box(text: str) -> bool:
    return any(command in text for command in _BOX_COMMANDS)


def extract_boxed(text: str) -> str | None:
    r"""Contents of the last ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed x`` without
    braces) in ``text``, nested braces allowed; None when there is none or the last one is not
    closed (a truncated final answer is no answer). A brace-less box followed by a word (two
    or more letters, any script) is prose about boxes when an earlier box exists, and is
    passed over for that box (``\boxed{42}, in \boxed notation`` gives ``42``).

    Example:
        >>> extract_boxed(r"so \boxed{\frac{1}{2}} done")
        '\\frac{1}{2}'
    """
    end = len(text)
    while True:
        start = max(text.rfind(command, 0, end) for command in _BOX_COMMANDS)
        if start == -1:
            return None
        command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        rest = text[start + len(command) :]
        if rest.startswith(" ") and not rest.lstrip(" ").startswith("{"):
            # "\boxed 5": the token after the space (as written without braces).
            words = rest.split(None, 1)
            token = words[0] if words else ""
            earlier = max(text.rfind(c, 0, start) for c in _BOX_COMMANDS) != -1
            if earlier and _PROSE_WORD.fullmatch(token):
                end = start
                continue
            return token.rstrip("$.") or None
        return _braced(text, start + len(command))


# A word after a brace-less box: letters of any script, then punctuation.
_PROSE_WORD = re.compile(r"[^\W\d_]{2,}[.,;:!?)\]]*")


def _braced(text: str, j: int) -> str | None:
    """The contents of the brace group starting at ``text[j]`` (after spaces), or None."""
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


# LaTeX that does not change a final answer, removed before comparing (as verl's math reward
# does): sizing, spacing, display-fraction commands, degrees, percent and dollar signs.
_NOISE = (
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""),
    ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\u2212", "-"), ("{,}", ","),
)  # fmt: skip
_WHOLE_TEXT = re.compile(r"^\\(?:text|mbox|mathrm)\{([^{}]*)\}$")  # \text{east} -> east
_TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}\s*$")  # 5 \text{cm}
_SHORT_FRAC = re.compile(r"\\frac(\d)(\d)")  # \frac12 -> \frac{1}{2}
_VARIABLE_PREFIX = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")  # "x = 5" -> "5"


def normalize_answer(text: str) -> str:
    r"""An answer as compared by the exact-match reward.

    Collapses whitespace and drops it around symbols (``x + 1`` = ``x+1``; words keep their
    spaces), removes a trailing period, LaTeX that does not change the value (``\left``,
    ``\right``, spacing, ``\dfrac``/``\tfrac`` -> ``\frac``, degrees, percent and dollar
    signs, ``{,}`` between thousands), a trailing ``\text{unit}`` (a whole-answer ``\text{X}``
    is ``X``), a one-letter ``x =`` prefix, and writes ``\frac12`` as ``\frac{1}{2}``; Unicode
    is compared in its composed form (NFC: ``e`` + combining acute = ``\u00e9``).
    """
    text = " ".join(unicodedata.normalize("NFC", str(text)).strip().split())
    for old, new in _NOISE:
        text = text.replace(old, new)
    text = _WHOLE_TEXT.sub(r"\1", text.strip())
    text = _TRAILING_UNIT.sub("", text)
    text = _SHORT_FRAC.sub(r"\\frac{\1}{\2}", text)
    text = _VARIABLE_PREFIX.sub("", text.strip())
    text = re.sub(r"\s*([^\w\s\\])\s*", r"\1", text)
    text = text[:-1].rstrip() if text.endswith(".") else text
    return text.strip()


_PLAIN = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRAC = re.compile(r"([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_RATIO = re.compile(r"([-+]?\d+(?:\.\d+)?)/([-+]?\d+(?:\.\d+)?)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def parse_number(text: Any) -> int | float | None:
    r"""``text`` as one number, or None when it is anything else.

    Accepts ``42``, ``-3.5``, ``.5``, ``1e3``, ``1,234`` (commas only between thousands),
    ``3/4``, ``\frac{3}{4}`` and ``-\frac{1}{2}``, after :func:`normalize_answer` (so ``$5``,
    ``50\%``, ``90^\circ``, ``x = 5`` and ``5 \text{cm}`` are numbers too). ``x \neq 5``,
    ``2^{10}``, ``(1,2)`` or ``3, 5`` are not: a number inside a larger expression is not
    the answer. JSON numbers (int, float) are returned as they are. An integer literal comes
    back as a Python int, exact at any size (float64 cannot tell ``2**53 + 1`` from
    ``2**53``); other numbers as floats; None for one beyond float range.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return _finite(text)
    text = normalize_answer(text)
    if not text or len(text) > 100:
        return None
    match = _FRAC.fullmatch(text)
    if match:
        num, den = parse_number(match.group(2)), parse_number(match.group(3))
        if num is None or den in (None, 0.0):
            return None
        return -num / den if match.group(1) == "-" else num / den
    match = _RATIO.fullmatch(text)
    if match:
        den = float(match.group(2))
        return float(match.group(1)) / den if den != 0 else None
    if _PLAIN.fullmatch(text):
        return _plain_number(text)
    return None


def _plain_number(text: str) -> int | float | None:
    """A plain number's text as a Python int when it is an integer literal (exact at any
    size: float64 cannot tell 2**53 + 1 from 2**53), else a float; None when not finite."""
    text = text.replace(",", "")
    exact = text.lstrip("+-").isdigit() and len(text) <= 400  # longer: no float holds it
    return _finite(int(text) if exact else float(text))


def _finite(value: int | float) -> int | float | None:
    """``value`` (an int kept exact) when a float could hold it, else None."""
    try:
        return value if math.isfinite(float(value)) else None
    except OverflowError:
        return None


def last_number(text: str) -> int | float | None:
    """The last number written in free text (GSM8K-style answers with no ``\\boxed{}``).

    The whitespace-separated word holding the text's last number counts as a whole when
    :func:`parse_number` reads it (``3/4``, ``\\frac{3}{4}``, ``$1,000``); otherwise that last
    number alone (``=8``, ``**42**``, ``42km``).
    """
    text = str(text)
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    begin = max(text.rfind(c, 0, last.start()) for c in " \t\n") + 1
    end = min(
        (i for i in (text.find(c, last.end()) for c in " \t\n") if i != -1), default=len(text)
    )
    word = parse_number(text[begin:end].rstrip(".,;:!?)").lstrip("("))
    if word is not None:
        return word
    return _plain_number(last.group())


def _answer_text(completion: str) -> str | None:
    """The completion's final answer: its last box; the whole completion when it has no box;
    None when its last box is not closed."""
    if not _has_box(completion):
        return completion
    return extract_boxed(completion)


def _check_lengths(prompts: Sequence, completions: Sequence, metadata: Sequence) -> None:
    if not (len(prompts) == len(completions) == len(metadata)):
        raise ValueError(
            f"prompts, completions and metadata must have the same length, got "
            f"{len(prompts)}, {len(completions)}, {len(metadata)}"
        )


def _answer(meta: dict, index: int) -> Any:
    if "answer" not in meta:
        raise ValueError(f"metadata[{index}] has no 'answer' key (keys: {sorted(meta)})")
    return meta["answer"]


def exact_match_reward(
    prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
) -> list[float]:
    r"""1.0 when the answer equals ``metadata['answer']`` after normalisation, else 0.0.

    The answer is the content of the last ``\boxed{}`` when there is one, else the whole
    completion; both sides go through :func:`normalize_answer`. A reference answer that is
    empty after normalisation (``""``, ``"$"``, an unclosed box) matches nothing, so an
    empty completion never earns a reward.
    """
    _check_lengths(prompts, completions, metadata)
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        target = exact_answer(_answer(meta, i))
        answer = _answer_text(completion)
        ok = bool(target) and answer is not None and normalize_answer(answer) == target
        out.append(float(ok))
    return out


def exact_answer(answer: Any) -> str:
    """A reference answer as the exact-match reward compares it: the content of its last box
    (or the whole answer), normalised; ``""`` when nothing is left (it matches nothing)."""
    return normalize_answer(_answer_text(answer_text(answer)) or "")


def numeric_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    metadata: Sequence[dict],
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
) -> list[float]:
    r"""1.0 when the completion's number equals the numeric answer, else 0.0.

    The number is the whole content of the last ``\boxed{}`` (:func:`parse_number`: a box
    holding anything but one number scores 0), or, with no box, the last number of the
    completion (:func:`last_number`). Two whole numbers are equal only when they are the same
    number (``1000001`` is not ``1000000``, whatever ``rel_tol``; exactly at any size when
    both are written as integers, to float64 precision when one is written as a float,
    ``6.02e23``); otherwise equal means
    ``math.isclose(pred, answer, rel_tol, abs_tol)``, which absorbs float noise in a written
    answer (``27.0000001`` is 27), not a rounded one (``0.333`` is not ``\frac{1}{3}``). A
    reference answer that is not a number raises ValueError naming the index.
    """
    _check_lengths(prompts, completions, metadata)
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        target = numeric_answer(_answer(meta, i))
        if target is None:
            raise ValueError(f"metadata[{i}]['answer']={meta['answer']!r} is not a number")
        if _has_box(completion):
            boxed = extract_boxed(completion)
            pred = None if boxed is None else parse_number(boxed)
        else:
            pred = last_number(completion)
        out.append(float(pred is not None and _same_number(pred, target, rel_tol, abs_tol)))
    return out


def _same_number(pred: int | float, target: int | float, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(pred, int) and isinstance(target, int):
        return pred == target  # two integer literals: exact at any size
    if _integral(pred) and _integral(target):  # one written as a float (6.02e23, 5.0)
        return float(pred) == float(target)
    return math.isclose(pred, target, rel_tol=rel_tol, abs_tol=abs_tol)


def _integral(value: int | float) -> bool:
    return isinstance(value, int) or value.is_integer()


def numeric_answer(answer: Any) -> int | float | None:
    """A reference answer as a number (a JSON number, or text :func:`parse_number` reads,
    boxed or not), or None."""
    if isinstance(answer, str):
        boxed = _answer_text(answer)
        return None if boxed is None else parse_number(boxed)
    return parse_number(answer)


def answer_text(answer: Any) -> str:
    """A reference answer as text: JSON numbers without a spurious ``.0`` (``5.0`` -> ``5``)."""
    if isinstance(answer, float) and answer.is_integer() and abs(answer) < 1e16:
        return str(int(answer))
    return str(answer)


def positional_match(completion: str, target: str) -> float:
    """Partial credit for a string answer: matching characters / the longer length.

    ``sum_i [c_i == t_i] / max(len(c), len(t))``: 1.0 only for an exact match; extra or
    missing characters cost as much as wrong ones. Empty vs empty is 1.0.
    """
    completion, target = completion.strip(), target.strip()
    longest = max(len(completion), len(target))
    if longest == 0:
        return 1.0
    hits = sum(a == b for a, b in zip(completion, target, strict=False))
    return hits / longest


def positional_match_reward(
    prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
) -> list[float]:
    """:func:`positional_match` of each completion against ``metadata['answer']``."""
    _check_lengths(prompts, completions, metadata)
    return [
        positional_match(c, str(_answer(m, i)))
        for i, (c, m) in enumerate(zip(completions, metadata, strict=True))
    ]


def integer_closeness_reward(
    prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
) -> list[float]:
    """Partial credit for an integer answer.

    1.0 when the completion is exactly the answer; otherwise, when the completion is an
    integer (digits, optional sign), ``0.5 * max(0, 1 - |pred - answer| / 10)``; otherwise 0.
    So a near miss earns more than a far one and any well-formed number earns a little more
    than text. The answer must be an integer (``7``, ``7.0``, ``"7"``); anything else raises
    ValueError naming the index (``7.5`` is never read as 7).
    """
    _check_lengths(prompts, completions, metadata)
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        value = numeric_answer(_answer(meta, i))
        if value is None or not _integral(value):
            raise ValueError(f"metadata[{i}]['answer']={meta['answer']!r} is not an integer")
        target = int(value)
        text = completion.strip()
        if re.fullmatch(r"[-+]?\d+", text) is None:
            out.append(0.0)
        elif int(text) == target and text.lstrip("+") == str(target):
            out.append(1.0)
        else:
            out.append(0.5 * max(0.0, 1.0 - abs(int(text) - target) / 10.0))
    return out
