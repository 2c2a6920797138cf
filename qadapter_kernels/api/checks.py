"""Argument checks shared by the public entry points.

Shape, dtype and device checks are free (no device sync) and always run. Checks that must
read tensor values (action ranges, NaN/inf, an empty mask) cost one host sync; they run in
eager mode only, not while torch.compile traces or a CUDA graph is being captured.
"""
import os

import torch


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
TILE_BUDGET_VARIABLE = "QADAPTER_TILE_BUDGET_MB"
DEFAULT_TILE_BUDGET_MB = 64.0


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


def check_logits_pair(q_logits: object, base_logits: object) -> None:
    """Both logits float tensors of one shape, dtype and device, with a non-empty vocabulary."""
    check_float_tensor("q_logits", q_logits)
    check_float_tensor("base_logits", base_logits)
    check_same_device("q_logits", q_logits.device, base_logits=base_logits)
    check_shape("base_logits", base_logits, tuple(q_logits.shape), "the shape of q_logits")
    if base_logits.dtype != q_logits.dtype:
        raise TypeError(f"base_logits dtype {base_logits.dtype} differs from q_logits dtype {q_logits.dtype}")
    if q_logits.dim() < 1 or q_logits.shape[-1] == 0:
        raise ValueError(f"q_logits must be [..., V] with V >= 1, got {list(q_logits.shape)}")


def check_hidden_and_head(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, layouts=None) -> None:
    """Float hidden states of one shape, an LM head [V, H] (+ bias [V]) matching them, one dtype and device.

    layouts(H) -> (allowed shapes of adapter_hidden, their description): the caller's layout,
    checked before H is compared with the head's, so a wrong H is reported against it.
    """
    for name, t in (("adapter_hidden", adapter_hidden), ("base_hidden", base_hidden),
                    ("lm_head_weight", lm_head_weight)):
        check_float_tensor(name, t)
    device = adapter_hidden.device
    check_same_device("adapter_hidden", device, base_hidden=base_hidden, lm_head_weight=lm_head_weight)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[0] == 0:
        raise ValueError(f"lm_head_weight must be [V, H] with V >= 1, got {list(lm_head_weight.shape)}")
    hidden = lm_head_weight.shape[1]
    if layouts is not None:
        shapes, description = layouts(hidden)
        if tuple(adapter_hidden.shape) not in shapes:
            raise ValueError(f"adapter_hidden must be {description}, got {list(adapter_hidden.shape)}")
    if adapter_hidden.shape[-1] != hidden:
        raise ValueError(f"lm_head_weight must be [V, H] with H = {adapter_hidden.shape[-1]} (the last dimension "
                         f"of adapter_hidden), got {list(lm_head_weight.shape)}")
    check_shape("base_hidden", base_hidden, tuple(adapter_hidden.shape), "the shape of adapter_hidden")
    if lm_head_bias is not None:
        check_float_tensor("lm_head_bias", lm_head_bias)
        check_same_device("adapter_hidden", device, lm_head_bias=lm_head_bias)
        check_shape("lm_head_bias", lm_head_bias, (lm_head_weight.shape[0],), "[V] of lm_head_weight")
    for name, t in (("base_hidden", base_hidden), ("lm_head_weight", lm_head_weight), ("lm_head_bias", lm_head_bias)):
        if t is not None and t.dtype != adapter_hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from adapter_hidden dtype {adapter_hidden.dtype}")


def tile_budget(tile_budget_mb: object) -> float:
    """The scratch budget in MiB: the argument, else $QADAPTER_TILE_BUDGET_MB, else 64.

    The variable is read at each call, so a malformed value is reported where it is used
    (naming the variable), never when the package is imported.
    """
    if tile_budget_mb is not None:
        if isinstance(tile_budget_mb, bool) or not isinstance(tile_budget_mb, (int, float)) or not tile_budget_mb > 0:
            raise ValueError(f"tile_budget_mb must be a positive number, got {tile_budget_mb!r}")
        return float(tile_budget_mb)
    text = os.environ.get(TILE_BUDGET_VARIABLE)
    if text is None or not text.strip():
        return DEFAULT_TILE_BUDGET_MB
    try:
        budget = float(text)
    except ValueError:
        budget = float("nan")
    if not 0 < budget < float("inf"):
        raise ValueError(f"the environment variable {TILE_BUDGET_VARIABLE} must be a positive number of MiB, "
                         f"got {text!r}")
    return budget


def value_checks_enabled(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# With alpha_0 = 0 a -inf base logit still enters y = (Q + alpha_0 L) / alpha_tilde as 0 * -inf = NaN.
ZERO_ALPHA_0_NOTE = (" (alpha_0 = 0 with a -inf base logit also gives 0 * -inf = NaN: mask with a finite value "
                     "such as torch.finfo(dtype).min instead)")


def nonfinite_message(source: str, alpha_0: float) -> str:
    """The message of the non-finite-logits check, naming the one cause the inputs do not show."""
    return (f"{source}: the logits hold NaN or +inf, or a row with no finite entry"
            f"{ZERO_ALPHA_0_NOTE if alpha_0 == 0 else ''}")


def finite_values_flag(values: torch.Tensor, source: str, alpha_0: float) -> dict[str, torch.Tensor]:
    """Flag: ``values`` (finite for finite logits with a finite entry per row) hold NaN or +-inf."""
    return {nonfinite_message(source, alpha_0): ~torch.isfinite(values).all()}


def guard_actions(actions: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(actions with every id outside [0, vocab) replaced by an id inside, where they were outside).

    The kernels never see an out-of-range id, so every backend (the reference's gather too)
    behaves alike without a host sync: the caller sets q_taken to NaN where an id was bad, and
    its gradient there is zero.
    """
    safe = actions.clamp(0, vocab - 1)
    return safe, safe != actions


def ids_in_range_flag(name: str, ids: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
    return {f"{name} must be token ids in [0, {vocab})": ((ids < 0) | (ids >= vocab)).any()}


def read_checks(checks: list[torch.Tensor]) -> list:
    """The values of several 0-dim tensors (bool or integer) in one host sync: ``.item()`` for one (a
    stack would cost more than the check itself on a decode step), one stacked read for more."""
    if len(checks) == 1:
        return [checks[0].item()]
    return torch.stack([c.reshape(()).long() for c in checks]).tolist()


def raise_on_flags(flags: dict[str, torch.Tensor]) -> None:
    """One host sync for several 0-dim bool tensors; raises ValueError with the first true one's message."""
    if not flags:
        return
    for message, bad in zip(flags, read_checks(list(flags.values()))):
        if bad:
            raise ValueError(message)
