"""ParallelLayout, MoERouterConfig, MegatronAdapterConfig: semantics, emitters, validation."""

import math

import numpy as np
import pytest

from novarl_jax.core import distributed
from novarl_jax.core.distributed import (
    MESH_AXES,
    MegatronAdapterConfig,
    MoERouterConfig,
    ParallelLayout,
)


def test_quickstart_example_describe():
    layout = ParallelLayout.from_world_size(
        total_world_size=8, tensor_parallel_size=2, pipeline_parallel_size=2, expert_parallel_size=2
    )
    assert layout.describe() == {"dp": 1, "tp": 2, "pp": 2, "ep": 2, "world": 8}
    assert str(layout.describe()) == "{'dp': 1, 'tp': 2, 'pp': 2, 'ep': 2, 'world': 8}"


@pytest.mark.parametrize(
    "world,tp,pp,ep,dp",
    [(8, 1, 1, 1, 8), (8, 2, 1, 2, 2), (8, 1, 1, 8, 1), (16, 2, 2, 1, 4), (1, 1, 1, 1, 1)],
)
def test_from_world_size_derives_dp(world, tp, pp, ep, dp):
    layout = ParallelLayout.from_world_size(world, tp, pp, ep)
    assert (layout.dp, layout.tp, layout.pp, layout.ep) == (dp, tp, pp, ep)
    assert layout.world_size == world
    assert layout.dense_data_parallel_size == dp * ep


def test_layout_is_frozen():
    layout = ParallelLayout(dp=2)
    with pytest.raises(AttributeError):
        layout.dp = 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(total_world_size=0), "total_world_size must be an integer >= 1"),
        (dict(total_world_size=8, tensor_parallel_size=0), "tensor_parallel_size must be"),
        (dict(total_world_size=8, pipeline_parallel_size=-1), "pipeline_parallel_size must be"),
        (dict(total_world_size=8, expert_parallel_size=1.5), "expert_parallel_size must be"),
        (
            dict(total_world_size=6, tensor_parallel_size=2, expert_parallel_size=2),
            r"total_world_size=6 is not divisible by .* = 4; valid world sizes are multiples of 4",
        ),
    ],
)
def test_from_world_size_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout.from_world_size(**kwargs)


def test_layout_direct_validation():
    with pytest.raises(ValueError, match="dp must be an integer >= 1, got 0"):
        ParallelLayout(dp=0)
    with pytest.raises(ValueError, match="tp must be an integer >= 1, got True"):
        ParallelLayout(tp=True)


def test_layout_accepts_numpy_integers_as_ints():
    layout = ParallelLayout(dp=np.int64(2), ep=np.int32(2))
    assert layout == ParallelLayout(dp=2, ep=2) and type(layout.dp) is int
    derived = ParallelLayout.from_world_size(np.int64(8), np.int64(2))
    assert derived == ParallelLayout(dp=4, tp=2) and type(derived.dp) is int
    with pytest.raises(ValueError, match="dp must be an integer >= 1, got np.int64\\(0\\)"):
        ParallelLayout(dp=np.int64(0))


@pytest.mark.parametrize(
    "dp,pp,ep,tp",
    [(8, 1, 1, 1), (1, 1, 1, 8), (1, 1, 8, 1), (2, 1, 2, 2), (1, 2, 2, 2), (4, 2, 1, 1)],
)
def test_make_mesh_shape_and_axis_names(devices, dp, pp, ep, tp):
    mesh = ParallelLayout(dp=dp, pp=pp, ep=ep, tp=tp).make_mesh()
    assert mesh.axis_names == MESH_AXES == ("dp", "pp", "ep", "tp")
    assert dict(mesh.shape) == {"dp": dp, "pp": pp, "ep": ep, "tp": tp}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_make_mesh_tp_is_innermost(devices):
    mesh = ParallelLayout(dp=4, tp=2).make_mesh()
    # Neighbouring device ids share a tp group.
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids.shape == (4, 1, 1, 2)
    assert all(abs(int(a) - int(b)) == 1 for a, b in ids.reshape(4, 2))


