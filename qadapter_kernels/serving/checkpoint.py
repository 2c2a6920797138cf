"""A base model as vLLM loads it: a plain transformers folder with safetensors weights.

vLLM reads config.json + *.safetensors. The embedded SmolLM2 is a quantised GGUF file, so it is
dequantised once (fp32) into a cache folder and reused. The folder is written beside its final
name and renamed into place, so an interrupted export never leaves a half-written model behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from ..loading import find_model_files, load_base_model, load_tokenizer

__all__ = ["plain_checkpoint", "is_plain_checkpoint"]

CACHE_ENV = "QADAPTER_CACHE_DIR"


def is_plain_checkpoint(path: Path) -> bool:
    """True for a folder with a config.json and safetensors weights (what vLLM loads as is)."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "qadapter_kernels" / "vllm"


def plain_checkpoint(model_path: str | os.PathLike) -> Path:
    """``model_path`` itself when vLLM can load it, else its dequantised fp32 export (cached).

    Raises ValueError when the path is neither a transformers folder with safetensors weights
    nor a GGUF file (pickled ``.bin`` weights are refused: nothing is unpickled).
    """
    path = Path(model_path).expanduser().resolve()
    if is_plain_checkpoint(path):
        return path
    files = find_model_files(path)  # the package's one rule (several .gguf files are an error)
    if files.gguf is None:
        raise ValueError(f"base model {path}: not a transformers folder with safetensors weights, nor a .gguf file")
    gguf = files.path
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_root() / f"{gguf.stem}-{key}"
    if is_plain_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.saving-{uuid.uuid4().hex[:12]}"
    try:
        _export_gguf(gguf, staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process exported the same file first: keep its copy
            if not is_plain_checkpoint(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _export_gguf(gguf: Path, out: Path) -> None:
    """Dequantises ``gguf`` to fp32 and saves model + tokenizer as a plain folder at ``out``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    loaded = load_base_model(gguf)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a model built from the
    # same config without the quantisation marker.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(gguf).save_pretrained(str(out))
