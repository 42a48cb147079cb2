"""The shared-prompt forward equals the full forward: outputs, MoE statistics, gradients, meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from tiny_models import DENSE, LLAMA3_ROPE, MESH_CONFIG, MOE, scaled

from novarl_jax.core import sharding as shd
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import forward, forward_shared_prompt, init_params, shard_params

GROUPS, GROUP, PROMPT, COMPLETION = 3, 4, 5, 6


def _rows(seed=0, groups=GROUPS, group=GROUP):
    """Grouped rows: left-padded prompts repeated per group, then right-padded completions."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(1, 64, (groups, PROMPT))
    prompt_mask = np.ones((groups, PROMPT), np.int32)
    prompt_mask[0, :2] = 0
    prompt_mask[-1, :1] = 0
    completions = rng.integers(1, 64, (groups * group, COMPLETION))
    completion_mask = np.ones((groups * group, COMPLETION), np.int32)
    completion_mask[1, 4:] = 0
    completion_mask[group + 2, 1:] = 0
    tokens = np.concatenate([np.repeat(prompts, group, 0), completions], axis=1)
    mask = np.concatenate([np.repeat(prompt_mask, group, 0), completion_mask], axis=1)
    tokens = np.where(mask > 0, tokens, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)


def _run(fn, params, config, tokens, mask, positions, **kw):
    if fn is forward_shared_prompt:
        kw = dict(kw, prompt_length=PROMPT, group_size=GROUP)
    return fn(params, tokens, config, positions=positions, attention_mask=mask, **kw)


