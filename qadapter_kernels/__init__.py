"""qadapter-kernels: fused CPU (C++) and GPU (Triton) kernels for Q-Adapter.

Set ``TRITON_INTERPRET=1`` before importing this package to run the Triton kernels on CPU
tensors with ``backend="triton"`` (tests only).
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

from . import ops  # noqa: F401  (loads the op schemas, CPU kernels and CUDA registrations)
from . import reference
from . import api
from .api import *  # noqa: F401,F403  (the public functions: their list is api.__all__)
from .loading import embedded_model_path
from .outputs import QAdapterLossOutput
from .params import PolicyParams, QAdapterParams, RewardVariant, SamplingParams

__all__ = [
    *api.__all__,
    "PolicyParams",
    "QAdapterLossOutput",
    "QAdapterParams",
    "RewardVariant",
    "SamplingParams",
    "embedded_model_path",
    "reference",
]
__version__ = "0.1.0"


# The model, training and decode layers need transformers and peft: loaded on first use, so the
# kernels import without them. Each name comes from its own layer (the model needs no trainer).
def __getattr__(name: str):
    if name in ("QAdapterConfig", "QAdapterModel"):
        from . import model as layer
    elif name in ("QAdapterTrainer", "QAdapterTrainingArguments"):
        from . import training as layer
    elif name == "QAdapterLogitsProcessor":
        from . import decoding as layer
    else:
        raise AttributeError(f"module 'qadapter_kernels' has no attribute {name!r}")
    return getattr(layer, name)
