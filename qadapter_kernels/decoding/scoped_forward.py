"""Module forwards that change only inside a ``with`` block of the current thread (or asyncio task).

Decoding swaps how some layers compute (``cpu_linear``: a faster few-row product; ``lora_rows``: rows
routed through their adapters by slicing). Setting ``module.forward`` for the length of a call would
reach every thread using the model: two threads decoding with different adapters would run each
other's routing. Instead a forward is installed once per module and stays; it reads a ``ContextVar``
(per thread and per task) holding what the calls now running in this context asked of that module,
and without an entry computes exactly what the module's class does.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

__all__ = ["ModuleScope", "install_forward"]


def install_forward(module: torch.nn.Module, forward: Callable[..., Any]) -> bool:
    """Makes ``forward`` (a function of ``(module, ...)``) the module's forward, once.

    True when it is (now or already); False when the module has a forward of someone else's set on
    the instance, which is left alone. Two threads installing the same function at once both win.
    """
    current = vars(module).get("forward")
    if current is None:
        module.forward = types.MethodType(forward, module)
        return True
    return getattr(current, "__func__", None) is forward


class ModuleScope:
    """For each module, the value the innermost enclosing ``entered`` block of this context gave it."""

    def __init__(self, name: str):
        self._values: ContextVar[dict[int, Any]] = ContextVar(name, default={})

    def get(self, module: torch.nn.Module) -> Any:
        """``module``'s value in this context, or None outside every block naming it."""
        return self._values.get().get(id(module))

    @contextlib.contextmanager
    def entered(self, modules: Iterable[torch.nn.Module], value: Any) -> Iterator[None]:
        """Within the block, in this context only, each of ``modules`` has ``value``."""
        # Keyed by id: the modules are alive while the block that names them runs.
        token = self._values.set({**self._values.get(), **{id(m): value for m in modules}})
        try:
            yield
        finally:
            self._values.reset(token)
