"""The logical-axis rule table, checked against a golden file for a tiny model's shapes.

Regenerate the golden file after an intended rule change with
``NOVARL_UPDATE_GOLDEN=1 python -m pytest tests/core/test_sharding.py``.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from novarl_jax.core import sharding
from novarl_jax.core.distributed import ParallelLayout

GOLDEN = pathlib.Path(__file__).parent / "data" / "sharding_golden.json"

# A tiny Mixtral-shaped model: V=64, D=32, N=4 heads, 2 KV heads, Dh=8, E=4, F=64, L=2.
TINY_SHAPES = {
    "embed": ((64, 32), ("vocab", "embed")),
    "attn_q": ((2, 32, 4, 8), ("layers", "embed", "heads", "head_dim")),
    "attn_kv": ((2, 32, 2, 8), ("layers", "embed", "kv_heads", "head_dim")),
    "attn_o": ((2, 4, 8, 32), ("layers", "heads", "head_dim", "embed")),
    "router": ((2, 32, 4), ("layers", "embed", None)),
    "experts_gate_up": ((2, 4, 32, 128), ("layers", "expert", "embed", "mlp")),
    "experts_down": ((2, 4, 64, 32), ("layers", "expert", "mlp", "embed")),
    "stage_weights": ((2, 1, 32, 32), ("stage", "layers", "embed", None)),
    "lm_head": ((32, 64), ("embed", "vocab")),
    "activations": ((16, 8, 32), ("batch", "length", "embed")),
    "odd_batch": ((3, 8, 32), ("batch", "length", "embed")),
}
LAYOUTS = {
    "single": dict(),
    "dp8": dict(dp=8),
    "tp8": dict(tp=8),
    "ep8": dict(ep=8),
    "tp2_ep2_dp2": dict(tp=2, ep=2, dp=2),
    "tp2_pp2_ep2": dict(tp=2, pp=2, ep=2),
    "pp4_ep2": dict(pp=4, ep=2),
}


def _spec_to_json(spec: PartitionSpec):
    return [list(p) if isinstance(p, tuple) else p for p in spec]


def _current_table(devices):
    table = {}
    for layout_name, sizes in LAYOUTS.items():
        layout = ParallelLayout(**sizes)
        mesh = layout.make_mesh(devices[: layout.world_size])
        table[layout_name] = {
            name: _spec_to_json(sharding.logical_to_spec(names, mesh, shape=shape))
            for name, (shape, names) in TINY_SHAPES.items()
        }
    return table


def test_rule_table_matches_golden(devices):
    table = _current_table(devices)
    if os.environ.get("NOVARL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(GOLDEN.read_text())


def test_golden_spot_checks():
    golden = json.loads(GOLDEN.read_text())
    # Heads over tp; KV heads (2) cannot split over tp=8 and stay replicated.
    assert golden["tp8"]["attn_q"] == []  # 4 heads cannot split over tp 8
    assert golden["tp2_ep2_dp2"]["attn_q"] == [None, None, "tp"]
    assert golden["tp2_ep2_dp2"]["attn_kv"] == [None, None, "tp"]
    # Batch over (dp, ep); experts over ep; expert hidden over tp.
    assert golden["tp2_ep2_dp2"]["activations"] == [["dp", "ep"]]
    assert golden["tp2_ep2_dp2"]["experts_gate_up"] == [None, "ep", None, "tp"]
    assert golden["ep8"]["experts_gate_up"] == []  # 4 experts cannot split over ep 8
    assert golden["tp2_pp2_ep2"]["stage_weights"] == ["pp"]
    assert golden["dp8"]["odd_batch"] == []
    assert golden["single"]["activations"] == []


def test_unknown_logical_name_and_rank_mismatch():
    with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
        sharding.logical_to_spec(("embedding",))
    with pytest.raises(ValueError, match=r"do not match shape \(2, 3\)"):
        sharding.logical_to_spec(("batch",), shape=(2, 3))


def test_no_mesh_axis_used_twice():
    rules = dict(sharding.DEFAULT_RULES, embed=("tp",))
    spec = sharding.logical_to_spec(("embed", "mlp"), rules=rules)
    assert spec == PartitionSpec("tp")  # mlp would also map to tp: left replicated


def test_tree_shardings_place_arrays(devices):
    mesh = ParallelLayout(tp=2, ep=2, dp=2).make_mesh()
    params = {"w": jnp.ones((4, 32, 64)), "b": jnp.arange(64.0)}
    names = {"w": ("expert", "embed", "mlp"), "b": ("mlp",)}
    shardings = sharding.tree_shardings(names, mesh, params)
    placed = jax.device_put(params, shardings)
    assert placed["w"].sharding == NamedSharding(mesh, PartitionSpec("ep", None, "tp"))
    assert placed["w"].addressable_shards[0].data.shape == (2, 32, 32)
    np.testing.assert_array_equal(np.asarray(placed["b"]), np.arange(64.0))
    specs = sharding.tree_specs(names)
    assert specs["b"] == PartitionSpec("tp")


def test_batch_spec(devices):
    mesh = ParallelLayout(dp=4, ep=2).make_mesh()
    assert sharding.batch_spec(2, mesh, batch_size=16) == PartitionSpec(("dp", "ep"))
    assert sharding.batch_spec(2, mesh, batch_size=4) == PartitionSpec("dp")
