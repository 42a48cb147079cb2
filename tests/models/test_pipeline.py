"""Tests for novarl_jax.models.pipeline: schedules, layouts, extras, aux outputs, errors."""

import functools
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import pipeline
from novarl_jax.models.pipeline import (
    bubble_fraction,
    context_mesh,
    from_stages,
    num_ticks,
    pipeline_apply,
    schedule_table,
    to_stages,
)

L, D, B = 8, 8, 16  # layers, width, batch
E = 4  # experts of the toy MoE layer
RTOL, ATOL = 1e-5, 1e-6


# --------------------------------------------------------------------------------------------
# A stack of simple layers: h <- tanh(h @ W_l + b_l) * scale_l[b], with a masked aux sum.


@pytest.fixture(scope="module")
def data():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    w = jax.random.normal(keys[0], (L, D, D), jnp.float32) / np.sqrt(D)
    b = 0.1 * jax.random.normal(keys[1], (L, D), jnp.float32)
    x = jax.random.normal(keys[2], (B, D), jnp.float32)
    mask = (jnp.arange(B) % 3 != 0).astype(jnp.float32)  # 1 = a real example
    scale = 1.0 + 0.1 * jax.random.normal(keys[3], (L, B), jnp.float32)  # per layer, example
    cot = jax.random.normal(keys[4], (B, D), jnp.float32)  # fixed output cotangent
    return {"w": w, "b": b, "x": x, "mask": mask, "scale": scale, "cot": cot}


def _layers(params, h):
    def body(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b), None

    return jax.lax.scan(body, h, params)[0]


def _stage_fn(params, h):
    return _layers(params, h)


def _sequential(w, b, x):
    return _layers((w, b), x)


def _numpy_stack(w, b, x, scale=None):
    """Float64 loop over layers: the plain reference."""
    h = np.asarray(x, np.float64)
    for layer in range(w.shape[0]):
        h = np.tanh(h @ np.asarray(w[layer], np.float64) + np.asarray(b[layer], np.float64))
        if scale is not None:
            h = h * np.asarray(scale[layer], np.float64)[:, None]
    return h


@pytest.fixture(scope="module")
def sequential(data):
    def loss(w, b, x):
        y = _sequential(w, b, x)
        return jnp.sum(y * data["cot"]), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        data["w"], data["b"], data["x"]
    )
    return y, grads


def _pipelined_value_and_grad(mesh, num_microbatches, num_repeats=1, remat=False):
    def loss(stages, x, cot):
        y = pipeline_apply(_stage_fn, stages, x, mesh=mesh, num_microbatches=num_microbatches,
                           num_repeats=num_repeats, remat=remat)  # fmt: skip
        return jnp.sum(y * cot), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _shard_inputs(data, mesh, num_repeats=1):
    pp = dict(mesh.shape)["pp"]
    stages = to_stages((data["w"], data["b"]), pp, num_repeats=num_repeats)
    lead = ("pp",) + (None,) * (1 + (num_repeats > 1))
    # W's output features over 'tp' (a column-parallel layer), b likewise.
    shardings = (
        NamedSharding(mesh, P(*lead, None, "tp")),
        NamedSharding(mesh, P(*lead, "tp")),
    )
    stages = jax.device_put(stages, shardings)
    x = jax.device_put(data["x"], NamedSharding(mesh, P(("dp", "ep"))))
    return stages, x


def _assert_matches(got_y, got_grads, sequential, num_repeats=1):
    y_ref, (gw_ref, gb_ref, gx_ref) = sequential
    gw, gb = from_stages(got_grads[0], num_repeats=num_repeats)
    np.testing.assert_allclose(got_y, y_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gw, gw_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gb, gb_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_grads[1], gx_ref, rtol=RTOL, atol=ATOL)


