"""Hugging Face interop: logits parity with transformers' fixtures, save/load round trips, errors.

The fixtures under tests/data/hf/ were written by tests/data/make_hf_fixture.py with torch and
transformers; these tests only read them (no torch here).
"""

import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import DENSE, MOE

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import ModelConfig, RopeScaling, forward, init_params
from novarl_jax.models import hf as hf_module
from novarl_jax.models.hf import (
    checkpoint_files,
    load_hf_model,
    params_from_hf_tensors,
    params_to_hf_tensors,
    save_hf_model,
)

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "hf"
jit_forward = jax.jit(forward, static_argnames=("config", "mesh"))


def _equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "name", ["mixtral", "mixtral_fused", "llama", "llama3_rope", "qwen2", "qwen3"]
)
def test_logits_match_transformers(name):
    config, params = load_hf_model(DATA / name)
    ref = np.load(DATA / name / "reference.npz")
    logits, _, aux = jit_forward(
        params, ref["input_ids"], config=config, positions=ref["position_ids"],
        attention_mask=ref["attention_mask"],
    )  # fmt: skip
    real = ref["attention_mask"].astype(bool)  # row 1 is left-padded
    np.testing.assert_allclose(np.asarray(logits)[real], ref["logits"][real], atol=1e-4, rtol=1e-4)
    assert np.abs(ref["logits"]).max() > 0.5  # the fixture's logits are far from uniform
    if name.startswith("mixtral"):
        assert config.num_local_experts == 4 and config.num_experts_per_tok == 2
        assert not config.tie_word_embeddings and config.rope_theta == 10000.0
        assert aux["expert_load"].shape == (2, 4)
    elif name == "qwen2":
        assert config.qkv_bias and config.tie_word_embeddings and config.rope_theta == 1000.0
        assert params["layers"]["attn"]["q_bias"].shape == (2, 4, 8)
        assert params["layers"]["attn"]["k_bias"].shape == (2, 2, 8)
        zeros = {
            k: jnp.zeros_like(params["layers"]["attn"][k]) for k in ("q_bias", "k_bias", "v_bias")
        }
        assert _moved_logits(ref, config, _with_attn(params, zeros), real) > 1e-2  # they matter
    elif name == "qwen3":
        assert config.qk_norm and not config.qkv_bias and not config.tie_word_embeddings
        assert config.head_dim == 16 and params["layers"]["attn"]["q_norm"].shape == (2, 16)
        ones = {k: jnp.ones_like(params["layers"]["attn"][k]) for k in ("q_norm", "k_norm")}
        assert _moved_logits(ref, config, _with_attn(params, ones), real) > 1e-2  # the gains too
    else:
        assert config.tie_word_embeddings and config.rope_theta == 500.0
        assert config.rms_norm_eps == 1e-6 and "lm_head" not in params
    if name == "llama3_rope":  # its positions lie 37 apart: the scaled frequencies matter
        assert config.rope_scaling == RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )  # fmt: skip
        assert _moved_logits(ref, config.replace(rope_scaling=None), params, real) > 1e-2


def _moved_logits(ref, config, params, real):
    """How far the logits of ``params`` under ``config`` lie from the fixture's reference."""
    logits, _, _ = jit_forward(
        params, ref["input_ids"], config=config, positions=ref["position_ids"],
        attention_mask=ref["attention_mask"],
    )  # fmt: skip
    return np.abs(np.asarray(logits)[real] - ref["logits"][real]).max()


def _with_attn(params, leaves):
    """``params`` with some attention leaves replaced."""
    layers = {**params["layers"], "attn": {**params["layers"]["attn"], **leaves}}
    return {**params, "layers": layers}


def test_llama3_rotary_scaling_matches_a_numpy_reference():
    """Each frequency band of the rule, in float64 against float32, under jit."""
    from novarl_jax.models.layers import rotary_cos_sin

    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)  # fmt: skip
    head_dim, theta = 16, 500.0
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelength = 2 * np.pi / inv
    want = []
    for f, w in zip(inv, wavelength, strict=True):
        if w < 64 / 4:
            want.append(f)
        elif w > 64 / 1:
            want.append(f / 8)
        else:
            s = (64 / w - 1) / (4 - 1)
            want.append((1 - s) * f / 8 + s * f)
    bands = (wavelength < 16).sum(), ((wavelength >= 16) & (wavelength <= 64)).sum()
    assert min(bands) >= 1 and (wavelength > 64).sum() >= 1  # every case is exercised
    positions = np.array([[0, 1, 37, 500]])
    angles = positions[..., None] * np.asarray(want)
    cos, sin = jax.jit(rotary_cos_sin, static_argnums=(1, 2, 3))(
        positions, head_dim, theta, scaling
    )
    np.testing.assert_allclose(cos, np.cos(np.concatenate([angles, angles], -1)), atol=2e-5)
    np.testing.assert_allclose(sin, np.sin(np.concatenate([angles, angles], -1)), atol=2e-5)


