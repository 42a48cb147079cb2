"""Writes the tiny Hugging Face checkpoints and reference logits under tests/data/hf/.

Needs torch and transformers (the ``bench`` extra), which the tests themselves never import:

    python tests/data/make_hf_fixture.py

Outputs (each directory loadable with ``AutoModelForCausalLM.from_pretrained``):
    hf/mixtral/        MixtralForCausalLM as ``save_pretrained`` writes it (per-expert keys
                       ``block_sparse_moe.experts.M.w1/w2/w3.weight``), untied LM head.
    hf/mixtral_fused/  the same weights under transformers 5's in-memory names
                       (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj``
                       [E, D, F], ``mlp.gate.weight``), i.e. the model's ``state_dict()``
                       written directly with safetensors.
    hf/llama/          LlamaForCausalLM with tied embeddings.
    hf/llama3_rope/    LlamaForCausalLM with Llama 3.1's rotary scaling (rope_type 'llama3'),
                       its bands chosen so that each of the rule's three cases holds for
                       some frequency, and positions far enough apart for them to matter.
    hf/qwen2/          Qwen2ForCausalLM (biases on q/k/v, drawn at random: transformers starts
                       them at zero, where a parity test could not see them), tied embeddings.
    hf/qwen3/          Qwen3ForCausalLM (an RMSNorm of each query and key head, its gains drawn
                       at random around 1), head_dim 16 unlike hidden / heads = 8, untied.
    hf/<name>/reference.npz: input_ids, attention_mask, position_ids [B, T] and the
                       float32 logits [B, T, V] transformers computes for them. Row 0 is
                       unpadded, row 1 is left-padded by 3 tokens.

Weights are drawn with a larger ``initializer_range`` than the default so that logits and
expert choices differ clearly between tokens (a parity test must be able to fail).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent / "hf"
SEQ, PAD = 10, 3
# The dense fixtures' sizes (a large initializer_range: see the module docstring).
DENSE_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                   rms_norm_eps=1e-6)  # fmt: skip


def _inputs(vocab: int, position_stride: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    ids = rng.integers(0, vocab, size=(2, SEQ)).astype(np.int64)
    mask = np.ones((2, SEQ), np.int64)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * position_stride
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _reference(model, out_dir: pathlib.Path, vocab: int, position_stride: int = 1) -> None:
    inputs = _inputs(vocab, position_stride)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    np.savez(
        out_dir / "reference.npz",
        **{k: v.astype(np.int32) for k, v in inputs.items()},
        logits=out.logits.float().numpy(),
    )


def _save(model, name: str) -> pathlib.Path:
    out_dir = HERE / name
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    return out_dir


def make_mixtral() -> None:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        initializer_range=0.2,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    out_dir = _save(model, "mixtral")
    _reference(model, out_dir, config.vocab_size)

    fused_dir = HERE / "mixtral_fused"
    shutil.rmtree(fused_dir, ignore_errors=True)
    fused_dir.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, fused_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(out_dir / "config.json", fused_dir / "config.json")
    shutil.copy(out_dir / "reference.npz", fused_dir / "reference.npz")
    # The fused file must load in transformers too and give the same logits.
    again = transformers.MixtralForCausalLM.from_pretrained(fused_dir).eval()
    inputs = {k: torch.from_numpy(v) for k, v in _inputs(config.vocab_size).items()}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits)


def _make_dense(name: str, seed: int, model_class, config, *, draw=None, stride: int = 1):
    """A dense fixture: ``model_class(config)`` under ``seed``, ``draw(model)`` redrawing the
    parts the default initialisation leaves constant, saved with its reference logits."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if draw is not None:
        with torch.no_grad():
            draw(model)
    out_dir = _save(model, name)
    _reference(model, out_dir, config.vocab_size, position_stride=stride)


def make_llama() -> None:
    config = transformers.LlamaConfig(
        **DENSE_SIZES,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
        tie_word_embeddings=True,
    )
    _make_dense("llama", 1, transformers.LlamaForCausalLM, config)


def make_llama3_rope() -> None:
    # head_dim 8, theta 500: wavelengths 6.3, 29.8, 140 and 664 against the bands 16 and 64
    # (original length 64 / high and low frequency factors 4 and 1).
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    config = transformers.LlamaConfig(
        **DENSE_SIZES,
        max_position_embeddings=512,
        rope_parameters={"rope_theta": 500.0, **scaling},
        tie_word_embeddings=True,
    )
    _make_dense("llama3_rope", 2, transformers.LlamaForCausalLM, config, stride=37)


def make_qwen2() -> None:
    config = transformers.Qwen2Config(
        **DENSE_SIZES,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 1000.0, "rope_type": "default"},
        tie_word_embeddings=True,
    )

    def draw(model):  # the q/k/v biases, which start at zero
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)

    _make_dense("qwen2", 3, transformers.Qwen2ForCausalLM, config, draw=draw)


def make_qwen3() -> None:
    config = transformers.Qwen3Config(
        **DENSE_SIZES,
        head_dim=16,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 1000.0, "rope_type": "default"},
        tie_word_embeddings=False,
    )

    def draw(model):  # the query/key norm gains, which start at one
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.5)

    _make_dense("qwen3", 4, transformers.Qwen3ForCausalLM, config, draw=draw)


def main() -> None:
    make_mixtral()
    make_llama()
    make_llama3_rope()
    make_qwen2()
    make_qwen3()
    for path in sorted(HERE.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(HERE)}  {path.stat().st_size} bytes")
    for name in ("mixtral", "mixtral_fused", "llama", "llama3_rope", "qwen2", "qwen3"):
        keys = json.loads((HERE / name / "config.json").read_text()).get("architectures")
        print(name, keys, transformers.__version__)


if __name__ == "__main__":
    main()
