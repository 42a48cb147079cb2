"""Hugging Face interop: read and write Mixtral, Mistral, Llama, Qwen2 and Qwen3 safetensors
checkpoints.

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
    >>> config, params = load_hf_model("checkpoints/tiny-mixtral")  # doctest: +SKIP
    >>> save_hf_model("/tmp/copy", config, params)  # doctest: +SKIP
    >>> # transformers.AutoModelForCausalLM.from_pretrained("/tmp/copy") loads it
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from novarl_jax.core.checks import is_integer
from novarl_jax.models import moe as moe_lib
from novarl_jax.models.config import ModelConfig
from novarl_jax.models.transformer import param_shardings, param_specs

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
# Extra tensors for the optional value head (Hugging Face has no such module; transformers
# ignores unknown keys when loading, and load_hf_model reads them back).
VALUE_HEAD_WEIGHT = "value_head.weight"
VALUE_HEAD_BIAS = "value_head.bias"
# The special token ids save_hf_model writes (config.json and generation_config.json).
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Non-weight buffers some transformers releases saved; loading ignores them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _open(file: pathlib.Path) -> Any:
    """``safe_open(file)``; a corrupt or truncated file raises ValueError naming it."""
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


# The dtypes weights are read from (cast to ``config.dtype``).
_WEIGHT_DTYPES = tuple(np.dtype(d) for d in (np.float64, np.float32, np.float16, jnp.bfloat16))


def _read_index(index: pathlib.Path) -> dict[str, str]:
    """The ``weight_map`` (tensor key -> shard file name) of a safetensors index file."""
    try:
        weight_map = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, Mapping):
        raise ValueError(f"{index}: no 'weight_map' object")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            raise ValueError(
                f"{index}: weight_map[{key!r}] must be the name of a file beside it, got {name!r}"
            )
    return dict(weight_map)


class _Tensors:
    """Lazy key -> NumPy array view of the safetensors files of one checkpoint."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index = directory / INDEX_FILE
        single = directory / SINGLE_FILE
        self.where: dict[str, pathlib.Path] = {}
        # transformers' order: one model.safetensors wins over an index whose shards are
        # gone (re-saving a sharded model unsharded leaves the old index behind), then the
        # index, and only here, without either, every *.safetensors file. A single file
        # beside a complete sharded set is one of two models, and which one is stale cannot
        # be told (transformers reads the single file): refused.
        if single.exists() and index.exists():
            try:  # transformers never opens it here: a broken leftover is no error
                named = set(_read_index(index).values())
            except (OSError, ValueError):
                named = set()
            shards = [directory / name for name in sorted(named) if name != SINGLE_FILE]
            if shards and all(file.exists() for file in shards):
                raise ValueError(
                    f"{directory}: holds both {SINGLE_FILE} and a complete sharded checkpoint "
                    f"({INDEX_FILE} and its {len(shards)} shard(s)), two copies of the model "
                    f"of which one is stale; remove the one that is not this model"
                )
        if not single.exists() and index.exists():
            weight_map = _read_index(index)
            for key, name in weight_map.items():
                self.where[key] = directory / name
            self.files = sorted(set(self.where.values()))
            for file in self.files:
                if not file.exists():
                    raise ValueError(f"{index}: names {file.name}, which does not exist")
        else:
            self.files = [single] if single.exists() else sorted(directory.glob("*.safetensors"))
            if not self.files:
                raise ValueError(
                    f"{directory}: no *.safetensors files (pickled .bin/.pt checkpoints are "
                    f"not read; convert them to safetensors)"
                )
            for file in self.files:
                with _open(file) as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        if key in self.where:
                            # With no index to say which copy is meant, either could be.
                            raise ValueError(
                                f"{directory}: tensor {key!r} is in both "
                                f"{self.where[key].name} and {file.name}, and there is no "
                                f"{INDEX_FILE} to say which to read; remove the stray file"
                            )
                        self.where[key] = file
        self._handles: dict[pathlib.Path, Any] = {}
        self.read: set[str] = set()  # the keys looked up so far

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __getitem__(self, key: str) -> np.ndarray:
        file = self.where.get(key)
        if file is None:
            names = ", ".join(f.name for f in self.files)
            raise ValueError(f"{self.directory}: tensor {key!r} not found in {names}")
        if file not in self._handles:
            self._handles[file] = _open(file)
        self.read.add(key)
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
        raise ValueError(
            f"{path}: not found (a checkpoint directory needs {CONFIG_FILE})"
            f"{_interrupted_save_hint(directory)}"
        )
    try:
        hf_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a {type(hf_config).__name__}")
    return hf_config