def test_rope_scaling_round_trips_through_config_json_and_bad_values_are_named(tmp_path):
    config, params = load_hf_model(DATA / "llama3_rope")
    hf = config.to_hf_config()
    want = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    assert hf["rope_scaling"] == want and hf["rope_parameters"] == {"rope_theta": 500.0, **want}
    assert ModelConfig.from_hf_config(hf) == config
    # A transformers 4 config.json: the block in rope_scaling, rope_theta at the top level.
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert ModelConfig.from_hf_config(legacy) == config
    save_hf_model(tmp_path / "out", config, params)
    again, _ = load_hf_model(tmp_path / "out")
    assert again == config
    # A mapping is taken as the scaling's fields; the config stays hashable (a jit argument).
    assert ModelConfig(**{**_fields(config), "rope_scaling": want}) == config
    hash(config)
    for block, match in (
        ({**want, "factor": 0.5}, r"rope_scaling factor must be >= 1, got 0.5"),
        ({**want, "low_freq_factor": 4.0}, r"needs 0 < low_freq_factor < high_freq_factor"),
        ({**want, "original_max_position_embeddings": "64"}, r"must be a finite number"),
    ):
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_hf_config({**legacy, "rope_scaling": block})
    block = {k: v for k, v in want.items() if k != "high_freq_factor"}
    with pytest.raises(ValueError, match=r"rope_scaling of rope_type 'llama3' lacks "
                       r"\['high_freq_factor'\]"):  # fmt: skip
        ModelConfig.from_hf_config({**legacy, "rope_scaling": block})
    with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported for model_type="):
        ModelConfig.from_hf_config({**legacy, "rope_scaling": {**want, "rope_type": "yarn"}})
    mistral = {**legacy, "model_type": "mistral", "sliding_window": None}
    with pytest.raises(ValueError, match=r"rope_type='llama3' is not supported for model_type="
                       r"'mistral'"):  # fmt: skip
        ModelConfig.from_hf_config(mistral)
    with pytest.raises(ValueError, match=r"model_type='mistral' has no 'llama3' rotary scaling"):
        config.to_hf_config("mistral")


def _fields(config):
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def test_both_mixtral_layouts_give_identical_params():
    _, per_expert = load_hf_model(DATA / "mixtral")
    _, fused = load_hf_model(DATA / "mixtral_fused")
    _equal_trees(per_expert, fused)
    # Re-keying the per-expert file into the fused layout by hand gives the same params too
    # (gate_up_proj [E, 2F, D] = w1 rows then w3 rows; down_proj [E, D, F] = w2).
    src = load_file(DATA / "mixtral" / "model.safetensors")
    rekeyed = {k: v for k, v in src.items() if ".block_sparse_moe." not in k}
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe."
        w = {n: np.stack([src[f"{p}experts.{e}.w{n}.weight"] for e in range(4)]) for n in "123"}
        q = f"model.layers.{i}.mlp."
        rekeyed[q + "gate.weight"] = src[p + "gate.weight"]
        rekeyed[q + "experts.gate_up_proj"] = np.concatenate([w["1"], w["3"]], axis=1)
        rekeyed[q + "experts.down_proj"] = w["2"]
    config, _ = load_hf_model(DATA / "mixtral")
    _equal_trees(params_from_hf_tensors(config, rekeyed), per_expert)


@pytest.mark.parametrize("name", ["mixtral", "llama", "llama3_rope", "qwen2", "qwen3"])
def test_save_writes_the_transformers_layout_bit_exactly(name, tmp_path):
    config, params = load_hf_model(DATA / name)
    save_hf_model(tmp_path, config, params)
    original = load_file(DATA / name / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)  # the keys save_pretrained writes
    for key, value in original.items():
        assert saved[key].dtype == value.dtype, key
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    hf = json.loads((tmp_path / "config.json").read_text())
    want = json.loads((DATA / name / "config.json").read_text())
    assert hf["architectures"] == want["architectures"]
    assert hf["model_type"] == want["model_type"]
    assert hf["rope_parameters"] == want["rope_parameters"]
    for key in ("hidden_size", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps"):
        assert hf[key] == want[key], key
    again_config, again = load_hf_model(tmp_path)
    assert again_config == config
    _equal_trees(again, params)


def test_round_trip_random_params_sharded_files_and_value_head(tmp_path):
    config = ModelConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_local_experts=2, num_experts_per_tok=1,
        value_head=True, dtype="bfloat16",
    )  # fmt: skip
    # Random values on the tree of init_params (tracing only: no compile needed).
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    save_hf_model(tmp_path, config, params, max_shard_bytes=600)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    assert "value_head.weight" in index["weight_map"]
    for file in files:
        assert (tmp_path / file).stat().st_size < 600 + 1024  # one tensor over at most
    loaded_config, loaded = load_hf_model(tmp_path, dtype="bfloat16")
    assert loaded_config == config  # the value head is detected from the tensors
    _equal_trees(loaded, params)
    assert loaded["value_head"]["kernel"].dtype == jnp.bfloat16
    # Default dtype float32: the bf16 file is upcast exactly.
    cfg32, p32 = load_hf_model(tmp_path)
    assert cfg32.dtype == "float32"
    np.testing.assert_array_equal(
        np.asarray(p32["layers"]["moe"]["w_down"]),
        np.asarray(params["layers"]["moe"]["w_down"]).astype(np.float32),
    )
    # A value head absent from the file starts at zero when requested.
    _, with_head = load_hf_model(DATA / "llama", value_head=True)
    np.testing.assert_array_equal(with_head["value_head"]["kernel"], 0.0)


