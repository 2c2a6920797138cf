"""The decode layer: Q-Adapter generation (``QAdapterModel.generate``) and a transformers logits processor."""
from .generate import encode_prompt_as_trained, generate, generate_text
from .logits_processor import QAdapterLogitsProcessor

__all__ = ["QAdapterLogitsProcessor", "encode_prompt_as_trained", "generate", "generate_text"]