def test_make_mesh_device_count_error(devices):
    with pytest.raises(ValueError, match=r"needs world_size=4 devices, but 8 devices were given "
                       r"\(jax.devices\(\) has 8\); choose sizes whose product is 8, or pass "
                       r"devices=jax.devices\(\)\[:4\]$"):  # fmt: skip
        ParallelLayout(dp=2, tp=2).make_mesh()
    # Too few given while enough exist: take them, not more fake devices.
    few = r"2 devices were given \(jax.devices\(\) has 8\); choose sizes whose product is 2, "
    with pytest.raises(ValueError, match=few + r"or pass devices=jax.devices\(\)\[:8\]$"):
        ParallelLayout(dp=8).make_mesh(devices[:2])


def test_make_mesh_device_count_hint_is_per_process(devices, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "devices", lambda: devices[:4])
    with pytest.raises(ValueError, match=r"device_count=4 in each of the 2 processes"):
        ParallelLayout(dp=8).make_mesh(devices[:4])


def test_make_mesh_subset_of_devices(devices):
    mesh = ParallelLayout(tp=2, ep=2).make_mesh(devices[:4])
    assert mesh.devices.size == 4


def test_make_mesh_rejects_repeated_and_non_devices(devices):
    with pytest.raises(ValueError, match="more than once; a mesh needs 4 distinct devices"):
        ParallelLayout(dp=4).make_mesh(devices[:2] * 2)
    with pytest.raises(TypeError, match=r"devices\[0\] must be a jax.Device .* got str 'cpu0'"):
        ParallelLayout().make_mesh(["cpu0"])
    with pytest.raises(TypeError, match=r"devices\[1\] must be a jax.Device .* got int 0"):
        ParallelLayout(dp=2).make_mesh([devices[0], 0])
    with pytest.raises(TypeError, match="devices must be a sequence of jax.Device objects"):
        ParallelLayout().make_mesh("cpu0")


# --- router -----------------------------------------------------------------------------


def _capacity_reference(tokens, k, cf, e, min_cap):
    if cf is None:
        return max(tokens, min_cap)
    from fractions import Fraction

    exact = Fraction(tokens * k) * Fraction(str(cf)) / e
    return max(math.ceil(exact), min_cap)


@pytest.mark.parametrize("tokens", [1, 7, 10, 64, 100, 4096])
@pytest.mark.parametrize(
    "k,cf,e,min_cap",
    [
        (2, 1.2, 4, 0),
        (1, 1.0, 8, 4),
        (2, 1.25, 8, 0),
        (2, None, 4, 0),
        (3, 0.5, 6, 2),
        (2, 2.0, 8, 0),
    ],
)
def test_capacity_formula(tokens, k, cf, e, min_cap):
    router = MoERouterConfig(num_experts=e, top_k=k, capacity_factor=cf, min_capacity=min_cap)
    assert router.capacity(tokens) == _capacity_reference(tokens, k, cf, e, min_cap)


def test_capacity_exact_decimal_products():
    # 8 tokens * 2 * 1.2 / 4 = 4.8 -> 5.
    assert MoERouterConfig(num_experts=4, capacity_factor=1.2).capacity(8) == 5
    # 10 * 2 * 1.1 / 2 = 11. (Products whose float value lands just above an integer, which
    # the rounding is for, are in test_capacity_rounds_away_float_error_above_an_integer.)
    assert MoERouterConfig(num_experts=2, capacity_factor=1.1).capacity(10) == 11


def test_capacity_validates_num_tokens():
    router = MoERouterConfig(num_experts=4)
    dropless = MoERouterConfig(num_experts=4, capacity_factor=None)
    for bad in (-5, 8.5, "8", None, True):
        for r in (router, dropless):
            with pytest.raises(ValueError, match="num_tokens must be an integer >= 0"):
                r.capacity(bad)
    assert router.capacity(np.int64(8)) == router.capacity(8) == 5
    # A NumPy integer no longer overflows in the product (it was silently 0).
    assert router.capacity(np.int64(2**62)) == 2**62 * 2 * 5 // 16