def _interrupted_save_hint(directory: pathlib.Path) -> str:
    """For a directory without config.json: where a save_hf_model killed while swapping
    checkpoints left the old one (``.previous-*``) and, when complete, the new one
    (``.partial-*``), and how to finish by hand; '' when there is no such backup."""

    def complete(pattern: str) -> list[pathlib.Path]:
        return sorted(p for p in directory.glob(pattern) if (p / CONFIG_FILE).exists())

    backups = complete(".previous-*")
    if not backups:
        return ""
    moved = [p.name for p in checkpoint_files(directory)]  # the new save's, moved in
    clear = f"delete the new save's files there ({', '.join(moved)}) and " if moved else ""
    hint = (
        f"; a save_hf_model killed while replacing the checkpoint left the previous one in "
        f"{backups[-1]}: to restore it, {clear}move that directory's files into {directory}"
    )
    staged = complete(".partial-*")  # the rest of the new save, config.json last
    if staged:
        hint += f"; to keep the new one instead, move the files of {staged[-1]} there"
    return hint


def end_token_ids(path: str | os.PathLike) -> list[int]:
    """The ids ``generate`` stops at for the checkpoint directory ``path``: ``eos_token_id``
    (an id or a list) of its generation_config.json, else of its config.json; [] when neither
    declares one.

    Raises:
        ValueError: such a file is not valid JSON, or its ``eos_token_id`` is not an id or a
            list of ids (the message names the file).
    """
    directory = pathlib.Path(path)
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        value = data.get("eos_token_id") if isinstance(data, dict) else None
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        if not ids or not all(is_integer(i) and i >= 0 for i in ids):
            raise ValueError(f"{file}: eos_token_id must be an id or a list of ids, got {value!r}")
        return [int(i) for i in ids]
    return []


