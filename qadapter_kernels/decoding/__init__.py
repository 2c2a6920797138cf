"""The decode layer: Q-Adapter generation (``QAdapterModel.generate``) and a transformers logits processor."""
from .generate import generate, generate_text
from .logits_processor import QAdapterLogitsProcessor

__all__ = ["QAdapterLogitsProcessor", "generate", "generate_text"]