def test_eval_capacity_factor():
    router = MoERouterConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0)
    assert router.capacity(16) == 8
    assert router.capacity(16, train=False) == 16
    assert MoERouterConfig(num_experts=4, capacity_factor=1.0).capacity(16, train=False) == 8
    assert MoERouterConfig(num_experts=4, capacity_factor=None).dropless
    assert (router.factor(), router.factor(train=False)) == (1.0, 2.0)
    dropless = MoERouterConfig(num_experts=4, capacity_factor=None)
    assert dropless.factor(train=False) is None  # the eval factor defaults to the training one


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0), "num_experts must be an integer >= 1, got 0"),
        (dict(num_experts=4, top_k=0), r"top_k=0 must be in \[1, num_experts=4\]"),
        (dict(num_experts=4, top_k=5), r"top_k=5 must be in \[1, num_experts=4\]"),
        (dict(num_experts=4, top_k=1.0), "top_k must be an integer"),
        (dict(num_experts=4, capacity_factor=0.0), "capacity_factor must be > 0 or None"),
        (dict(num_experts=4, capacity_factor=-1), "capacity_factor must be > 0 or None"),
        (dict(num_experts=4, eval_capacity_factor=0), "eval_capacity_factor must be > 0 or None"),
        (dict(num_experts=4, min_capacity=-1), "min_capacity must be an integer >= 0"),
        (dict(num_experts=4, drop_policy="random"),
         r"drop_policy='random' is not one of \['position', 'probs'\]"),
        (dict(num_experts=4, aux_loss_coef=-0.1), "aux_loss_coef must be >= 0"),
        (dict(num_experts=4, z_loss_coef=float("nan")), "z_loss_coef must be >= 0"),
        (dict(num_experts=4, capacity_factor=float("inf")),
         "capacity_factor must be > 0 or None .* finite"),
        (dict(num_experts=4, eval_capacity_factor=float("inf")),
         "eval_capacity_factor must be > 0 or None .* finite"),
        (dict(num_experts=4, capacity_factor="1.0"),
         "capacity_factor must be > 0 or None .*got '1.0'"),
        (dict(num_experts=4, aux_loss_coef=None),
         "aux_loss_coef must be >= 0 and a finite number, got None"),
        (dict(num_experts=4, z_loss_coef="x"), "z_loss_coef must be >= 0 and a finite number"),
        (dict(num_experts=4, aux_loss_coef=float("inf")),
         "aux_loss_coef must be >= 0 and a finite number, got inf"),
        (dict(num_experts=4, normalize_top_k="no"), "normalize_top_k must be a bool, got 'no'"),
        (dict(num_experts=4, normalize_top_k=1), "normalize_top_k must be a bool, got 1"),
        (dict(num_experts=4, min_capacity=2.0), "min_capacity must be an integer >= 0"),
    ],
)  # fmt: skip
def test_router_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoERouterConfig(**kwargs)


def test_router_accepts_numpy_numbers():
    router = MoERouterConfig(
        num_experts=np.int64(8), top_k=np.int32(2), min_capacity=np.int64(1),
        capacity_factor=np.float32(1.5), aux_loss_coef=np.float64(0.1),
        normalize_top_k=np.bool_(True),
    )  # fmt: skip
    assert (type(router.num_experts), type(router.top_k), type(router.min_capacity)) == (
        int,
        int,
        int,
    )
    assert router.normalize_top_k is True and router.capacity(8) == 3


def test_layout_arguments_must_be_layouts():
    router = MoERouterConfig(num_experts=4)
    for call in (router.validate_layout, router.to_deepspeed, router.to_megatron):
        for bad in (None, {"ep": 2}):
            with pytest.raises(TypeError, match="layout must be a ParallelLayout, got"):
                call(bad)
    with pytest.raises(TypeError, match="router must be a MoERouterConfig or None, got dict"):
        MegatronAdapterConfig(parallel_layout=ParallelLayout(), router={"num_experts": 4})


