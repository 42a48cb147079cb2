"""Hugging Face interop: read and write Mixtral, Mistral and Llama safetensors checkpoints.

Only safetensors are read (never pickle). A checkpoint directory holds ``config.json`` and
either one ``*.safetensors`` file, several (with or without ``model.safetensors.index.json``),
or a sharded set named by that index.

Mixtral expert weights are accepted in both layouts found in the wild:

* per expert (every transformers release writes this):
  ``model.layers.N.block_sparse_moe.gate.weight`` [E, D] and
  ``model.layers.N.block_sparse_moe.experts.M.{w1,w3}.weight`` [F, D], ``...w2.weight`` [D, F];
* fused (transformers 5's in-memory module names, e.g. a raw ``state_dict()``):
  ``model.layers.N.mlp.gate.weight`` [E, D],
  ``model.layers.N.mlp.experts.gate_up_proj`` [E, 2F, D] (``w1`` rows then ``w3`` rows) and
  ``model.layers.N.mlp.experts.down_proj`` [E, D, F].

Linear weights are stored by Hugging Face as ``[out, in]``; this package keeps ``[in, out]``
(attention projections split into heads), so conversion is a transpose and a reshape.

Example:
    >>> config, params = load_hf_model("checkpoints/tiny-mixtral")
    >>> save_hf_model("/tmp/copy", config, params)  # transformers can load /tmp/copy
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from novarl_jax.models import moe as moe_lib
from novarl_jax.models.config import ModelConfig
from novarl_jax.models.transformer import param_shardings

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
# Extra tensors for the optional value head (Hugging Face has no such module; transformers
# ignores unknown keys when loading, and load_hf_model reads them back).
VALUE_HEAD_WEIGHT = "value_head.weight"
VALUE_HEAD_BIAS = "value_head.bias"


class _Tensors:
    """Lazy key -> NumPy array view of the safetensors files of one checkpoint."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index = directory / INDEX_FILE
        self.where: dict[str, pathlib.Path] = {}
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ValueError(f"{index}: no 'weight_map' object")
            for key, name in weight_map.items():
                self.where[key] = directory / name
            self.files = sorted(set(self.where.values()))
            for file in self.files:
                if not file.exists():
                    raise ValueError(f"{index}: names {file.name}, which does not exist")
        else:
            self.files = sorted(directory.glob("*.safetensors"))
            if not self.files:
                raise ValueError(
                    f"{directory}: no *.safetensors files (pickled .bin/.pt checkpoints are "
                    f"not read; convert them to safetensors)"
                )
            for file in self.files:
                with safe_open(file, framework="np") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        self.where[key] = file
        self._handles: dict[pathlib.Path, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __getitem__(self, key: str) -> np.ndarray:
        file = self.where.get(key)
        if file is None:
            names = ", ".join(f.name for f in self.files)
            raise ValueError(f"{self.directory}: tensor {key!r} not found in {names}")
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="np")
        try:
            return self._handles[file].get_tensor(key)
        except Exception as e:  # the index may name a key its file lacks
            raise ValueError(f"{file}: tensor {key!r} could not be read ({e})") from e

    def keys(self):
        return self.where.keys()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"{path}: not found (a checkpoint directory needs {CONFIG_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _prefix(tensors: Any) -> str:
    """'model.' for *ForCausalLM checkpoints, '' for bare *Model checkpoints."""
    if "model.embed_tokens.weight" in tensors:
        return "model."
    if "embed_tokens.weight" in tensors:
        return ""
    return "model."  # the lookup of the usual key then raises a clear error