def test_load_onto_a_mesh(devices):
    mesh = ParallelLayout(dp=2, tp=2, ep=2).make_mesh(devices)
    config, params = load_hf_model(DATA / "mixtral")
    _, sharded = load_hf_model(DATA / "mixtral", mesh=mesh)
    _equal_trees(jax.device_get(sharded), jax.device_get(params))
    spec = tuple(sharded["layers"]["moe"]["w_gate_up"].sharding.spec)
    assert spec[1] == "ep" and spec[4] == "tp"  # [L, E, D, 2, F]
    assert tuple(sharded["layers"]["attn"]["q_proj"].sharding.spec)[2] == "tp"


def test_save_refuses_to_overwrite(tmp_path):
    config, params = load_hf_model(DATA / "llama")
    save_hf_model(tmp_path, config, params, max_shard_bytes=10_000)
    with pytest.raises(ValueError, match="already holds a checkpoint .* overwrite=True"):
        save_hf_model(tmp_path, config, params)
    save_hf_model(tmp_path, config, params, overwrite=True)  # single file now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="model_type='mixtral' does not match"):
        save_hf_model(tmp_path / "x", config, params, model_type="mixtral")


def test_shards_without_an_index_are_a_checkpoint_an_overwrite_replaces(tmp_path):
    # An index lost or never copied: the model-*-of-* files are still a checkpoint's.
    config, params = load_hf_model(DATA / "llama")
    save_hf_model(tmp_path / "s", config, params, max_shard_bytes=10_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    out = tmp_path / "out"
    out.mkdir()
    for name in shards:
        shutil.copy(tmp_path / "s" / name, out / name)
    assert [p.name for p in checkpoint_files(out)] == shards
    with pytest.raises(ValueError, match="already holds a checkpoint .* overwrite=True"):
        save_hf_model(out, config, params)
    save_hf_model(out, config, params, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_bfloat16_finiteness_from_the_exponent_bits_is_numpys_for_every_value():
    every = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(hf_module._finite(every), np.isfinite(every.astype(np.float32)))


def test_params_to_hf_tensors_orientation():
    config, params = load_hf_model(DATA / "mixtral")
    tensors = params_to_hf_tensors(config, params)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]  # [N * Dh, D]
    np.testing.assert_array_equal(q[8:16].T, params["layers"]["attn"]["q_proj"][1][:, 1, :])
    w2 = tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]  # [D, F]
    np.testing.assert_array_equal(w2.T, params["layers"]["moe"]["w_down"][0, 3])


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst)
    return dst


def test_load_errors(tmp_path):
    missing = r"nope: does not exist; load_hf_model reads a local checkpoint directory \(conf"
    with pytest.raises(ValueError, match=missing):
        load_hf_model(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file: is a file, not a local checkpoint directory"):
        load_hf_model(tmp_path / "file")
    with pytest.raises(ValueError, match=r"pass mesh= \(place the weights on it\) or host=True"):
        load_hf_model(DATA / "llama", mesh=object(), host=True)
    d = _copy("llama", tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: not found"):
        load_hf_model(d)

    d = _copy("mixtral", tmp_path)
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ValueError, match=r"no \*\.safetensors files \(pickled .bin"):
        load_hf_model(d)

    d = _copy("llama", tmp_path / "gpt")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"llama/config\.json: config model_type='gpt2' is not"):
        load_hf_model(d)


