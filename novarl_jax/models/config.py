"""The shape and routing settings of a decoder-only policy (dense or Mixture-of-Experts).

Field names follow Hugging Face's ``MixtralConfig`` where it has them;
:meth:`ModelConfig.from_hf_config` maps a Mixtral, Mistral, Llama, Qwen2 or Qwen3
``config.json`` onto them (architecture flags such as ``qkv_bias`` and ``qk_norm`` follow from
its ``model_type``). ``num_local_experts=0`` describes a dense (Llama/Mistral) model with a
SwiGLU MLP in every layer.

Example:
    >>> config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4,
    ...                      num_key_value_heads=2, num_local_experts=4)
    >>> config.head_dim, config.router.top_k
    (8, 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from novarl_jax.core.distributed import DROP_POLICIES, MoERouterConfig

PARAM_DTYPES = ("float32", "bfloat16", "float16")

# Hugging Face architectures this package reads and writes, by model_type.
HF_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "mistral": "MistralForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Each architecture's own defaults in transformers, used for keys config.json leaves out
# (``num_key_value_heads`` None: one KV head per attention head). Mistral's sliding window
# is on by default; it only matters past ``sliding_window`` tokens.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": None},
    "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "num_key_value_heads": None,
              "max_position_embeddings": 2048, "sliding_window": None},
    # Qwen2's window applies only with use_sliding_window (see from_hf_config).
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "sliding_window": None},
    "qwen3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "sliding_window": None, "head_dim": 128},
}  # fmt: skip

# The ModelConfig fields that are copied from/to config.json as they are.
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)


# Fields that must be real bools (``"false"`` or 1 would silently mean True).
_BOOL_FIELDS = ("tie_word_embeddings", "qkv_bias", "qk_norm", "value_head", "remat")
# Real-valued fields: (name, may be None).
_FLOAT_FIELDS = (
    ("rope_theta", False),
    ("rms_norm_eps", False),
    ("router_aux_loss_coef", False),
    ("router_z_loss_coef", False),
    ("capacity_factor", True),
    ("eval_capacity_factor", True),
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (``rope_type: 'llama3'`` in config.json), which
    Llama 3.1, 3.2 and 3.3 checkpoints use to stretch a context of
    ``original_max_position_embeddings`` tokens by ``factor``.

    With ``L = original_max_position_embeddings`` and each rotary frequency's wavelength
    ``w = 2 pi / inv_freq``: frequencies whose wavelength is longer than ``L /
    low_freq_factor`` are divided by ``factor``, those shorter than ``L / high_freq_factor``
    are kept, and between the two ``inv_freq`` is blended linearly in ``s = (L / w -
    low_freq_factor) / (high_freq_factor - low_freq_factor)``: ``(1 - s) * inv_freq / factor
    + s * inv_freq``. Attention is not rescaled.

    Raises:
        ValueError: a value that is not a finite number, ``factor < 1``, frequency factors
            that are not ``0 < low_freq_factor < high_freq_factor``, or a non-integer or
            non-positive ``original_max_position_embeddings`` (naming the key).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        for name in ROPE_SCALING_KEYS:
            value = getattr(self, name)
            if isinstance(value, np.generic):
                object.__setattr__(self, name, value.item())
                value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"rope_scaling {name} must be a finite number, got {value!r}")
        if not self.factor >= 1:
            raise ValueError(f"rope_scaling factor must be >= 1, got {self.factor!r}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor!r} and {self.high_freq_factor!r}"
            )
        length = self.original_max_position_embeddings
        if isinstance(length, float) and length.is_integer():
            object.__setattr__(self, "original_max_position_embeddings", int(length))
            length = int(length)
        if not _is_int(length) or length < 1:
            raise ValueError(
                f"rope_scaling original_max_position_embeddings must be an integer >= 1, got "
                f"{length!r}"
            )
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any], where: str) -> RopeScaling:
        """The scaling of a config.json rope block (``where`` names it in errors)."""
        missing = [k for k in ROPE_SCALING_KEYS if k not in block]
        if missing:
            raise ValueError(f"config {where} of rope_type 'llama3' lacks {missing}")
        try:
            return cls(**{k: block[k] for k in ROPE_SCALING_KEYS})
        except ValueError as e:
            raise ValueError(f"config {where}: {e}") from None

    def to_mapping(self) -> dict[str, Any]:
        """The config.json entries (with ``rope_type: 'llama3'``)."""
        return {"rope_type": "llama3", **{k: getattr(self, k) for k in ROPE_SCALING_KEYS}}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Sizes, rotary base and MoE routing of a decoder-only transformer policy.

    ``head_dim`` and ``num_key_value_heads`` given as None are resolved at construction
    (to ``hidden_size // num_attention_heads`` and ``num_attention_heads``), so after
    ``__post_init__`` both are always integers. Every field is checked at construction: a
    value of the wrong type (a string or None for a number, anything but True/False for a
    flag) or out of range raises ValueError naming the field. NumPy scalars are accepted and
    stored as the equivalent Python values.

    Attributes:
        vocab_size: V, tokens in the vocabulary.
        hidden_size: D, model width.
        intermediate_size: F, hidden width of the SwiGLU MLP (of each expert in MoE layers).
        num_hidden_layers: L, decoder layers.
        num_attention_heads: N, query heads.
        num_key_value_heads: key/value heads (grouped-query attention); must divide N.
        head_dim: Dh, width of one head (even, for rotary embeddings).
        num_local_experts: E, experts per layer; 0 = dense MLP (Llama/Mistral).
        num_experts_per_tok: K, experts each token is routed to (<= E).
        rope_theta: rotary base wavelength.
        rope_scaling: Llama 3.1's rotary frequency scaling (a :class:`RopeScaling`, or a
            mapping of its fields), None for plain rotary embeddings.
        rms_norm_eps: epsilon inside RMSNorm's square root.
        max_position_embeddings: longest sequence the model is meant for (positions are not
            clipped to it; it is recorded for config.json and cache sizing).
        sliding_window: the attention window of a Mistral or Mixtral checkpoint (None: no
            window). Attention here is always full, which equals windowed attention on
            sequences of at most the window, so ``max_position_embeddings`` may not exceed
            it; it is recorded so that config.json keeps the window (a dense model with a
            window is written as Mistral, which has one, not Llama).
        tie_word_embeddings: the LM head reuses the token embedding matrix.
        qkv_bias: biases on the query, key and value projections (Qwen2's attention; the
            output projection has none). A MoE model with them has no Hugging Face
            architecture to be written as.
        qk_norm: an RMSNorm (epsilon ``rms_norm_eps``, a gain of Dh per layer) of each query
            and key head before the rotary embedding (Qwen3's attention). Dense models only
            have a Hugging Face architecture with it, and not with ``qkv_bias`` too.
        router_aux_loss_coef: weight of the load-balancing loss (Hugging Face's name).
        router_z_loss_coef: weight of the router z-loss.
        capacity_factor: training capacity factor of every MoE layer; None = dropless.
        eval_capacity_factor: capacity factor when ``train=False``; None = capacity_factor.
        min_capacity: lower bound on each expert's capacity.
        drop_policy: 'position' or 'probs' (which choices lose when an expert is full).
        value_head: add a scalar value head on the final hidden state (PPO critic).
        dtype: parameter dtype name: 'float32', 'bfloat16' or 'float16'.
        compute_dtype: dtype of activations, matmul inputs and the KV cache, one of the
            names above; None = ``dtype`` (a value equal to ``dtype`` is stored as None).
            When it differs from ``dtype`` the forward casts the floating-point parameters
            to it on entry, so the parameters themselves (and their gradients and optimizer
            state) stay in ``dtype``: mixed precision, e.g. float32 master weights computing
            in bfloat16. The MoE router and the value head read their weights in float32
            (not cast, when ``dtype`` is float32), from activations in the compute dtype;
            logits, attention softmaxes and normalisation statistics are float32 either way.
        remat: gradient checkpointing: in a forward that reads no cache (training and
            scoring forwards, a prefill) every decoder layer runs under ``jax.checkpoint``,
            so its backward pass recomputes the layer's activations from the layer's input
            instead of keeping them: one more forward's FLOPs for activation memory that no
            longer grows with the layer count beyond one [B, T, D] input per layer. A
            forward that is not differentiated compiles to the same program either way.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.001
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: str = "position"
    value_head: bool = False
    dtype: str = "float32"
    compute_dtype: str | None = None
    remat: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.generic):  # NumPy scalars as plain Python values
                object.__setattr__(self, field.name, value.item())
        for name in ("dtype", "compute_dtype"):
            if isinstance(getattr(self, name), np.dtype):
                object.__setattr__(self, name, getattr(self, name).name)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
        for name, optional in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not (_is_number(value) or (optional and value is None)):
                kind = "an int or float, or None" if optional else "an int or float"
                raise ValueError(
                    f"{name} must be {kind}, got {value!r} of type {type(value).__name__}"
                )
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        window = self.sliding_window
        if window is not None and (not _is_int(window) or window < 1):
            raise ValueError(f"sliding_window must be an integer >= 1 or None, got {window!r}")
        if window is not None and self.max_position_embeddings > window:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} is longer than "
                f"sliding_window={window}: sliding-window attention is not implemented, so "
                f"this model runs sequences of at most {window} tokens"
            )
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", heads)
        kv = self.num_key_value_heads
        if not _is_int(kv) or kv < 1 or heads % kv:
            raise ValueError(
                f"num_key_value_heads={kv!r} must be an integer >= 1 that divides "
                f"num_attention_heads={heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(
                    f"head_dim=None needs hidden_size={self.hidden_size} divisible by "
                    f"num_attention_heads={heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // heads)
        if not _is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim!r} must be an even integer >= 2 (rotary embeddings "
                f"rotate pairs of channels)"
            )
        if not _is_int(self.num_local_experts) or self.num_local_experts < 0:
            raise ValueError(
                f"num_local_experts must be an integer >= 0 (0 = dense MLP), got "
                f"{self.num_local_experts!r}"
            )
        if self.num_local_experts and not (
            _is_int(self.num_experts_per_tok)
            and 1 <= self.num_experts_per_tok <= self.num_local_experts
        ):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok!r} must be an integer in "
                f"[1, num_local_experts={self.num_local_experts}]"
            )
        if not (_is_int(self.num_experts_per_tok) and self.num_experts_per_tok >= 1):
            # Unused by a dense model, but kept in its records and in replace()'s copies.
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok!r} must be an integer >= 1"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if isinstance(self.rope_scaling, Mapping):
            block = {k: v for k, v in self.rope_scaling.items() if k not in ("rope_type", "type")}
            llama3 = _rope_type(self.rope_scaling, "llama3") == "llama3"
            if not llama3 or set(block) != set(ROPE_SCALING_KEYS):
                raise ValueError(
                    f"rope_scaling must have rope_type 'llama3' and exactly the keys "
                    f"{list(ROPE_SCALING_KEYS)}, got {dict(self.rope_scaling)!r}"
                )
            object.__setattr__(self, "rope_scaling", RopeScaling(**block))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"rope_scaling must be a RopeScaling, a mapping of its fields or None, got "
                f"{self.rope_scaling!r}"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name, none in (
            ("capacity_factor", "dropless"),
            ("eval_capacity_factor", "= capacity_factor"),
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"{name} must be > 0 or None ({none}), got {value!r}")
        if not _is_int(self.min_capacity) or self.min_capacity < 0:
            raise ValueError(f"min_capacity must be an integer >= 0, got {self.min_capacity!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(
                f"drop_policy={self.drop_policy!r} is not one of {list(DROP_POLICIES)}"
            )
        if self.dtype not in PARAM_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(PARAM_DTYPES)}")
        if self.compute_dtype is not None and self.compute_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r} is not one of {list(PARAM_DTYPES)} or "
                f"None (= dtype)"
            )
        if self.compute_dtype == self.dtype:  # one spelling per model (equal jit keys)
            object.__setattr__(self, "compute_dtype", None)

    @property
    def is_moe(self) -> bool:
        """True when every decoder layer has a Mixture-of-Experts block."""
        return self.num_local_experts > 0

    @property
    def router(self) -> MoERouterConfig | None:
        """The MoE router settings of every layer, or None for a dense model."""
        if not self.is_moe:
            return None
        return MoERouterConfig(
            num_experts=self.num_local_experts,
            top_k=self.num_experts_per_tok,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            drop_policy=self.drop_policy,
            aux_loss_coef=self.router_aux_loss_coef,
            z_loss_coef=self.router_z_loss_coef,
            normalize_top_k=True,
        )

    @property
    def param_dtype(self):
        """The parameter dtype as a NumPy/JAX dtype."""
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def activation_dtype(self):
        """The dtype the forward computes in (``compute_dtype``, else ``dtype``)."""
        import jax.numpy as jnp

        return jnp.dtype(self.compute_dtype or self.dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again).

        ``head_dim`` and ``num_key_value_heads`` were resolved to integers at construction
        and are kept as they are: pass them too (or None) when changing ``hidden_size`` or
        ``num_attention_heads``.
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Reads a Hugging Face Mixtral, Mistral, Llama, Qwen2 or Qwen3 ``config.json`` dict.

        Both the top-level ``rope_theta`` (transformers 4) and transformers 5's
        ``rope_parameters: {rope_theta, rope_type}`` are understood; the rotary types read are
        the default and, for Llama, Llama 3.1's 'llama3' scaling (:class:`RopeScaling`).
        Qwen2's query, key and value biases set ``qkv_bias``, Qwen3's query and key norms
        ``qk_norm``. Our own fields (capacity
        factor, value head, dtype ...) are not in config.json: pass them as ``overrides``.

        Args:
            hf_config: the parsed config.json.
            **overrides: ModelConfig fields that replace what the file says.

        Raises:
            TypeError: ``hf_config`` is not a mapping.
            ValueError: an unknown ``model_type``, a value of the wrong type, or a feature
                this model does not implement (non-SiLU activation, Llama's attention or MLP
                biases, other rotary scalings, a ``max_position_embeddings`` override longer
                than the config's ``sliding_window``), named by its key.

        A ``sliding_window`` shorter than ``max_position_embeddings`` (Mistral's default
        4096) is read as ``max_position_embeddings = sliding_window``: within the window,
        sliding-window attention is full attention, and the sampler and trainer refuse
        longer sequences, so no sequence runs where the two differ. The window is kept as
        ``sliding_window`` and written back by :meth:`to_hf_config`. Llama has no window:
        its config's ``sliding_window`` key is ignored, as transformers ignores it; nor do
        Qwen2 and Qwen3 unless ``use_sliding_window`` (or ``layer_types``) turns it on.
        Mixtral's ``router_jitter_noise`` (noise transformers multiplies into the router's
        input while training) is not applied: the trainer's forward must route as the
        sampler's did, or the log-prob ratios of RL updates would measure the noise.

        Example:
            >>> cfg = ModelConfig.from_hf_config({"model_type": "llama", "vocab_size": 64,
            ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            ...     "num_attention_heads": 4, "rope_parameters": {"rope_theta": 5e5,
            ...     "rope_type": "default"}})
            >>> cfg.rope_theta, cfg.num_key_value_heads
            (500000.0, 4)
        """
        if not isinstance(hf_config, Mapping):
            raise TypeError(
                f"hf_config must be a mapping (the parsed config.json object), got "
                f"{type(hf_config).__name__}"
            )
        model_type = hf_config.get("model_type")
        if not isinstance(model_type, str) or model_type not in HF_ARCHITECTURES:
            raise ValueError(
                f"config model_type={model_type!r} is not supported; supported: "
                f"{sorted(HF_ARCHITECTURES)}"
            )
        act = hf_config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' two names for x * sigmoid(x)
            raise ValueError(
                f"config hidden_act={act!r} is not supported; only 'silu' (also named 'swish')"
            )
        for key in ("attention_bias", "mlp_bias"):
            flag = hf_config.get(key)
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"config {key} must be true, false or null, got {flag!r}")
            if flag:
                raise ValueError(
                    f"config {key}=true is not supported (biases on every attention projection "
                    f"or in the MLP; of biases only Qwen2's on q/k/v are implemented)"
                )
        defaults = _HF_DEFAULTS[model_type]
        rope_theta, rope_scaling = _hf_rope(hf_config, defaults["rope_theta"], model_type)
        max_pos = hf_config.get("max_position_embeddings", defaults["max_position_embeddings"])
        # Llama has no window: transformers ignores a sliding_window key in its config. Qwen2
        # windows only with use_sliding_window (and then the layers from max_window_layers
        # on, which its layer_types lists).
        if model_type == "llama":
            window = None
        elif model_type in ("qwen2", "qwen3"):
            layer_types = hf_config.get("layer_types") or []
            windowed = hf_config.get("use_sliding_window", False) is True or (
                isinstance(layer_types, list) and "sliding_attention" in layer_types
            )
            window = hf_config.get("sliding_window") if windowed else None
        else:
            window = hf_config.get("sliding_window", defaults["sliding_window"])
        if window is not None and (not _is_int(window) or window < 1):
            raise ValueError(
                f"config sliding_window must be an integer >= 1 or null, got {window!r}"
            )
        if window is not None and _is_int(max_pos) and window < max_pos:
            # Windowed and full attention agree on sequences of at most `window` tokens:
            # the model is read as one for those, and longer ones are refused by the length
            # checks of the sampler and the trainer (nothing past the window runs unwindowed).
            wanted = overrides.get("max_position_embeddings", window)
            if _is_int(wanted) and wanted > window:
                raise ValueError(
                    f"max_position_embeddings={wanted} is longer than the config's "
                    f"sliding_window={window}: sliding-window attention is not implemented, "
                    f"so this model runs sequences of at most {window} tokens"
                )
            max_pos = window
        missing = [k for k in _HF_FIELDS[:5] if k not in hf_config]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        kwargs: dict[str, Any] = {
            k: hf_config[k] if k in hf_config else defaults[k]
            for k in _HF_FIELDS
            if k in hf_config or k in defaults
        }
        kwargs["rope_theta"] = float(rope_theta)
        kwargs["rope_scaling"] = rope_scaling
        kwargs["max_position_embeddings"] = max_pos
        kwargs["sliding_window"] = window
        kwargs["qkv_bias"] = model_type == "qwen2"  # Qwen2's q/k/v projections have biases
        kwargs["qk_norm"] = model_type == "qwen3"  # Qwen3 normalises each query and key head
        if model_type == "mixtral":
            kwargs["num_local_experts"] = hf_config.get(
                "num_local_experts", hf_config.get("num_experts", 8)
            )
            kwargs["num_experts_per_tok"] = hf_config.get("num_experts_per_tok", 2)
            kwargs["router_aux_loss_coef"] = hf_config.get("router_aux_loss_coef", 0.001)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self, model_type: str | None = None) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers 4 and 5 both read it).

        Args:
            model_type: 'mixtral', 'mistral', 'llama', 'qwen2' or 'qwen3'; default 'mixtral'
                for MoE models and, for dense ones, 'qwen2' with ``qkv_bias``, 'qwen3' with
                ``qk_norm``, else 'mistral' with a ``sliding_window`` and 'llama' without. A
                MoE model can only be written as 'mixtral', a model with q/k/v biases only as
                'qwen2' and one with query/key norms only as 'qwen3' (and the reverse).

        Raises:
            ValueError: an unknown model_type, a MoE config with a dense model_type, 'llama'
                for a model with a ``sliding_window`` (Llama has none), or a model_type whose
                attention does not match ``qkv_bias`` / ``qk_norm``.
        """
        if model_type is None:
            model_type = (
                "mixtral" if self.is_moe
                else "qwen2" if self.qkv_bias
                else "qwen3" if self.qk_norm
                else "mistral" if self.sliding_window
                else "llama"
            )  # fmt: skip
        if model_type not in HF_ARCHITECTURES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported: {sorted(HF_ARCHITECTURES)}"
            )
        if (model_type == "mixtral") != self.is_moe:
            raise ValueError(
                f"model_type={model_type!r} does not match num_local_experts="
                f"{self.num_local_experts}; use 'mixtral' for MoE and 'llama', 'mistral', "
                f"'qwen2' or 'qwen3' for dense models"
            )
        if (model_type == "qwen2") != self.qkv_bias:
            raise ValueError(
                f"model_type={model_type!r} does not match qkv_bias={self.qkv_bias}: only "
                f"'qwen2' has biases on the query, key and value projections"
            )
        if (model_type == "qwen3") != self.qk_norm:
            raise ValueError(
                f"model_type={model_type!r} does not match qk_norm={self.qk_norm}: only "
                f"'qwen3' normalises its query and key heads"
            )
        if model_type != "llama" and self.rope_scaling is not None:
            raise ValueError(
                f"model_type={model_type!r} has no 'llama3' rotary scaling; this model's "
                f"rope_scaling needs model_type='llama'"
            )
        if model_type == "llama" and self.sliding_window is not None:
            raise ValueError(
                f"model_type='llama' has no sliding window; this model's sliding_window="
                f"{self.sliding_window} needs model_type='mistral'"
            )
        out: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[model_type]],
            "model_type": model_type,
            "hidden_act": "silu",
        }
        out.update({k: getattr(self, k) for k in _HF_FIELDS})
        # Written both ways: transformers 5 reads rope_parameters, older releases rope_theta.
        out["rope_theta"] = float(self.rope_theta)
        scaling = self.rope_scaling
        rope = {"rope_type": "default"} if scaling is None else scaling.to_mapping()
        out["rope_parameters"] = {"rope_theta": float(self.rope_theta), **rope}
        if scaling is not None:  # transformers 4 reads a scaling from rope_scaling
            out["rope_scaling"] = rope
        out["torch_dtype"] = self.dtype
        if model_type == "mixtral":
            out["num_local_experts"] = self.num_local_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
            out["router_aux_loss_coef"] = self.router_aux_loss_coef
            out["sliding_window"] = self.sliding_window
        elif model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        elif model_type in ("qwen2", "qwen3"):
            # Every layer windowed when there is a window (from layer 0 on), none otherwise.
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
            out["max_window_layers"] = 0 if self.sliding_window else self.num_hidden_layers
            if model_type == "qwen3":
                out["attention_bias"] = False
        else:
            out["attention_bias"] = False
            out["mlp_bias"] = False
        return out


def _rope_type(block: Mapping[str, Any], default: Any) -> Any:
    """A rope block's type: ``rope_type``, or the older ``type``."""
    return block.get("rope_type", block.get("type", default))


