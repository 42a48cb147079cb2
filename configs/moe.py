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
    exp.world_size = 8
    exp.tensor_parallel_size = 2
    exp.pipeline_parallel_size = 2
    exp.expert_parallel_size = 2
    exp.num_experts = 4
    exp.top_k = 2
    exp.capacity_factor = 1.25
    exp.algorithm = "grpo"
    return config