LAYOUTS = {
    "pp2_dp4": dict(pp=2, dp=4),
    "pp4_ep2": dict(pp=4, ep=2),
    "pp2_tp2_ep2": dict(pp=2, tp=2, ep=2),
    "pp2_tp2_dp2": dict(pp=2, tp=2, dp=2),
}


def test_sequential_scan_matches_numpy_float64(data, sequential):
    np.testing.assert_allclose(
        sequential[0], _numpy_stack(data["w"], data["b"], data["x"]), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_sequential(name, data, sequential):
    mesh = ParallelLayout(**LAYOUTS[name]).make_mesh()
    stages, x = _shard_inputs(data, mesh)
    (_, y), grads = _pipelined_value_and_grad(mesh, num_microbatches=2)(stages, x, data["cot"])
    _assert_matches(y, grads, sequential)
    np.testing.assert_allclose(
        y, _numpy_stack(data["w"], data["b"], data["x"]), rtol=RTOL, atol=ATOL
    )
    # The batch stays sharded over the data axes (no gather onto every device).
    spec0 = y.sharding.spec[0] if len(y.sharding.spec) else None
    spec0 = () if spec0 is None else (spec0,) if isinstance(spec0, str) else tuple(spec0)
    sizes = dict(mesh.shape)
    assert set(spec0) == {a for a in ("dp", "ep") if sizes[a] > 1}, y.sharding


@pytest.mark.parametrize("num_repeats", [1, 2])
@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_microbatch_counts_and_circular_schedule_agree(
    num_microbatches, num_repeats, data, sequential
):
    mesh = ParallelLayout(pp=2, dp=4).make_mesh()
    stages, x = _shard_inputs(data, mesh, num_repeats)
    fn = _pipelined_value_and_grad(mesh, num_microbatches, num_repeats)
    (_, y), grads = fn(stages, x, data["cot"])
    _assert_matches(y, grads, sequential, num_repeats)


def test_four_stages_circular_with_more_microbatches_than_stages(data, sequential):
    # pp=4, V=2, M=8 > pp: microbatches wait at stage 0 between their repeats.
    mesh = ParallelLayout(pp=4, dp=2).make_mesh()
    stages, x = _shard_inputs(data, mesh, num_repeats=2)
    (_, y), grads = _pipelined_value_and_grad(mesh, 8, 2)(stages, x, data["cot"])
    _assert_matches(y, grads, sequential, num_repeats=2)


def test_one_stage_and_remat(data, sequential):
    mesh = ParallelLayout(dp=8).make_mesh()  # pp=1: a plain loop over microbatches
    stages, x = _shard_inputs(data, mesh)
    (_, y), grads = _pipelined_value_and_grad(mesh, 2, remat=True)(stages, x, data["cot"])
    _assert_matches(y, grads, sequential)


def test_without_jit(data, sequential):
    mesh = ParallelLayout(pp=2, dp=4).make_mesh()
    stages, x = _shard_inputs(data, mesh)
    y = pipeline_apply(_stage_fn, stages, x, mesh=mesh, num_microbatches=2)
    np.testing.assert_allclose(y, sequential[0], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Side inputs and auxiliary outputs


def test_extra_layer_extra_and_aux(data):
    """Mask (per example), per-layer per-example scales, and summed aux match a loop."""
    pp, num_repeats, m = 2, 2, 4
    mesh = ParallelLayout(pp=pp, ep=2, dp=2).make_mesh()

    def stage_fn(params, h, extra, layer_extra):
        def body(h, inputs):
            w, b, scale = inputs  # scale: [B/M] for this layer and microbatch
            h = jnp.tanh(h @ w + b) * scale[:, None]
            return h, jnp.sum(extra[:, None] * h**2)  # masked, per layer

        h, per_layer = jax.lax.scan(body, h, (*params, layer_extra))
        aux = {"sq": per_layer, "count": jnp.sum(extra)}
        return h, aux

    stages = to_stages((data["w"], data["b"]), pp, num_repeats=num_repeats)
    layer_extra = to_stages(data["scale"], pp, num_repeats=num_repeats)
    fn = jax.jit(
        lambda s, x, mask, le: pipeline_apply(
            stage_fn, s, x, mesh=mesh, num_microbatches=m, extra=mask, layer_extra=le,
            has_aux=True, num_repeats=num_repeats,
        )
    )  # fmt: skip
    y, aux = fn(stages, data["x"], data["mask"], layer_extra)

    ref = _numpy_stack(data["w"], data["b"], data["x"], data["scale"])
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    # Per-layer masked sums of squares, via a float64 loop.
    h = np.asarray(data["x"], np.float64)
    sq = []
    for layer in range(L):
        h = np.tanh(h @ np.asarray(data["w"][layer], np.float64) + np.asarray(data["b"][layer]))
        h = h * np.asarray(data["scale"][layer], np.float64)[:, None]
        sq.append(np.sum(np.asarray(data["mask"])[:, None] * h**2))
    assert aux["sq"].shape == (pp, num_repeats, L // (pp * num_repeats))
    np.testing.assert_allclose(from_stages(aux["sq"], num_repeats=num_repeats), sq, rtol=RTOL)
    # Every chunk saw every real example exactly once.
    np.testing.assert_allclose(aux["count"], np.full((pp, num_repeats), float(data["mask"].sum())))


def test_stage_with_nested_expert_shard_map(data):
    """A toy top-1 MoE whose dispatch is an all_to_all in a shard_map over 'ep', per layer."""
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    num_layers = 4
    w_router = jax.random.normal(keys[0], (num_layers, D, E), jnp.float32)
    w_expert = jax.random.normal(keys[1], (num_layers, E, D, D), jnp.float32) / np.sqrt(D)
    x, cot = data["x"], data["cot"]

    def experts_loop(h, wr, we):
        """Per-token reference: p_e * tanh(h @ W_e) for the argmax expert e."""
        logits = h @ wr
        e = jnp.argmax(logits, -1)
        p = jnp.take_along_axis(jax.nn.softmax(logits), e[:, None], -1)
        return jnp.tanh(jnp.einsum("nd,ndf->nf", h, we[e])) * p, jnp.bincount(e, length=E)

    def experts_sharded(mesh, h, wr, we):
        def local(h, wr, we):  # h [n, D] this shard's tokens; we [E/ep, D, D]
            logits = h @ wr
            e = jnp.argmax(logits, -1)
            p = jnp.take_along_axis(jax.nn.softmax(logits), e[:, None], -1)
            dispatch = jax.nn.one_hot(e, E, dtype=h.dtype)  # [n, E], dropless
            buf = jnp.einsum("ne,nd->end", dispatch, h)  # [E, n, D]
            buf = jax.lax.all_to_all(buf, "ep", 0, 1, tiled=True)  # [E/ep, ep*n, D]
            out = jnp.tanh(jnp.einsum("ecd,edf->ecf", buf, we))
            out = jax.lax.all_to_all(out, "ep", 1, 0, tiled=True)  # [E, n, D]
            load = jax.lax.psum(jnp.sum(dispatch, 0), "ep")
            return jnp.einsum("ne,end->nd", dispatch, out) * p, load

        return jax.shard_map(
            local,
            mesh=context_mesh(mesh),
            in_specs=(P("ep"), P(), P("ep")),
            out_specs=(P("ep"), P()),
            axis_names={"ep"},
        )(h, wr, we)

    def stack(moe, params, h):
        def body(h, w):
            out, load = moe(h, *w)
            return h + out, load

        return jax.lax.scan(body, h, params)

    def ref_loss(params, x):
        y, load = stack(experts_loop, params, x)
        return jnp.sum(y * cot), (y, load)

    (_, (y_ref, load_ref)), g_ref = jax.value_and_grad(ref_loss, (0, 1), has_aux=True)(
        (w_router, w_expert), x
    )

    for layout in (dict(pp=2, tp=2, ep=2), dict(pp=4, ep=2)):
        mesh = ParallelLayout(**layout).make_mesh()
        pp = layout["pp"]
        stages = jax.device_put(
            to_stages((w_router, w_expert), pp),
            (NamedSharding(mesh, P("pp")), NamedSharding(mesh, P("pp", None, "ep"))),
        )

        def loss(stages, x, mesh=mesh):
            y, load = pipeline_apply(
                lambda p, h: stack(functools.partial(experts_sharded, mesh), p, h),
                stages, x, mesh=mesh, num_microbatches=2, has_aux=True,
            )  # fmt: skip
            return jnp.sum(y * cot), (y, load)

        xs = jax.device_put(x, NamedSharding(mesh, P(("dp", "ep"))))
        (_, (y, load)), g = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(stages, xs)
        np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(from_stages(load), load_ref)
        got_w, want_w = jax.tree.leaves(from_stages(g[0])), jax.tree.leaves(g_ref[0])
        for got, want in zip(got_w, want_w, strict=True):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g[1], g_ref[1], rtol=RTOL, atol=ATOL)


def test_num_stages_reads_the_pp_axis(devices):
    assert pipeline.num_stages(None) == 1
    assert pipeline.num_stages(ParallelLayout(pp=4, dp=2).make_mesh()) == 4
    assert pipeline.num_stages(ParallelLayout(tp=8).make_mesh()) == 1
    assert pipeline.num_stages(jax.sharding.Mesh(np.array(devices), ("data",))) == 1


def test_context_mesh_outside_any_shard_map_is_the_given_mesh():
    mesh = ParallelLayout(pp=2, dp=4).make_mesh()
    assert context_mesh(mesh) is mesh


# --------------------------------------------------------------------------------------------
# Layouts and schedules (pure NumPy)


@pytest.mark.parametrize("num_repeats", [1, 2])
def test_to_stages_order_and_round_trip(num_repeats):
    layers = jnp.arange(8 * 3).reshape(8, 3)
    stages = to_stages({"a": layers}, 2, num_repeats=num_repeats)["a"]
    if num_repeats == 1:
        assert stages.shape == (2, 4, 3)
        np.testing.assert_array_equal(stages[1, 0], layers[4])  # consecutive layers
    else:
        assert stages.shape == (2, 2, 2, 3)
        # chunk c = r * pp + s of 2 layers: stage 1, repeat 1 holds chunk 3 = layers 6, 7.
        np.testing.assert_array_equal(stages[1, 1], layers[6:8])
        np.testing.assert_array_equal(stages[0, 1], layers[4:6])
    back = from_stages({"a": stages}, num_repeats=num_repeats)["a"]
    np.testing.assert_array_equal(back, layers)


def test_layer_axis_sharded_over_pp_becomes_stages_without_communication():
    # Stacked [L, ...] weights whose layer axis is split over 'pp' in contiguous blocks are
    # already laid out by stage: to_stages is a local reshape, so params (and checkpoints)
    # can stay [L, ...] whatever pp is.
    mesh = ParallelLayout(pp=4, dp=2).make_mesh()
    w = jax.device_put(jnp.ones((8, 4, 4)), NamedSharding(mesh, P("pp")))
    fn = jax.jit(lambda w: to_stages(w, 4))
    assert fn(w).sharding.spec == P("pp")
    hlo = fn.lower(w).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in hlo


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    pp=st.integers(1, 5), m=st.integers(1, 9), v=st.integers(1, 3)
)  # fmt: skip
def test_schedule_table_is_a_valid_pipeline(pp, m, v):
    table = schedule_table(pp, m, v)
    assert table.shape == (num_ticks(pp, m, v), pp, 2)
    done = {}
    for t in range(table.shape[0]):
        for s in range(pp):
            j, r = table[t, s]
            if j < 0:
                assert r < 0
                continue
            assert (j, r, s) not in done  # each chunk of each microbatch runs once
            done[(j, r, s)] = t
    assert len(done) == m * v * pp
    for (j, r, s), t in done.items():
        # Its input was produced on the previous stage (or round the ring) at an earlier tick.
        if s > 0:
            assert done[(j, r, s - 1)] < t
        elif r > 0:
            assert done[(j, r - 1, pp - 1)] < t
    idle = np.mean(table[..., 0] < 0)
    np.testing.assert_allclose(idle, bubble_fraction(pp, m, v))
    if v == 1:
        np.testing.assert_allclose(idle, (pp - 1) / (m + pp - 1))
    elif m >= pp:
        # Each tick does 1/V of a stage's work: the bubble is (pp-1) / (V*M + pp-1).
        np.testing.assert_allclose(idle, (pp - 1) / (v * m + pp - 1))


# --------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def pp2():
    return ParallelLayout(pp=2, dp=4).make_mesh()


def test_error_layers_not_divisible_by_stages():
    with pytest.raises(ValueError, match=r"num_layers L=6 is not divisible by .* = 4"):
        to_stages(jnp.zeros((6, 2)), 2, num_repeats=2)
    with pytest.raises(ValueError, match="different numbers of layers"):
        to_stages((jnp.zeros((4, 2)), jnp.zeros((2, 2))), 2)
    with pytest.raises(ValueError, match="is a scalar"):
        to_stages({"a": jnp.zeros(())}, 2)
    with pytest.raises(ValueError, match="num_stages must be an integer >= 1"):
        to_stages(jnp.zeros((4, 2)), 0)


def test_error_from_stages_shapes():
    with pytest.raises(ValueError, match=r"expected \[pp, Lc, \.\.\.\]"):
        from_stages(jnp.zeros((2,)))
    with pytest.raises(ValueError, match="axis 1 should be num_repeats=2"):
        from_stages(jnp.zeros((2, 3, 1)), num_repeats=2)


def test_error_batch_not_divisible(pp2):
    stages = to_stages(jnp.zeros((4, D, D)), 2)
    with pytest.raises(
        ValueError, match=r"B=6 is not divisible by num_microbatches=4.*\[1, 2, 3, 6\]"
    ):
        pipeline_apply(_layers_w, stages, jnp.zeros((6, D)), mesh=pp2, num_microbatches=4)
    with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1"):
        pipeline_apply(_layers_w, stages, jnp.zeros((6, D)), mesh=pp2, num_microbatches=0)
    with pytest.raises(ValueError, match="num_repeats must be an integer >= 1"):
        pipeline_apply(_layers_w, stages, jnp.zeros((6, D)), mesh=pp2, num_microbatches=1,
                       num_repeats=0)  # fmt: skip
    with pytest.raises(ValueError, match="leading batch axis"):
        pipeline_apply(_layers_w, stages, jnp.zeros(()), mesh=pp2, num_microbatches=1)


def _layers_w(w, h):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w)[0]


