"""Prompts and answers from a JSONL file (one ``{"prompt": ..., "answer": ...}`` per line).

The file's position is checkpointed, so a resumed run continues with the next prompt.
Rewards: exact match of the (``\\boxed{}``-extracted) answer; ``task.options.reward='numeric'``
compares numbers instead. A byte-level tokenizer is used unless ``model.tokenizer`` points to
a ``tokenizer.json`` (or a ``model.init_from`` checkpoint has one).

Run (on the bundled example file, or add task.path=YOUR.jsonl):
    python -m novarl_jax.train --config=configs/jsonl.py
"""

import os

from configs import base

# A 12-line example beside the configs, found from any working directory.
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                       "data", "prompts_tiny.jsonl")  # fmt: skip


def get_config():
    config = base.get_config()
    config.task.name = "jsonl"  # novarl_jax.rollout.tasks.JSONLTask
    config.task.path = EXAMPLE  # set your own
    config.rollout.max_prompt_length = 48  # tokens (bytes, built-in tokenizer) of a prompt
    config.rollout.max_new_tokens = 8  # completion budget
    return config
