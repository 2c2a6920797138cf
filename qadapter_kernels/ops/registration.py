"""How an op gets its CUDA kernels and autograd (pytorch/extension-cpp pattern), and the registry
of every Triton kernel with the argument types it is compiled for.

The schema and the CPU kernel come from C++ (csrc/); here the Triton launchers are registered
for CUDA and the autograd formula for the dispatcher op. The same formula over the same
Triton launchers also serves CPU tensors through the Triton interpreter (tests only), which
the dispatcher cannot route to because CPU belongs to the C++ kernels.
"""
from dataclasses import dataclass, field

import torch

from . import native  # noqa: F401  (loads the op schemas and CPU kernels)

_LIB = torch.library.Library("qadapter", "IMPL")


def register_cuda(name: str, launcher) -> None:
    _LIB.impl(name, launcher, "CUDA")


def register_differentiable_op(name: str, triton_forward, triton_backward, setup_context, make_backward):
    """Registers `qadapter::{name}` and `{name}_backward` for CUDA plus autograd; returns the
    autograd.Function that runs the Triton launchers directly (for the interpreter)."""
    register_cuda(name, triton_forward)
    register_cuda(f"{name}_backward", triton_backward)
    torch.library.register_autograd(
        f"qadapter::{name}", make_backward(getattr(torch.ops.qadapter, f"{name}_backward")), setup_context=setup_context
    )
    return type(
        f"Interpreted_{name}",
        (torch.autograd.Function,),
        {
            "__doc__": f"qadapter::{name} as Triton kernels on CPU tensors through the interpreter (tests only).",
            "forward": staticmethod(triton_forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(make_backward(triton_backward)),
        },
    )


@dataclass(frozen=True)
class KernelVariant:
    """One compilation of a Triton kernel: a Triton type per runtime argument ("*bf16", "i32",
    "fp32"...) and a value per constexpr."""

    types: dict
    constexprs: dict = field(default_factory=dict)


TRITON_KERNELS: dict[str, tuple] = {}
"""Every Triton kernel of the package: qualified name -> (kernel, [KernelVariant, ...]). The
sm_90 compile check (tests/triton_compile_check.py) compiles each variant."""


def register_triton_kernel(kernel, variants: list[KernelVariant]) -> None:
    """Adds ``kernel`` and the variants it must compile for to ``TRITON_KERNELS``."""
    fn = getattr(kernel, "fn", kernel)
    TRITON_KERNELS[f"{fn.__module__}.{fn.__name__}"] = (kernel, list(variants))


def pointers(names, dtype: str) -> dict:
    """Triton pointer types for several arguments of one element type."""
    return {name: f"*{dtype}" for name in names}


def scalars(kind: str, *names: str) -> dict:
    """One scalar Triton type ("i32", "fp32") for several arguments."""
    return {name: kind for name in names}


FLOAT_TYPES = ("fp32", "bf16", "fp16", "fp64")
