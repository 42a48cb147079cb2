"""Prompts and answers from a JSONL file (one ``{"prompt": ..., "answer": ...}`` per line).

The file's position is checkpointed, so a resumed run continues with the next prompt.
Rewards: exact match of the (``\\boxed{}``-extracted) answer; ``task.options.reward='numeric'``
compares numbers instead. A byte-level tokenizer is used unless ``model.tokenizer`` points to
a ``tokenizer.json`` (or a ``model.init_from`` checkpoint has one).

Run:
    python -m novarl_jax.train --config=configs/jsonl.py task.path=prompts.jsonl
"""

from configs import base


def get_config():
    config = base.get_config()
    config.task.name = "jsonl"
    config.task.path = "tests/data/prompts_tiny.jsonl"
    config.rollout.max_prompt_length = 48
    config.rollout.max_new_tokens = 8
    config.model.max_position_embeddings = 64
    return config
