"""PPO with a separate critic (``ppo.critic='separate'``): architecture, start, routing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from novarl_jax.models import forward
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.loop import Trainer
from novarl_jax.trainer.steps import make_apply_fn


def _config(num_experts=4, **train):
    c = base.get_config()
    c.experiment.algorithm = "ppo"
    c.experiment.num_experts = num_experts
    c.experiment.capacity_factor = None
    c.experiment.steps = 1
    c.rollout.prompts_per_step = 4
    c.rollout.max_new_tokens = 4
    c.ppo.critic = "separate"
    c.train.update(train)
    c.logging.plot = False
    c.logging.progress = False
    return c


def _split_head(params):
    trunk = {k: v for k, v in params.items() if k != "value_head"}
    return trunk, params["value_head"]


@pytest.mark.parametrize("num_experts", [0, 4])
def test_the_critic_is_the_policy_with_a_value_head_and_its_weights(num_experts):
    run = build_run(validate_config(_config(num_experts)))
    assert run.model.critic == dataclasses.replace(run.model.policy, value_head=True)
    assert run.model.critic.num_local_experts == num_experts
    assert not run.model.policy.value_head
    params = run.init_params(jax.random.key(0))
    trunk, head = _split_head(params["critic"])
    assert jax.tree.structure(trunk) == jax.tree.structure(params["policy"])
    for a, b in zip(jax.tree.leaves(trunk), jax.tree.leaves(params["policy"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # Own buffers: the update donates both models' weights.
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    kernel = np.asarray(head["kernel"])
    assert kernel.shape == (run.model.policy.hidden_size, 1)
    assert 0.005 < kernel.std() < 0.05  # normal(0, 0.02), as init_params draws a value head
    np.testing.assert_array_equal(np.asarray(head["bias"]), 0.0)


def test_router_replay_drives_the_policy_and_not_the_critic():
    """The replayed choices are the policy's; the critic's routers choose for themselves."""
    run = build_run(validate_config(_config(router_replay=True)))
    spec = run.model
    assert spec.router_replay
    params = run.init_params(jax.random.key(1))
    # A critic that no longer equals the policy, so the two routers choose differently.
    params["critic"] = jax.tree.map(
        lambda x: x * 1.5 if x.ndim > 1 else x, params["critic"]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    rows, p, t = 4, spec.prompt_length, 4
    tokens = jnp.asarray(rng.integers(3, spec.policy.vocab_size, size=(rows, p + t)), jnp.int32)
    inputs = dict(
        positions=jnp.broadcast_to(jnp.arange(p + t, dtype=jnp.int32), tokens.shape),
        attention_mask=jnp.ones_like(tokens),
    )
    _, _, own = forward(params["critic"], tokens, spec.critic, return_routing=True, **inputs)
    experts = spec.policy.num_local_experts
    forced = (own["routing"] + 1) % experts  # valid choices, none of them the critic's own
    batch = dict(tokens=tokens, response_tokens=tokens[:, p:], routing=forced, **inputs)
    out = jax.jit(make_apply_fn(spec))(params, batch)

    want_values = own["values"][:, p - 1 : -1]
    np.testing.assert_allclose(out["values"], want_values, rtol=1e-5, atol=1e-6)
    replayed = forward(params["critic"], tokens, spec.critic, routing=forced, **inputs)[2]
    assert np.abs(np.asarray(replayed["values"][:, p - 1 : -1] - want_values)).max() > 1e-3

    logits, _, policy_aux = forward(params["policy"], tokens, spec.policy, routing=forced, **inputs)
    logprobs = jax.nn.log_softmax(logits[:, p - 1 : -1], axis=-1)
    want_logprobs = jnp.take_along_axis(logprobs, tokens[:, p:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], want_logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["moe_aux_loss"], policy_aux["moe_aux_loss"], rtol=1e-6)
    np.testing.assert_allclose(out["critic_moe_aux_loss"], own["moe_aux_loss"], rtol=1e-6)
    np.testing.assert_allclose(out["critic_moe_z_loss"], own["moe_z_loss"], rtol=1e-6)


def test_a_ppo_step_with_an_moe_critic_and_router_replay_on_a_mesh(devices):
    config = _config(router_replay=True, minibatches=2)
    config.experiment.update(world_size=8, tensor_parallel_size=2, expert_parallel_size=2)
    config.rollout.prompts_per_step = 8
    spec = validate_config(config)
    run = build_run(spec)
    trainer = Trainer(run, "unused", mesh=spec.layout.make_mesh(devices))
    state, reference = trainer.initial_state()
    start = jax.device_get(state.params["critic"])
    state, metrics, _ = trainer.iteration(state, reference, 0)
    for name in ("critic/vf_loss", "critic/moe_aux_loss", "critic/moe_z_loss", "actor/pg_loss"):
        assert np.isfinite(metrics[name]), name
    # Each model's gradient norm on its own (each is clipped by its own, as in verl).
    assert metrics["actor/grad_norm"] > 0 and metrics["critic/grad_norm"] > 0
    assert metrics["actor/grad_norm"] != metrics["critic/grad_norm"]
    end = jax.device_get(state.params["critic"])
    # The critic's routers learn (from the value loss and their own router losses).
    for path in (("layers", "moe", "router"), ("value_head", "kernel")):
        before, after = start, end
        for key in path:
            before, after = before[key], after[key]
        assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0, path