def test_missing_or_misshapen_tensor_names_file_and_key(tmp_path):
    d = _copy("mixtral", tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"mixtral: tensor 'model\.layers\.1\.block_sparse_moe"
                       r"\.experts\.2\.w3\.weight' is missing"):  # fmt: skip
        load_hf_model(d)

    d = _copy("llama", tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(3, np.float32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\), expected"):
        load_hf_model(d)

    # An index naming a key its file lacks: the message names the file and the key.
    d = _copy("llama", tmp_path / "indexed")
    shard = "model-00001-of-00001.safetensors"
    (d / "model.safetensors").rename(d / shard)
    index = {"weight_map": {k: shard for k in load_file(d / shard)}}
    index["weight_map"]["lm_head.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"00001\.safetensors: tensor 'lm_head\.weight' could"):
        load_hf_model(d, tie_word_embeddings=False)
    index["weight_map"]["extra"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names model-00002-of-00002.safetensors, which does"):
        load_hf_model(d)


def test_ambiguous_duplicates_bad_indexes_and_integer_weights_are_refused(tmp_path):
    # A stray second file holding the same key, and no index: which copy is meant is unknown.
    d = _copy("llama", tmp_path / "dup")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").rename(d / "weights.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    save_file({key: np.zeros_like(tensors[key])}, d / "z_finetuned.safetensors")
    match = (
        rf"tensor '{key}' is in both weights\.safetensors and z_finetuned\.safetensors, and "
        r"there is no model\.safetensors\.index"
    )
    with pytest.raises(ValueError, match=match):
        load_hf_model(d)
    d = _copy("llama", tmp_path / "index")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=r"index/llama/model\.safetensors\.index\.json: not valid "
                       r"JSON"):  # fmt: skip
        load_hf_model(d)
    (d / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"index\.json: no 'weight_map' object"):
        load_hf_model(d)
    d = _copy("llama", tmp_path / "int8")
    tensors[key] = tensors[key].astype(np.int8)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{key}' has dtype int8; only float weights"):
        load_hf_model(d)
    # Non-finite weights (bfloat16 too): named at load, not found as skipped updates.
    for dtype in (np.float32, ml_dtypes.bfloat16):
        d = _copy("llama", tmp_path / f"nan_{np.dtype(dtype).name}")
        tensors = {k: v.astype(dtype) for k, v in load_file(d / "model.safetensors").items()}
        tensors[key][2, 1] = np.nan
        tensors[key][3, 0] = np.inf
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"tensor '{key}' has 2 non-finite value\(s\) \(NaN "
                           r"or inf\), the first at index \(2, 1\)"):  # fmt: skip
            load_hf_model(d)


def test_bfloat16_checkpoint_reads_without_torch(tmp_path):
    d = _copy("llama", tmp_path)
    tensors = load_file(d / "model.safetensors")
    save_file(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
        d / "model.safetensors",
        metadata={"format": "pt"},
    )
    config, params = load_hf_model(d, dtype="bfloat16")
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    # Every weight, not only the experts', comes in the dtype asked for (float32 by default).
    assert {leaf.dtype for leaf in jax.tree.leaves(load_hf_model(d)[1])} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(
        np.asarray(params["final_norm"]["scale"]),
        tensors["model.norm.weight"].astype(ml_dtypes.bfloat16),
    )


def test_load_names_corrupt_files_and_non_object_configs(tmp_path):
    d = _copy("llama", tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(
        ValueError,
        match=r"garbage/llama/model\.safetensors: not a readable safetensors file \(.*too small",
    ):
        load_hf_model(d)
    d = _copy("llama", tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated/llama/model\.safetensors: not a readable"):
        load_hf_model(d)
    d = _copy("llama", tmp_path / "listed")
    (d / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"config\.json: must hold a JSON object, got a list"):
        load_hf_model(d)
    cfg = json.loads((DATA / "llama" / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "false"}))
    with pytest.raises(ValueError, match=r"config\.json: tie_word_embeddings must be a bool"):
        load_hf_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": None, "rope_theta": None}))
    with pytest.raises(ValueError, match=r"config\.json: config rope_theta must be a number"):
        load_hf_model(d)


def test_load_refuses_tensors_the_config_does_not_use(tmp_path):
    original = load_file(DATA / "llama" / "model.safetensors")
    extras = {
        "model.layers.5.mlp.up_proj.weight": np.zeros((48, 32), np.float32),  # layer 5 of 2
        "model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32),
    }
    for key, value in extras.items():
        d = _copy("llama", tmp_path / key)
        save_file({**original, key: value}, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(
            ValueError,
            match=rf"llama: unexpected tensor '{key}' in model\.safetensors: not a weight of this "
            r"config \(num_hidden_layers=2, .*1 unexpected tensor\(s\) in all",
        ):
            load_hf_model(d)
    # Kept accepting: rotary inv_freq buffers (older transformers), lm_head.weight of a tied
    # model, and a value head when the config asks for none.
    d = _copy("llama", tmp_path / "ignored")
    ignored = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
        "lm_head.weight": original["model.embed_tokens.weight"],
        "value_head.weight": np.ones((1, 32), np.float32),
        "value_head.bias": np.ones(1, np.float32),
    }
    save_file({**original, **ignored}, d / "model.safetensors", metadata={"format": "pt"})
    config, params = load_hf_model(d, value_head=False)
    _equal_trees(params, load_hf_model(DATA / "llama")[1])
    # A tied config whose file holds another head: transformers would use that head untied,
    # so tying it here would give other logits.
    ignored["lm_head.weight"] = original["model.embed_tokens.weight"] + 1.0
    save_file({**original, **ignored}, d / "model.safetensors", metadata={"format": "pt"})
    match = "tie_word_embeddings=true but lm_head.weight differs from the embeddings; set"
    with pytest.raises(ValueError, match=match):
        load_hf_model(d, value_head=False)


def test_one_model_safetensors_wins_over_a_stale_index_like_transformers(tmp_path):
    """Re-saving a sharded model as one file leaves the old index behind; transformers then
    reads model.safetensors, and so must we. Beside a complete sharded set, a single file is
    one of two models and which is stale cannot be told: refused (transformers would read
    the single file, the old model after shards were copied over it)."""
    d = _copy("llama", tmp_path)
    stale = {k: np.zeros_like(v) for k, v in load_file(d / "model.safetensors").items()}
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in stale}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _equal_trees(load_hf_model(d)[1], load_hf_model(DATA / "llama")[1])
    save_file(stale, d / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    both = r"holds both model\.safetensors and a complete sharded checkpoint \(model\.safet"
    with pytest.raises(ValueError, match=both):
        load_hf_model(d)
    # An incomplete sharded set (a shard missing) beside it is no second model: the single
    # file is read, as transformers reads it.
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {**index["weight_map"], "lm_head.weight": "model-2.safetensors"}})
    )
    _equal_trees(load_hf_model(d)[1], load_hf_model(DATA / "llama")[1])
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    # An index that names model.safetensors itself (some Hub repositories ship one), or a
    # broken leftover index beside it: the single file is read, as transformers reads it.
    (d / "model-00001-of-00001.safetensors").rename(d / "shard.bak")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model.safetensors" for k in stale}})
    )
    _equal_trees(load_hf_model(d)[1], load_hf_model(DATA / "llama")[1])
    (d / "model.safetensors.index.json").write_text("{not json")
    _equal_trees(load_hf_model(d)[1], load_hf_model(DATA / "llama")[1])
    (d / "shard.bak").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model.safetensors").unlink()  # without it, the index is read
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(load_hf_model(d)[1]))
    # An index's shard names are file names beside it, nothing else.
    for name in (None, 3, "", "../model.safetensors"):
        index["weight_map"]["model.norm.weight"] = name
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"index\.json: weight_map\['model\.norm\.weight'\] "
                           r"must be the name of a file beside it, got "):  # fmt: skip
            load_hf_model(d)