@pytest.mark.parametrize("config", [DENSE, MOE, LLAMA3_ROPE], ids=["dense", "moe", "llama3_rope"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_outputs_equal_the_full_forward(config, use_jit):
    params = scaled(init_params(config, jax.random.key(1)))
    tokens, mask, positions = _rows()
    run = functools.partial(_run, config=config, return_routing=config.is_moe)
    if use_jit:
        run = jax.jit(run, static_argnums=0)
    want_logits, _, want = run(forward, params, tokens=tokens, mask=mask, positions=positions)
    got_logits, cache, got = run(
        forward_shared_prompt, params, tokens=tokens, mask=mask, positions=positions
    )
    assert cache is None
    # Padding positions' outputs are never read (the full forward gives them whatever their
    # uniform attention makes); every real position must agree.
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(
        np.asarray(got_logits)[real], np.asarray(want_logits)[real], rtol=1e-5, atol=1e-5
    )
    assert got_logits.shape == want_logits.shape
    assert set(got) == set(want)
    for name in ("moe_aux_loss", "moe_z_loss", "dropped_fraction", "expert_load"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    if config.value_head:
        np.testing.assert_allclose(
            np.asarray(got["values"])[real], np.asarray(want["values"])[real], atol=1e-5
        )
    if config.is_moe:
        chosen = np.asarray(got["routing"]), np.asarray(want["routing"])
        np.testing.assert_array_equal(chosen[0][:, real], chosen[1][:, real])
        assert float(want["moe_aux_loss"]) > 0


def _assert_grads_close(got, want):
    """Per leaf, to float32 rounding of the leaf's largest entries (sums run in other orders)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(want)
    for (path, w), g in zip(flat, jax.tree.leaves(got), strict=True):
        scale = float(np.abs(np.asarray(w)).max())
        np.testing.assert_allclose(
            g, w, rtol=2e-4, atol=3e-5 * scale + 1e-9, err_msg=jax.tree_util.keystr(path)
        )


def _loss(fn, params, config, tokens, mask, positions, routing=None, mesh=None):
    logits, _, aux = _run(fn, params, config, tokens, mask, positions, routing=routing, mesh=mesh)
    logp = jax.nn.log_softmax(logits[:, PROMPT - 1 : -1])
    target = tokens[:, PROMPT:]
    nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    weights = mask[:, PROMPT:]
    loss = jnp.sum(nll * weights) / jnp.sum(weights)
    if config.is_moe:
        loss = loss + 0.1 * aux["moe_aux_loss"] + 0.1 * aux["moe_z_loss"]
        loss = loss + 0.1 * jnp.mean((aux["values"][:, PROMPT - 1 : -1] * weights) ** 2)
    return loss


@pytest.mark.parametrize(
    "config,replay", [(DENSE, False), (MOE, False), (MOE, True)], ids=["dense", "moe", "replay"]
)
def test_gradients_equal_the_full_forward(config, replay):
    params = scaled(init_params(config, jax.random.key(2)))
    tokens, mask, positions = _rows(seed=3)
    routing = None
    if replay:  # replay choices that differ from what this router would pick
        routing = jax.random.randint(jax.random.key(4), (2, *tokens.shape, 2), 0, 4)
        routing = routing.at[..., 1].set((routing[..., 0] + 1) % 4)
        # The prompt's choices are one per group, as a rollout would have recorded them.
        prompt_part = jnp.repeat(routing[:, ::GROUP, :PROMPT], GROUP, axis=1)
        routing = routing.at[:, :, :PROMPT].set(prompt_part)
    grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=(0, 2))
    want_loss, want = grad(forward, params, config, tokens, mask, positions, routing)
    got_loss, got = grad(forward_shared_prompt, params, config, tokens, mask, positions, routing)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    _assert_grads_close(got, want)
    # The prompt's weights get gradient through the completions' attention to it.
    assert float(jnp.abs(got["embed_tokens"]["embedding"][tokens[0, PROMPT - 1]]).sum()) > 0


@pytest.mark.parametrize(
    "layout",
    [
        ParallelLayout(dp=8),
        ParallelLayout(ep=8),
        ParallelLayout(tp=8),
        ParallelLayout(dp=2, tp=2, ep=2),
    ],
    ids=["dp8", "ep8", "tp8", "dp2-tp2-ep2"],
)
def test_sharded_equals_single_device(layout, devices):
    config = MESH_CONFIG
    params = scaled(init_params(config, jax.random.key(5)))
    # 2 groups of 4: fewer prompts than batch shards, so the prompts' rows are padded there.
    tokens, mask, positions = _rows(seed=6, groups=2)
    grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=(0, 2, 7))
    want_loss, want = grad(forward, params, config, tokens, mask, positions, None, None)
    mesh = layout.make_mesh(devices)
    rows = NamedSharding(mesh, shd.batch_spec(2, mesh, batch_size=tokens.shape[0]))
    placed = [jax.device_put(x, rows) for x in (tokens, mask, positions)]
    sharded = shard_params(params, config, mesh)
    got_loss, got = grad(forward_shared_prompt, sharded, config, *placed, None, mesh)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    _assert_grads_close(got, want)


def test_input_errors(devices):
    params = init_params(DENSE, jax.random.key(0))
    tokens, mask, positions = _rows()
    call = functools.partial(
        forward_shared_prompt, params, tokens, DENSE, positions=positions, attention_mask=mask
    )
    with pytest.raises(ValueError, match=r"group_size=5 does not divide the batch size B=12"):
        call(prompt_length=PROMPT, group_size=5)
    with pytest.raises(ValueError, match=r"prompt_length=11 must be shorter than the sequences"):
        call(prompt_length=11, group_size=GROUP)
    with pytest.raises(ValueError, match=r"group_size must be an integer >= 1, got 0"):
        call(prompt_length=PROMPT, group_size=0)
    with pytest.raises(ValueError, match=r"prompt_length must be an integer >= 1, got 2.0"):
        call(prompt_length=2.0, group_size=GROUP)
    # NumPy integers are integers.
    want = call(prompt_length=PROMPT, group_size=GROUP)[0]
    got = call(prompt_length=np.int64(PROMPT), group_size=np.int32(GROUP))[0]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"positions must have the shape of tokens"):
        call(prompt_length=PROMPT, group_size=GROUP, positions=positions[:, :3])
    mesh = ParallelLayout(pp=2, dp=4).make_mesh(devices)
    with pytest.raises(ValueError, match=r"on a mesh with pp > 1 use forward"):
        call(prompt_length=PROMPT, group_size=GROUP, mesh=mesh)
    with pytest.raises(ValueError, match=r"routing= was given but the model is dense"):
        call(prompt_length=PROMPT, group_size=GROUP, routing=jnp.zeros((2, 12, 11, 2), int))
    with pytest.raises(TypeError, match=r"train must be a bool \(True or False\), got 'no'"):
        call(prompt_length=PROMPT, group_size=GROUP, train="no")
    moe_params = init_params(MOE, jax.random.key(0))
    moe_call = functools.partial(
        forward_shared_prompt, moe_params, tokens, MOE, positions=positions,
        attention_mask=mask, prompt_length=PROMPT, group_size=GROUP,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"routing must be \[L, B, T, K\] = \(2, 12, 11, 2\)"):
        moe_call(routing=jnp.zeros((12, 11, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"routing values must be in \[0, num_experts=4\)"):
        moe_call(routing=jnp.full((2, 12, 11, 2), 4, jnp.int32))
    with pytest.raises(ValueError, match=r"params\['embed_tokens'\]\['embedding'\] has shape"):
        forward_shared_prompt(
            params, tokens, DENSE.replace(vocab_size=128), positions=positions,
            attention_mask=mask, prompt_length=PROMPT, group_size=GROUP,
        )  # fmt: skip


def test_a_scoring_forward_routes_with_the_eval_capacity_factor():
    config = MOE.replace(capacity_factor=0.5, eval_capacity_factor=8.0)
    params = scaled(init_params(config, jax.random.key(1)))
    tokens, mask, positions = _rows()
    run = functools.partial(_run, params=params, config=config, tokens=tokens, mask=mask,
                            positions=positions)  # fmt: skip
    want_logits, _, want = run(forward, train=False)
    got_logits, _, got = run(forward_shared_prompt, train=False)
    assert float(got["dropped_fraction"]) == float(want["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(got["expert_load"], want["expert_load"], rtol=1e-5, atol=1e-7)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(
        np.asarray(got_logits)[real], np.asarray(want_logits)[real], rtol=1e-5, atol=1e-5
    )
    # The training factor would drop choices: the eval one is what kept them.
    assert float(run(forward_shared_prompt, train=True)[2]["dropped_fraction"]) > 0.1


def test_return_routing_must_be_a_bool():
    params = init_params(MOE, jax.random.key(0))
    tokens, mask, positions = _rows()
    with pytest.raises(TypeError, match=r"return_routing must be a bool \(True or False\)"):
        _run(forward_shared_prompt, params, MOE, tokens, mask, positions, return_routing="no")
