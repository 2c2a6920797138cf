"""Shared by the vLLM serving tests: small bounded engines, a saved Q-Adapter with a visible effect,
and greedy decoding both ways (``QAdapterModel.generate`` and a vLLM engine), cut at EOS."""
from __future__ import annotations

import torch
from transformers import MistralConfig, Qwen2Config, Qwen3Config

from qadapter_kernels.model import QAdapterConfig, QAdapterModel

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERVER_START_S = 600
# Small, bounded engines: 1 GiB of KV cache, no thread pinning (the CPUs are shared), the engine
# in this process (no engine subprocess to leak), no compilation (minutes on 2 cores).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ENGINE_OPTIONS = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=16, seed=0)
PROMPTS = ["Hi", "What is the capital of France?",
           "Write two sentences about the sea at night, the wind, and a small boat far from the shore."]
MAX_NEW_TOKENS = 12
ALPHA_TILDE, ALPHA_0 = 0.8, 0.3


def save_adapter(folder, causal_lm, target_modules=ALL_MODULES, seed: int = 0, scale: float = 0.02,
                 **config) -> QAdapterModel:
    """A Q-Adapter with random LoRA B (a fresh one has B = 0, i.e. no effect), saved to ``folder``.

    peft draws LoRA A from the global generator: seeded here, or an unlucky draw (1 run in 3 or so)
    leaves every greedy token of the small adapter unchanged and the equality tests vacuous.
    """
    torch.manual_seed(seed)
    qa = QAdapterModel(causal_lm, QAdapterConfig(target_modules=tuple(target_modules), **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in qa.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    qa.save_pretrained(folder)
    return qa


def chat_prompts(tokenizer) -> list[list[int]]:
    """``PROMPTS`` as chats (instruct models often answer a bare prompt with EOS at once, adapter or not)."""
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for p in PROMPTS]


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def reference_greedy(qa: QAdapterModel, prompts: list[list[int]], eos: int, adapter: bool = True) -> list[list[int]]:
    """``QAdapterModel.generate(temperature=0)`` on the left-padded batch, new tokens per prompt."""
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = qa.generate(ids, mask, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, eos_token_id=eos,
                          pad_token_id=eos, adapter=adapter)
    return [until_eos(row[width:].tolist(), eos) for row in out]


def vllm_greedy_routed(llm, prompts: list[list[int]], eos: int, routes: dict) -> dict[str, list[list[int]]]:
    """Per route name, the greedy tokens of every prompt, all routes' requests interleaved in ONE generate
    call (one mixed batch); ``routes``: name -> the request's ``extra_args`` (None: the engine's default)."""
    from vllm import SamplingParams

    requests = [(route, i) for i in range(len(prompts)) for route in routes]
    outputs = llm.generate([{"prompt_token_ids": prompts[i]} for _, i in requests],
                           [SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, extra_args=routes[route])
                            for route, _ in requests], use_tqdm=False)
    tokens = {route: [None] * len(prompts) for route in routes}
    for (route, i), output in zip(requests, outputs):
        tokens[route][i] = until_eos(list(output.outputs[0].token_ids), eos)
    return tokens


def vllm_greedy(llm, prompts: list[list[int]], eos: int) -> list[list[int]]:
    from vllm import SamplingParams

    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)
    return [until_eos(list(o.outputs[0].token_ids), eos) for o in outputs]


# Tiny random models of the families beside Llama (``make_family_model``). head_dim 32: vLLM's CPU
# attention has kernels for some head sizes only (16 is refused).
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)
FAMILIES = {
    "qwen2": lambda vocab: Qwen2Config(**SHAPE, vocab_size=vocab, tie_word_embeddings=False),
    "qwen3": lambda vocab: Qwen3Config(**SHAPE, vocab_size=vocab, head_dim=64, tie_word_embeddings=True),
    "mistral": lambda vocab: MistralConfig(**SHAPE, vocab_size=vocab, head_dim=32, tie_word_embeddings=False),
}


def make_family_model(family: str, folder, tokenizer, **shape) -> torch.nn.Module:
    """A random ``family`` causal LM (``FAMILIES``, config fields in ``shape`` changed) saved to ``folder`` with
    ``tokenizer``: biases and norm weights drawn, so that loading them wrongly (or not at all) changes the tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = FAMILIES[family](len(tokenizer))
    for field, value in shape.items():
        setattr(config, field, value)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
