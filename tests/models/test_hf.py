"""Hugging Face interop: logits parity with transformers' fixtures, save/load round trips, errors.

The fixtures under tests/data/hf/ were written by tests/data/make_hf_fixture.py with torch and
transformers; these tests only read them (no torch here).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import ModelConfig, forward, init_params
from novarl_jax.models.hf import (
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


@pytest.mark.parametrize("name", ["mixtral", "mixtral_fused", "llama"])
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
    else:
        assert config.tie_word_embeddings and config.rope_theta == 500.0
        assert config.rms_norm_eps == 1e-6 and "lm_head" not in params


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


@pytest.mark.parametrize("name", ["mixtral", "llama"])
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
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_model(tmp_path / "nope")
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
    index = {"weight_map": {k: "model.safetensors" for k in load_file(d / "model.safetensors")}}
    index["weight_map"]["lm_head.weight"] = "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'lm_head\.weight' could"):
        load_hf_model(d, tie_word_embeddings=False)
    index["weight_map"]["extra"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names model-00002-of-00002.safetensors, which does"):
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
    np.testing.assert_array_equal(
        np.asarray(params["final_norm"]["scale"]),
        tensors["model.norm.weight"].astype(ml_dtypes.bfloat16),
    )