def test_error_stage_params_and_mesh(pp2):
    x = jnp.zeros((8, D))
    with pytest.raises(ValueError, match=r"stage_params leaf .* shape \(4, 8, 8\).*\[pp\]"):
        pipeline_apply(_layers_w, jnp.zeros((4, D, D)), x, mesh=pp2, num_microbatches=2)
    with pytest.raises(ValueError, match=r"\[pp, num_repeats\]"):
        pipeline_apply(_layers_w, jnp.zeros((2, 3, D, D)), x, mesh=pp2, num_microbatches=2,
                       num_repeats=2)  # fmt: skip
    flat = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    with pytest.raises(ValueError, match="no 'pp' axis"):
        pipeline_apply(_layers_w, to_stages(jnp.zeros((4, D, D)), 2), x, mesh=flat,
                       num_microbatches=2)  # fmt: skip
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        pipeline_apply(_layers_w, to_stages(jnp.zeros((4, D, D)), 2), x, mesh=None,
                       num_microbatches=2)  # fmt: skip


def test_error_side_inputs_and_stage_fn(pp2):
    stages = to_stages(jnp.zeros((4, D, D)), 2)
    x = jnp.zeros((8, D))
    with pytest.raises(ValueError, match=r"extra leaf \['mask'\] has shape \(4,\).*\(8,\)"):
        pipeline_apply(lambda w, h, extra: h, stages, x, mesh=pp2, num_microbatches=2,
                       extra={"mask": jnp.zeros(4)})  # fmt: skip
    with pytest.raises(ValueError, match=r"layer_extra leaf .* shape \(2, 2, 4\)"):
        pipeline_apply(lambda w, h, layer_extra: h, stages, x, mesh=pp2, num_microbatches=2,
                       layer_extra=jnp.zeros((2, 2, 4)))  # fmt: skip
    with pytest.raises(ValueError, match="must return a microbatch of the shape and dtype"):
        pipeline_apply(lambda w, h: h[:, :2], stages, x, mesh=pp2, num_microbatches=2)
    with pytest.raises(ValueError, match="must return a pair"):
        pipeline_apply(lambda w, h: h, stages, x, mesh=pp2, num_microbatches=2, has_aux=True)


