"""Decoder-only policies (dense or Mixture-of-Experts) and Hugging Face weight interop.

The public API is exactly what this module re-exports.
"""

from novarl_jax.models.config import ModelConfig, RopeScaling
from novarl_jax.models.hf import load_hf_model, save_hf_model
from novarl_jax.models.shared_prompt import forward_shared_prompt
from novarl_jax.models.transformer import (
    KVCache,
    cache_logical_axes,
    cast_params,
    forward,
    init_cache,
    init_params,
    param_logical_axes,
    param_shardings,
    prefill,
    shard_params,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "cache_logical_axes",
    "cast_params",
    "forward",
    "forward_shared_prompt",
    "init_cache",
    "init_params",
    "load_hf_model",
    "param_logical_axes",
    "param_shardings",
    "prefill",
    "save_hf_model",
    "shard_params",
]