def test_an_overwrite_keeps_safetensors_files_that_are_not_the_models(tmp_path):
    params = init_params(DENSE, jax.random.key(0))
    save_hf_model(tmp_path, DENSE, params)
    adapter = {"lora_A": np.ones((2, 2), np.float32)}
    save_file(adapter, tmp_path / "adapter_model.safetensors")
    save_hf_model(tmp_path, DENSE, params, overwrite=True, max_shard_bytes=2**10)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert not (tmp_path / "model.safetensors").exists()  # the old single file went
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1


def test_save_refuses_params_that_do_not_match_the_config(tmp_path):
    params = init_params(DENSE, jax.random.key(0))
    out = tmp_path / "out"
    cases = [
        (DENSE.replace(dtype="bfloat16"), params,
         r"params\['embed_tokens'\]\['embedding'\] has dtype float32, but config.dtype='bfloat16'"),
        (DENSE, jax.tree.map(lambda x: x.astype(jnp.int32), params),
         r"has dtype int32, but config.dtype='float32'"),
        (MOE, params, r"params\['layers'\]\['moe'\]\['router'\] is missing: config "),
        (DENSE.replace(hidden_size=64, head_dim=None), params,
         r"params\['embed_tokens'\]\['embedding'\] has shape \(64, 32\), but config .* needs "
         r"\(64, 64\)"),
        (DENSE, {**params, "lm_head": {"kernel": jnp.zeros((32, 64))}},
         r"params\['lm_head'\]\['kernel'\] is not a parameter of config .*tie_word_embeddings"),
    ]  # fmt: skip
    for config, bad, match in cases:
        with pytest.raises(ValueError, match=match):
            save_hf_model(out, config, bad)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging directory left


