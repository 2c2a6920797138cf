"""Which implementation serves a call (C++ on CPU, Triton on CUDA or the interpreter, or the
reference) and the dtype its reductions accumulate in."""
import os

import torch

BACKENDS = (None, "cpu", "triton", "torch")

# triton.jit picks the interpreter at decoration time, so this must be read before the kernel
# modules are imported.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that will run, or a ValueError saying why the requested one cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend is None:
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            return "triton"
        raise ValueError(f"no fused kernel for device {device}; pass backend='torch' for the reference")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        if device.type == "cpu" and not TRITON_INTERPRETED:
            raise ValueError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing qadapter_kernels"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA (or CPU with the interpreter), got {device}")
    return backend


def through_dispatcher(backend: str, device: torch.device) -> bool:
    """True when the call goes through torch.ops.qadapter (the registered C++/Triton kernels).

    The only other fused route is Triton on CPU tensors (the interpreter), which the dispatcher
    cannot reach because CPU already belongs to the C++ kernels.
    """
    return backend == "cpu" or (backend == "triton" and device.type == "cuda")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run and results come out in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
