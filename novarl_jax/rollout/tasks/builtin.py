"""Built-in verifiable toy tasks small enough for a tiny policy to learn on a CPU.

Each task draws its prompts from a JAX key (the same key gives the same prompts), attaches the
reference answer as ``metadata[i]['answer']`` and scores with partial credit, so a random
policy already sees a reward gradient:

- :class:`CopyTask`: ``"copy abc:"`` -> ``"abc"``, positional-match credit.
- :class:`ReverseTask`: ``"reverse abc:"`` -> ``"cba"``, positional-match credit.
- :class:`SortTask`: ``"sort 312:"`` -> ``"123"``, positional-match credit.
- :class:`AdditionTask`: ``"3+4="`` -> ``"7"``, closeness credit for integers.

``task.alphabet`` lists every character a prompt or answer can contain, so
``CharTokenizer(task.alphabet)`` is a complete (and tiny) vocabulary for the task.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from novarl_jax.rollout.rewards import (
    RewardFn,
    integer_closeness_reward,
    positional_match_reward,
)
from novarl_jax.rollout.tasks.base import BaseTask, check_batch_size, numpy_rng

# NumPy draws the operands as int64 from [0, max_operand + 1).
_MAX_OPERAND = 2**63 - 2
# Far more characters than any prompt holds; bounds what NumPy is asked to draw.
_MAX_LENGTH = 2**20


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _unique_chars(*parts: str) -> str:
    seen: dict[str, None] = {}
    for part in parts:
        for c in part:
            seen.setdefault(c, None)
    return "".join(sorted(seen))


class _StringTask(BaseTask):
    """Prompts ``f"{verb} {s}:"`` for a random string ``s``; the answer is ``transform(s)``."""

    verb = ""

    def __init__(
        self,
        *,
        symbols: str = "abcde",
        min_length: int = 2,
        max_length: int = 4,
        reward_fn: str | RewardFn | None = None,
    ):
        super().__init__(reward_fn)
        if (
            not isinstance(symbols, str)
            or len(set(symbols)) < 2
            or len(set(symbols)) != len(symbols)
        ):
            raise ValueError(
                f"symbols must be a string of >= 2 distinct characters, got {symbols!r}"
            )
        if any(c.isspace() or c == ":" for c in symbols):
            # The reward strips the completion and the answer, and ':' ends the prompt.
            raise ValueError(
                f"symbols must not hold whitespace or ':' (they cannot be told apart from the "
                f"prompt's own), got {symbols!r}"
            )
        _check_int("min_length", min_length, 1)
        _check_int("max_length", max_length, 1)
        if max_length > _MAX_LENGTH:
            raise ValueError(
                f"max_length must be at most {_MAX_LENGTH} (a prompt holds the whole string), "
                f"got {max_length!r}"
            )
        if max_length < min_length:
            raise ValueError(f"max_length={max_length} must be >= min_length={min_length}")
        self.symbols, self.min_length, self.max_length = symbols, min_length, max_length
        self.alphabet = _unique_chars(symbols, f"{self.verb} :")

    def transform(self, s: str) -> str:
        raise NotImplementedError

    def longest_answer(self) -> str:
        """An answer of the greatest length this task asks for (what a completion must hold
        to earn the full reward)."""
        return self.transform((self.symbols * self.max_length)[: self.max_length])

    def sample_prompts(self, key: jax.Array, batch_size: int) -> tuple[list[str], list[dict]]:
        batch_size = check_batch_size(batch_size)
        rng = numpy_rng(key)
        prompts, metadata = [], []
        for _ in range(batch_size):
            n = int(rng.integers(self.min_length, self.max_length + 1))
            s = "".join(rng.choice(list(self.symbols), size=n))
            prompts.append(f"{self.verb} {s}:")
            metadata.append({"answer": self.transform(s), "input": s})
        return prompts, metadata

    def default_reward(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
    ) -> list[float]:
        return positional_match_reward(prompts, completions, metadata)


class CopyTask(_StringTask):
    """Repeat a short string: ``"copy abc:"`` -> ``"abc"``.

    Reward: :func:`~novarl_jax.rollout.rewards.positional_match` (matching characters over
    the longer length; 1.0 only when exact).

    Args:
        symbols: distinct characters the strings are drawn from (no whitespace, no ':').
        min_length, max_length: string length range (inclusive).
        reward_fn: optional override, callable or ``"module.path:function"``.

    Example:
        >>> task = CopyTask()
        >>> prompts, meta = task.sample_prompts(jax.random.key(0), 2)
        >>> rewards, info = task.score(prompts, [m["answer"] for m in meta], meta)
        >>> rewards.tolist()
        [1.0, 1.0]
    """

    name = "copy"
    verb = "copy"

    def transform(self, s: str) -> str:
        return s


class ReverseTask(_StringTask):
    """Reverse a short string: ``"reverse abc:"`` -> ``"cba"`` (positional-match credit)."""

    name = "reverse"
    verb = "reverse"

    def transform(self, s: str) -> str:
        return s[::-1]


class SortTask(_StringTask):
    """Sort a few digits ascending: ``"sort 312:"`` -> ``"123"`` (positional-match credit)."""

    name = "sort"
    verb = "sort"

    def __init__(
        self,
        *,
        symbols: str = "0123456789",
        min_length: int = 3,
        max_length: int = 3,
        reward_fn: str | RewardFn | None = None,
    ):
        super().__init__(
            symbols=symbols, min_length=min_length, max_length=max_length, reward_fn=reward_fn
        )

    def transform(self, s: str) -> str:
        return "".join(sorted(s))


class AdditionTask(BaseTask):
    """Single-digit addition: ``"3+4="`` -> ``"7"``.

    Reward: 1.0 for the exact sum, ``0.5 * max(0, 1 - |pred - sum| / 10)`` for another
    integer, 0 otherwise (:func:`~novarl_jax.rollout.rewards.integer_closeness_reward`).

    Args:
        max_operand: operands are drawn from ``0..max_operand`` (default 9), an integer in
            ``[1, 2**63 - 2]``.
        reward_fn: optional override, callable or ``"module.path:function"``.

    Example:
        >>> task = AdditionTask()
        >>> rewards, _ = task.score(["3+4=", "3+4="], ["7", "8"], [{"answer": 7}] * 2)
        >>> [round(float(r), 2) for r in rewards]
        [1.0, 0.45]
    """

    name = "addition"

    def __init__(self, *, max_operand: int = 9, reward_fn: str | RewardFn | None = None):
        super().__init__(reward_fn)
        self.max_operand = _check_int("max_operand", max_operand, 1)
        if max_operand > _MAX_OPERAND:
            raise ValueError(
                f"max_operand must be at most 2**63 - 2 (operands are drawn as int64), got "
                f"{max_operand!r}"
            )
        self.alphabet = "+0123456789="

    def longest_answer(self) -> str:
        """The longest sum this task asks for (what a completion must hold to earn the full
        reward)."""
        return str(2 * self.max_operand)

    def sample_prompts(self, key: jax.Array, batch_size: int) -> tuple[list[str], list[dict]]:
        batch_size = check_batch_size(batch_size)
        rng = numpy_rng(key)
        ab = rng.integers(0, self.max_operand + 1, size=(batch_size, 2))
        prompts = [f"{a}+{b}=" for a, b in ab.tolist()]
        metadata = [{"answer": a + b, "operands": (a, b)} for a, b in ab.tolist()]
        return prompts, metadata

    def default_reward(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
    ) -> list[float]:
        return integer_closeness_reward(prompts, completions, metadata)