def test_save_checks_token_ids_and_writes_them_as_json_ints(tmp_path):
    params = init_params(DENSE, jax.random.key(0))
    out = tmp_path / "out"
    for token_ids, match in [
        ({"model_type": "mixtral"}, r"token_ids key 'model_type' is not one of \['bos_token_id'"),
        ({"vocab_size": 7}, "token_ids key 'vocab_size' is not one of"),
        ({"eos_token_id": 64}, r"token_ids\['eos_token_id'\]=64 is not an id of the model: it "
                               r"must be in \[0, vocab_size=64\)"),
        ({"pad_token_id": -1}, r"token_ids\['pad_token_id'\]=-1 is not an id"),
        ({"eos_token_id": "2"}, r"token_ids\['eos_token_id'\] must be an integer id or a list "
                                r"of them, got '2'"),
        ({"bos_token_id": True}, r"token_ids\['bos_token_id'\] must be an id, got True"),
        ({"eos_token_id": [3, 64]}, r"token_ids\['eos_token_id'\] holds 64, which is not an id"),
        ({"eos_token_id": []}, r"must be an id or a non-empty list of ids"),
        ({"pad_token_id": [1]}, r"token_ids\['pad_token_id'\] must be an id, got \[1\]"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf_model(out, DENSE, params, token_ids=token_ids)
    with pytest.raises(TypeError, match=r"token_ids must be a mapping like"):
        save_hf_model(out, DENSE, params, token_ids=[("eos_token_id", 1)])
    assert list(tmp_path.iterdir()) == []
    # NumPy ints used to fail in json.dumps after model.safetensors was written.
    save_hf_model(out, DENSE, params, token_ids={"eos_token_id": np.int64(3), "pad_token_id": 0})
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"eos_token_id": 3, "pad_token_id": 0}
    hf = json.loads((out / "config.json").read_text())
    assert (hf["eos_token_id"], hf["model_type"], hf["vocab_size"]) == (3, "llama", 64)
    # Several end ids (a run's stop tokens) go into both files as a list.
    save_hf_model(out, DENSE, params, overwrite=True, token_ids={"eos_token_id": (3, np.int32(5))})
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [3, 5]}
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [3, 5]
    # Overwriting without token ids leaves no stale generation_config.json; other files stay.
    (out / "tokenizer.json").write_text("{}")
    save_hf_model(out, DENSE, params, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    params = init_params(DENSE, jax.random.key(0))
    out = tmp_path / "out"
    written = []

    def failing_save_file(tensors, filename, metadata=None):
        written.append(filename)
        if len(written) == 2:
            raise OSError("No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_hf_model(out, DENSE, params, max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []  # a retry is not refused
    monkeypatch.undo()
    save_hf_model(out, DENSE, params)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(hf_module, "save_file", failing_save_file)
    written.clear()
    other = init_params(DENSE, jax.random.key(1))
    with pytest.raises(OSError, match="No space left"):
        save_hf_model(out, DENSE, other, overwrite=True, max_shard_bytes=10_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_stages_on_the_target_file_system(tmp_path, monkeypatch):
    """An existing target may be a mount point or a link to another disk: a rename from a
    staging directory beside it would cross devices, fail, and lose the old checkpoint."""
    import errno

    params = init_params(DENSE, jax.random.key(0))
    out = tmp_path / "out"
    save_hf_model(out, DENSE, params)
    real_replace, real_rename = os.replace, os.rename

    def same_device_only(real):
        def move(src, dst):
            # Stands in for a mount point at `out`: only renames within it succeed.
            if pathlib.Path(dst).parent == out and pathlib.Path(src).parent.parent != out:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, dst)

        return move

    monkeypatch.setattr(hf_module.os, "replace", same_device_only(real_replace))
    monkeypatch.setattr(hf_module.os, "rename", same_device_only(real_rename))
    other = init_params(DENSE, jax.random.key(1))
    save_hf_model(out, DENSE, other, overwrite=True, max_shard_bytes=10_000)
    monkeypatch.undo()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    _, loaded = load_hf_model(out)
    _equal_trees(loaded, other)


def _random_dense(seed=0):
    """A small dense model with random float32 weights (traced, not compiled)."""
    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=2)  # fmt: skip
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return config, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def test_sharded_save_keeps_each_multi_tensor_shard_within_the_limit(tmp_path):
    config, params = _random_dense()
    save_hf_model(tmp_path, config, params, max_shard_bytes=600)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values())):
        shard = load_file(tmp_path / name)
        total = sum(a.nbytes for a in shard.values())
        assert len(shard) == 1 or total <= 600, (name, total, len(shard))