def _unexpected_tensors(tensors: _Tensors, config: ModelConfig) -> list[str]:
    """The tensors the checkpoint holds that loading did not read, except those legitimately
    ignored: rotary ``inv_freq`` buffers, a value head the config has none of, and
    ``lm_head.weight`` when the embeddings are tied and it equals them (a copy written with
    the tied weights)."""
    ignored = set()
    if not config.value_head:
        ignored |= {VALUE_HEAD_WEIGHT, VALUE_HEAD_BIAS}
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        head = tensors["lm_head.weight"]
        embed = tensors[_prefix(tensors) + "embed_tokens.weight"]
        if head.shape != embed.shape or not np.array_equal(head, embed):
            # transformers keeps such a head untied and uses it: tying it here would give
            # other logits.
            raise ValueError(
                f"{tensors.directory}: config.json sets tie_word_embeddings=true but "
                f"lm_head.weight differs from the embeddings; set tie_word_embeddings to "
                f"false in config.json to load the head as trained"
            )
        ignored.add("lm_head.weight")
    return sorted(
        k for k in tensors.keys()
        if k not in tensors.read and k not in ignored and not k.endswith(_IGNORED_SUFFIXES)
    )  # fmt: skip


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
        if arr.dtype not in _WEIGHT_DTYPES:
            # A quantised or corrupted checkpoint: casting its integers would load garbage.
            raise ValueError(
                f"tensor {key!r} has dtype {arr.dtype}; only float weights (float32, float16, "
                f"bfloat16, float64) are read (quantised checkpoints are not supported)"
            )
        finite = _finite(arr)
        if not finite.all():  # a damaged file: found here, not as a first update skipped
            raise ValueError(
                f"tensor {key!r} has {arr.size - int(finite.sum())} non-finite value(s) (NaN "
                f"or inf), the first at index {tuple(int(i) for i in np.argwhere(~finite)[0])}"
            )
        return arr.astype(dt, copy=False)

    def layer_params(i: int) -> dict[str, Any]:
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
        if config.qkv_bias:
            for name, heads in (("q", n), ("k", nkv), ("v", nkv)):
                bias = get(f"{lp}self_attn.{name}_proj.bias", (heads * dh,))
                layer["attn"][f"{name}_bias"] = bias.reshape(heads, dh)
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                layer["attn"][name] = get(f"{lp}self_attn.{name}.weight", (dh,))
        if config.is_moe:
            layer["moe"] = _moe_from_hf(config, tensors, lp, get)
        else:
            f = config.intermediate_size
            layer["mlp"] = {
                "gate_proj": get(lp + "mlp.gate_proj.weight", (f, d)).T,
                "up_proj": get(lp + "mlp.up_proj.weight", (f, d)).T,
                "down_proj": get(lp + "mlp.down_proj.weight", (d, f)).T,
            }
        return layer

    # Each layer is written into arrays stacked over the layers as soon as it is read, so
    # the host holds the stacked weights and one layer's temporaries, not every layer twice.
    num_layers = config.num_hidden_layers
    first = layer_params(0)
    stacked = jax.tree.map(lambda x: np.empty((num_layers, *x.shape), x.dtype), first)
    for i in range(num_layers):
        layer = first if i == 0 else layer_params(i)
        jax.tree.map(lambda out, x, i=i: out.__setitem__(i, x), stacked, layer)
        first = layer = None
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
    # Placed one leaf at a time, each host array dropped once placed.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    params = stacked = None
    placed = []
    for k in range(len(leaves)):
        path, x = leaves[k]
        leaves[k] = None
        placed.append(put(tuple(p.key for p in path), np.ascontiguousarray(x)))
        x = None
    return jax.tree_util.tree_unflatten(treedef, placed)


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
    path: str | os.PathLike, *, mesh: Any = None, host: bool = False, **config_overrides: Any
) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a Hugging Face Mixtral / Mistral / Llama (1-3.3) / Qwen2 / Qwen3 checkpoint
    directory.

    Args:
        path: directory with ``config.json`` and safetensors file(s).
        mesh: when given, each parameter goes straight to its sharding on this mesh
            (:func:`~novarl_jax.models.param_shardings`), never whole on one device.
        host: keep the weights as NumPy arrays in host memory, to be placed later (e.g. by
            :func:`~novarl_jax.models.shard_params`, which then moves only each device's
            part); by default they go to the default device.
        **config_overrides: ModelConfig fields not stored in config.json (``dtype``,
            ``capacity_factor``, ``value_head`` ...). ``value_head`` defaults to whether the
            checkpoint has ``value_head.weight``.

    Returns:
        (config, params), params in ``config.dtype`` (default float32).

    Raises:
        ValueError: missing or malformed config.json, missing or unreadable safetensors, an
            unsupported model_type/feature, a missing/misshapen tensor, or a tensor the
            config does not use (e.g. a layer beyond ``num_hidden_layers`` or a bias; rotary
            ``inv_freq`` buffers, a tied ``lm_head.weight`` and a value head the config
            lacks are ignored); the message names the file and the key.

    Example:
        >>> config, params = load_hf_model("tests/data/hf/mixtral", capacity_factor=1.25)
        >>> logits, _, _ = forward(params, tokens, config)
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        what = "is a file, not" if directory.exists() else "does not exist; load_hf_model reads"
        raise ValueError(
            f"{directory}: {what} a local checkpoint directory (config.json and *.safetensors; "
            f"a Hub model must be downloaded first)"
        )
    hf_config = _read_config(directory)
    tensors = _Tensors(directory)
    config_overrides.setdefault("value_head", VALUE_HEAD_WEIGHT in tensors)
    try:
        config = ModelConfig.from_hf_config(hf_config, **config_overrides)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from e
    if host and mesh is not None:
        raise ValueError("pass mesh= (place the weights on it) or host=True (keep them), not both")
    put = (lambda p, x: x) if host else None  # noqa: E731
    if mesh is not None:
        shardings = param_shardings(config, mesh)
        flat = {
            tuple(p.key for p in path): s
            for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
        }
        put = lambda p, x: jax.device_put(x, flat[p])  # noqa: E731
    try:
        params = params_from_hf_tensors(config, tensors, put=put)
        unexpected = _unexpected_tensors(tensors, config)
        if unexpected:
            first = unexpected[0]
            raise ValueError(
                f"{directory}: unexpected tensor {first!r} in {tensors.where[first].name}: "
                f"not a weight of this config (num_hidden_layers={config.num_hidden_layers}, "
                f"num_local_experts={config.num_local_experts}, "
                f"{'q/k/v biases only' if config.qkv_bias else 'no biases'}); "
                f"{len(unexpected)} unexpected tensor(s) in all"
            )
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
        if config.qkv_bias:
            for name in ("q", "k", "v"):
                out[f"{lp}self_attn.{name}_proj.bias"] = attn[f"{name}_bias"].reshape(-1)
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{lp}self_attn.{name}.weight"] = attn[name]
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


