"""Mixed precision: ``compute_dtype`` casts the weights on entry, the weights keep ``dtype``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from tiny_models import MESH_CONFIG, MOE, TINY, scaled

from novarl_jax.core import sharding as shd
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import (
    ModelConfig,
    cast_params,
    forward,
    forward_shared_prompt,
    init_cache,
    init_params,
)
from novarl_jax.models import shard_params as shard

BF16 = jnp.dtype(jnp.bfloat16)


def _loss(params, toks, mask, config, mesh=None, routing=None):
    logits, _, aux = forward(
        params, toks, config, attention_mask=mask, mesh=mesh, routing=routing, return_routing=True
    )
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
    loss = jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    loss = loss + 0.1 * jnp.mean(aux["values"] ** 2) + 0.01 * aux["moe_aux_loss"]
    return loss, (logits, aux["values"], aux["routing"])


grad_fn = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=(3, 4))


def _routing(result):
    return result[0][1][2]


def _inputs(config):
    # Weights of std 0.04: at std 0.1 the tiny model is so sharp (near-tied attention and
    # router scores) that bfloat16 rounding moves single logits by 20%.
    params = scaled(init_params(config, jax.random.key(3)), 2.0)
    toks = jax.random.randint(jax.random.key(4), (8, 10), 1, 64)
    mask = jnp.ones((8, 10), jnp.int32).at[2, :4].set(0)
    return params, jnp.where(mask > 0, toks, 0), mask


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def test_config_field():
    mixed = ModelConfig(**TINY, compute_dtype=np.dtype(jnp.bfloat16))
    assert mixed.compute_dtype == "bfloat16" and mixed.dtype == "float32"
    assert mixed.activation_dtype == BF16 and mixed.param_dtype == jnp.float32
    assert ModelConfig(**TINY, dtype="bfloat16").activation_dtype == BF16
    with pytest.raises(ValueError, match=r"compute_dtype='int8' is not one of \['float32'"):
        ModelConfig(**TINY, compute_dtype="int8")
    # Not part of the architecture: config.json does not carry it.
    assert "compute_dtype" not in mixed.to_hf_config()
    # One spelling per model: equal configs, one compiled program.
    assert ModelConfig(**TINY, compute_dtype="float32") == ModelConfig(**TINY)


def test_cast_params_against_numpy():
    params = init_params(MOE, jax.random.key(0))
    tree = {**params, "step": np.int32(7)}
    cast = cast_params(tree, MOE.replace(compute_dtype="bfloat16"))
    assert cast["step"] is tree["step"]  # integers are not cast
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for (path, want), got in zip(flat, jax.tree.leaves(cast), strict=True):
        name = jax.tree_util.keystr(path)
        if "router" in name or "value_head" in name or want.dtype == np.int32:
            assert got is want, name  # read in float32 by the forward: not cast
            continue
        assert got.dtype == BF16, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float64).astype(BF16))
    assert cast["layers"]["moe"]["router"].dtype == jnp.float32
    # Already in the compute dtype: the same arrays, no copies.
    same = cast_params(params, MOE)
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params), strict=True))


def test_params_of_another_dtype_are_refused():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(MOE, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"params\['embed_tokens'\]\['embedding'\] has dtype "
                       r"bfloat16, but config dtype='float32'"):  # fmt: skip
        forward(params, jnp.ones((1, 3), jnp.int32), MOE)
    # Weights cast already (what the sampler feeds its decode loop) are the compute dtype's.
    mixed = MOE.replace(compute_dtype="bfloat16")
    forward(
        cast_params(init_params(MOE, jax.random.key(0)), mixed), jnp.ones((1, 3), jnp.int32), mixed
    )


def test_value_head_reads_float32_weights():
    params = init_params(MOE, jax.random.key(0))
    params["value_head"] = {"kernel": jnp.zeros_like(params["value_head"]["kernel"]),
                            "bias": jnp.full((1,), 0.7011, jnp.float32)}  # fmt: skip
    _, _, aux = forward(params, jnp.ones((2, 3), jnp.int32), MOE.replace(compute_dtype="bfloat16"))
    # 0.7011 is not a bfloat16 number (0.69921875 is the nearest): the bias was not cast.
    np.testing.assert_array_equal(aux["values"], np.float32(0.7011))


def cast_then_loss(params, toks, mask):
    # What the sampler's decode loop does: cast once, then forward the cast weights.
    mixed = MOE.replace(compute_dtype="bfloat16")
    return _loss(cast_params(params, mixed), toks, mask, mixed)


@functools.cache
def _results():
    params, toks, mask = _inputs(MOE)
    mixed = MOE.replace(compute_dtype="bfloat16")
    reference = grad_fn(params, toks, mask, MOE, None)
    return {
        "float32": reference,
        "mixed": grad_fn(params, toks, mask, mixed, None),
        # bfloat16 rounding can flip a near-tie expert choice, which changes that token's
        # output outright: against float32, the mixed forward replays float32's choices.
        "mixed_replay": grad_fn(params, toks, mask, mixed, None, _routing(reference)),
        # Cast outside the forward, differentiated through the cast.
        "cast": jax.jit(jax.value_and_grad(cast_then_loss, has_aux=True))(params, toks, mask),
    }


def test_forward_is_the_forward_of_cast_weights():
    r = _results()
    (loss, (logits, values, _)), grads = r["mixed"]
    (c_loss, (c_logits, c_values, _)), c_grads = r["cast"]
    assert logits.dtype == jnp.float32 and values.dtype == jnp.float32
    np.testing.assert_array_equal(logits, c_logits)
    np.testing.assert_array_equal(values, c_values)
    np.testing.assert_array_equal(loss, c_loss)
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(c_grads), strict=True):
        np.testing.assert_array_equal(g, c)


def test_close_to_float32_but_computed_in_bfloat16():
    r = _results()
    (loss, (logits, *_)), grads = r["float32"]
    (m_loss, (m_logits, *_)), m_grads = r["mixed_replay"]
    # bfloat16 keeps 8 significant bits: within a few percent, and not float32's numbers.
    assert 1e-4 < _relative(m_logits, logits) < 3e-2
    np.testing.assert_allclose(m_loss, loss, rtol=2e-2)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), m in zip(flat, jax.tree.leaves(m_grads), strict=True):
        assert m.dtype == jnp.float32, jax.tree_util.keystr(path)  # the weights' dtype
        assert _relative(m, g) < 0.1, jax.tree_util.keystr(path)


def test_shared_prompt_forward_computes_in_bfloat16():
    """The trainer's GRPO scoring (and update) forward: casts on entry like forward."""
    params, toks, _ = _inputs(MOE)
    mixed = MOE.replace(compute_dtype="bfloat16")

    @functools.partial(jax.jit, static_argnums=1)
    def logits(p, config):
        return forward_shared_prompt(p, toks, config, prompt_length=4, group_size=4)[0]

    got = logits(params, mixed)
    np.testing.assert_array_equal(got, logits(cast_params(params, mixed), mixed))
    assert 1e-4 < _relative(got, logits(params, MOE)) < 3e-2


