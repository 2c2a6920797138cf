"""Q-Adapter decoding on a tiny random Llama, against a naive reference.

The reference decodes the way the method is defined, with nothing shared or cached: at every
step two full forwards over the whole sequence (adapter on, then off), ``reference.combined_logits``
of their last logits rows, argmax. LoRA B is random (peft starts it at zero), so the two streams
differ, and alpha_0 / alpha_tilde are far from 0 / 1, so the combination matters.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels import QAdapterLogitsProcessor, reference
from qadapter_kernels.decoding.cpu_linear import few_row_linears
from qadapter_kernels.decoding.generate import special_token_ids
from qadapter_kernels.prompts import encode_prompt
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from training_helpers import tiny_tokenizer

PAD, EOS = 0, 2
ALPHA_TILDE, ALPHA_0 = 0.8, 0.5


def tiny_qadapter(vocab: int = 96, seed: int = 0) -> QAdapterModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=PAD, eos_token_id=EOS)
    model = QAdapterModel(LlamaForCausalLM(config), QAdapterConfig(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qadapter()


@torch.no_grad()
def naive_combined_logits(model: QAdapterModel, ids: list[int]) -> torch.Tensor:
    """The combined logits of the next token after ``ids``: two uncached forwards, float64 combination."""
    x = torch.tensor([ids])
    q = model.base_causal_lm(x).logits[0, -1]
    with model.peft_model.disable_adapter():
        base = model.base_causal_lm(x).logits[0, -1]
    return reference.combined_logits(q.double(), base.double(), alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0)


def naive_greedy(model: QAdapterModel, prompt: list[int], steps: int, eos: int | None = None) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(naive_combined_logits(model, ids).argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 33], [1, 40, 41, 42, 60, 7, 9], [11, 12, 13, 14, 15]]


@pytest.mark.parametrize("two_pass", [False, True], ids=["mixed_batch", "two_pass"])
def test_greedy_single_prompt_matches_naive_reference(model, two_pass):
    prompt = PROMPTS[1]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, temperature=0, eos_token_id=[], two_pass=two_pass)
    assert out[0, : len(prompt)].tolist() == prompt
    assert out[0, len(prompt):].tolist() == naive_greedy(model, prompt, 12)


@pytest.mark.parametrize("two_pass", [False, True], ids=["mixed_batch", "two_pass"])
def test_greedy_batch_of_different_lengths_matches_each_prompt_alone(model, two_pass):
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, mask, max_new_tokens=10, temperature=0, eos_token_id=[], two_pass=two_pass)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for row, prompt in enumerate(PROMPTS):
        assert out[row, ids.shape[1]:].tolist() == naive_greedy(model, prompt, 10), row


def test_base_only_decoding_is_the_base_models_greedy(model):
    prompt = PROMPTS[0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, temperature=0, eos_token_id=[], adapter=False)
    ids = list(prompt)
    with torch.no_grad(), model.peft_model.disable_adapter():
        for _ in range(8):
            ids.append(int(model.base_causal_lm(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out[0].tolist() == ids


def test_seeded_sampling_reproduces_and_both_schemes_agree(model):
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=16, temperature=1.3, top_k=40, top_p=0.95, eos_token_id=[])
    first = model.generate(ids, mask, generator=123, **kwargs)
    assert torch.equal(first, model.generate(ids, mask, generator=123, **kwargs))
    assert torch.equal(first, model.generate(ids, mask, generator=torch.Generator().manual_seed(123), **kwargs))
    # Same uniforms, same combined rows (up to float rounding): the same tokens.
    assert torch.equal(first, model.generate(ids, mask, generator=123, two_pass=True, **kwargs))
    assert not torch.equal(first, model.generate(ids, mask, generator=124, **kwargs))


def test_first_token_follows_the_filtered_combined_policy(model):
    """20000 rows of one prompt, one step each: the draws follow the exact filtered distribution."""
    prompt, rows = PROMPTS[2], 20000
    temperature, top_k, top_p = 0.7, 12, 0.9
    out = model.generate(torch.tensor([prompt] * rows), max_new_tokens=1, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=7, eos_token_id=[])
    counts = torch.bincount(out[:, -1], minlength=96).double() / rows
    logits = naive_combined_logits(model, prompt)[None]
    exact = torch.softmax(reference.filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=0.0), -1)[0]
    assert counts[exact == 0].sum() == 0  # nothing drawn outside the support
    assert 0.5 * (counts - exact).abs().sum() < 0.03


def test_eos_stops_each_row_on_its_own(model):
    free = [naive_greedy(model, p, 10) for p in PROMPTS]
    eos = free[0][3]  # row 0 emits it at step 4; the other rows stop wherever they emit it, if at all
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, mask, max_new_tokens=10, temperature=0, eos_token_id=eos, pad_token_id=PAD)
    new = out[:, ids.shape[1]:].tolist()
    expected = [naive_greedy(model, p, 10, eos=eos) for p in PROMPTS]
    assert len(new[0]) == max(map(len, expected))  # the batch ends when every row has ended
    for row, want in enumerate(expected):
        assert new[row] == want + [PAD] * (len(new[row]) - len(want)), row


def test_eos_id_zero_from_the_generation_config_is_kept(model):
    config = model.base_causal_lm.generation_config
    saved = config.eos_token_id
    config.eos_token_id = 0  # a valid id, though falsy
    try:
        assert special_token_ids(model, None, None, None) == ([0], PAD)
    finally:
        config.eos_token_id = saved


def test_stop_strings_end_a_row_and_are_cut_from_the_text():
    tokenizer = tiny_tokenizer()
    model = tiny_qadapter(vocab=len(tokenizer), seed=3)
    prompt = "What is the capital of France?"
    ids = torch.tensor([encode_prompt(prompt, tokenizer)])
    n = ids.shape[1]
    free = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_id=[])
    text = tokenizer.decode(free[0, n:], skip_special_tokens=True)
    assert len(text) >= 6
    stop = text[3:6]
    stopped = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_id=[], pad_token_id=PAD,
                             stop_strings=[stop, "never generated"], tokenizer=tokenizer)
    assert stopped.shape[1] < free.shape[1] and torch.equal(stopped, free[:, : stopped.shape[1]])
    # It stopped at the first token that completed the stop string, and kept that token.
    assert stop in tokenizer.decode(stopped[0, n:], skip_special_tokens=True)
    assert stop not in tokenizer.decode(stopped[0, n:-1], skip_special_tokens=True)
    # The text convenience encodes the prompt the same way and cuts the text before the stop string.
    answer = model.generate_text(tokenizer, prompt, max_new_tokens=12, temperature=0, eos_token_id=[],
                                 stop_strings=stop)
    assert answer == text[: text.index(stop)]
    assert model.generate_text(tokenizer, [prompt, "Describe the dog."], max_new_tokens=12, temperature=0,
                               eos_token_id=[], stop_strings=stop)[0] == answer


def test_streamer_receives_the_prompt_then_each_token(model):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, ids):
            self.chunks.append(ids.clone())

        def end(self):
            self.ended = True

    ids, mask = left_padded(PROMPTS)
    recorder = Recorder()
    out = model.generate(ids, mask, max_new_tokens=5, temperature=0, eos_token_id=[], streamer=recorder)
    assert recorder.ended and torch.equal(recorder.chunks[0], ids)
    assert torch.equal(torch.stack(recorder.chunks[1:], 1), out[:, ids.shape[1]:])


def test_logits_processor_makes_transformers_generate_decode_the_same(model):
    ids, mask = left_padded(PROMPTS)
    eos = naive_greedy(model, PROMPTS[0], 10)[4]  # a token some row emits: rows stop at different steps
    ours = model.generate(ids, mask, max_new_tokens=10, temperature=0, eos_token_id=eos, pad_token_id=PAD)
    processor = QAdapterLogitsProcessor(model, attention_mask=mask)
    theirs = model.peft_model.generate(input_ids=ids, attention_mask=mask, logits_processor=[processor],
                                       do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(theirs, ours)
    with pytest.raises(ValueError, match="one generate call"):
        processor(ids[:2], torch.zeros(2, 96))


def test_logits_processor_returns_the_combined_logits(model):
    prompt = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        q = model.base_causal_lm(prompt).logits[:, -1]
    combined = QAdapterLogitsProcessor(model)(prompt, q)
    torch.testing.assert_close(combined.double(), naive_combined_logits(model, PROMPTS[1])[None],
                               atol=1e-5, rtol=1e-5)
    # A plain causal LM as the base: here the same weights with the adapter switched off by hand.
    with model.peft_model.disable_adapter():
        separate_base = QAdapterLogitsProcessor(model.base_causal_lm, alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0)
        torch.testing.assert_close(separate_base(prompt, q), combined)


@pytest.mark.parametrize("rows, bias", [(1, True), (2, False), (3, True), (4, False), (9, True)])
def test_few_row_linears_compute_the_same_product(rows, bias):
    layer = torch.nn.Linear(40, 24, bias=bias)
    x = torch.randn(rows, 1, 40)
    with few_row_linears(layer):
        got = layer(x)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))
    # Outside the block the layer is nn.Linear again, exactly.
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_generate_restores_the_training_mode(model):
    model.train()
    try:
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, temperature=0)
        assert model.training and model.peft_model.training
        with pytest.raises(ValueError, match="top_p"):
            model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, top_p=1.5)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "input_ids"),
    (dict(input_ids=torch.tensor([1, 2])), ValueError, "input_ids"),
    (dict(input_ids=torch.tensor([[1, 96]])), ValueError, "input_ids"),
    (dict(input_ids=torch.tensor([[1, -1]])), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.long, device="meta")), ValueError, "input_ids"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "left-padded"),
    (dict(attention_mask=torch.tensor([[1, 1]])), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[0, 2, 1]])), ValueError, "attention_mask"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(min_p=1.0), ValueError, "min_p"),
    (dict(top_p=torch.tensor([0.5, 0.5])), ValueError, "top_p"),
    (dict(generator="seed"), TypeError, "generator"),
    (dict(stop_strings="x"), ValueError, "tokenizer"),
    (dict(stop_strings=[""], tokenizer=object()), ValueError, "stop_strings"),
    (dict(eos_token_id="</s>"), TypeError, "eos_token_id"),
    (dict(streamer=object()), TypeError, "streamer"),
    (dict(two_pass="yes"), TypeError, "two_pass"),
    (dict(return_log_probs=1), TypeError, "return_log_probs"),
])
def test_bad_arguments_name_the_argument(model, kwargs, error, match):
    call = dict(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=2) | kwargs
    with pytest.raises(error, match=match):
        model.generate(**call)


def test_logits_processor_bad_arguments(model):
    with pytest.raises(TypeError, match="base"):
        QAdapterLogitsProcessor(object())
    with pytest.raises(ValueError, match="alpha_tilde"):
        QAdapterLogitsProcessor(model, alpha_tilde=0.0)
    processor = QAdapterLogitsProcessor(model, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        processor(torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 96))


# --------------------------------------------------------------------------- peft's private hook


@pytest.mark.parametrize("change", ["missing", "no adapter_names"])
def test_a_peft_without_the_mixed_batch_hook_is_a_clear_error(model, monkeypatch, change):
    """Without the private hook, mixed-batch decoding would silently run the base rows WITH the adapter."""
    from qadapter_kernels.decoding import streams
    from qadapter_kernels.decoding.streams import TESTED_PEFT_VERSIONS, UnsupportedPeftError

    # As for a model the sliced routing does not serve (a DoRA adapter, say): peft's hook is needed.
    monkeypatch.setattr(streams, "sliced_lora_routing", lambda *args: None)
    lora_model = type(model.peft_model.base_model)
    for cls in lora_model.__mro__:
        if "_enable_peft_forward_hooks" in vars(cls):
            if change == "missing":
                monkeypatch.delattr(cls, "_enable_peft_forward_hooks")
            else:
                monkeypatch.setattr(cls, "_enable_peft_forward_hooks", lambda self: None)
    with pytest.raises(UnsupportedPeftError,
                       match=rf"{lora_model.__name__}\._enable_peft_forward_hooks.*peft{TESTED_PEFT_VERSIONS}"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, temperature=0.0)
    # The authors' two-pass decoding does not need it.
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, temperature=0.0, two_pass=True).shape == (1, 5)


def test_setup_pins_the_tested_peft_versions():
    from pathlib import Path

    from qadapter_kernels.decoding.streams import TESTED_PEFT_VERSIONS

    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert f'"peft{TESTED_PEFT_VERSIONS}"' in setup


@torch.no_grad()
def two_stream_log_probs(model: QAdapterModel, out: torch.Tensor, mask: torch.Tensor, new: int, adapter: bool):
    """log pi~ of each row's last ``new`` tokens: two uncached forwards per row (adapter on, off), fp64 combination."""
    rows = []
    for row in range(out.shape[0]):
        ids = out[row, mask[row].bool().tolist() + [True] * new][None]
        with model.peft_model.disable_adapter():
            base = model.base_causal_lm(ids).logits[0, -new - 1:-1].double()
        q = model.base_causal_lm(ids).logits[0, -new - 1:-1].double() if adapter else base
        policy = dict(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0) if adapter else dict(alpha_tilde=1.0, alpha_0=0.0)
        rows.append(reference.combined_log_probs(q, base, ids[0, -new:], **policy))
    return torch.stack(rows)


