"""The model layer: ``QAdapterModel`` (a causal LM, its LoRA adapter, the fused loss, saving and loading),
its configuration, and the files and state of a saved adapter. Decoding (``QAdapterModel.generate``) is the
layer below (``decoding``); training, evaluation and serving build on this one."""
from .config import QAdapterConfig

__all__ = ["QADAPTER_CONFIG_NAME", "QAdapterConfig", "QAdapterModel"]


def __getattr__(name: str):
    # The model needs transformers and peft: loaded on first use, so that the config (and the command
    # line's parser, built from it) imports without them.
    if name in ("QADAPTER_CONFIG_NAME", "QAdapterModel"):
        from . import qadapter_model

        return getattr(qadapter_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