def test_num_experts_not_divisible_by_ep():
    router = MoERouterConfig(num_experts=6)
    layout = ParallelLayout(ep=4)
    with pytest.raises(
        ValueError, match="num_experts=6 is not divisible by expert_parallel_size=4"
    ):
        router.to_deepspeed(layout)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        router.to_megatron(layout, num_moe_layers=1)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        MegatronAdapterConfig(parallel_layout=layout, router=router, num_moe_layers=1)


def _argv_to_dict(argv):
    out, i = {}, 0
    while i < len(argv):
        assert argv[i].startswith("--"), argv
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[argv[i]] = argv[i + 1]
            i += 2
        else:
            out[argv[i]] = True
            i += 1
    return out


def test_megatron_layout_args():
    layout = ParallelLayout.from_world_size(8, 2, 2, 1)
    assert _argv_to_dict(layout.to_megatron_args()) == {
        "--tensor-model-parallel-size": "2",
        "--pipeline-model-parallel-size": "2",
        "--expert-model-parallel-size": "1",
    }
    # Megatron refuses expert parallelism without --num-experts: the router's flags have it.
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 needs Megatron-LM's MoE "
                       r"flags .* MoERouterConfig.to_megatron"):  # fmt: skip
        ParallelLayout.from_world_size(8, 2, 2, 2).to_megatron_args()


