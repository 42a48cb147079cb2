"""Where the PyTorch references run: ``--torch-device cpu`` (default) or ``cuda``.

Imported by the scripts in this directory as ``import torch_side`` (``python
benchmarks/<script>.py`` puts this directory first on ``sys.path``). On ``cuda`` the timed
torch calls end with ``torch.cuda.synchronize()`` (kernels run asynchronously), and float32
matrix products stay float32: TF32 is turned off, as JAX's side runs with
``JAX_DEFAULT_MATMUL_PRECISION=highest`` on a GPU (``benchmarks/run_all.sh`` sets it).
"""

from __future__ import annotations

import argparse
import os


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--torch-device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the PyTorch reference (default cpu)",
    )


def use_cores(threads: int) -> None:
    """Pins the whole process, both sides, to its first ``threads`` cores (call it before
    JAX's first computation: XLA:CPU sizes its thread pool from the cores it may use, and
    its flags no longer limit them); torch's own thread count is set by each script."""
    if threads < (os.cpu_count() or 1):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def prepare(device: str) -> None:
    """Checks the device is there; on cuda, keeps float32 matmuls in full float32."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--torch-device cuda: torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"# torch on {torch.cuda.get_device_name()}, TF32 off")


def sync(device: str) -> None:
    """Waits for the device's queued work (a no-op on cpu)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