def _hf_rope(
    hf_config: Mapping[str, Any], default: float, model_type: str
) -> tuple[float, RopeScaling | None]:
    """rope_theta and the rotary scaling from either config.json convention; rejects
    rotary types other than plain ('default') and Llama 3.1's ('llama3', Llama only)."""
    params = hf_config.get("rope_parameters")
    scaling = hf_config.get("rope_scaling")
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise ValueError(f"config {key} must be a mapping or null, got {block!r}")
        rope_type = _rope_type(block, "default")
        if rope_type not in ("default", "llama3") or (
            rope_type == "llama3" and model_type != "llama"
        ):
            supported = "'default' and, for Llama, 'llama3'"
            raise ValueError(
                f"config {key}.rope_type={rope_type!r} is not supported for model_type="
                f"{model_type!r}; the rotary embeddings implemented: {supported}"
            )
    # transformers' order: a (legacy) non-empty rope_scaling block replaces rope_parameters,
    # and the block's rope_theta wins over the top-level key.
    key, block = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    rope = None
    if isinstance(block, Mapping) and _rope_type(block, None) == "llama3":
        rope = RopeScaling.from_mapping(block, key)
    return _hf_rope_theta(hf_config, default, key, block), rope


def _hf_rope_theta(hf_config: Mapping[str, Any], default: float, key: str, block: Any) -> float:
    """rope_theta: the rope block's (``key``), else the top-level key, else ``default``."""
    if isinstance(block, Mapping) and "rope_theta" in block:
        key, theta = f"{key}.rope_theta", block["rope_theta"]
    else:
        key, theta = "rope_theta", hf_config.get("rope_theta", default)
    if not _is_number(theta):
        raise ValueError(f"config {key} must be a number, got {theta!r}")
    return float(theta)