def test_megatron_router_args():
    layout = ParallelLayout.from_world_size(8, 2, 2, 2)
    router = MoERouterConfig(num_experts=8, top_k=2, capacity_factor=1.2, drop_policy="probs")
    args = _argv_to_dict(router.to_megatron(layout, num_moe_layers=1))
    assert args == {
        "--tensor-model-parallel-size": "2",
        "--pipeline-model-parallel-size": "2",
        "--expert-model-parallel-size": "2",
        "--num-experts": "8",
        "--moe-router-topk": "2",
        "--moe-router-load-balancing-type": "aux_loss",
        "--moe-aux-loss-coeff": "0.02",  # 0.01 x top_k: Megatron's loss is ours / top_k
        "--moe-z-loss-coeff": "0.001",
        "--moe-token-dispatcher-type": "alltoall",
        "--moe-expert-capacity-factor": "1.2",
        "--moe-token-drop-policy": "probs",
        "--sequence-parallel": True,
    }


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_megatron_aux_loss_coeff_gives_our_weighted_loss(top_k):
    # Megatron-Core's switch load-balancing loss, written out in float64 from its definition:
    # coeff * E / (K * T^2) * sum_e (sum_t p_te) * (choices of e), on our block's own routing.
    import jax
    import numpy as np

    from novarl_jax.models.moe import init_moe_params, moe_forward

    e, t, d = 6, 40, 8
    router = MoERouterConfig(
        num_experts=e, top_k=top_k, capacity_factor=None, aux_loss_coef=0.03,
        normalize_top_k=top_k > 1,
    )  # fmt: skip
    params = init_moe_params(jax.random.key(0), d, 4, e)
    x = jax.random.normal(jax.random.key(1), (1, t, d))
    _, aux = moe_forward(params, x, router)
    logits = np.asarray(x[0], np.float64) @ np.asarray(params["router"], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    chosen = np.argsort(-probs, axis=1)[:, :top_k]
    tokens_per_expert = np.bincount(chosen.ravel(), minlength=e)
    coeff = float(
        _argv_to_dict(router.to_megatron(ParallelLayout(), num_moe_layers=1))[
            "--moe-aux-loss-coeff"
        ]
    )
    megatron = coeff * e / (top_k * t * t) * np.sum(probs.sum(0) * tokens_per_expert)
    np.testing.assert_allclose(megatron, router.aux_loss_coef * float(aux["aux_loss"]), rtol=1e-5)


def test_megatron_loss_coefficients_for_several_layers_give_our_model_loss():
    # Megatron adds each MoE layer's aux and z losses; our model averages them over layers.
    import jax.numpy as jnp

    from novarl_jax.models import ModelConfig
    from novarl_jax.models.transformer import _finish_stats

    layers, e, k = 3, 4, 2
    config = ModelConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=e,
        num_experts_per_tok=k, capacity_factor=None, router_aux_loss_coef=0.03,
        router_z_loss_coef=0.002,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tokens = np.array([10.0, 12.0, 9.0])
    counts = np.stack([rng.multinomial(int(n) * k, np.ones(e) / e) for n in tokens]).astype(float)
    probs = rng.dirichlet(np.ones(e), size=layers) * tokens[:, None]
    z = rng.uniform(1.0, 3.0, layers) * tokens
    stats = {"tokens": tokens, "counts": counts, "kept": tokens * k, "probs": probs, "z": z}
    aux = _finish_stats({key: jnp.asarray(v, jnp.float32) for key, v in stats.items()}, config)
    ours = 0.03 * float(aux["moe_aux_loss"]) + 0.002 * float(aux["moe_z_loss"])
    # Per layer, Megatron's load-balancing loss is ours / top_k (see the test above).
    aux_per_layer = e * np.sum(counts / tokens[:, None] * probs / tokens[:, None], axis=1)
    z_per_layer = z / tokens
    args = _argv_to_dict(config.router.to_megatron(ParallelLayout(), num_moe_layers=layers))
    megatron = float(args["--moe-aux-loss-coeff"]) * np.sum(aux_per_layer / k) + float(
        args["--moe-z-loss-coeff"]
    ) * np.sum(z_per_layer)
    np.testing.assert_allclose(megatron, ours, rtol=1e-6)
    with pytest.raises(ValueError, match="num_moe_layers must be an integer >= 1"):
        config.router.to_megatron(ParallelLayout(), num_moe_layers=0)


def test_megatron_refuses_what_it_cannot_express():
    layout = ParallelLayout()
    with pytest.raises(ValueError, match="min_capacity=2 has no Megatron-LM equivalent"):
        MoERouterConfig(num_experts=4, min_capacity=2).to_megatron(layout, num_moe_layers=1)
    # Dropless: a minimum capacity changes nothing.
    MoERouterConfig(num_experts=4, min_capacity=2, capacity_factor=None).to_megatron(
        layout, num_moe_layers=1
    )
    with pytest.raises(ValueError, match="eval_capacity_factor=2.0 has no Megatron-LM"):
        MoERouterConfig(num_experts=4, eval_capacity_factor=2.0).to_megatron(
            layout, num_moe_layers=1
        )
    MoERouterConfig(num_experts=4, eval_capacity_factor=1.25).to_megatron(layout, num_moe_layers=1)


def test_megatron_dropless_and_pre_softmax():
    router = MoERouterConfig(num_experts=4, capacity_factor=None, normalize_top_k=False)
    args = _argv_to_dict(router.to_megatron(ParallelLayout(ep=2), num_moe_layers=1))
    assert "--moe-expert-capacity-factor" not in args
    assert "--moe-token-drop-policy" not in args
    assert args["--moe-router-pre-softmax"] is True
    assert "--sequence-parallel" not in args  # tp = 1


def test_megatron_top1_needs_the_pre_softmax_weights():
    # Megatron refuses top-1 routing without --moe-router-pre-softmax.
    with pytest.raises(ValueError, match="normalize_top_k=True with top_k=1"):
        MoERouterConfig(num_experts=4, top_k=1).to_megatron(ParallelLayout(), num_moe_layers=1)
    args = MoERouterConfig(num_experts=4, top_k=1, normalize_top_k=False).to_megatron(
        ParallelLayout(), num_moe_layers=1
    )
    assert "--moe-router-pre-softmax" in args


def test_megatron_adapter_config():
    layout = ParallelLayout(tp=2, pp=2, ep=2)
    router = MoERouterConfig(num_experts=4)
    dense = ParallelLayout(tp=2, pp=2)
    assert MegatronAdapterConfig(parallel_layout=dense).to_args() == dense.to_megatron_args()
    # Megatron-LM's loss weights depend on the number of MoE layers: no silent default.
    for call in (
        lambda: router.to_megatron(layout),
        lambda: MegatronAdapterConfig(parallel_layout=layout, router=router),
    ):
        with pytest.raises(ValueError, match="num_moe_layers is required with a router"):
            call()
    assert MegatronAdapterConfig(parallel_layout=layout, router=router, num_moe_layers=4).to_args(
    ) == router.to_megatron(layout, num_moe_layers=4)  # fmt: skip
    with pytest.raises(TypeError, match="layout must be a ParallelLayout"):
        MegatronAdapterConfig(parallel_layout={"tp": 2})
    # Megatron-LM asserts "num_experts must be non None to use expert model parallelism".
    with pytest.raises(ValueError, match="expert_parallel_size=2 needs a router"):
        MegatronAdapterConfig(parallel_layout=layout)
    with pytest.raises(ValueError, match="num_moe_layers must be an integer >= 1, got 0"):
        MegatronAdapterConfig(parallel_layout=layout, router=router, num_moe_layers=0)


def test_deepspeed_kwargs():
    layout = ParallelLayout.from_world_size(8, 2, 2, 2)
    router = MoERouterConfig(num_experts=8, top_k=2, capacity_factor=1.2)
    assert router.to_deepspeed(layout) == {
        "num_experts": 8,
        "ep_size": 2,
        "k": 2,
        "capacity_factor": 1.2,
        "eval_capacity_factor": 1.2,
        "min_capacity": 0,
        "drop_tokens": True,
        "use_rts": False,
        "noisy_gate_policy": None,
        "use_residual": False,
        "enable_expert_tensor_parallelism": True,
        "top2_2nd_expert_sampling": False,
    }


def test_deepspeed_dropless_eval_and_probs_policy():
    layout = ParallelLayout(ep=2)
    ds = MoERouterConfig(num_experts=4, capacity_factor=None).to_deepspeed(layout)
    assert ds["drop_tokens"] is False and ds["enable_expert_tensor_parallelism"] is False
    ds = MoERouterConfig(num_experts=4, eval_capacity_factor=2.0).to_deepspeed(layout)
    assert (ds["capacity_factor"], ds["eval_capacity_factor"]) == (1.25, 2.0)
    # DeepSpeed's drop_tokens=False would make evaluation dropless too.
    with pytest.raises(ValueError, match="capacity_factor=None with eval_capacity_factor=2.0"):
        MoERouterConfig(num_experts=4, capacity_factor=None, eval_capacity_factor=2.0).to_deepspeed(
            layout
        )
    with pytest.raises(ValueError, match="drop_policy='probs' has no DeepSpeed-MoE equivalent"):
        MoERouterConfig(num_experts=4, drop_policy="probs").to_deepspeed(layout)


def test_deepspeed_gate_normalisation_must_match():
    # DeepSpeed's top-2 / top-k gates renormalise over the chosen experts; its top-1 gate keeps
    # the full-softmax probability. Other combinations would change the router silently.
    layout = ParallelLayout()
    assert MoERouterConfig(num_experts=4, top_k=2).to_deepspeed(layout)["k"] == 2
    assert MoERouterConfig(num_experts=4, top_k=3).to_deepspeed(layout)["k"] == 3
    top1 = MoERouterConfig(num_experts=4, top_k=1, normalize_top_k=False)
    assert top1.to_deepspeed(layout)["k"] == 1
    with pytest.raises(
        ValueError,
        match="normalize_top_k=False with top_k=2 has no DeepSpeed-MoE equivalent: DeepSpeed's "
        "gate always renormalises .* use normalize_top_k=True",
    ):
        MoERouterConfig(num_experts=4, top_k=2, normalize_top_k=False).to_deepspeed(layout)
    with pytest.raises(
        ValueError,
        match="normalize_top_k=True with top_k=1 has no DeepSpeed-MoE equivalent: .* full-softmax "
        "probability .* use normalize_top_k=False",
    ):
        MoERouterConfig(num_experts=4, top_k=1).to_deepspeed(layout)


def test_cpu_xla_flags():
    from novarl_jax.core.distributed import cpu_xla_flags

    flags = cpu_xla_flags(8).split()
    assert "--xla_force_host_platform_device_count=8" in flags
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags
    # A larger existing count is kept, a smaller one replaced; other flags survive once.
    kept = cpu_xla_flags(4, "--xla_force_host_platform_device_count=16 --foo=1").split()
    assert kept.count("--xla_force_host_platform_device_count=16") == 1 and "--foo=1" in kept
    raised = cpu_xla_flags(8, "--xla_force_host_platform_device_count=2").split()
    assert "--xla_force_host_platform_device_count=2" not in raised
    assert "--xla_force_host_platform_device_count=8" in raised
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert cpu_xla_flags(1, mine).split() == [mine]  # an explicit choice is respected


def test_set_cpu_devices_gives_xla_threads_for_every_device():
    import os
    import subprocess
    import sys

    from novarl_jax.core.distributed import set_cpu_devices

    env = {"XLA_FLAGS": "--foo=1"}
    set_cpu_devices(4, env)
    assert env["NPROC"] == str(max(16, os.cpu_count()))
    assert env["XLA_FLAGS"].split()[0] == "--foo=1"
    assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"].split()
    env = {"NPROC": "999"}
    set_cpu_devices(4, env)
    assert env["NPROC"] == "999"  # a larger pool is kept
    env = {}
    set_cpu_devices(1, env)
    assert "NPROC" not in env and "device_count" not in env["XLA_FLAGS"]
    with pytest.raises(ValueError, match="device_count must be an integer >= 1, got 0"):
        set_cpu_devices(0, {})
    # XLA:CPU reads NPROC: its pools grow (a collective over 4 fake devices, OS threads after).
    script = (
        "import os, jax, jax.numpy as jnp;"
        "f = jax.pmap(lambda a: jax.lax.psum(a, 'i'), axis_name='i');"
        "f(jnp.ones((4, 1))).block_until_ready();"
        "print(len(os.listdir('/proc/self/task')))"
    )
    counts = []
    for nproc in ("", "64"):
        child = {k: v for k, v in os.environ.items() if k not in ("NPROC", "XLA_FLAGS")}
        child.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
        if nproc:
            child["NPROC"] = nproc
        out = subprocess.run([sys.executable, "-c", script], env=child, capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        counts.append(int(out.stdout.split()[-1]))
    assert counts[1] >= counts[0] + 32, counts


class FakeLibc:
    """Records mallopt calls; ``accept`` is what mallopt returns (glibc: 1 = accepted)."""

    def __init__(self, accept=1):
        self.calls = []

        def mallopt(option, value):  # a function, so that ctypes' argtypes can be set on it
            self.calls.append((option, value))
            return accept

        self.mallopt = mallopt


@pytest.mark.parametrize("accept", [1, 0])
def test_reuse_host_memory_sets_glibc_mallopt(accept, monkeypatch):
    libc = FakeLibc(accept)
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: libc)
    assert distributed.reuse_host_memory() is bool(accept)
    # M_MMAP_MAX = 0 (no mmap), M_TRIM_THRESHOLD = 2 GiB - 1 (no trimming), M_ARENA_MAX = 1.
    expected = [(-4, 0), (-1, 2**31 - 1), (-8, 1)]
    assert libc.calls == (expected if accept else expected[:1])


def test_reuse_host_memory_is_a_no_op_without_glibc(monkeypatch):
    def no_libc(name):
        raise OSError("no C library here")

    monkeypatch.setattr(distributed.ctypes, "CDLL", no_libc)
    assert distributed.reuse_host_memory() is False
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: object())  # no mallopt symbol
    assert distributed.reuse_host_memory() is False


