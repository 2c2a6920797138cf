"""Argument checks shared by the public entry points.

Shape, dtype and device checks are free (no device sync) and always run. Checks that must
read tensor values (action ranges, NaN/inf, an empty mask) cost one host sync; they run in
eager mode only, not while torch.compile traces or a CUDA graph is being captured.
"""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run and results come out in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_index_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {t.dtype}")


def check_mask_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bool and t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {t.dtype}")


def check_same_device(ref_name: str, device: torch.device, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)} ({what}), got {list(t.shape)}")


def check_scalar(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """A finite real in [low, high] (or (low, high] with low_open); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return value


def check_alphas(alpha_tilde: object, alpha_0: object) -> tuple[float, float]:
    """The customised policy's temperature (> 0) and base weight (>= 0), as floats."""
    return (check_scalar("alpha_tilde", alpha_tilde, 0.0, float("inf"), low_open=True),
            check_scalar("alpha_0", alpha_0, 0.0, float("inf")))


def value_checks_enabled(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def raise_on_flags(flags: dict[str, torch.Tensor]) -> None:
    """One host sync for several 0-dim bool tensors; raises ValueError with the first true one's message."""
    if not flags:
        return
    values = torch.stack([f.reshape(()) for f in flags.values()]).tolist()
    for message, bad in zip(flags, values):
        if bad:
            raise ValueError(message)
