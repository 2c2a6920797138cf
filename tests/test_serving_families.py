"""The vLLM plug-in serves the decoder families beside Llama: Qwen2 (q/k/v biases), Qwen3 (per-head q/k
norms, a head size apart from hidden / heads, tied embeddings) and Mistral.

Each is a tiny random model of that architecture made here (config -> random weights, with the biases
and norms the family has drawn away from their neutral initial values -> saved with SmolLM2's real
tokenizer and chat template), with a saved Q-Adapter of random LoRA. The plug-in's greedy completions
equal ``QAdapterModel.generate(temperature=0)`` token for token, and differ from the base model's (the
adapter matters). Without vLLM (its own venv, .ci/vllm_setup.sh) the tests skip; the base-config
checks run everywhere.
"""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from qadapter_kernels.serving.settings import SUPPORTED_MODEL_TYPES, check_base_config, engine_arguments
from serving_helpers import (ALPHA_0, ALPHA_TILDE, ENGINE_OPTIONS, FAMILIES, chat_prompts, make_family_model,
                             reference_greedy, save_adapter, vllm_greedy)


def test_every_served_family_is_tested_and_unusual_options_are_refused():
    assert set(FAMILIES) | {"llama"} == set(SUPPORTED_MODEL_TYPES)  # llama: tests/test_serving_vllm.py
    with pytest.raises(ValueError, match="llama_4_scaling"):
        check_base_config({"model_type": "mistral", "llama_4_scaling": {"beta": 0.1}})
    with pytest.raises(ValueError, match="'gemma2'"):
        check_base_config({"model_type": "gemma2"})


def test_the_model_class_builds_every_supported_family(vllm):
    from qadapter_kernels.serving.model import DECODER_MODELS

    assert set(DECODER_MODELS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_completions_of_each_family_equal_generate(vllm, smollm2_checkpoint, tmp_path, family):
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    base = make_family_model(family, tmp_path / "base", tokenizer)
    if family == "qwen2":
        assert any(n.endswith("q_proj.bias") for n, _ in base.named_parameters()), "Qwen2 must have q/k/v biases"
    if family == "qwen3":
        assert any("q_norm" in n for n, _ in base.named_parameters()), "Qwen3 must have q/k norms"
    qa = save_adapter(tmp_path / "adapter", base, scale=0.5, alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0,
                      base_model=str(tmp_path / "base")).eval()
    prompts, eos = chat_prompts(tokenizer), tokenizer.eos_token_id
    expected = reference_greedy(qa, prompts, eos)
    assert expected != reference_greedy(qa, prompts, eos, adapter=False), "not vacuous: the adapter must matter"
    llm = vllm.LLM(**engine_arguments(tmp_path / "adapter"), **ENGINE_OPTIONS)
    try:
        assert vllm_greedy(llm, prompts, eos) == expected
    finally:
        llm.llm_engine.engine_core.shutdown()
