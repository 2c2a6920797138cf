"""Loading the tokenizer (and base model) that evaluation and the baselines run on.

Stand-in until the shared loader (``qadapter_kernels.loading``, issue 11) is on this branch:
the lead swaps these two functions for it when merging.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["load_model_and_tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model folder, an adapter folder saved with one, or a GGUF file; pad = EOS when missing."""
    from transformers import AutoTokenizer

    path = Path(path)
    gguf = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if gguf and not (path.is_dir() and (path / "tokenizer_config.json").is_file()):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(path: str | os.PathLike):
    """(causal LM, tokenizer) of a model folder (safetensors) or a GGUF file."""
    from ..training import load_base_model

    return load_base_model(path), load_tokenizer(path)
