"""Logged rollout samples: what the policy wrote and how it scored, in ``samples.jsonl``.

With ``logging.samples = N`` each training step appends its first N rollout rows (with GRPO,
whole groups of the first prompts when N is a multiple of the group size) to
``WORKDIR/samples.jsonl``, and each evaluation its first N
rows with ``"split": "val"``. One JSON object per line::

    {"step": 3, "split": "train", "row": 0, "prompt_index": 0, "prompt": "...",
     "completion": "...", "response_tokens": [7, 4, 2], "score": 0.5,
     "response_length": 3, "stopped": true, "policy_version": 4,
     "metadata": {"answer": "..."}}

``row`` is the sample's row in its batch and ``prompt_index`` its prompt (its GRPO group);
``completion`` is the text the task scored: decoded without the stop token, and without the
padding, BOS and EOS ids a policy may also sample, which decode to nothing;
``response_tokens`` are the generated ids as sampled (stop token included), where such ids
show; ``score`` is the task's reward before any shaping; ``response_length`` counts the
generated tokens, stop token included, and ``stopped`` says whether a stop token ended the
completion (otherwise it ran to ``rollout.max_new_tokens``). A sample whose reward was not
finite (never trained on) has ``null`` for all four. ``metadata`` is what the task keeps with
the prompt (the expected answer). A resumed run first drops the rows of steps after its
checkpoint, as in ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from novarl_jax.core.distributed import host_array

FILE_NAME = "samples.jsonl"


def sample_rows(
    trajectory: Any,
    info: Any,
    count: int,
    *,
    step: int,
    split: str,
    stop_token_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """The first ``count`` rows of a rollout as ``samples.jsonl`` rows (see the module doc).

    Args:
        trajectory: a :class:`~novarl_jax.rollout.engine.Trajectory`.
        info: its :class:`~novarl_jax.rollout.engine.RolloutInfo`.
        count: rows to take (fewer when the rollout has fewer).
        step: the training step (1-based) written in each row.
        split: ``"train"`` or ``"val"``.
        stop_token_ids: the tokens that end a completion.
    """
    n = min(int(count), len(info.prompts))
    if n <= 0:
        return []
    take = slice(0, n)
    valid = host_array(trajectory.valid)[take] > 0
    rewards = host_array(trajectory.rewards)[take].astype(np.float64)
    mask = host_array(trajectory.response_mask)[take] > 0
    tokens = host_array(trajectory.response_tokens)[take]
    stopped = (np.isin(tokens, np.asarray(stop_token_ids)) & mask).any(axis=1)
    groups = host_array(trajectory.group_ids)[take]
    versions = host_array(trajectory.policy_version)[take]
    return [
        {
            "step": int(step),
            "split": split,
            "row": r,
            "prompt_index": int(groups[r]),
            "prompt": info.prompts[r],
            "completion": info.completions[r],
            "response_tokens": [int(t) for t in tokens[r][mask[r]]] if valid[r] else None,
            "score": float(rewards[r]) if valid[r] else None,
            "response_length": int(mask[r].sum()) if valid[r] else None,
            "stopped": bool(stopped[r]) if valid[r] else None,
            "policy_version": int(versions[r]),
            "metadata": info.metadata[r],
        }
        for r in range(n)
    ]