def test_cache_dtype_follows_compute_dtype():
    assert init_cache(MOE, 2, 4).k[0].dtype == jnp.float32
    mixed = init_cache(MOE.replace(compute_dtype="bfloat16"), 2, 4)
    assert {x.dtype for x in mixed.k + mixed.v} == {BF16}
    assert init_cache(MOE, 2, 4, jnp.bfloat16).v[1].dtype == BF16


@pytest.mark.parametrize(
    "layout",
    # pp: XLA:CPU could not compile the pipeline's bfloat16 all-reduces (models.pipeline).
    [ParallelLayout(dp=2, tp=2, ep=2), ParallelLayout(pp=2, tp=2, ep=2)],
    ids=["dp2-tp2-ep2", "pp2-tp2-ep2"],
)
def test_sharded_mixed_precision_equals_single_device(layout, devices):
    mixed = MESH_CONFIG.replace(compute_dtype="bfloat16")
    params, toks, mask = _inputs(MESH_CONFIG)
    single = grad_fn(params, toks, mask, mixed, None)
    (loss, (logits, *_)), grads = single
    mesh = layout.make_mesh(devices)
    batch = NamedSharding(mesh, shd.batch_spec(2, mesh, batch_size=8))
    (s_loss, (s_logits, *_)), s_grads = grad_fn(
        shard(params, MESH_CONFIG, mesh),
        jax.device_put(toks, batch),
        jax.device_put(mask, batch),
        mixed,
        mesh,
        _routing(single),  # the same expert choices (see _results)
    )
    # tp splits each matmul's sum in two (rounded to bfloat16 apiece): bfloat16 tolerances.
    assert _relative(s_logits, logits) < 2e-2
    np.testing.assert_allclose(s_loss, loss, rtol=1e-2)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(s_grads), strict=True):
        assert s.dtype == jnp.float32 and _relative(s, g) < 0.1
    assert tuple(s_grads["layers"]["moe"]["w_gate_up"].sharding.spec)[1] == "ep"
