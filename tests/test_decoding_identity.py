"""generate on the combined hidden state h_c, and its two-logits fallback where the identity fails.

Decoding applies the LM head once, to h_c = (h_q + alpha_0 h_b) / alpha_tilde (docs/DESIGN.md §1 (the logit identity)).
That is exact only when the logits are the shared head applied alone: a model that softcaps or
scales its logits, or a LoRA on the head, must be decoded from both streams' real logits rows.
Each case is checked against the naive reference (two uncached forwards per token through the
whole causal LM, combined in fp64, argmax).
"""
import importlib

import peft
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import qadapter_kernels as qk
from qadapter_kernels import reference
from qadapter_kernels.logit_identity import identity_break, post_head_logit_change
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from qadapter_kernels.params import PLAIN_POLICY, PolicyParams

from test_decoding import ALPHA_0, ALPHA_TILDE, EOS, PAD, PROMPTS, naive_greedy, tiny_qadapter

# The module, not the function that qadapter_kernels.decoding re-exports under the same name.
generate_module = importlib.import_module("qadapter_kernels.decoding.generate")
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS)


def with_random_lora(model: QAdapterModel, seed: int = 1) -> QAdapterModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


def softcapped_qadapter() -> QAdapterModel:
    """A tiny Gemma 2 whose logits are softcapped hard (cap 2): the identity is far off.

    The training layer refuses such a model (its fused loss applies the head alone), so the cap is
    switched on after wrapping, as a model loaded for decoding only might have it."""
    torch.manual_seed(0)
    config = Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=None, attn_logit_softcapping=None,
                          initializer_range=0.2, query_pre_attn_scalar=8, sliding_window=64)
    qconfig = QAdapterConfig(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0)
    model = with_random_lora(QAdapterModel(Gemma2ForCausalLM(config), qconfig))
    model.base_causal_lm.config.final_logit_softcapping = 2.0
    return model


