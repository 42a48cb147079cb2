r"""A prompt dataset read from a JSONL file, iterated deterministically and resumably.

Each line is a JSON object with a prompt and a reference answer (field names configurable)::

    {"prompt": "What is 2+3? Put the answer in \\boxed{}.", "answer": "5"}

A prompt may also be a conversation, as TRL's conversational datasets hold it: a list of
``{"role", "content"}`` messages, rendered by the tokenizer's chat template
(``rollout.chat_template=True``)::

    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+3?"}], "answer": "5"}

Iteration goes through the examples in a fixed order per epoch (a permutation seeded by
``(seed, epoch)`` when ``shuffle``), wrapping into the next epoch when a batch runs past the
end. The position is the small state ``{'epoch', 'index', 'seed'}`` (with ``'examples'`` and
``'digest'`` naming the data it is a position in): ``get_state()`` after any number of batches,
``set_state`` on a fresh task, and the next batches are exactly those the original would have
produced; a position saved for other data (the file was edited) is refused. The key passed to
``sample_prompts`` is not used: the order depends only on the seed and the position, so a
resumed run does not depend on keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import string
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from novarl_jax.rollout.chat import check_conversation, is_conversation
from novarl_jax.rollout.rewards import (
    RewardFn,
    exact_answer,
    exact_match_reward,
    numeric_answer,
    numeric_reward,
)
from novarl_jax.rollout.tasks.base import BaseTask, check_batch_size

BUILTIN_REWARDS = {"exact": exact_match_reward, "numeric": numeric_reward}


class JSONLTask(BaseTask):
    r"""Prompts and answers from a JSONL file, scored by exact match or numeric equality.

    Args:
        path: the JSONL file (one object per line; blank lines are skipped).
        reward: 'exact' (:func:`~novarl_jax.rollout.rewards.exact_match_reward`), 'numeric'
            (:func:`~novarl_jax.rollout.rewards.numeric_reward`), a callable, or
            ``"module.path:function"``. Both built-ins read the answer from the last
            ``\boxed{}`` when the completion has one (a last box left open is no answer);
            'numeric' needs every answer to be a number, 'exact' an answer with something
            left once normalised; both are checked when the file is read (also when the
            built-in is named by its ``"module.path:function"``).
        prompt_field, answer_field: the JSON keys of the prompt (a string, or a conversation:
            a list of ``{"role", "content"}`` messages) and the answer (a string or a number).
        prompt_template: ``str.format`` template applied to the prompt (to a conversation's
            last user message): ``{prompt}`` is the only field allowed (at least once);
            literal braces are doubled, as in ``"Q: {prompt} Put the answer in \\boxed{{}}."``.
        shuffle: visit the examples in a seeded random order per epoch (else file order).
        seed: the shuffle seed (part of the state).
        reward_fn: the same as ``reward`` (the other tasks' name for it); give one of them.

    Raises:
        ValueError: the file is missing or empty, a line is not a JSON object, a line lacks
            a field or holds a malformed conversation (the message names the line number), or
            a bad ``prompt_template``.

    Example:
        >>> task = JSONLTask("prompts.jsonl", reward="numeric")  # doctest: +SKIP
        >>> prompts, meta = task.sample_prompts(jax.random.key(0), 4)  # doctest: +SKIP
        >>> state = task.get_state()  # doctest: +SKIP
        >>> # {'epoch': 0, 'index': 4, 'seed': 0, 'examples': 12, 'digest': '81c5...'}
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        reward: str | RewardFn = "exact",
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        prompt_template: str = "{prompt}",
        shuffle: bool = True,
        seed: int = 0,
        reward_fn: str | RewardFn | None = None,
    ):
        if reward_fn is not None:  # the other tasks' name for it
            if reward != "exact":
                raise ValueError("pass reward= or reward_fn=, not both")
            reward = reward_fn
        if isinstance(reward, str) and reward not in BUILTIN_REWARDS and ":" not in reward:
            raise ValueError(
                f"reward={reward!r} must be one of {sorted(BUILTIN_REWARDS)}, a callable, or "
                f"'module.path:function'"
            )
        reward_fn = BUILTIN_REWARDS.get(reward, reward) if isinstance(reward, str) else reward
        super().__init__(reward_fn)
        _check_template(prompt_template)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.path = os.fspath(path)
        self.prompt_template = prompt_template
        if not isinstance(shuffle, bool | np.bool_) and shuffle not in (0, 1):
            raise ValueError(f"shuffle must be True or False, got {shuffle!r}")
        self.shuffle = bool(shuffle)
        self.examples, self._line_numbers = _read_jsonl(self.path, prompt_field, answer_field)
        if prompt_template != "{prompt}":
            for (prompt, _), line in zip(self.examples, self._line_numbers, strict=True):
                if is_conversation(prompt) and not any(m["role"] == "user" for m in prompt):
                    raise ValueError(
                        f"{self.path}:{line}: the conversation has no user message for "
                        f"prompt_template={prompt_template!r} to apply to"
                    )
        # Identifies the examples in a saved position: a file edited between a run's starts
        # would resume at a position (and a shuffle order) of other data.
        text = json.dumps(self.examples, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self._digest = hashlib.sha256(text).hexdigest()[:16]
        _check_answers(self.path, self.examples, self._line_numbers, self._reward_fn)
        self._seed = seed
        self._epoch = 0
        self._index = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def conversational(self) -> bool:
        """Whether some prompt is a conversation (which needs a chat template)."""
        return any(is_conversation(prompt) for prompt, _ in self.examples)

    def _format(self, prompt: str | list[dict[str, str]]) -> str | list[dict[str, str]]:
        """The prompt with ``prompt_template`` applied (to a conversation's last user
        message; the conversation is copied)."""
        if not is_conversation(prompt):
            return self.prompt_template.format(prompt=prompt)
        messages = [dict(m) for m in prompt]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if users:
            last = messages[users[-1]]
            last["content"] = self.prompt_template.format(prompt=last["content"])
        return messages

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self._seed, epoch]).permutation(len(self.examples))

    def sample_prompts(
        self, key: jax.Array | None, batch_size: int
    ) -> tuple[list[Any], list[dict]]:
        """The next ``batch_size`` prompts (texts or conversations) and their metadata;
        ``key`` is ignored (order = seed + position).

        Metadata per prompt: ``{'answer', 'example_index', 'epoch'}``.
        """
        batch_size = check_batch_size(batch_size)
        prompts, metadata = [], []
        for _ in range(batch_size):
            if self._index >= len(self.examples):
                self._epoch += 1
                self._index = 0
                self._order = self._epoch_order(self._epoch)
            example_index = int(self._order[self._index])
            prompt, answer = self.examples[example_index]
            prompts.append(self._format(prompt))
            metadata.append(
                {"answer": answer, "example_index": example_index, "epoch": self._epoch}
            )
            self._index += 1
        return prompts, metadata

    def default_reward(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
    ) -> list[float]:
        return exact_match_reward(prompts, completions, metadata)

    def all_prompts(self) -> list[tuple[str, Any]]:
        """Every prompt of the file as ``(where, prompt)``, ``where`` = ``'path:line'``,
        so a run can check them all before it starts (not only when each one comes up)."""
        return [
            (f"{self.path}:{line}", self._format(prompt))
            for (prompt, _), line in zip(self.examples, self._line_numbers, strict=True)
        ]

    def get_state(self) -> dict:
        """The iteration position ``{'epoch', 'index', 'seed'}`` (ints) and the examples it
        is a position in, ``'examples'`` (their count) and ``'digest'`` (of their content);
        JSON-able."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self._seed,
            "examples": len(self.examples),
            "digest": self._digest,
        }

    def set_state(self, state: dict) -> None:
        """Resumes at a position returned by :meth:`get_state` (one without ``'examples'``
        and ``'digest'``, as saved before they existed, is taken as it is).

        Raises:
            ValueError: missing/extra keys, negative values, an index past the dataset, or
                a position saved for other examples (the file has changed).
        """
        keys = {"epoch", "index", "seed"}
        if not isinstance(state, dict) or not keys <= set(state) <= keys | {"examples", "digest"}:
            raise ValueError(
                f"JSONLTask state must be a dict with keys ['epoch', 'index', 'seed'] (and "
                f"'examples', 'digest'), got {state!r}"
            )
        if state.get("digest", self._digest) != self._digest:
            count = state.get("examples", "?")
            raise ValueError(
                f"{self.path} has changed since this position in it was saved ({count} "
                f"examples then, {len(self.examples)} now): resuming would skip or repeat "
                f"examples; restore the file, or train on the new one in a new --workdir"
            )
        values = {}
        for name in ("epoch", "index", "seed"):
            value = state[name]
            if isinstance(value, (np.integer, np.ndarray)):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"JSONLTask state[{name!r}] must be an integer >= 0, got {value!r}"
                )
            values[name] = value
        if values["index"] > len(self.examples):
            raise ValueError(
                f"JSONLTask state['index']={values['index']} is past the dataset's "
                f"{len(self.examples)} examples"
            )
        self._epoch, self._index, self._seed = values["epoch"], values["index"], values["seed"]
        self._order = self._epoch_order(self._epoch)


_BRACES_HINT = "write literal braces doubled ('{{' and '}}'), e.g. \\boxed{{}} for \\boxed{}"


def _check_template(template: Any) -> None:
    """Raises ValueError unless ``template.format(prompt=...)`` works and uses the prompt."""
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a str with {{prompt}}, got {template!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(
            f"prompt_template={template!r} is not a valid format string ({err}); {_BRACES_HINT}"
        ) from None
    other = sorted({"{" + f + "}" for f in fields if f != "prompt"})
    if other:
        raise ValueError(
            f"prompt_template={template!r} has the replacement field(s) {', '.join(other)}; "
            f"the only field allowed is {{prompt}}: {_BRACES_HINT}"
        )
    if not fields:
        raise ValueError(
            f"prompt_template={template!r} must contain '{{prompt}}' (doubled braces are "
            f"literal text)"
        )
    try:
        template.format(prompt="")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(
            f"prompt_template={template!r} cannot be formatted with a prompt ({err})"
        ) from None


class _NotJson(ValueError):
    pass


def _finite_float(text: str) -> float:
    """A JSON number as a float, refusing what is not finite: one that overflows
    (``1e999``), and the NaN, Infinity and -Infinity that Python's json module reads although
    JSON has no such values."""
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(text)
    return value


def _check_answers(
    path: str, examples: list[tuple[str, Any]], line_numbers: list[int], reward_fn: Any
) -> None:
    """Refuses, naming the line, an answer the built-in reward (however it was named) could
    never match: not a number for 'numeric', nothing left after normalisation for 'exact'."""
    for (_, answer), lineno in zip(examples, line_numbers, strict=True):
        if reward_fn is numeric_reward and numeric_answer(answer) is None:
            raise ValueError(
                f"{path}:{lineno}: answer {answer!r:.60} is not a number, which "
                "reward='numeric' needs; use reward='exact' for text answers"
            )
        if reward_fn is exact_match_reward and not exact_answer(answer):
            raise ValueError(
                f"{path}:{lineno}: answer {answer!r:.60} is empty once normalised (an empty "
                "string, only signs such as '$', or an unclosed box), so no completion could "
                "match it"
            )


def _read_jsonl(
    path: str, prompt_field: str, answer_field: str
) -> tuple[list[tuple[str, Any]], list[int]]:
    """The file's ``(prompt, answer)`` examples and the line number of each."""
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
        raise ValueError(f"JSONL file {path!r} does not exist{where}")
    if not os.path.isfile(path):
        raise ValueError(f"JSONL file {path!r} is not a file")
    examples, line_numbers = [], []
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # a BOM is no field
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise ValueError(f"JSONL file {path!r} is not UTF-8 text") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_finite_float, parse_float=_finite_float)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except _NotJson as err:
                raise ValueError(
                    f"{path}:{lineno}: {err} is not a finite number (NaN, Infinity and numbers "
                    "too large for a float cannot be answers or fields)"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            for field in (prompt_field, answer_field):
                if field not in row:
                    raise ValueError(
                        f"{path}:{lineno}: missing field {field!r} (fields: {sorted(row)})"
                    )
            prompt, answer = row[prompt_field], row[answer_field]
            if isinstance(prompt, list):
                try:
                    prompt = check_conversation(prompt)
                except ValueError as err:
                    raise ValueError(f"{path}:{lineno}: field {prompt_field!r}: {err}") from None
            elif not isinstance(prompt, str):
                raise ValueError(
                    f"{path}:{lineno}: field {prompt_field!r} must be a string (the prompt's "
                    f"text) or a list of {{'role', 'content'}} messages, got "
                    f"{type(prompt).__name__} {str(prompt)[:60]!r}"
                )
            if isinstance(answer, bool) or not isinstance(answer, str | int | float):
                raise ValueError(
                    f"{path}:{lineno}: field {answer_field!r} must be a string or a number, got "
                    f"{type(answer).__name__} {answer!r:.60}"
                )
            examples.append((prompt, answer))
            line_numbers.append(lineno)
    if not examples:
        raise ValueError(f"JSONL file {path!r} has no examples")
    return examples, line_numbers
