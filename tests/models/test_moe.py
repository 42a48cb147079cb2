"""Tests of the Mixture-of-Experts block (novarl_jax.models.moe).

The oracles: ``moe_reference`` (a per-expert loop with no capacity) for dropless routing, and
``np_moe`` below, a NumPy float64 loop that applies the capacity/drop rule choice by choice.

The test batches (64 tokens, 128 choices) are small routing groups. On one device they run
on the grouped rows like large ones; under expert parallelism they take the block's small-group
path (slabs sized to the real loads), and tests that take the ``large_groups`` fixture force
the capacity slabs of large groups there on the same inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from novarl_jax.core import sharding as shd
from novarl_jax.core.distributed import MoERouterConfig, ParallelLayout
from novarl_jax.models import moe

D, F, E, K = 16, 32, 8, 2
B, S = 8, 8  # 64 tokens


def make_params(key=0, num_experts=E, scale=20.0):
    """Parameters with O(1) outputs (the 0.02 initialisation makes them tiny)."""
    params = moe.init_moe_params(jax.random.key(key), D, F, num_experts)
    return jax.tree.map(lambda w: w * scale, params)


def make_x(key=1, batch=B, seq=S):
    return jax.random.normal(jax.random.key(key), (batch, seq, D), jnp.float32)


@pytest.fixture
def large_groups(monkeypatch):
    """Routes every group under expert parallelism as a large one (full capacity slabs)."""
    monkeypatch.setattr(moe, "_SLOT_MAX_CHOICES", 0)


def router_cfg(**kw):
    kw.setdefault("num_experts", E)
    kw.setdefault("top_k", K)
    kw.setdefault("capacity_factor", None)
    return MoERouterConfig(**kw)


# ----------------------------------------------------------------------------------------------
# NumPy float64 oracle of the whole block, drop rule included


def np_moe(params, x, router, *, mask=None, groups=1, routing=None, train=True):
    """Float64 loops: routing, per-group capacity by drop policy, outputs and statistics.

    ``groups`` splits the batch into that many contiguous routing groups (the shards of
    ``('dp', 'ep')``).
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    b, s, _ = x.shape
    e, k = router.num_experts, router.top_k
    t = b * s
    xt = x.reshape(t, -1)
    valid = np.ones(t, bool) if mask is None else np.asarray(mask).reshape(t) > 0
    xt = np.where(valid[:, None], xt, 0.0)  # padding is read as a zero token
    logits = xt @ p["router"]
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    probs = np.exp(logits - lse[:, None])
    if routing is None:
        experts = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    else:
        experts = np.asarray(routing).reshape(t, k)
    chosen = np.take_along_axis(logits, experts, 1)
    if router.normalize_top_k:
        gates = np.exp(chosen - chosen.max(1, keepdims=True))
        gates /= gates.sum(1, keepdims=True)
    else:
        gates = np.take_along_axis(probs, experts, 1)

    keep = np.zeros((t, k), bool)
    per_group = t // groups
    for g in range(groups):
        tokens = range(g * per_group, (g + 1) * per_group)
        # C counts the group's real tokens (never more than the whole group's C).
        real = int(sum(valid[tok] for tok in tokens))
        capacity = min(router.capacity(real, train=train), router.capacity(per_group, train=train))
        for ex in range(e):
            cands = [(tok, j) for tok in tokens for j in range(k)
                     if valid[tok] and experts[tok, j] == ex]  # fmt: skip
            if router.drop_policy == "probs":
                cands.sort(key=lambda c: (-gates[c[0], c[1]], c[0]))
            for tok, j in cands[:capacity]:
                keep[tok, j] = True

    y = np.zeros_like(xt)
    for tok in range(t):
        for j in range(k):
            if keep[tok, j]:
                ex = experts[tok, j]
                gate = xt[tok] @ p["w_gate_up"][ex, :, 0, :]
                up = xt[tok] @ p["w_gate_up"][ex, :, 1, :]
                h = gate / (1.0 + np.exp(-gate)) * up
                y[tok] += gates[tok, j] * (h @ p["w_down"][ex])

    n = max(valid.sum(), 1)
    counts = np.array([np.sum(valid[:, None] & (experts == ex)) for ex in range(e)], float)
    mean_probs = probs[valid].sum(0) / n
    aux = {
        "aux_loss": e * np.sum(counts / n * mean_probs),
        "z_loss": np.sum(lse[valid] ** 2) / n,
        "dropped_fraction": 1.0 - keep.sum() / max(valid.sum() * k, 1),
        "expert_load": counts / max(valid.sum() * k, 1),
        "routing": experts.reshape(b, s, k),
    }
    return y.reshape(x.shape), aux, keep.reshape(b, s, k)


def masked_reference(params, x, router, keep):
    """JAX per-expert loop keeping only the choices ``keep`` [B, S, K] (for gradients)."""
    logits = jnp.einsum("bsd,de->bse", x, params["router"], precision="highest")
    top_logits, top = jax.lax.top_k(logits, router.top_k)
    gates = jax.nn.softmax(top_logits, axis=-1) * jnp.asarray(keep)
    y = jnp.zeros_like(x)
    for ex in range(router.num_experts):
        weight = jnp.sum(jnp.where(top == ex, gates, 0.0), axis=-1)
        h = jnp.einsum("bsd,dgf->bsgf", x, params["w_gate_up"][ex])
        out = (jax.nn.silu(h[..., 0, :]) * h[..., 1, :]) @ params["w_down"][ex]
        y = y + weight[..., None] * out
    return y


def assert_aux_close(aux, ref, rtol=1e-5):
    for key in ("aux_loss", "z_loss", "dropped_fraction", "expert_load"):
        np.testing.assert_allclose(np.asarray(aux[key]), ref[key], rtol=rtol, atol=1e-6,
                                   err_msg=key)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(aux["routing"]), ref["routing"])


