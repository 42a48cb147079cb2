"""The bench-tiny Mixtral the generation and GRPO-step benchmarks share (random weights).

Imported by the scripts in this directory as ``from bench_tiny import BENCH_TINY``: running
``python benchmarks/<script>.py`` puts this directory first on ``sys.path``.
"""

# Hugging Face MixtralConfig field names, so the same dict configures both sides.
BENCH_TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
)
MAX_POSITIONS = 512