@pytest.mark.parametrize("two_pass, adapter", [(False, True), (True, True), (False, False)],
                         ids=["mixed_batch", "two_pass", "base_only"])
def test_return_log_probs_equal_the_two_stream_reference(model, two_pass, adapter):
    """Per-token log-probs of the policy itself (not the temperature/top-k filtered draw), batch of
    left-padded prompts; the same tokens as without return_log_probs."""
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=9, temperature=1.3, top_k=20, generator=5, eos_token_id=[], two_pass=two_pass,
                  adapter=adapter)
    out, log_probs = model.generate(ids, mask, return_log_probs=True, **kwargs)
    assert torch.equal(out, model.generate(ids, mask, **kwargs))
    assert log_probs.shape == (3, 9) and log_probs.dtype == torch.float32
    expected = two_stream_log_probs(model, out, mask, 9, adapter)
    torch.testing.assert_close(log_probs.double(), expected, rtol=0, atol=2e-5)


def test_return_log_probs_are_zero_after_a_row_ends(model):
    eos = naive_greedy(model, PROMPTS[0], 8)[2]  # row 0 ends at its first emission of it (at most its third token)
    ids, mask = left_padded(PROMPTS)
    out, log_probs = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=eos, pad_token_id=PAD,
                                    return_log_probs=True)
    ended = out[0, ids.shape[1]:].tolist().index(eos) + 1
    assert log_probs.shape == (3, out.shape[1] - ids.shape[1]) and ended < log_probs.shape[1]
    assert (log_probs[0, ended:] == 0).all() and (log_probs[1:] < 0).any()
    expected = two_stream_log_probs(model, out[:1, : ids.shape[1] + ended], mask[:1], ended, True)
    torch.testing.assert_close(log_probs[:1, :ended].double(), expected, rtol=0, atol=2e-5)