def assert_tree_close(a, b, rtol=1e-5):
    """Elementwise closeness, with an absolute floor at rtol times each leaf's scale."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):  # fmt: skip
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max(),
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip


def loss_fns(router, mesh=None, impl="dense", mask=None):
    """Scalar losses of (params, x) for gradient checks: <y, c> + the aux losses."""
    c = jax.random.normal(jax.random.key(7), (B, S, D))

    def ours(params, x):
        y, aux = moe.moe_forward(params, x, router, mesh=mesh, token_mask=mask, impl=impl)
        return jnp.sum(y * c), (y, aux)

    def ref(params, x):
        y = moe.moe_reference(params, x, router, token_mask=mask)
        return jnp.sum(y * c), y

    return ours, ref


# ----------------------------------------------------------------------------------------------
# Parameters and conversions


def test_init_shapes_dtype_and_logical_axes():
    params = moe.init_moe_params(jax.random.key(0), D, F, E, dtype=jnp.bfloat16)
    assert params["router"].shape == (D, E)
    assert params["w_gate_up"].shape == (E, D, 2, F)
    assert params["w_down"].shape == (E, F, D)
    assert all(w.dtype == jnp.bfloat16 for w in params.values())
    std = float(jnp.std(params["w_gate_up"].astype(jnp.float32)))
    assert 0.015 < std < 0.025
    axes = moe.moe_logical_axes()
    assert jax.tree.structure(axes, is_leaf=lambda n: isinstance(n, tuple)) == (
        jax.tree.structure(params)
    )
    for name, w in params.items():
        assert len(axes[name]) == w.ndim
    mesh = ParallelLayout(dp=2, ep=2, tp=2).make_mesh()
    specs = shd.tree_specs(axes, mesh, {k: v.shape for k, v in params.items()})
    assert specs["w_gate_up"] == P("ep", None, None, "tp")
    assert specs["w_down"] == P("ep", "tp")
    assert specs["router"] == P()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
        ({"intermediate_size": 2.5}, "intermediate_size must be an integer >= 1"),
        ({"num_experts": True}, "num_experts must be an integer >= 1"),
    ],
)
def test_init_rejects_bad_sizes(kwargs, match):
    args = {"hidden_size": D, "intermediate_size": F, "num_experts": E} | kwargs
    with pytest.raises(ValueError, match=match):
        moe.init_moe_params(jax.random.key(0), **args)


def hf_weights(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(E, D)),  # gate.weight [E, D]
        rng.normal(size=(E, F, D)) * 0.3,  # w1 [F, D] per expert
        rng.normal(size=(E, F, D)) * 0.3,  # w3
        rng.normal(size=(E, D, F)) * 0.3,  # w2 [D, F]
    )


def test_per_expert_conversion_round_trips_and_means_the_hf_formula():
    router, w1, w3, w2 = hf_weights()
    params = moe.moe_params_from_per_expert(router, list(w1), list(w3), list(w2))
    assert all(isinstance(v, np.ndarray) for v in params.values())
    assert params["w_gate_up"].shape == (E, D, 2, F)
    back = moe.moe_params_to_per_expert(params)
    for got, want in zip(back, (router, w1, w3, w2), strict=True):
        np.testing.assert_array_equal(got, want)
    # JAX arrays in -> JAX arrays out.
    jparams = moe.moe_params_from_per_expert(*(jnp.asarray(w, jnp.float32) for w in
                                               (router, w1, w3, w2)))  # fmt: skip
    assert all(isinstance(v, jax.Array) for v in jparams.values())
    # Hugging Face's per-expert Mixtral MLP in float64: (silu(x w1^T) * (x w3^T)) w2^T.
    x = np.random.default_rng(1).normal(size=(1, 5, D))
    cfg = router_cfg()
    logits = x[0] @ router.T
    want = np.zeros((5, D))
    for tok in range(5):
        top = np.argsort(-logits[tok], kind="stable")[:K]
        g = np.exp(logits[tok, top] - logits[tok, top].max())
        g /= g.sum()
        for weight, ex in zip(g, top, strict=True):
            gate, up = w1[ex] @ x[0, tok], w3[ex] @ x[0, tok]
            want[tok] += weight * (w2[ex] @ (gate / (1 + np.exp(-gate)) * up))
    got = moe.moe_reference({k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                            jnp.asarray(x, jnp.float32), cfg)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-4, atol=1e-4)


def test_fused_conversion_matches_transformers_v5_layout():
    router, w1, w3, w2 = hf_weights()
    # transformers v5: gate_up_proj[e] = cat(w1[e], w3[e]) over rows; down_proj = w2.
    gate_up_proj = np.concatenate([w1, w3], axis=1)
    params = moe.moe_params_from_fused(router, gate_up_proj, w2)
    ref = moe.moe_params_from_per_expert(router, w1, w3, w2)
    for name in moe.PARAM_NAMES:
        np.testing.assert_array_equal(params[name], ref[name])
    got_router, got_gate_up, got_down = moe.moe_params_to_fused(params)
    np.testing.assert_array_equal(got_router, router)
    np.testing.assert_array_equal(got_gate_up, gate_up_proj)
    np.testing.assert_array_equal(got_down, w2)


def test_conversion_errors():
    router, w1, w3, w2 = hf_weights()
    with pytest.raises(ValueError, match=r"w2 has shape .* it must be \(8, 16, 32\)"):
        moe.moe_params_from_per_expert(router, w1, w3, w2[:, :, :-1])
    with pytest.raises(ValueError, match="w1 must be stacked over experts with 3 dims"):
        moe.moe_params_from_per_expert(router, w1[0], w3, w2)
    with pytest.raises(ValueError, match=r"gate_up_proj has shape .* must be \[8, 2F, 16\]"):
        moe.moe_params_from_fused(router, w1[:, :-1], w2)
    with pytest.raises(ValueError, match=r"down_proj has shape .* must be \[E, D, F\]"):
        moe.moe_params_from_fused(router, np.concatenate([w1, w3], 1), w2[:, :, :-1])


# ----------------------------------------------------------------------------------------------
# Dropless routing equals the per-expert loop


@pytest.mark.parametrize(
    ("impl", "use_jit"),
    [("dense", True), ("dense", False), ("ragged", True), ("ragged", False)],
)
def test_dropless_matches_reference_values_and_grads(impl, use_jit):
    router = router_cfg()
    params, x = make_params(), make_x()
    ours, ref = loss_fns(router, impl=impl)
    grad_ours = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)
    grad_ref = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)
    if use_jit:
        grad_ours, grad_ref = jax.jit(grad_ours), jax.jit(grad_ref)
    (_, (y, aux)), g = grad_ours(params, x)
    (_, y_ref), g_ref = grad_ref(params, x)
    assert float(jnp.abs(y_ref).mean()) > 0.1  # outputs are O(1), so rtol means something
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    assert_tree_close(g, g_ref)
    assert float(aux["dropped_fraction"]) == 0.0


def test_dropless_full_softmax_gates_and_top1():
    params, x = make_params(), make_x()
    for router in (router_cfg(normalize_top_k=False), router_cfg(top_k=1)):
        y, _ = jax.jit(functools.partial(moe.moe_forward, router=router))(params, x)
        y_ref = moe.moe_reference(params, x, router)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
        y_np, _, _ = np_moe(params, x, router)
        np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)


def test_dropless_is_per_token_permutation_equivariant():
    router = router_cfg()
    params, x = make_params(), make_x()
    perm = np.random.default_rng(0).permutation(B * S)
    fwd = jax.jit(functools.partial(moe.moe_forward, router=router))
    y, _ = fwd(params, x)
    y_perm, _ = fwd(params, x.reshape(B * S, D)[perm].reshape(B, S, D))
    np.testing.assert_allclose(
        np.asarray(y_perm).reshape(B * S, D), np.asarray(y).reshape(B * S, D)[perm],
        rtol=1e-6, atol=1e-6,
    )  # fmt: skip


# (ep, tp, pp); dp fills the 8 devices.
LAYOUTS = [(1, 2, 1), (2, 1, 1), (2, 2, 1), (4, 1, 1), (4, 2, 1), (8, 1, 1), (2, 2, 2)]


@pytest.mark.parametrize(("ep", "tp", "pp"), LAYOUTS, ids=lambda v: str(v))
def test_mesh_dropless_matches_reference_and_single_device(ep, tp, pp, devices):
    check_mesh_dropless(ep, tp, pp, devices)


def test_mesh_dropless_large_groups(devices, large_groups):
    check_mesh_dropless(2, 2, 1, devices)


def check_mesh_dropless(ep, tp, pp, devices):
    layout = ParallelLayout(dp=8 // (ep * tp * pp), ep=ep, tp=tp, pp=pp)
    mesh = layout.make_mesh(devices)
    router = router_cfg()
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.random.default_rng(3).random((B, S)) > 0.2, jnp.int32)
    ours, ref = loss_fns(router, mesh=mesh, mask=mask)
    (_, (y, aux)), g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(params, x)
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    assert_tree_close(g, g_ref)
    # Statistics are global: the same as one device (and as NumPy).
    _, aux_np, _ = np_moe(params, x, router, mask=mask)
    assert_aux_close(aux, aux_np)


# ----------------------------------------------------------------------------------------------
# Small routing groups: slabs sized to the busiest expert


def test_slot_sizes_step_by_at_most_a_quarter_up_to_the_capacity():
    assert moe._slot_sizes(32) == (8, 10, 12, 14, 16, 20, 24, 28, 32)
    assert moe._slot_sizes(20) == (8, 10, 12, 14, 16, 20)
    assert moe._slot_sizes(8) == (8,)
    assert moe._slot_sizes(5) == (5,)
    assert moe._slot_sizes(40, steps=(4,)) == (8, 16, 32, 40)  # the backward pass's sizes
    for capacity in range(1, 300):
        sizes = moe._slot_sizes(capacity)
        assert sizes[-1] == capacity and list(sizes) == sorted(set(sizes))
        assert all(b <= 1.25 * a for a, b in zip(sizes, sizes[1:], strict=False))


def spread_routing(tokens, crowded=0):
    """[tokens, K] choices spread evenly over the experts, the first ``crowded`` on 0 and 1."""
    t = np.arange(tokens)
    routing = np.stack([t % E, (t + 1) % E], axis=-1)
    routing[:crowded] = [0, 1]
    return routing


def grad_fn(router, mesh=None):
    """A fresh jitted value-and-grad of <y, c> (fresh, so that it traces the current path).

    Called as ``fn(params, x, c, mask, routing)``: arrays as arguments, so that test cases of
    the same shapes share one compiled program.
    """

    def loss(params, x, c, mask, routing):
        y, aux = moe.moe_forward(params, x, router, mesh=mesh, token_mask=mask, routing=routing)
        return jnp.sum(y * c), (y, aux)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _count_calls(monkeypatch, name):
    """Wraps ``moe.<name>`` so that each call (each trace, under jit) adds 1 to the list
    returned."""
    count = [0]
    original = getattr(moe, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(moe, name, counted)
    return count


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_only_expert_parallel_small_groups_take_the_slot_path(impl, devices, monkeypatch):
    # Decode-sized groups (64 tokens, 128 choices): on one device the grouped rows, under
    # ep=2 the slabs sized to the loads (ragged too: it runs 'dense' under expert parallelism).
    taken = _count_calls(monkeypatch, "_slot_experts")
    router = router_cfg()
    params, x = make_params(), make_x()
    y, _ = jax.jit(functools.partial(moe.moe_forward, router=router, impl=impl))(params, x)
    assert taken == [0]
    mesh = ParallelLayout(ep=2).make_mesh(devices[:2])
    fwd = jax.jit(functools.partial(moe.moe_forward, router=router, impl=impl, mesh=mesh))
    y_ep, _ = fwd(params, x)
    assert taken == [1]
    np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [None, 0.75])
@pytest.mark.parametrize("crowded", [0, B * S // 2, B * S], ids=["even", "half", "all"])
def test_small_groups_match_numpy_and_the_large_group_path(factor, crowded, devices, monkeypatch):
    # Experts split over ep=2 (32 tokens per routing group, 25-26 of them real). Loads from
    # even (an 8-row slab) to every real token on experts 0 and 1 (a 28-row slab of C = 32
    # dropless); a slab smaller than the busiest expert would drop choices.
    mesh = ParallelLayout(ep=2).make_mesh(devices[:2])
    taken = _count_calls(monkeypatch, "_slot_experts")
    router = router_cfg(capacity_factor=factor)
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.random.default_rng(8).random((B, S)) > 0.2, jnp.int32)
    routing = jnp.asarray(spread_routing(B * S, crowded).reshape(B, S, K), jnp.int32)
    args = (params, x, jax.random.normal(jax.random.key(7), x.shape), mask, routing)
    (_, (y, aux)), g = grad_fn(router, mesh)(*args)
    assert taken == [1]  # traced once, on the slot path
    monkeypatch.setattr(moe, "_SLOT_MAX_CHOICES", 0)
    (_, (y_large, aux_large)), g_large = grad_fn(router, mesh)(*args)
    assert taken == [1]
    y_np, aux_np, _ = np_moe(params, x, router, mask=mask, groups=2, routing=routing)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    assert_aux_close(aux, aux_np)
    if factor is not None and crowded:
        assert aux_np["dropped_fraction"] > 0.1
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_large), rtol=1e-5, atol=1e-6)
    assert_tree_close(g, g_large)
    for key in ("aux_loss", "z_loss", "dropped_fraction", "expert_load", "routing"):
        np.testing.assert_array_equal(np.asarray(aux[key]), np.asarray(aux_large[key]))


@pytest.mark.parametrize("factor", [None, 2.5])
def test_decode_sized_groups_under_an_expert_parallel_mesh(factor, devices, monkeypatch):
    # One token per sequence, 16 per routing group (4 data shards), C = 16 dropless or 10.
    # The first shard crowds experts 0 and 1 (a C-row slab), the others spread (8 rows): all
    # shards must run the same slab size, or the all_to_all between them would not match.
    mesh = ParallelLayout(dp=2, ep=2, tp=2).make_mesh(devices)
    router = router_cfg(capacity_factor=factor)
    params, x = make_params(), make_x(batch=64, seq=1)
    routing = jnp.asarray(spread_routing(64, crowded=16).reshape(64, 1, K), jnp.int32)
    mask = jnp.ones(x.shape[:2], jnp.int32)
    args = (params, x, jax.random.normal(jax.random.key(7), x.shape), mask, routing)
    (_, (y, aux)), g = grad_fn(router, mesh)(*args)
    monkeypatch.setattr(moe, "_SLOT_MAX_CHOICES", 0)
    (_, (y_large, aux_large)), g_large = grad_fn(router, mesh)(*args)
    y_np, aux_np, _ = np_moe(params, x, router, groups=4, routing=routing)
    if factor is not None:
        assert aux_np["dropped_fraction"] > 0.05
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    assert_aux_close(aux, aux_np)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_large), rtol=1e-5, atol=1e-6)
    assert_tree_close(g, g_large)


# ----------------------------------------------------------------------------------------------
# Capacity and the drop rule


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_drop_rule_matches_numpy(policy):
    router = router_cfg(capacity_factor=0.5, drop_policy=policy)
    params, x = make_params(), make_x()
    y, aux = jax.jit(functools.partial(moe.moe_forward, router=router))(params, x)
    y_np, aux_np, keep = np_moe(params, x, router)
    assert aux_np["dropped_fraction"] > 0.3
    assert_aux_close(aux, aux_np)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    # Tokens whose every choice was dropped output exactly zero.
    all_dropped = ~keep.any(-1)
    assert all_dropped.sum() >= 3
    assert np.all(np.asarray(y)[all_dropped] == 0.0)
    # Each kept choice is what the full (uncapped) block would give for it.
    y_full, _, _ = np_moe(params, x, router_cfg(drop_policy=policy))
    full_kept = ~all_dropped & keep.all(-1)
    np.testing.assert_allclose(np.asarray(y)[full_kept], y_full[full_kept], rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    # Gradients equal those of a per-expert loop that keeps the same choices.
    c = jax.random.normal(jax.random.key(7), x.shape)
    g = jax.grad(lambda p, x: jnp.sum(moe.moe_forward(p, x, router)[0] * c), (0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(masked_reference(p, x, router, keep) * c), (0, 1))(
        params, x
    )
    assert_tree_close(g, g_ref)


@pytest.mark.parametrize("normalize_top_k", [True, False])
def test_probs_policy_keeps_the_largest_gate_weights(normalize_top_k):
    # Megatron-LM's 'probs' policy: an expert keeps the choices with the largest gate weight
    # (after the softmax over the chosen K when it renormalises, else the full softmax).
    kw = dict(capacity_factor=0.5, normalize_top_k=normalize_top_k)
    router_pos = router_cfg(drop_policy="position", **kw)
    router_probs = router_cfg(drop_policy="probs", **kw)
    params, x = make_params(), make_x()
    _, aux, keep_pos = np_moe(params, x, router_pos)
    _, _, keep_probs = np_moe(params, x, router_probs)
    assert (keep_pos != keep_probs).any()  # the two policies differ on this input
    logits = np.asarray(x, np.float64).reshape(B * S, D) @ np.asarray(params["router"])
    experts = aux["routing"].reshape(B * S, K)
    chosen = np.take_along_axis(logits, experts, 1)
    full = np.exp(logits - logits.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    top = np.exp(chosen - chosen.max(1, keepdims=True))
    top /= top.sum(1, keepdims=True)
    weight = top if normalize_top_k else np.take_along_axis(full, experts, 1)
    kp = keep_probs.reshape(B * S, K)
    for ex in range(E):
        sel = experts == ex
        if kp[sel].any() and (~kp[sel]).any():
            assert weight[sel & kp].min() >= weight[sel & ~kp].max()
    # Our block keeps the same choices as the NumPy oracle.
    y, _ = jax.jit(functools.partial(moe.moe_forward, router=router_probs))(params, x)
    y_np, _, _ = np_moe(params, x, router_probs)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("policy", "groups"), [("position", "small"), ("probs", "small"), ("position", "large")]
)
def test_mesh_capacity_routes_per_shard_and_stats_are_global(policy, groups, devices, monkeypatch):
    if groups == "large":
        monkeypatch.setattr(moe, "_SLOT_MAX_CHOICES", 0)
    mesh = ParallelLayout(dp=2, ep=2, tp=2).make_mesh(devices)
    router = router_cfg(capacity_factor=0.75, drop_policy=policy)
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.random.default_rng(4).random((B, S)) > 0.25, jnp.int32)
    fwd = jax.jit(
        lambda p, x, r=None: moe.moe_forward(p, x, router, mesh=mesh, token_mask=mask, routing=r)
    )
    y, aux = fwd(params, x)
    y_np, aux_np, _ = np_moe(params, x, router, mask=mask, groups=4)
    assert aux_np["dropped_fraction"] > 0.05
    assert_aux_close(aux, aux_np)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    # Router replay through the mesh reproduces the outputs.
    y2, aux2 = fwd(params, x, aux["routing"])
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(aux2["routing"]), np.asarray(aux["routing"]))


def test_eval_capacity_factor_is_used_when_not_training():
    router = router_cfg(capacity_factor=0.25, eval_capacity_factor=E / K)
    params, x = make_params(), make_x()
    _, aux_train = moe.moe_forward(params, x, router, train=True)
    y_eval, aux_eval = moe.moe_forward(params, x, router, train=False)
    assert float(aux_train["dropped_fraction"]) > 0.3
    assert float(aux_eval["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(moe.moe_reference(params, x,
                               router)), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_eval_capacity_factor_sets_each_masked_groups_limit_when_not_training():
    """With padding, each routing group's capacity follows its own token count, from the eval
    factor when not training (sampling, evaluation), not the training one."""
    router = router_cfg(capacity_factor=0.5, eval_capacity_factor=1.0, drop_policy="position")
    params, x = make_params(), make_x()
    mask = np.ones((B, S), np.int32)
    mask[:, :3] = 0
    y, aux = moe.moe_forward(params, x, router, token_mask=jnp.asarray(mask), train=False)
    want, want_aux, _ = np_moe(params, x, router, mask=mask, train=False)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-4)
    assert float(aux["dropped_fraction"]) == pytest.approx(want_aux["dropped_fraction"])
    _, trained = moe.moe_forward(params, x, router, token_mask=jnp.asarray(mask), train=True)
    assert float(trained["dropped_fraction"]) > float(aux["dropped_fraction"])


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    policy=st.sampled_from(["position", "probs"]),
    pad_rate=st.sampled_from([0.0, 0.3]),
)
def test_drop_rule_property(seed, policy, pad_rate):
    router = router_cfg(capacity_factor=0.75, drop_policy=policy, min_capacity=2)
    params = make_params(seed % 3)
    x = make_x(seed)
    mask = jnp.asarray(np.random.default_rng(seed).random((B, S)) >= pad_rate, jnp.int32)
    y, aux = _jitted_forward(router)(params, x, mask)
    y_np, aux_np, _ = np_moe(params, x, router, mask=mask)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    assert_aux_close(aux, aux_np)


@functools.cache
def _jitted_forward(router):
    return jax.jit(lambda p, x, m: moe.moe_forward(p, x, router, token_mask=m))


# ----------------------------------------------------------------------------------------------
# Padding tokens


def test_padding_tokens_output_zero_take_no_capacity_and_are_not_counted():
    router = router_cfg(capacity_factor=0.5, drop_policy="position")
    params, x = make_params(), make_x()
    mask = np.ones((B, S), np.int32)
    mask[:, :3] = 0  # padding first: if it took capacity, later real tokens would lose it
    mask = jnp.asarray(mask)
    fwd = jax.jit(lambda p, x: moe.moe_forward(p, x, router, token_mask=mask))
    y, aux = fwd(params, x)
    y_np, aux_np, keep = np_moe(params, x, router, mask=mask)
    assert not keep[np.asarray(mask) == 0].any()
    assert np.all(np.asarray(y)[np.asarray(mask) == 0] == 0.0)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    assert_aux_close(aux, aux_np)
    # Whatever the padding tokens hold changes nothing.
    noise = 100.0 * jax.random.normal(jax.random.key(9), x.shape)
    y2, aux2 = fwd(params, jnp.where(mask[..., None] > 0, x, noise))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    for key in ("aux_loss", "z_loss", "dropped_fraction", "expert_load"):
        np.testing.assert_array_equal(np.asarray(aux2[key]), np.asarray(aux[key]))


@pytest.mark.parametrize("mesh_layout", [None, dict(ep=2, dp=4)])
def test_capacity_counts_the_real_tokens_not_the_padding(mesh_layout, devices):
    # The same real tokens with and without 3x as many padding positions in their groups:
    # the same capacity, drops and outputs (a padded RL batch gets the configured factor).
    router = router_cfg(capacity_factor=1.0)
    mesh = None if mesh_layout is None else ParallelLayout(**mesh_layout).make_mesh(devices)
    params, x = make_params(), make_x()
    padded = jnp.concatenate([x, jnp.zeros((B, 3 * S, D))], axis=1)
    mask = jnp.concatenate([jnp.ones((B, S), jnp.int32), jnp.zeros((B, 3 * S), jnp.int32)], 1)
    y, aux = jax.jit(lambda p, x: moe.moe_forward(p, x, router, mesh=mesh))(params, x)
    y_pad, aux_pad = jax.jit(
        lambda p, x: moe.moe_forward(p, x, router, mesh=mesh, token_mask=mask)
    )(params, padded)
    assert float(aux["dropped_fraction"]) > 0.05
    np.testing.assert_allclose(float(aux_pad["dropped_fraction"]), float(aux["dropped_fraction"]))
    np.testing.assert_allclose(np.asarray(y_pad)[:, :S], np.asarray(y), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(y_pad)[:, S:] == 0.0)


@pytest.mark.parametrize("impl", ["dense", "ragged"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_nan_in_padding_reaches_no_output_statistic_or_gradient(impl, capacity_factor):
    router = router_cfg(capacity_factor=capacity_factor)
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.arange(S)[None, :] < np.array([8, 5, 3, 8, 1, 6, 7, 2])[:, None])
    poisoned = jnp.where(mask[..., None], x, jnp.nan)

    def loss(p, x):
        y, aux = moe.moe_forward(p, x, router, token_mask=mask, impl=impl)
        return jnp.sum(jnp.where(mask[..., None], y, 0.0) ** 2) + aux["aux_loss"] + aux["z_loss"]

    fwd = jax.jit(lambda p, x: moe.moe_forward(p, x, router, token_mask=mask, impl=impl))
    (y, aux), (y2, aux2) = fwd(params, x), fwd(params, poisoned)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    assert np.all(np.asarray(y2)[~np.asarray(mask)] == 0.0)
    for key in ("aux_loss", "z_loss", "dropped_fraction", "expert_load"):
        np.testing.assert_array_equal(np.asarray(aux2[key]), np.asarray(aux[key]))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    (gp, gx), (gp2, gx2) = grads(params, x), grads(params, poisoned)
    np.testing.assert_allclose(np.asarray(gx2), np.asarray(gx), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(gp2), jax.tree.leaves(gp), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(gx2)[~np.asarray(mask)] == 0.0)


def test_padded_tokens_match_the_unpadded_batch_when_dropless():
    router = router_cfg()
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.arange(S)[None, :] < np.array([8, 5, 3, 8, 1, 6, 7, 2])[:, None])
    y, _ = moe.moe_forward(params, x, router, token_mask=mask)
    y_ref = moe.moe_reference(params, x, router, token_mask=mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Auxiliary statistics


def test_aux_statistics_match_numpy_and_balanced_value():
    router = router_cfg(capacity_factor=1.0)
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.random.default_rng(5).random((B, S)) > 0.3, jnp.int32)
    _, aux = moe.moe_forward(params, x, router, token_mask=mask)
    _, aux_np, _ = np_moe(params, x, router, mask=mask)
    assert_aux_close(aux, aux_np)
    assert aux["routing"].dtype == jnp.int32
    np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), 1.0, rtol=1e-6)
    # A zero router gives uniform probabilities: aux = E * sum_e f_e / E = K, z = log(E)^2.
    zero = dict(params, router=jnp.zeros_like(params["router"]))
    _, aux0 = moe.moe_forward(zero, x, router, token_mask=mask)
    np.testing.assert_allclose(float(aux0["aux_loss"]), K, rtol=1e-6)
    np.testing.assert_allclose(float(aux0["z_loss"]), np.log(E) ** 2, rtol=1e-6)


def test_all_padding_gives_zero_output_and_finite_stats():
    router = router_cfg(capacity_factor=1.0)
    y, aux = moe.moe_forward(make_params(), make_x(), router,
                             token_mask=jnp.zeros((B, S), jnp.int32))  # fmt: skip
    assert np.all(np.asarray(y) == 0.0)
    for key in ("aux_loss", "z_loss", "dropped_fraction"):
        assert float(aux[key]) == 0.0


# ----------------------------------------------------------------------------------------------
# Router replay


def test_routing_replay_reproduces_and_pins_the_choices():
    router = router_cfg(capacity_factor=1.0)
    params, x = make_params(), make_x()
    fwd = jax.jit(lambda p, x, r=None: moe.moe_forward(p, x, router, routing=r))
    y, aux = fwd(params, x)
    y_replay, aux_replay = fwd(params, x, aux["routing"])
    np.testing.assert_array_equal(np.asarray(y_replay), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(aux_replay["routing"]), np.asarray(aux["routing"]))
    # A changed router would choose differently; replay keeps the old choices and recomputes
    # the gate weights from the new logits at those experts.
    new = dict(params, router=params["router"] + make_params(5)["router"])
    _, aux_new = fwd(new, x)
    assert (np.asarray(aux_new["routing"]) != np.asarray(aux["routing"])).any()
    y_pinned, aux_pinned = fwd(new, x, aux["routing"])
    np.testing.assert_array_equal(np.asarray(aux_pinned["routing"]), np.asarray(aux["routing"]))
    y_np, _, _ = np_moe(new, x, router, routing=aux["routing"])
    np.testing.assert_allclose(np.asarray(y_pinned), y_np, rtol=1e-4, atol=1e-4)


def test_unset_routing_takes_the_routers_own_choice_eagerly_and_under_jit():
    router = router_cfg(capacity_factor=1.0)
    params, x = make_params(), make_x()
    y, aux = moe.moe_forward(params, x, router)
    unset = jnp.full((B, S, K), -1, jnp.int32)
    for fwd in (moe.moe_forward, jax.jit(moe.moe_forward, static_argnums=2)):
        y2, aux2 = fwd(params, x, router, routing=unset)  # not refused as a duplicate
        np.testing.assert_array_equal(np.asarray(aux2["routing"]), np.asarray(aux["routing"]))
        np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-5, atol=1e-6)
    # Some tokens unset, the rest pinned to other experts.
    pinned = unset.at[:4].set(jnp.asarray([3, 5], jnp.int32))
    _, aux3 = moe.moe_forward(params, x, router, routing=pinned)
    got = np.asarray(aux3["routing"])
    assert np.all(got[:4] == [3, 5])
    np.testing.assert_array_equal(got[4:], np.asarray(aux["routing"])[4:])


def test_a_duplicate_expert_is_found_wherever_it_sits_among_top_k():
    router = router_cfg(top_k=3)
    routing = (
        jnp.tile(jnp.asarray([1, 2, 3], jnp.int32), (B, S, 1))
        .at[1, 2]
        .set(jnp.asarray([4, 6, 4], jnp.int32))
    )  # not side by side
    with pytest.raises(ValueError, match=r"routing\[1, 2\] names an expert twice \(\[4, 6, 4\]\)"):
        moe.moe_forward(make_params(), make_x(), router, routing=routing)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
# Validation


def _bad_inputs():
    params, x, router = make_params(), make_x(), router_cfg()
    return [
        ({"router": "not a config"}, "router must be a MoERouterConfig"),
        ({"impl": "sparse"}, r"impl='sparse' is not one of \['dense', 'ragged'\]"),
        ({"params": {"router": params["router"]}}, "params must be a mapping with keys"),
        ({"router": router_cfg(num_experts=4)}, "has 8 experts but router.num_experts=4"),
        ({"params": dict(params, w_gate_up=params["w_gate_up"][:, :, :1])},
         r"w_gate_up'\] must be \[E, D, 2, F\]"),
        ({"params": dict(params, w_down=params["w_down"][:, :-1])},
         r"w_down'\] must be \[E, F, D\]"),
        ({"x": x[0]}, r"x must be \[B, S, D\] with D=16"),
        ({"x": x[..., :-1]}, r"x must be \[B, S, D\] with D=16"),
        ({"token_mask": jnp.ones((B,))}, r"token_mask must be \[B, S\] = \(8, 8\)"),
        ({"routing": jnp.zeros((B, S, 3), jnp.int32)}, r"routing must be an integer array"),
        ({"routing": jnp.zeros((B, S, K))}, r"routing must be an integer array"),
        # Out-of-range experts gave all-NaN (>= E) or zero (< 0) outputs.
        ({"routing": jnp.full((B, S, K), E, jnp.int32)},
         r"routing values must be in \[0, num_experts=8\) \(or -1 for all of a token's top_k"
         r": its own choice\), got 8"),
        ({"routing": jnp.full((B, S, K), -2, jnp.int32)},
         r"routing values must be in \[0, num_experts=8\) .*, got -2"),
        ({"routing": jnp.zeros((B, S, K), jnp.int32).at[..., 1].set(1).at[0, 0, 0].set(-1)},
         r"routing values must be in \[0, num_experts=8\) .*, got -1"),  # -1 for one of K
        # The same expert twice for a token overflowed the capacity sized for distinct ones.
        ({"routing": jnp.zeros((B, S, K), jnp.int32).at[..., 1].set(1).at[2, 5].set(3)},
         r"routing\[2, 5\] names an expert twice \(\[3, 3\]\); each token's top_k experts"),
        ({"x": x[:, :0]}, r"x must be \[B, S, D\] with B >= 1 and S >= 1, got \(8, 0, 16\)"),
        ({"x": x[:0]}, r"with B >= 1 and S >= 1, got \(0, 8, 16\)"),
        # Integer activations gave integer zeros.
        ({"x": x.astype(jnp.int32)}, r"x must be floating-point activations, got dtype int32"),
    ], params, x, router  # fmt: skip


def test_train_must_be_a_bool():
    with pytest.raises(TypeError, match=r"train must be a bool \(True or False\), got 'no'"):
        moe.moe_forward(make_params(), make_x(), router_cfg(), train="no")


_NUM_BAD_INPUTS = 18


@pytest.mark.parametrize("case", range(_NUM_BAD_INPUTS))
def test_validation_errors(case):
    cases, params, x, router = _bad_inputs()
    assert len(cases) == _NUM_BAD_INPUTS  # every case runs
    overrides, match = cases[case]
    kwargs = {"params": params, "x": x, "router": router} | overrides
    with pytest.raises(ValueError, match=match):
        moe.moe_forward(kwargs.pop("params"), kwargs.pop("x"), kwargs.pop("router"), **kwargs)


def test_mesh_rejects_experts_not_divisible_by_ep(devices):
    mesh = ParallelLayout(ep=8).make_mesh(devices)
    router = router_cfg(num_experts=4)
    with pytest.raises(ValueError, match="num_experts=4 is not divisible by the expert-parallel"):
        moe.moe_forward(make_params(num_experts=4), make_x(), router, mesh=mesh)


def test_mesh_pads_a_batch_the_data_axes_do_not_divide(devices):
    mesh = ParallelLayout(dp=2, ep=4).make_mesh(devices)
    router = router_cfg()
    params, x = make_params(), make_x(batch=3)
    y, aux = jax.jit(lambda p, x: moe.moe_forward(p, x, router, mesh=mesh))(params, x)
    assert y.shape == x.shape and aux["routing"].shape == (3, S, K)
    y_ref = moe.moe_reference(params, x, router)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    _, aux_np, _ = np_moe(params, x, router)
    assert_aux_close(aux, aux_np)


@pytest.mark.parametrize("factor", [None, 1.25])
def test_small_chunks_split_experts_and_slabs(factor, monkeypatch):
    # Chunks of 16 rows: each expert's rows (dropless, or capped at C = 20) run as full chunks
    # in a loop plus binary-digit remainders. (Capacity slabs, used with expert parallelism,
    # split into a full chunk and a remainder in the mesh tests.)
    monkeypatch.setattr(moe, "_CHUNK_ELEMENTS", 16 * F)
    monkeypatch.setattr(moe, "_MIN_CHUNK_ROWS", 1)
    router = router_cfg(capacity_factor=factor)
    params, x = make_params(), make_x()
    ours, ref = loss_fns(router)
    (_, (y, aux)), g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(params, x)
    y_np, aux_np, _ = np_moe(params, x, router)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-4, atol=1e-4)
    assert_aux_close(aux, aux_np)
    if factor is None:
        _, g_ref = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(params, x)
        assert_tree_close(g, g_ref)


def test_moe_forward_local_inside_a_user_shard_map(devices):
    mesh = ParallelLayout(dp=2, ep=2, tp=2).make_mesh(devices)
    router = router_cfg(capacity_factor=1.0)
    params, x = make_params(), make_x()
    specs = {"router": P(), "w_gate_up": P("ep", None, None, "tp"), "w_down": P("ep", "tp")}
    body = functools.partial(
        moe.moe_forward_local, router=router, data_axes=("dp", "ep"), expert_axes=("ep",),
        tensor_axes=("tp",),
    )  # fmt: skip
    local = jax.shard_map(
        lambda p, x: body(p, x),
        mesh=mesh,
        in_specs=(specs, P(("dp", "ep"))),
        out_specs=(P(("dp", "ep")), {k: P(("dp", "ep")) if k == "routing" else P()
                                     for k in moe.AUX_KEYS}),
    )  # fmt: skip
    y, aux = jax.jit(local)(params, x)
    y_mesh, aux_mesh = jax.jit(lambda p, x: moe.moe_forward(p, x, router, mesh=mesh))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_mesh), rtol=1e-6, atol=1e-6)
    assert_tree_close(aux, aux_mesh, rtol=1e-6)


def test_moe_forward_local_refuses_expert_axes_outside_the_data_axes():
    params, x = make_params(), make_x()
    with pytest.raises(ValueError, match=r"expert_axes \['ep'\] must also be in data_axes"):
        moe.moe_forward_local(params, x, router_cfg(), data_axes=("dp",), expert_axes=("ep",))


def test_ragged_impl_under_tensor_parallel_mesh(devices):
    mesh = ParallelLayout(dp=4, tp=2).make_mesh(devices)
    router = router_cfg()
    params, x = make_params(), make_x()
    ours, ref = loss_fns(router, mesh=mesh, impl="ragged")
    (_, (y, _)), g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(params, x)
    (_, y_ref), g_ref = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    assert_tree_close(g, g_ref)


def test_bfloat16_activations_and_params():
    router = router_cfg(capacity_factor=1.0)
    params, x = make_params(), make_x()
    p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    x16 = x.astype(jnp.bfloat16)
    fwd = jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(moe.moe_forward(p, x, router)[0].astype(jnp.float32)), (0, 1)
    ))  # fmt: skip
    _, (g, gx) = fwd(p16, x16)
    y16, _ = moe.moe_forward(p16, x16, router)
    assert y16.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16
    assert all(w.dtype == jnp.bfloat16 for w in g.values())
    y32, _ = moe.moe_forward(jax.tree.map(lambda w: w.astype(jnp.float32), p16),
                             x16.astype(jnp.float32), router)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.05,
                               atol=0.05 * float(jnp.abs(y32).max()))  # fmt: skip


def test_aux_sums_combine_split_batches_exactly():
    # Pipeline microbatches add the sums of their parts and divide once.
    router = router_cfg()
    params, x = make_params(), make_x()
    mask = jnp.asarray(np.random.default_rng(6).random((B, S)) > 0.3, jnp.int32)
    fwd = jax.jit(lambda p, x, m: moe.moe_forward(p, x, router, token_mask=m)[1])
    whole = fwd(params, x, mask)
    parts = [fwd(params, x[i : i + B // 2], mask[i : i + B // 2]) for i in (0, B // 2)]
    sums = jax.tree.map(lambda a, b: a + b, parts[0]["sums"], parts[1]["sums"])
    assert_tree_close(sums, whole["sums"], rtol=1e-6)
    np.testing.assert_allclose(float(sums["tokens"]), float(jnp.sum(mask)))
    n = float(sums["tokens"])
    aux_loss = E * float(jnp.sum(sums["counts"] / n * sums["probs"] / n))
    np.testing.assert_allclose(aux_loss, float(whole["aux_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(sums["z"]) / n, float(whole["z_loss"]), rtol=1e-5)


def test_a_rounded_up_chunk_overruns_into_the_next_expert_but_not_the_buffer():
    # Top-1 over 2 experts with 17 tokens each: blocks of 8 rows, each expert owns 3 blocks
    # (24 rows, 7 of them padding) of a 48-row buffer, and full chunks are 4 blocks. Expert 0
    # runs its 3 blocks as one chunk of 4, whose last 8 rows are expert 1's (they must add
    # nothing to expert 0's gradients); expert 1's chunk of 4 would pass the buffer's end, so
    # it runs as 2 + 1.
    router = MoERouterConfig(num_experts=2, top_k=1, capacity_factor=None)
    params = make_params(num_experts=2)
    direction = np.zeros((D, 2), np.float32)
    direction[0] = [1.0, -1.0]  # logits (x0, -x0): expert 0 exactly where x0 > 0
    params["router"] = jnp.asarray(direction)
    x = np.array(make_x(batch=1, seq=34))
    x[0, :, 0] = np.abs(x[0, :, 0]) + 0.5
    x[0, 1::2, 0] *= -1  # alternate experts along the sequence
    x = jnp.asarray(x)
    assert moe._block_size(34, 2) == 8
    assert moe._chunk_blocks(8, -(-34 // 8), F) == 4
    c = jax.random.normal(jax.random.key(7), x.shape)

    def ours(params, x):
        y, aux = moe.moe_forward(params, x, router)
        return jnp.sum(y * c), aux

    def ref(params, x):
        return jnp.sum(moe.moe_reference(params, x, router) * c)

    (_, aux), g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(params, x)
    _, g_ref = jax.value_and_grad(ref, argnums=(0, 1))(params, x)
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), [0.5, 0.5])
    assert_tree_close(g, g_ref)
