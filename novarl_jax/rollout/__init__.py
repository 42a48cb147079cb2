"""Rollouts: the KV-cache sampler, the rollout engine, tokenizers and verifiable-reward tasks.

The public API is exactly what this module re-exports.

Example:
    >>> task = AdditionTask()
    >>> tokenizer = CharTokenizer(task.alphabet)
    >>> engine = RolloutEngine(model_config=config, tokenizer=tokenizer, task=task,
    ...     sampling=SamplingConfig(max_prompt_length=8, max_new_tokens=4, num_samples=4))
    >>> trajectory, info = engine.rollout(params, key, policy_version=0, batch_size=8)
    >>> trajectory.response_tokens.shape
    (32, 4)
"""

from novarl_jax.rollout.engine import RolloutEngine, RolloutInfo, SamplingConfig, Trajectory
from novarl_jax.rollout.rewards import (
    RewardFunctionError,
    exact_match_reward,
    extract_boxed,
    integer_closeness_reward,
    last_number,
    load_reward_fn,
    numeric_reward,
    parse_number,
    positional_match_reward,
)
from novarl_jax.rollout.sampler import (
    MIN_TEMPERATURE,
    SampleOutput,
    apply_temperature,
    left_pad,
    sample,
    sampling_logits,
    top_k_mask,
    top_p_mask,
)
from novarl_jax.rollout.tasks import (
    AdditionTask,
    BaseTask,
    CopyTask,
    JSONLTask,
    ReverseTask,
    SortTask,
    Task,
    TaskError,
    make_task,
)
from novarl_jax.rollout.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "AdditionTask",
    "BaseTask",
    "ByteTokenizer",
    "CharTokenizer",
    "CopyTask",
    "HFTokenizer",
    "JSONLTask",
    "MIN_TEMPERATURE",
    "RewardFunctionError",
    "ReverseTask",
    "RolloutEngine",
    "RolloutInfo",
    "SampleOutput",
    "SamplingConfig",
    "SortTask",
    "Task",
    "TaskError",
    "Tokenizer",
    "Trajectory",
    "apply_temperature",
    "exact_match_reward",
    "extract_boxed",
    "last_number",
    "integer_closeness_reward",
    "left_pad",
    "load_reward_fn",
    "make_task",
    "numeric_reward",
    "parse_number",
    "positional_match_reward",
    "sample",
    "sampling_logits",
    "top_k_mask",
    "top_p_mask",
]