def params_from_hf_tensors(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    put: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Builds our parameter tree from Hugging Face-named tensors.

    Args:
        config: the model the tensors describe.
        tensors: key -> array ([out, in] orientation), any mapping supporting ``in`` and
            ``[]``; a missing or misshapen tensor raises ValueError naming the key.
        put: called as ``put(path, array)`` for each finished leaf (``path`` like
            ``('layers', 'attn', 'q_proj')``) to place it, e.g. on a mesh; default
            :func:`jax.numpy.asarray`.

    Returns:
        params with the tree of :func:`~novarl_jax.models.init_params`, in ``config.dtype``.
        A value head absent from the tensors starts at zero when ``config.value_head``.
    """
    if put is None:
        put = lambda path, x: jnp.asarray(x)  # noqa: E731
    dt = config.param_dtype
    pre = _prefix(tensors)
    d, n, nkv, dh = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"tensor {key!r} is missing")
        arr = np.asarray(tensors[key])
        if arr.shape != shape:
            raise ValueError(f"tensor {key!r} has shape {arr.shape}, expected {shape}")
        return arr.astype(dt, copy=False)

    layers: list[dict[str, Any]] = []
    for i in range(config.num_hidden_layers):
        lp = f"{pre}layers.{i}."
        layer: dict[str, Any] = {
            "input_norm": {"scale": get(lp + "input_layernorm.weight", (d,))},
            "post_attn_norm": {"scale": get(lp + "post_attention_layernorm.weight", (d,))},
            "attn": {
                "q_proj": get(lp + "self_attn.q_proj.weight", (n * dh, d)).T.reshape(d, n, dh),
                "k_proj": get(lp + "self_attn.k_proj.weight", (nkv * dh, d)).T.reshape(d, nkv, dh),
                "v_proj": get(lp + "self_attn.v_proj.weight", (nkv * dh, d)).T.reshape(d, nkv, dh),
                "o_proj": get(lp + "self_attn.o_proj.weight", (d, n * dh)).T.reshape(n, dh, d),
            },
        }
        if config.is_moe:
            layer["moe"] = _moe_from_hf(config, tensors, lp, get)
        else:
            f = config.intermediate_size
            layer["mlp"] = {
                "gate_proj": get(lp + "mlp.gate_proj.weight", (f, d)).T,
                "up_proj": get(lp + "mlp.up_proj.weight", (f, d)).T,
                "down_proj": get(lp + "mlp.down_proj.weight", (d, f)).T,
            }
        layers.append(layer)

    stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    v = config.vocab_size
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": get(pre + "embed_tokens.weight", (v, d))},
        "layers": stacked,
        "final_norm": {"scale": get(pre + "norm.weight", (d,))},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (v, d)).T}
    if config.value_head:
        if VALUE_HEAD_WEIGHT in tensors:
            kernel = get(VALUE_HEAD_WEIGHT, (1, d)).T
            bias = get(VALUE_HEAD_BIAS, (1,))
        else:
            kernel, bias = np.zeros((d, 1), dt), np.zeros((1,), dt)
        params["value_head"] = {"kernel": kernel, "bias": bias}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: put(tuple(p.key for p in path), np.ascontiguousarray(x)), params
    )


def _moe_from_hf(config: ModelConfig, tensors: Any, lp: str, get: Callable) -> Any:
    e, f, d = config.num_local_experts, config.intermediate_size, config.hidden_size
    if lp + "block_sparse_moe.gate.weight" in tensors or lp + "mlp.gate.weight" not in tensors:
        mp = lp + "block_sparse_moe."
        out = moe_lib.moe_params_from_per_expert(
            get(mp + "gate.weight", (e, d)),
            np.stack([get(f"{mp}experts.{j}.w1.weight", (f, d)) for j in range(e)]),
            np.stack([get(f"{mp}experts.{j}.w3.weight", (f, d)) for j in range(e)]),
            np.stack([get(f"{mp}experts.{j}.w2.weight", (d, f)) for j in range(e)]),
        )
    else:
        mp = lp + "mlp."
        out = moe_lib.moe_params_from_fused(
            get(mp + "gate.weight", (e, d)),
            get(mp + "experts.gate_up_proj", (e, 2 * f, d)),
            get(mp + "experts.down_proj", (e, d, f)),
        )
    return jax.tree.map(lambda x: np.asarray(x).astype(config.param_dtype, copy=False), out)


def load_hf_model(
    path: str | os.PathLike, *, mesh: Any = None, **config_overrides: Any
) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a Hugging Face Mixtral / Mistral / Llama checkpoint directory.

    Args:
        path: directory with ``config.json`` and safetensors file(s).
        mesh: when given, each parameter goes straight to its sharding on this mesh
            (:func:`~novarl_jax.models.param_shardings`), never whole on one device.
        **config_overrides: ModelConfig fields not stored in config.json (``dtype``,
            ``capacity_factor``, ``value_head`` ...). ``value_head`` defaults to whether the
            checkpoint has ``value_head.weight``.

    Returns:
        (config, params), params in ``config.dtype`` (default float32).

    Raises:
        ValueError: missing config.json or safetensors, an unsupported model_type/feature,
            or a missing/misshapen tensor; the message names the file and the key.

    Example:
        >>> config, params = load_hf_model("tests/data/hf/mixtral", capacity_factor=1.25)
        >>> logits, _, _ = forward(params, tokens, config)
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    hf_config = _read_config(directory)
    tensors = _Tensors(directory)
    config_overrides.setdefault("value_head", VALUE_HEAD_WEIGHT in tensors)
    try:
        config = ModelConfig.from_hf_config(hf_config, **config_overrides)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from e
    put = None
    if mesh is not None:
        shardings = param_shardings(config, mesh)
        flat = {
            tuple(p.key for p in path): s
            for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
        }
        put = lambda p, x: jax.device_put(x, flat[p])  # noqa: E731
    try:
        params = params_from_hf_tensors(config, tensors, put=put)
    except ValueError as e:
        if str(e).startswith(str(directory)):
            raise
        raise ValueError(f"{directory}: {e}") from e
    finally:
        tensors.close()
    return config, params


def params_to_hf_tensors(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our parameters as Hugging Face-named NumPy arrays (per-expert Mixtral layout).

    Returns:
        key -> contiguous array in [out, in] orientation, dtype of the params. Keys are
        those ``save_pretrained`` writes for ``*ForCausalLM`` (no ``lm_head.weight`` when
        embeddings are tied), plus ``value_head.weight`` [1, D] / ``value_head.bias`` [1]
        when the config has a value head.
    """
    params = jax.device_get(params)
    d, n, nkv, dh = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": params["embed_tokens"]["embedding"],
        "model.norm.weight": params["final_norm"]["scale"],
    }
    layers = params["layers"]
    for i in range(config.num_hidden_layers):
        lp = f"model.layers.{i}."
        attn = {k: np.asarray(v[i]) for k, v in layers["attn"].items()}
        out[lp + "input_layernorm.weight"] = layers["input_norm"]["scale"][i]
        out[lp + "post_attention_layernorm.weight"] = layers["post_attn_norm"]["scale"][i]
        out[lp + "self_attn.q_proj.weight"] = attn["q_proj"].reshape(d, n * dh).T
        out[lp + "self_attn.k_proj.weight"] = attn["k_proj"].reshape(d, nkv * dh).T
        out[lp + "self_attn.v_proj.weight"] = attn["v_proj"].reshape(d, nkv * dh).T
        out[lp + "self_attn.o_proj.weight"] = attn["o_proj"].reshape(n * dh, d).T
        if config.is_moe:
            moe_i = jax.tree.map(lambda x, i=i: x[i], layers["moe"])
            router, w1, w3, w2 = (np.asarray(x) for x in moe_lib.moe_params_to_per_expert(moe_i))
            mp = lp + "block_sparse_moe."
            out[mp + "gate.weight"] = router
            for j in range(config.num_local_experts):
                out[f"{mp}experts.{j}.w1.weight"] = w1[j]
                out[f"{mp}experts.{j}.w2.weight"] = w2[j]
                out[f"{mp}experts.{j}.w3.weight"] = w3[j]
        else:
            mlp = layers["mlp"]
            out[lp + "mlp.gate_proj.weight"] = np.asarray(mlp["gate_proj"][i]).T
            out[lp + "mlp.up_proj.weight"] = np.asarray(mlp["up_proj"][i]).T
            out[lp + "mlp.down_proj.weight"] = np.asarray(mlp["down_proj"][i]).T
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    if config.value_head:
        out[VALUE_HEAD_WEIGHT] = np.asarray(params["value_head"]["kernel"]).T
        out[VALUE_HEAD_BIAS] = np.asarray(params["value_head"]["bias"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def checkpoint_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files of a Hugging Face checkpoint in directory ``path``: config.json, the
    safetensors index and the safetensors files that exist there (none: no checkpoint)."""
    directory = pathlib.Path(path)
    files = [directory / CONFIG_FILE, directory / INDEX_FILE, *directory.glob("*.safetensors")]
    return [p for p in files if p.exists()]


def save_hf_model(
    path: str | os.PathLike,
    config: ModelConfig,
    params: Any,
    *,
    model_type: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    token_ids: Mapping[str, int] | None = None,
) -> None:
    """Writes ``config.json`` and safetensors that ``transformers`` loads directly.

    Mixtral experts are written per expert (the layout ``save_pretrained`` writes). Files
    larger than ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` with
    a ``model.safetensors.index.json``.

    Args:
        path: output directory (created).
        config: the model.
        params: its parameters (host or device arrays, sharded or not).
        model_type: 'mixtral', 'llama' or 'mistral' (default: mixtral for MoE, llama for
            dense).
        max_shard_bytes: largest file size before splitting.
        overwrite: replace an existing checkpoint in ``path`` (its config.json and
            safetensors/index files are removed first); otherwise that raises.
        token_ids: special token ids (``eos_token_id``, ``pad_token_id``, ``bos_token_id``)
            to write into config.json and a generation_config.json, so that ``generate``
            stops at the model's own EOS.

    Raises:
        ValueError: ``path`` already holds a checkpoint and ``overwrite`` is False, or a
            bad ``model_type``.

    Example:
        >>> save_hf_model("/tmp/policy", config, params)
        >>> # transformers.AutoModelForCausalLM.from_pretrained("/tmp/policy")
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    hf_config = {**config.to_hf_config(model_type), **(token_ids or {})}
    directory = pathlib.Path(path)
    existing = checkpoint_files(directory)
    if existing and not overwrite:
        raise ValueError(
            f"{directory}: already holds a checkpoint ({existing[0].name}); pass "
            f"overwrite=True to replace it"
        )
    tensors = params_to_hf_tensors(config, params)
    directory.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        index = {
            "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
            "weight_map": weight_map,
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if token_ids:
        text = json.dumps(dict(token_ids), indent=2, sort_keys=True) + "\n"
        (directory / GENERATION_CONFIG_FILE).write_text(text)