def test_wrong_stage_axes_dtypes_and_bool_counts_are_refused(pp2):
    stages = to_stages(jnp.zeros((4, D, D)), 2)
    x = jnp.zeros((8, D))
    # The batch axis is right, the stage axis is not: each stage would read another's rows.
    with pytest.raises(ValueError, match=r"layer_extra leaf .* shape \(4, 2, 8\)"):
        pipeline_apply(lambda w, h, layer_extra: h, stages, x, mesh=pp2, num_microbatches=2,
                       layer_extra=jnp.zeros((4, 2, 8)))  # fmt: skip
    with pytest.raises(ValueError, match=r"shape and dtype it was given, \(4, 8\) float32, but "
                       r"returned \(4, 8\) bfloat16"):  # fmt: skip
        pipeline_apply(lambda w, h: h.astype(jnp.bfloat16), stages, x, mesh=pp2,
                       num_microbatches=2)  # fmt: skip
    with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1, got True"):
        pipeline_apply(_layers_w, stages, x, mesh=pp2, num_microbatches=True)
    with pytest.raises(ValueError, match="num_stages must be an integer >= 1, got True"):
        to_stages(jnp.zeros((4, 2)), True)


def test_bfloat16_activations_reach_the_stages_and_come_back_as_bfloat16(data, pp2):
    w = data["w"][:4].astype(jnp.bfloat16)
    x = data["x"].astype(jnp.bfloat16)
    seen = []

    def stage_fn(w, h):
        seen.append(h.dtype)
        return _layers_w(w, h)

    y = jax.jit(lambda s, x: pipeline_apply(stage_fn, s, x, mesh=pp2, num_microbatches=2))(
        to_stages(w, 2), x
    )
    assert y.dtype == jnp.bfloat16 and set(seen) == {jnp.dtype(jnp.bfloat16)}
    ref = np.asarray(_layers_w(w, x), np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=2e-2)


def test_remat_recomputes_the_stages_in_the_backward_pass(data, pp2):
    stages = to_stages(data["w"][:4], 2)

    def grad_program(remat):
        def loss(s, x):
            return jnp.sum(pipeline_apply(_layers_w, s, x, mesh=pp2, num_microbatches=2,
                                          remat=remat))  # fmt: skip

        return str(jax.make_jaxpr(jax.grad(loss))(stages, data["x"]))

    pattern = r"\b(remat2?|checkpoint)\["
    assert re.search(pattern, grad_program(True))
    assert not re.search(pattern, grad_program(False))