def _finite(arr: np.ndarray) -> np.ndarray:
    """``np.isfinite(arr)``; for bfloat16 from its exponent bits (NumPy's generic loop for
    that type is ~10x slower, seconds for a 7B checkpoint)."""
    if arr.dtype == jnp.bfloat16:
        return (arr.view(np.uint16) & 0x7F80) != 0x7F80
    return np.isfinite(arr)


def checkpoint_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files of a Hugging Face checkpoint in directory ``path`` that exist there (none:
    no checkpoint): config.json, the safetensors index, the shards it names, and
    ``model.safetensors`` or ``model-*-of-*.safetensors``. Other safetensors files (an
    adapter's ``adapter_model.safetensors``) are not the model's."""
    directory = pathlib.Path(path)
    files = [directory / CONFIG_FILE, directory / INDEX_FILE, directory / SINGLE_FILE]
    files += sorted(directory.glob("model-*-of-*.safetensors"))
    try:
        files += [directory / name for name in _read_index(directory / INDEX_FILE).values()]
    except (OSError, ValueError):
        pass  # no index, or one that names nothing usable: the files above
    return [p for p in dict.fromkeys(files) if p.exists()]


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
        path: output directory (created). Everything is checked before anything is
            written, and the files are written into a temporary directory on the same file
            system (inside ``path`` when it exists) that is then moved into place, so a
            failure never leaves a half-written checkpoint: an existing one stays, or is
            put back (a killed process leaves it in ``path/.previous-*``, which
            :func:`load_hf_model` names).
        config: the model.
        params: its parameters (host or device arrays, sharded or not): exactly the tree,
            shapes and dtype (``config.dtype``) of ``init_params(config, key)``.
        model_type: 'mixtral', 'llama', 'mistral', 'qwen2' or 'qwen3' (default, as
            :meth:`~novarl_jax.models.ModelConfig.to_hf_config` chooses it: mixtral for MoE;
            for dense, qwen2 with q/k/v biases, qwen3 with query/key norms, mistral with a
            ``sliding_window``, else llama).
        max_shard_bytes: largest file size before splitting.
        overwrite: replace an existing checkpoint in ``path`` (its config.json, index,
            model safetensors files and generation_config.json are replaced; other files,
            an adapter's safetensors among them, stay); otherwise that raises.
        token_ids: special token ids (``eos_token_id``, ``pad_token_id``, ``bos_token_id``
            only; integers in ``[0, vocab_size)``, ``eos_token_id`` also a list of them) to
            write into config.json and a generation_config.json, so that ``generate`` stops
            where the model learned to stop. :func:`load_hf_model` does not return them:
            pass them again when re-saving a loaded checkpoint.

    Raises:
        ValueError: ``path`` already holds a checkpoint and ``overwrite`` is False, a bad
            ``model_type``, params that do not match ``config`` (the message names the
            parameter), or bad ``token_ids``.
        TypeError: ``config``, ``token_ids`` or ``overwrite`` of the wrong type.

    Example:
        >>> save_hf_model("/tmp/policy", config, params)  # doctest: +SKIP
        >>> # transformers.AutoModelForCausalLM.from_pretrained("/tmp/policy")
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int | np.integer):
        raise ValueError(f"max_shard_bytes must be an integer >= 1, got {max_shard_bytes!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if not isinstance(overwrite, bool | np.bool_):
        raise TypeError(f"overwrite must be a bool (True or False), got {overwrite!r}")
    # Everything is checked and serialised before the first byte is written.
    ids = _checked_token_ids(token_ids, config.vocab_size)
    hf_config = {**config.to_hf_config(model_type), **ids}
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    existing = checkpoint_files(directory)
    if existing and not overwrite:
        raise ValueError(
            f"{directory}: already holds a checkpoint ({existing[0].name}); pass "
            f"overwrite=True to replace it"
        )
    _check_params_fit(config, params)
    tensors = params_to_hf_tensors(config, params)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    texts = {CONFIG_FILE: _json_text(hf_config)}
    if ids:
        texts[GENERATION_CONFIG_FILE] = _json_text(ids)
    names = [SINGLE_FILE]
    if len(shards) > 1:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        index = {
            "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
            "weight_map": weight_map,
        }
        texts[INDEX_FILE] = _json_text(index)

    # Written into a fresh staging directory, then moved into place: a failure part way
    # leaves ``path`` as it was. The staging directory lies on the target's own file system
    # (inside an existing target, which may be a mount point or a link to another disk;
    # else beside it), so the moves are renames that cannot fail for crossing devices.
    tag = uuid.uuid4().hex[:12]
    if directory.is_dir():
        staging = directory / f".partial-{tag}"
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.parent / f".{directory.name}.{tag}.partial"
    staging.mkdir()
    try:
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, staging / name, metadata={"format": "pt"})
        for name, text in texts.items():
            (staging / name).write_text(text)
        if not directory.exists():
            os.rename(staging, directory)
            return
        _swap_in(staging, directory, tag)
        staging.rmdir()
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: pathlib.Path, directory: pathlib.Path, tag: str) -> None:
    """Moves the files of ``staging`` into ``directory`` in place of its checkpoint files (a
    stale generation_config.json included; its other files, a tokenizer or an adapter, stay).

    The old files move aside into ``directory/.previous-TAG`` first, config.json first, and
    the new ones move in with config.json last: while the two are swapped the directory holds
    no config.json, so a mix of old and new files is never loaded. An exception on the way
    puts the old files back; a killed process leaves them in the backup, which
    :func:`load_hf_model` then points to.
    """
    backup = directory / f".previous-{tag}"
    backup.mkdir()
    old = [*checkpoint_files(directory), directory / GENERATION_CONFIG_FILE]
    old = sorted((p for p in old if p.exists()), key=lambda p: p.name != CONFIG_FILE)
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for p in old:
            os.replace(p, backup / p.name)
            moved_out.append(p.name)
        for p in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_FILE):
            os.replace(p, directory / p.name)
            moved_in.append(p.name)
    except BaseException:
        for name in reversed(moved_in):  # config.json, when it landed, first
            os.replace(directory / name, staging / name)
        for name in reversed(moved_out):  # config.json last
            os.replace(backup / name, directory / name)
        backup.rmdir()
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _checked_token_ids(token_ids: Any, vocab_size: int) -> dict[str, int | list[int]]:
    """``token_ids`` as plain ints, keys among :data:`TOKEN_ID_KEYS`, values in [0, V);
    ``eos_token_id`` may be a list (every id ``generate`` stops at)."""
    if token_ids is None:
        return {}
    if not isinstance(token_ids, Mapping):
        raise TypeError(
            f"token_ids must be a mapping like {{'eos_token_id': 2}}, got "
            f"{type(token_ids).__name__}"
        )
    out: dict[str, int | list[int]] = {}
    for key, value in token_ids.items():
        if key not in TOKEN_ID_KEYS:
            raise ValueError(
                f"token_ids key {key!r} is not one of {list(TOKEN_ID_KEYS)} (the other "
                f"config.json entries come from config)"
            )
        many = key == "eos_token_id" and isinstance(value, list | tuple)
        if many and not value:
            raise ValueError("token_ids['eos_token_id'] must be an id or a non-empty list of ids")
        ids = []
        for item in value if many else [value]:
            if not is_integer(item):
                what = "an integer id or a list of them" if key == "eos_token_id" else "an id"
                raise ValueError(f"token_ids[{key!r}] must be {what}, got {value!r}")
            if not 0 <= item < vocab_size:
                where = (
                    f"token_ids[{key!r}] holds {int(item)}, which"
                    if many
                    else (f"token_ids[{key!r}]={int(item)}")
                )
                raise ValueError(
                    f"{where} is not an id of the model: it must be in [0, vocab_size={vocab_size})"
                )
            ids.append(int(item))
        out[key] = ids if many else ids[0]
    return out


def _check_params_fit(config: ModelConfig, params: Any) -> None:
    """Raises ValueError naming the first parameter that is missing, extra, misshapen, or
    not of ``config.dtype``: what is written must be exactly ``config``'s model."""
    want = param_specs(config)
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    what = (
        f"num_hidden_layers={config.num_hidden_layers}, num_local_experts="
        f"{config.num_local_experts}, tie_word_embeddings={config.tie_word_embeddings}, "
        f"value_head={config.value_head}"
    )
    for name in want:
        if name not in got:
            raise ValueError(f"params{name} is missing: config ({what}) has it")
    for name in got:
        if name not in want:
            raise ValueError(f"params{name} is not a parameter of config ({what})")
    for name, spec in want.items():
        shape, dtype = np.shape(got[name]), getattr(got[name], "dtype", None)
        if shape != spec.shape:
            raise ValueError(
                f"params{name} has shape {shape}, but config ({what}, hidden_size="
                f"{config.hidden_size}, vocab_size={config.vocab_size}) needs {spec.shape}"
            )
        if dtype != spec.dtype:
            raise ValueError(
                f"params{name} has dtype {dtype}, but config.dtype={config.dtype!r}; cast the "
                f"params to {config.dtype} or save with config.replace(dtype=...)"
            )
