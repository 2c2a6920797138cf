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

# The training and decode layers need transformers and peft: loaded on first use, so the
# kernels import without them.
_TRAINING_NAMES = ("QAdapterConfig", "QAdapterModel", "QAdapterTrainer", "QAdapterTrainingArguments")
_DECODING_NAMES = ("QAdapterLogitsProcessor",)


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    if name in _DECODING_NAMES:
        from . import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'qadapter_kernels' has no attribute {name!r}")