def test_a_float32_file_loads_as_bfloat16_when_asked():
    _, params = load_hf_model(DATA / "mixtral", dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_a_bare_model_checkpoint_without_the_model_prefix_loads(tmp_path):
    d = _copy("llama", tmp_path)
    tensors = load_file(d / "model.safetensors")
    bare = {k.removeprefix("model."): v for k, v in tensors.items()}
    assert "embed_tokens.weight" in bare and "model.embed_tokens.weight" not in bare
    save_file(bare, d / "model.safetensors", metadata={"format": "pt"})
    _equal_trees(load_hf_model(d)[1], load_hf_model(DATA / "llama")[1])


def test_a_value_head_absent_from_the_file_starts_at_zero(tmp_path):
    _, params = load_hf_model(DATA / "llama", value_head=True)
    np.testing.assert_array_equal(params["value_head"]["bias"], 0.0)
    np.testing.assert_array_equal(params["value_head"]["kernel"], 0.0)
    # Half a value head in the file is not taken for none.
    d = _copy("llama", tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["value_head.bias"] = np.ones((1,), np.float32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor.*'value_head.bias'"):
        load_hf_model(d, value_head=True)


def test_a_per_expert_checkpoint_without_its_router_names_the_router(tmp_path):
    d = _copy("mixtral", tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.gate.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"tensor 'model\.layers\.0\.block_sparse_moe\.gate\.weight' is missing"
    ):
        load_hf_model(d)


def _greedy_shards(sizes, limit):
    """Shard sizes of sorted tensors packed in order, a new shard when the next would not fit."""
    shards = [[]]
    for n in sizes:
        if shards[-1] and sum(shards[-1]) + n > limit:
            shards.append([])
        shards[-1].append(n)
    return shards


@pytest.mark.parametrize("limit", [1, 600, "total"])
def test_shards_are_packed_greedily_and_indexed(tmp_path, limit):
    config, params = _random_dense()
    tensors = params_to_hf_tensors(config, params)
    total = sum(t.nbytes for t in tensors.values())
    limit = total if limit == "total" else limit
    save_hf_model(tmp_path, config, params, max_shard_bytes=limit)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    want = _greedy_shards([tensors[k].nbytes for k in sorted(tensors)], limit)
    if len(want) == 1:  # everything fits: one file, no index
        assert files == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
        return
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert sorted(set(index["weight_map"].values())) == files  # no file left out of the map
    sizes = [sum(a.nbytes for a in load_file(tmp_path / name).values()) for name in files]
    assert sizes == [sum(s) for s in want]


def test_save_checks_its_arguments_before_writing(tmp_path):
    config, params = _random_dense()
    with pytest.raises(TypeError, match="config must be a ModelConfig, got dict"):
        save_hf_model(tmp_path / "a", {}, params)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_shard_bytes must be >= 1, got {bad}"):
            save_hf_model(tmp_path / "a", config, params, max_shard_bytes=bad)
    for bad in (True, 1.5):
        with pytest.raises(ValueError, match="max_shard_bytes must be an integer >= 1"):
            save_hf_model(tmp_path / "a", config, params, max_shard_bytes=bad)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        save_hf_model(tmp_path / "a", config, params, overwrite="yes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file: exists and is not a directory"):
        save_hf_model(tmp_path / "file", config, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_overwrite_moves_config_json_in_last(tmp_path, monkeypatch):
    """Until config.json lands, the directory holds no loadable checkpoint."""
    config, params = _random_dense()
    save_hf_model(tmp_path, config, params)
    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append((pathlib.Path(src).parent.name, pathlib.Path(dst).parent.name,
                      pathlib.Path(dst).name))  # fmt: skip
        return real_replace(src, dst)

    monkeypatch.setattr(hf_module.os, "replace", recording_replace)
    save_hf_model(tmp_path, config, _random_dense(1)[1], overwrite=True, max_shard_bytes=600)
    # The old config.json moves aside first, the new one in last.
    out = [name for _, dst, name in moved if dst.startswith(".previous-")]
    into = [name for _, dst, name in moved if dst == tmp_path.name]
    assert out == ["config.json", "model.safetensors"]
    assert len(into) > 2 and into[-1] == "config.json" and into.count("config.json") == 1


@pytest.mark.parametrize("failing_move", [1, 2, 4])  # moving aside, then moving in
def test_an_overwrite_interrupted_part_way_puts_the_old_checkpoint_back(
    tmp_path, monkeypatch, failing_move
):
    config, params = _random_dense()
    save_hf_model(tmp_path, config, params, max_shard_bytes=600, token_ids={"eos_token_id": 1})
    (tmp_path / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(before) > 4  # shards, index, config, generation config, tokenizer
    real_replace, calls = os.replace, []

    def interrupted_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_move:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(hf_module.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        save_hf_model(tmp_path, config, _random_dense(1)[1], overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing left over
    _equal_trees(load_hf_model(tmp_path)[1], params)


def test_loading_a_checkpoint_whose_replacement_was_killed_names_the_backup(tmp_path):
    config, params = _random_dense()
    save_hf_model(tmp_path / "m", config, params)
    out = tmp_path / "m"
    backup = out / ".previous-0123456789ab"
    backup.mkdir()
    for name in ("config.json", "model.safetensors"):  # as a kill after moving both aside
        os.replace(out / name, backup / name)
    with pytest.raises(ValueError, match=re.escape(
        f"config.json: not found (a checkpoint directory needs config.json); a save_hf_model "
        f"killed while replacing the checkpoint left the previous one in {backup}: to restore "
        f"it, move that directory's files into {out}"
    ) + "$"):  # fmt: skip
        load_hf_model(out)
    # Killed later: the new save's shards and index moved in, its config.json not yet.
    save_hf_model(tmp_path / "new", config, _random_dense(1)[1], max_shard_bytes=600)
    staged = out / ".partial-0123456789ab"
    os.replace(tmp_path / "new", staged)
    for p in sorted(staged.iterdir()):
        if p.name != "config.json":
            os.replace(p, out / p.name)
    moved = ", ".join(p.name for p in checkpoint_files(out))
    assert "model.safetensors.index.json" in moved
    with pytest.raises(ValueError) as info:
        load_hf_model(out)
    assert str(info.value).endswith(
        f"left the previous one in {backup}: to restore it, delete the new save's files there "
        f"({moved}) and move that directory's files into {out}; to keep the new one instead, "
        f"move the files of {staged} there"
    )
    # Following it either way gives a checkpoint that loads.
    keep = tmp_path / "keep"
    shutil.copytree(out, keep)
    for p in staged.iterdir():
        os.replace(p, out / p.name)
    _equal_trees(load_hf_model(out)[1], _random_dense(1)[1])
    for p in checkpoint_files(keep):
        p.unlink()
    for p in (keep / backup.name).iterdir():
        os.replace(p, keep / p.name)
    _equal_trees(load_hf_model(keep)[1], params)


def test_a_sliding_window_bounds_the_sequences_the_model_runs(tmp_path):
    """Sliding-window attention is not implemented: a config whose window is shorter than
    its context loads as a model of window-long sequences (where the window changes nothing),
    and the sampler refuses anything longer instead of running it unwindowed."""
    from novarl_jax.rollout import sample

    d = _copy("llama", tmp_path)
    hf = json.loads((d / "config.json").read_text())
    hf.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4)
    (d / "config.json").write_text(json.dumps(hf))
    config, params = load_hf_model(d)
    assert config.max_position_embeddings == 4 < hf["max_position_embeddings"]
    prompt, mask = jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32)
    key = jax.random.key(0)
    assert sample(params, config, prompt, mask, key, max_new_tokens=1, pad_id=0).tokens.shape
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=4"):
        sample(params, config, prompt, mask, key, max_new_tokens=2, pad_id=0)
    with pytest.raises(ValueError, match="longer than the config's sliding_window=4"):
        load_hf_model(d, max_position_embeddings=8)
    # Saved again, it keeps its window (as Mistral: Llama has none).
    save_hf_model(tmp_path / "again", config, params)
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (again["model_type"], again["sliding_window"]) == ("mistral", 4)
    assert load_hf_model(tmp_path / "again")[0] == config
    # A Llama config.json may carry the key, which neither transformers nor we apply.
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="swish")
    (d / "config.json").write_text(json.dumps(hf))
    llama, _ = load_hf_model(d)
    assert llama.max_position_embeddings == hf["max_position_embeddings"]
    assert llama.sliding_window is None


@pytest.mark.parametrize("moe", [False, True])
def test_loading_holds_about_one_copy_of_the_weights_in_host_memory(tmp_path, moe):
    """Layers are written into the stacked arrays as they are read (not all read, then
    stacked: three copies at the peak), so a 7B checkpoint needs about its own size."""
    import tracemalloc

    config = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=8, num_attention_heads=4,
                         num_local_experts=4 if moe else 0)  # fmt: skip
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    save_hf_model(tmp_path, config, params)
    tracemalloc.start()
    try:
        _, loaded = load_hf_model(tmp_path, host=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sum(x.nbytes for x in jax.tree.leaves(loaded))
    assert peak < 1.4 * size, (peak, size)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_qwen2_configs_window_only_with_use_sliding_window_and_biases_need_qwen2():
    hf = json.loads((DATA / "qwen2" / "config.json").read_text())
    assert ModelConfig.from_hf_config(hf).sliding_window is None
    # Released Qwen2.5 configs carry a window that use_sliding_window leaves off.
    legacy = {k: v for k, v in hf.items() if k != "layer_types"}
    off = ModelConfig.from_hf_config(
        {**legacy, "sliding_window": 32768, "use_sliding_window": False}
    )
    assert off.sliding_window is None and off.max_position_embeddings == 64
    on = ModelConfig.from_hf_config(
        {**legacy, "sliding_window": 16, "use_sliding_window": True, "max_window_layers": 1}
    )
    assert on.sliding_window == 16 and on.max_position_embeddings == 16
    assert ModelConfig.from_hf_config(on.to_hf_config()) == on
    assert on.to_hf_config()["max_window_layers"] == 0  # every layer windowed, as read
    config = ModelConfig.from_hf_config(hf)
    assert config.to_hf_config()["architectures"] == ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match=r"model_type='llama' does not match qkv_bias=True"):
        config.to_hf_config("llama")
    with pytest.raises(ValueError, match=r"model_type='qwen2' does not match qkv_bias=False"):
        DENSE.to_hf_config("qwen2")
    with pytest.raises(ValueError, match=r"model_type='mixtral' does not match qkv_bias=True"):
        MOE.replace(qkv_bias=True).to_hf_config()
    with pytest.raises(ValueError, match=r"qkv_bias must be a bool"):
        DENSE.replace(qkv_bias=1)
    # Qwen3: query/key norms, no biases, and its own head width when config.json omits it.
    qwen3 = json.loads((DATA / "qwen3" / "config.json").read_text())
    config = ModelConfig.from_hf_config(qwen3)
    assert config.qk_norm and not config.qkv_bias and config.to_hf_config("qwen3")
    del qwen3["head_dim"]
    assert ModelConfig.from_hf_config(qwen3).head_dim == 128  # transformers' default
    with pytest.raises(ValueError, match=r"model_type='llama' does not match qk_norm=True"):
        config.to_hf_config("llama")
    with pytest.raises(ValueError, match=r"attention_bias=true is not supported"):
        ModelConfig.from_hf_config({**qwen3, "attention_bias": True})