def test_make_mesh_keeps_the_given_device_order(devices):
    mesh = ParallelLayout(dp=4, tp=2).make_mesh(devices[::-1])
    assert [d.id for d in mesh.devices.flat] == [7, 6, 5, 4, 3, 2, 1, 0]
    mesh = ParallelLayout(dp=2, tp=2).make_mesh(devices[::-1][2:6])
    assert [d.id for d in mesh.devices.flat] == [5, 4, 3, 2]


def test_capacity_rounds_away_float_error_above_an_integer():
    # 25 * 2 * 2.2 / 2 is 55.00000000000001 in floats: the capacity is 55, not 56.
    assert MoERouterConfig(num_experts=2, top_k=2, capacity_factor=2.2).capacity(25) == 55
    # 25 * 1 * 2.2 / 1 is 55.00000000000001 as well.
    assert MoERouterConfig(num_experts=1, top_k=1, capacity_factor=2.2).capacity(25) == 55


def test_capacity_of_a_tiny_positive_product_is_one_and_factors_are_python_floats():
    router = MoERouterConfig(num_experts=2, top_k=1, capacity_factor=1e-12)
    assert router.capacity(5) == 1 and router.capacity(0) == 0
    # A float32 factor is kept as a Python float, so the capacity is not rounded in float32
    # (16777217 * 1.0 in float32 is 16777216: a token would be dropped at factor 1).
    router = MoERouterConfig(num_experts=1, top_k=1, capacity_factor=np.float32(1.0),
                             eval_capacity_factor=np.float32(2.0))  # fmt: skip
    assert type(router.capacity_factor) is float and type(router.eval_capacity_factor) is float
    assert router.capacity(16777217) == 16777217
    assert (
        type(MoERouterConfig(num_experts=2, aux_loss_coef=np.float32(0.5)).aux_loss_coef) is float
    )


