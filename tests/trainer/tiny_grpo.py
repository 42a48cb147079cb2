"""A one-step GRPO config on a tiny MoE policy, for tests that compare two trainer paths."""

from configs import base


def tiny_grpo_config(*, prompts_per_step=2, minibatches=1, micro_batches=2):
    """Base config: GRPO, 4 experts top-2, groups of 4, 4 new tokens, one epoch, one step."""
    c = base.get_config()
    c.experiment.algorithm = "grpo"
    c.experiment.num_experts = 4
    c.experiment.top_k = 2
    # Dropless: with a capacity, which choices drop depends on how a forward groups its
    # tokens (the whole batch or its micro-batches; prompts then completions, or whole rows),
    # so the paths these tests compare would differ.
    c.experiment.capacity_factor = None
    c.experiment.grpo_group_size = 4
    c.experiment.steps = 1
    c.rollout.prompts_per_step = prompts_per_step
    c.rollout.max_new_tokens = 4
    c.train.epochs = 1
    c.train.minibatches = minibatches
    c.train.micro_batches = micro_batches
    c.logging.progress = False
    return c
