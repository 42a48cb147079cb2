"""The quickstart's MoE demo: a tiny Mixtral-style policy on an 8-device DP/TP/PP/EP layout.

world 8 = dp 1 x tp 2 x pp 2 x ep 2, four experts, top-2 routing, GRPO. On a CPU-only
machine the command line creates 8 fake XLA devices before JAX starts.

Run:
    python -m novarl_jax.train --config=configs/moe.py
    python -m novarl_jax.train --config=configs/moe.py experiment.algorithm=ppo
"""

from configs import base


def get_config():
    config = base.get_config()
    exp = config.experiment
    exp.world_size = 8  # devices: dp = 8 / (tp * pp * ep) = 1
    exp.tensor_parallel_size = 2  # attention heads and expert hidden units over 2 devices
    exp.pipeline_parallel_size = 2  # the 2 decoder layers as 2 pipeline stages
    exp.expert_parallel_size = 2  # 2 experts per device; all_to_all dispatch
    exp.num_experts = 4  # experts per MoE layer (every layer is MoE)
    exp.top_k = 2  # experts per token, weighted by the softmax over the chosen two
    exp.capacity_factor = 1.25  # capacity = 1.25 x the even share; None = dropless
    exp.algorithm = "grpo"  # or "ppo": the loop is the same
    return config
