"""Which backend serves a call (qadapter_kernels/ops/backend.py): the fused backends refuse devices
they do not serve, with an error naming the backend, for every public function."""
import pytest
import torch

import qadapter_kernels as qk
from qadapter_kernels.ops import backend as backend_module

from helpers import loss_args, rqv_args


@pytest.mark.parametrize("backend", [None, "cpu", "triton"])
@pytest.mark.parametrize("fn, make", [(qk.qadapter_loss, loss_args), (qk.residual_q_values, rqv_args)],
                         ids=["loss", "residual_q_values"])
def test_fused_backends_refuse_meta_tensors(fn, make, backend):
    """All tensors on one device that no fused kernel serves: a clear error naming the backend."""
    args = {k: torch.empty_like(v, device="meta") for k, v in make("cpu").items()}
    patterns = {None: r"no fused kernel for device meta; pass backend='torch'",
                "cpu": r"backend='cpu' needs CPU tensors, got tensors on meta",
                "triton": r"backend='triton' needs CUDA \(or CPU with the interpreter\), got meta"}
    with pytest.raises(ValueError, match=patterns[backend]):
        fn(**args, backend=backend)


@pytest.mark.parametrize("fn, make", [(qk.qadapter_loss, loss_args), (qk.residual_q_values, rqv_args)],
                         ids=["loss", "residual_q_values"])
def test_triton_on_cpu_needs_the_interpreter(fn, make, monkeypatch):
    monkeypatch.setattr(backend_module, "TRITON_INTERPRETED", False)
    with pytest.raises(ValueError, match=r"backend='triton' on CPU tensors needs the Triton interpreter"):
        fn(**make("cpu"), backend="triton")