def lora_head_qadapter() -> QAdapterModel:
    """A tiny Llama whose LoRA also adapts lm_head: the two streams use different heads."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False, initializer_range=0.2))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], task_type="CAUSAL_LM")
    qconfig = QAdapterConfig(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0)
    return with_random_lora(QAdapterModel(peft.get_peft_model(llama, lora), qconfig))


FALLBACKS = {"softcapping": (softcapped_qadapter, "final_logit_softcapping"),
             "lora-on-lm_head": (lora_head_qadapter, "LM head is a")}


def test_a_plain_shared_head_decodes_on_h_c():
    assert identity_break(tiny_qadapter()) is None


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("logits_scaling", 4.0),
                                          ("logit_scale", 0.0625)])
def test_post_head_config_fields_break_the_identity(field, value):
    model = tiny_qadapter()
    assert identity_break(model) is None
    setattr(model.base_causal_lm.config, field, value)
    assert field in identity_break(model)
    setattr(model.base_causal_lm.config, field, None)
    assert identity_break(model) is None


def test_post_head_settings_are_read_from_config_objects_dicts_and_text_config():
    config = LlamaConfig(**SMALL)
    assert post_head_logit_change(config) is None
    config.logits_scaling = 4.0
    assert post_head_logit_change(config) == ("logits_scaling", 4.0)
    assert post_head_logit_change({"logit_scale": 0.5}) == ("logit_scale", 0.5)  # a config.json, as serving reads it
    assert post_head_logit_change({"text_config": {"final_logit_softcapping": 30.0}}) == ("final_logit_softcapping", 30.0)
    assert post_head_logit_change({"logit_scale": 1.0, "final_logit_softcapping": None, "text_config": None}) is None


def test_the_head_on_h_c_with_its_bias_is_the_customised_policy():
    gen = torch.Generator().manual_seed(0)
    adapter_hidden, base_hidden = (torch.randn(5, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    weight, bias = torch.randn(40, 16, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen,
                                                                                       dtype=torch.float64)
    policy = PolicyParams(alpha_tilde=0.7, alpha_0=0.4)
    on_h_c = torch.nn.functional.linear(policy.combined_hidden(adapter_hidden, base_hidden), weight,
                                        policy.combined_bias(bias))
    expected = reference.combined_logits(torch.nn.functional.linear(adapter_hidden, weight, bias),
                                         torch.nn.functional.linear(base_hidden, weight, bias), policy)
    torch.testing.assert_close(torch.log_softmax(on_h_c, -1), torch.log_softmax(expected, -1), rtol=1e-12, atol=1e-12)
    # With the adapter off (Q = L) the policy is the base model's own: its logits, unscaled.
    assert policy.for_adapter(True) is policy and policy.for_adapter(False) == PLAIN_POLICY
    base_logits = torch.nn.functional.linear(base_hidden, weight, bias)
    torch.testing.assert_close(torch.log_softmax(reference.combined_logits(base_logits, base_logits, PLAIN_POLICY), -1),
                               torch.log_softmax(base_logits, -1), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def real_logits_draws(model: QAdapterModel, prompt: list[int], rows: int, seed: int) -> torch.Tensor:
    """First tokens of ``rows`` copies of ``prompt`` drawn from the whole causal LM's two logits rows,
    with the uniforms ``generate`` draws from the same seed."""
    ids = torch.tensor([prompt])
    q = model.base_causal_lm(ids).logits[:, -1]
    with model.peft_model.disable_adapter():
        base = model.base_causal_lm(ids).logits[:, -1]
    return qk.combined_sample(q.expand(rows, -1), base.expand(rows, -1), alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0,
                              generator=seed)


def first_draws(model: QAdapterModel, prompt: list[int], rows: int, seed: int, **kwargs) -> torch.Tensor:
    return model.generate(torch.tensor([prompt] * rows), max_new_tokens=1, eos_token_id=[], generator=seed,
                          **kwargs)[:, -1]


@pytest.mark.parametrize("case", list(FALLBACKS))
@pytest.mark.parametrize("two_pass", [False, True], ids=["mixed_batch", "two_pass"])
def test_fallback_decodes_the_real_logits_and_says_why(case, two_pass):
    build, reason = FALLBACKS[case]
    model = build()
    prompt = PROMPTS[1]
    with pytest.warns(UserWarning, match=reason):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10, temperature=0, eos_token_id=[],
                             two_pass=two_pass)
    assert out[0, len(prompt):].tolist() == naive_greedy(model, prompt, 10)
    with pytest.warns(UserWarning, match=reason):
        drawn = first_draws(model, prompt, 64, seed=5, two_pass=two_pass)
    assert torch.equal(drawn, real_logits_draws(model, prompt, 64, seed=5))


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_h_c_would_decode_these_models_wrongly(case, monkeypatch):
    """The fallback is needed: forced onto h_c, these models draw other tokens than their real logits give."""
    build, _ = FALLBACKS[case]
    model = build()
    monkeypatch.setattr(generate_module, "identity_break", lambda model: None)
    prompt = PROMPTS[1]
    assert not torch.equal(first_draws(model, prompt, 64, seed=5), real_logits_draws(model, prompt, 64, seed=5))


def test_h_c_and_two_heads_draw_the_same_tokens_for_the_same_uniforms():
    """Default (one head product on h_c) against two_pass (two forwards and two head products per token)."""
    model = tiny_qadapter()
    ids = torch.tensor([PROMPTS[2]] * 6)
    kwargs = dict(max_new_tokens=12, temperature=torch.tensor([0.0, 0.6, 1.0, 1.0, 1.4, 0.9]), top_k=30, top_p=0.95,
                  min_p=0.01, eos_token_id=[], generator=11)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, two_pass=True, **kwargs))


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_fallback_log_probs_are_the_real_logits_policy(case):
    """return_log_probs where the identity breaks: log pi~ of the whole causal LM's two logits rows."""
    model = FALLBACKS[case][0]()
    prompt = PROMPTS[1]
    with pytest.warns(UserWarning, match=FALLBACKS[case][1]):
        out, log_probs = model.generate(torch.tensor([prompt]), max_new_tokens=6, temperature=1.0, generator=3,
                                        eos_token_id=[], return_log_probs=True)
    with torch.no_grad():
        q = model.base_causal_lm(out).logits[0, len(prompt) - 1:-1].double()
        with model.peft_model.disable_adapter():
            base = model.base_causal_lm(out).logits[0, len(prompt) - 1:-1].double()
    expected = reference.combined_log_probs(q, base, out[0, len(prompt):], alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0)
    torch.testing.assert_close(log_probs[0].double(), expected, rtol=0, atol=2e-5)
