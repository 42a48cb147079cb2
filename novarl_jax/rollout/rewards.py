"""Verifiable reward functions and the loader for reward functions named in a config.

A reward function has the signature::

    reward_fn(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]

one float per completion (B of each). ``metadata[i]`` is whatever the task attached to prompt
``i`` (the built-in tasks and the JSONL task put the reference answer under ``'answer'``).
Rewards are floats and are never rounded; NaN or inf marks a completion that could not be
scored and is excluded from training by the rollout engine.

A config names a reward function as ``"module.path:function"``, loaded by
:func:`load_reward_fn`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


class RewardFunctionError(ValueError):
    """A reward function (or a task's ``score``) raised, or did not return one float per
    completion; the message names the function and the task."""


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


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
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(
            f"reward function {spec!r} must be a string 'module.path:function' or a callable"
        )
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must look like 'module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"reward function {spec!r}: cannot import {module_name!r} ({err})"
        ) from err
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


def extract_boxed(text: str) -> str | None:
    r"""Contents of the last ``\boxed{...}`` in ``text`` (nested braces allowed), or None.

    Example:
        >>> extract_boxed(r"so \boxed{\frac{1}{2}} done")
        '\\frac{1}{2}'
    """
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
        # Unclosed or malformed: look for an earlier one.
        start = text.rfind("\\boxed", 0, start)
    return None


def normalize_answer(text: str) -> str:
    """Strips, collapses whitespace and removes a trailing period (for exact-match)."""
    text = " ".join(str(text).strip().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_number(text: str) -> float | None:
    r"""The last number in ``text`` as a float (``1,234`` -> 1234; ``\frac{a}{b}`` and ``a/b``
    -> a/b), or None when there is none."""
    text = str(text)
    frac = re.findall(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", text)
    if frac:
        num, den = (parse_number(x) for x in frac[-1])
        if num is not None and den not in (None, 0.0):
            return num / den
    ratio = re.findall(r"([-+]?\d+(?:\.\d+)?)\s*/\s*([-+]?\d+(?:\.\d+)?)\s*$", text.strip())
    if ratio:
        num, den = float(ratio[-1][0]), float(ratio[-1][1])
        if den != 0:
            return num / den
    matches = _NUMBER.findall(text)
    for candidate in reversed(matches):
        try:
            return float(candidate.replace(",", ""))
        except ValueError:
            continue
    return None


def _answer_text(completion: str) -> str:
    boxed = extract_boxed(completion)
    return completion if boxed is None else boxed


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
    completion; both sides go through :func:`normalize_answer`.
    """
    _check_lengths(prompts, completions, metadata)
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        target = normalize_answer(_answer_text(str(_answer(meta, i))))
        out.append(float(normalize_answer(_answer_text(completion)) == target))
    return out


def numeric_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    metadata: Sequence[dict],
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
) -> list[float]:
    r"""1.0 when the completion's number equals the numeric answer, else 0.0.

    The number is read from the last ``\boxed{}`` when present, else it is the last number in
    the completion (:func:`parse_number`). Equal means ``math.isclose(pred, answer, rel_tol,
    abs_tol)``. A reference answer that is not a number raises ValueError naming the index.
    """
    _check_lengths(prompts, completions, metadata)
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        target = parse_number(_answer_text(str(_answer(meta, i))))
        if target is None:
            raise ValueError(f"metadata[{i}]['answer']={meta['answer']!r} is not a number")
        pred = parse_number(_answer_text(completion))
        ok = pred is not None and math.isclose(pred, target, rel_tol=rel_tol, abs_tol=abs_tol)
        out.append(float(ok))
    return out


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
    than text.
    """
    _check_lengths(prompts, completions, metadata)
    out = []
    for i, (completion, meta) in enumerate(zip(completions, metadata, strict=True)):
        target = int(_answer(meta, i))
        text = completion.strip()
        if re.fullmatch(r"[-+]?\d+", text) is None:
            out.append(0.0)
        elif int(text) == target and text.lstrip("+") == str(target):
            out.append(1.0)
        else:
            out.append(0.5 * max(0.0, 1.0 - abs(int(text) - target) / 10.0))
    return out
