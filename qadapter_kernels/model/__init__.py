"""The model layer: ``QAdapterModel`` (a causal LM, its LoRA adapter, the fused loss, saving and loading),
its configuration, and the files and state of a saved adapter. Decoding (``QAdapterModel.generate``) is the
layer below (``decoding``); training, evaluation and serving build on this one."""
from .config import QAdapterConfig
from .qadapter_model import QADAPTER_CONFIG_NAME, QAdapterModel

__all__ = ["QADAPTER_CONFIG_NAME", "QAdapterConfig", "QAdapterModel"]
