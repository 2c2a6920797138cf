"""The one way an op with a backward gets its CUDA kernels and autograd (pytorch/extension-cpp pattern).

The schema and the CPU kernel come from C++ (csrc/); here the Triton launchers are registered
for CUDA and the autograd formula for the dispatcher op. The same formula over the same
Triton launchers also serves CPU tensors through the Triton interpreter (tests only), which
the dispatcher cannot route to because CPU belongs to the C++ kernels.
"""
import torch
import triton
import triton.language as tl

from . import _C  # noqa: F401  (loads the op schemas and CPU kernels)

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


@triton.jit
def online_lse_update(running_max, running_sum, x, axis: tl.constexpr):
    """Folds a tile x into a running logsumexp along axis; -inf-only prefixes stay NaN-free."""
    new_max = tl.maximum(running_max, tl.max(x, axis))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    if axis == 0:
        tile_sum = tl.sum(tl.exp(x - shift), 0)
    else:
        tile_sum = tl.sum(tl.exp(x - shift[:, None]), 1)
    return new_max, running_sum * tl.exp(running_max - shift) + tile_sum