def test_make_mesh_splits_physical_axes_when_the_topology_needs_it(devices, monkeypatch):
    from jax.experimental import mesh_utils

    calls = []
    real = mesh_utils.create_device_mesh

    def tpu_like(shape, devices=None, **kw):
        calls.append(kw.get("allow_split_physical_axes", False))
        if not kw.get("allow_split_physical_axes"):
            raise NotImplementedError("Failed to find assignment for logical_axis_index 1")
        return real(shape, devices=devices, **kw)

    monkeypatch.setattr(mesh_utils, "create_device_mesh", tpu_like)
    mesh = ParallelLayout(dp=2, pp=2, ep=2).make_mesh(devices)
    assert calls == [False, True] and mesh.devices.shape == (2, 2, 2, 1)


def test_megatron_expert_parallel_size_is_ep_not_dp_times_ep():
    router = MoERouterConfig(num_experts=4, top_k=2)
    args = router.to_megatron(ParallelLayout(dp=2, tp=1, pp=1, ep=2), num_moe_layers=1)
    assert args[:6] == [
        "--tensor-model-parallel-size", "1",
        "--pipeline-model-parallel-size", "1",
        "--expert-model-parallel-size", "2",
    ]  # fmt: skip
    args = ParallelLayout(dp=4, tp=2, pp=1, ep=1).to_megatron_args()
    assert args[args.index("--expert-model-parallel-size") + 1] == "1"


def test_deepspeed_min_capacity_is_passed_through():
    kwargs = MoERouterConfig(num_experts=4, top_k=2, min_capacity=3).to_deepspeed(
        ParallelLayout(ep=2)
    )
    assert kwargs["min_capacity"] == 3


def test_dropless_capacity_is_raised_to_min_capacity():
    router = MoERouterConfig(num_experts=4, capacity_factor=None, min_capacity=16)
    assert router.capacity(8) == router.capacity(8, train=False) == 16
    assert router.capacity(32) == 32


@pytest.mark.parametrize(
    "layout",
    [ParallelLayout(dp=3, ep=2), ParallelLayout(tp=4, pp=3, ep=2), ParallelLayout(dp=3, ep=4)],
)
def test_deepspeed_ep_size_is_the_expert_axis_alone(layout):
    # Every axis has its own size, so ep_size cannot come from dp * ep, tp or pp by chance.
    kwargs = MoERouterConfig(num_experts=8).to_deepspeed(layout)
    assert kwargs["ep_size"] == layout.ep
    assert kwargs["enable_expert_tensor_parallelism"] is (layout.tp > 1)
