"""Loads the C++ extension built for the widest vector ISA this CPU supports, once per process.

setup.py compiles csrc/ three times on x86-64 (``_C_DEFAULT``, ``_C_AVX2``, ``_C_AVX512``); each
module holds the op schemas and every CPU kernel. The level is the one torch picks for its own
kernels (``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``), or
``QADAPTER_CPU_CAPABILITY`` to force a lower one. Importing two of them would register the CPU
kernels twice, so only this module imports them.

It also owns the one kept output block of the CPU kernels (see ``set_cached_memory_limit``).
"""
import importlib
import os

import torch

CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
CAPABILITY_ENV = "QADAPTER_CPU_CAPABILITY"
CACHE_LIMIT_ENV = "QADAPTER_OUTPUT_CACHE_MB"
DEFAULT_CACHE_LIMIT_MB = 1024


def _torch_capability() -> str:
    # torch also reports ISAs of other architectures (VSX, ZVECTOR, SVE256): DEFAULT is ours there.
    level = torch.backends.cpu.get_cpu_capability()
    return level if level in CAPABILITIES else "DEFAULT"


def _requested_capability() -> str:
    supported = _torch_capability()
    requested = os.environ.get(CAPABILITY_ENV, "").strip().upper()
    if not requested:
        return supported
    if requested not in CAPABILITIES:
        raise ValueError(f"{CAPABILITY_ENV} must be one of {', '.join(CAPABILITIES)}, got {requested!r}")
    if CAPABILITIES.index(requested) > CAPABILITIES.index(supported):
        raise ValueError(
            f"{CAPABILITY_ENV}={requested}, but this CPU runs at most {supported} "
            "(as torch detects it, ATEN_CPU_CAPABILITY included)")
    return requested


def _load():
    wanted = _requested_capability()
    # On architectures other than x86-64 only DEFAULT is built: take the widest built at or below.
    for level in reversed(CAPABILITIES[: CAPABILITIES.index(wanted) + 1]):
        try:
            return importlib.import_module(f"{__package__}._C_{level}")
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}._C_{level}":
                raise
    raise ImportError(
        "qadapter_kernels: no compiled CPU kernels found (qadapter_kernels/ops/_C_*.so); "
        "install the package with `pip install --no-build-isolation .` so that they are built")


_module = _load()


def _cache_limit_from_env() -> int:
    text = os.environ.get(CACHE_LIMIT_ENV, str(DEFAULT_CACHE_LIMIT_MB))
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"{CACHE_LIMIT_ENV} must be a number of MiB (0 turns the cache off), got {text!r}") from None
    if not megabytes >= 0:
        raise ValueError(f"{CACHE_LIMIT_ENV} must be >= 0 MiB, got {text!r}")
    return int(megabytes * 2**20)


_module.set_cached_output_limit(_cache_limit_from_env())


def cpu_capability() -> str:
    """The vector ISA of the CPU kernels in use: ``"DEFAULT"``, ``"AVX2"`` or ``"AVX512"``."""
    return _module.capability()


def cached_memory_bytes() -> int:
    """Bytes held by the kept output block of the CPU kernels (0 when none is kept).

    The loss's backward writes dQ, an ``[N, V]`` tensor, into a fresh block every step; from 32 MiB
    up the freed block is kept and handed to the next output of the same size, which saves the
    kernel's zeroing of fresh pages (about 40% of the backward at 2x512x32000). At most one block is
    kept, up to the limit of ``set_cached_memory_limit``. torch's memory tools count it as freed.
    """
    return _module.cached_output_bytes()


def release_cached_memory() -> int:
    """Returns the kept output block to the system; the number of bytes released."""
    return _module.release_cached_output()


def set_cached_memory_limit(megabytes: float) -> None:
    """Keeps freed output blocks only up to ``megabytes`` MiB (0: never keep one); a kept block
    larger than the new limit is released at once. The initial limit is ``QADAPTER_OUTPUT_CACHE_MB``
    (default 1024)."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or not megabytes >= 0:
        raise ValueError(f"megabytes must be a number >= 0, got {megabytes!r}")
    _module.set_cached_output_limit(int(megabytes * 2**20))


def cached_memory_limit_bytes() -> int:
    """The largest output block that may be kept, in bytes."""
    return _module.cached_output_limit()
