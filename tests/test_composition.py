"""Composing several Q-Adapters at decode, against the formula computed from each adapter's full logits.

    pi~ ∝ exp((sum_i w_i Q_i + alpha_0 log pi_1) / alpha_tilde)

Two adapters with random LoRA B are trained "separately" (saved on their own) on one tiny random
Llama, then loaded into one model. The reference loads each adapter into its own model and runs
full, uncached forwards: it shares nothing with the mixed-batch streams, the caches or h_mix.
"""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels import QAdapterLogitsProcessor, reference
from qadapter_kernels.api.unchecked import RowSampling, sample_logits_rows
from qadapter_kernels.decoding.composition import composition
from qadapter_kernels.params import PolicyParams
from qadapter_kernels.model import QAdapterConfig, QAdapterModel

PAD, EOS, VOCAB = 0, 2, 96
ALPHA_TILDE, ALPHA_0 = 0.8, 0.5
BASE_NAME = "tiny-llama"  # recorded as every adapter's base model
PROMPTS = [[5, 17, 33], [1, 40, 41, 42, 60, 7, 9], [11, 12, 13, 14, 15]]


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same base weights every time
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=PAD, eos_token_id=EOS)
    return LlamaForCausalLM(config)


def save_random_adapter(directory, seed: int, **config) -> None:
    params = QAdapterConfig(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0, base_model=BASE_NAME)
    model = QAdapterModel(tiny_base(), dataclasses.replace(params, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_random_adapter(root / "a", seed=1)
    save_random_adapter(root / "b", seed=2, target_modules=("q_proj", "v_proj", "o_proj"))
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture(scope="module")
def model(folders):
    return QAdapterModel.from_pretrained(folders, base_model=tiny_base()).eval()


@pytest.fixture(scope="module")
def alone(folders):
    """Each adapter in a model of its own: the reference's Q_i."""
    return {name: QAdapterModel.from_pretrained(folder, base_model=tiny_base()).eval()
            for name, folder in folders.items()}


@torch.no_grad()
def explicit_logits(alone, ids: list[int], weights: dict[str, float]) -> torch.Tensor:
    """(sum_i w_i Q_i + alpha_0 log_softmax(L)) / alpha_tilde after ``ids``, from full forwards, in fp64."""
    x = torch.tensor([ids])
    some = next(iter(alone.values()))
    with some.peft_model.disable_adapter():
        base = some.base_causal_lm(x).logits[0, -1].double()
    q = sum(w * alone[name].base_causal_lm(x).logits[0, -1].double() for name, w in weights.items())
    return (q + ALPHA_0 * torch.log_softmax(base, -1)) / ALPHA_TILDE


def explicit_greedy(alone, prompt: list[int], steps: int, weights: dict[str, float]) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(explicit_logits(alone, ids, weights).argmax()))
    return ids[len(prompt):]


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_the_two_adapters_and_the_base_differ(alone):
    """Otherwise every comparison below would hold trivially."""
    greedy = {name: explicit_greedy(alone, PROMPTS[1], 6, {name: 1.0}) for name in alone}
    base = explicit_greedy(alone, PROMPTS[1], 6, {"a": 0.0})
    assert greedy["a"] != greedy["b"] and base not in greedy.values()


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 1.5}, {"a": 2.0, "b": -0.5}])
@pytest.mark.parametrize("two_pass", [False, True], ids=["mixed_batch", "two_pass"])
def test_greedy_composition_matches_the_explicit_formula(model, alone, weights, two_pass):
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[], adapters=weights,
                         two_pass=two_pass)
    for row, prompt in enumerate(PROMPTS):
        assert out[row, ids.shape[1]:].tolist() == explicit_greedy(alone, prompt, 8, weights), row


def test_per_row_weights_decode_each_row_as_its_own_weights_would(model, alone):
    ids, mask = left_padded(PROMPTS)
    a, b = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    out = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[], adapters={"a": a, "b": b})
    for row, prompt in enumerate(PROMPTS):
        weights = {"a": float(a[row]), "b": float(b[row])}
        assert out[row, ids.shape[1]:].tolist() == explicit_greedy(alone, prompt, 8, weights), row


def test_one_adapter_at_weight_one_is_todays_decoding(model):
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.95, eos_token_id=[], generator=5)
    assert torch.equal(model.generate(ids, mask, adapters={"a": 1.0}, **kwargs), model.generate(ids, mask, **kwargs))
    # An adapter at weight 0 is off: the same tokens, and no row group is run for it.
    assert torch.equal(model.generate(ids, mask, adapters={"a": 1.0, "b": 0.0}, **kwargs),
                       model.generate(ids, mask, **kwargs))


def test_all_weights_zero_is_the_base_anchored_policy(model):
    """pi~ ∝ pi_1^(alpha_0 / alpha_tilde): the base model at temperature alpha_tilde / alpha_0."""
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=12, eos_token_id=[], generator=9)
    zero = {"a": 0.0, "b": torch.zeros(3)}
    assert torch.equal(model.generate(ids, mask, adapters=zero, temperature=1.0, **kwargs),
                       model.generate(ids, mask, adapter=False, temperature=ALPHA_TILDE / ALPHA_0, **kwargs))
    assert torch.equal(model.generate(ids, mask, adapters=zero, temperature=0.0, **kwargs),
                       model.generate(ids, mask, adapter=False, temperature=0.0, **kwargs))


def test_seeded_draws_agree_between_one_head_product_and_each_streams_logits(model):
    """Same uniforms, same composed rows (up to float rounding): the same tokens."""
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=16, temperature=1.1, top_p=0.9, eos_token_id=[], generator=3,
                  adapters={"a": torch.tensor([1.0, 0.2, 0.7]), "b": 0.6})
    first = model.generate(ids, mask, **kwargs)
    assert torch.equal(first, model.generate(ids, mask, two_pass=True, **kwargs))
    assert not torch.equal(first, model.generate(ids, mask, **(kwargs | dict(generator=4))))


def test_first_token_follows_the_filtered_composed_policy(model, alone):
    """20000 rows of one prompt, one step each: the draws follow the exact filtered distribution."""
    prompt, rows, weights = PROMPTS[2], 20000, {"a": 0.7, "b": 1.2}
    temperature, top_k, min_p = 0.9, 20, 0.02
    out = model.generate(torch.tensor([prompt] * rows), max_new_tokens=1, temperature=temperature, top_k=top_k,
                         min_p=min_p, generator=11, eos_token_id=[], adapters=weights)
    counts = torch.bincount(out[:, -1], minlength=VOCAB).double() / rows
    logits = explicit_logits(alone, prompt, weights)[None]
    filtered = reference.filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=1.0, min_p=min_p)
    exact = torch.softmax(filtered, -1)[0]
    assert counts[exact == 0].sum() == 0
    assert 0.5 * (counts - exact).abs().sum() < 0.03


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_one_head_product_with_a_bias_draws_as_the_explicit_logits(backend):
    """The LM-head bias scales by (sum w_i + alpha_0) / alpha_tilde, per row (Llama's head has no bias)."""
    gen = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 5, 16, 50
    w_head, b_head = torch.randn(vocab, hidden, generator=gen), 3 * torch.randn(vocab, generator=gen)
    streams = [torch.randn(rows, hidden, generator=gen) for _ in range(3)]
    weights = {"x": torch.tensor([1.0, 0.0, 2.0, 0.3, 1.0]), "y": torch.tensor([0.5, 0.0, 0.0, 1.7, -0.2])}
    policy = PolicyParams(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0)
    composed = composition(weights, rows, torch.device("cpu"), policy)
    per_row = RowSampling(torch.full((rows,), 0.9), torch.zeros(rows, dtype=torch.long), torch.full((rows,), 0.95),
                          torch.zeros(rows))
    head = composed.head_sampling(per_row)
    logits = [torch.nn.functional.linear(h, w_head, b_head) for h in streams]
    q = weights["x"][:, None] * logits[0] + weights["y"][:, None] * logits[1]
    explicit = reference.combined_logits(q, logits[2], policy)
    greedy = per_row._replace(temperature=torch.zeros(rows))
    assert torch.equal(composed.sample(streams, w_head, b_head, greedy, composed.head_sampling(greedy), None,
                                       backend, 64.0, "mixed"), explicit.argmax(-1))
    for seed in range(20):
        draws = [fn(torch.Generator().manual_seed(seed)) for fn in (
            lambda g: composed.sample(streams, w_head, b_head, per_row, head, g, backend, 64.0, "mixed"),
            lambda g: sample_logits_rows(q, logits[2], policy, per_row, g, backend))]
        assert torch.equal(*draws), seed


@pytest.mark.parametrize("adapters, error, match", [
    ({}, TypeError, "non-empty dict"),
    ([("a", 1.0)], TypeError, "non-empty dict"),
    ({"c": 1.0}, ValueError, "no adapter named 'c'.*loaded: \\['a', 'b'\\]"),
    ({"a": True}, TypeError, r"adapters\['a'\]"),
    ({"a": "1"}, TypeError, r"adapters\['a'\]"),
    ({"a": float("nan")}, ValueError, r"adapters\['a'\]"),
    ({"a": float("inf")}, ValueError, r"adapters\['a'\]"),
    ({"a": torch.ones(2)}, ValueError, r"adapters\['a'\].*B = 1"),
    ({"a": torch.ones(1, 1)}, ValueError, r"adapters\['a'\].*\[B\]"),
    ({"a": torch.tensor([True])}, TypeError, r"adapters\['a'\]"),
    ({"a": torch.tensor([float("nan")])}, ValueError, r"adapters\['a'\] must hold finite"),
    ({"a": 1.0, "b": torch.tensor([-1.5])}, ValueError, r"row 0 .*sum to -0.5.*alpha_0 = 0.5"),
    ({"a": torch.ones(1, device="meta")}, ValueError, r"adapters\['a'\] is on meta"),
])
def test_bad_adapter_weights_name_the_argument(model, adapters, error, match):
    with pytest.raises(error, match=match):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, adapters=adapters)


def test_no_adapter_with_zero_alpha_0_has_no_policy(folders, tmp_path):
    for name in "ab":
        save_random_adapter(tmp_path / name, seed=3, alpha_0=0.0)
    zero = QAdapterModel.from_pretrained({"a": tmp_path / "a", "b": tmp_path / "b"}, base_model=tiny_base())
    with pytest.raises(ValueError, match="row 0 .*sum to 0 and alpha_0 = 0"):
        zero.generate(torch.tensor([[3, 4]]), max_new_tokens=1, adapters={"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="adapter=False"):
        zero.generate(torch.tensor([[3, 4]]), max_new_tokens=1, adapters={"a": 1.0}, adapter=False)


def test_adapters_compose_only_on_their_base_and_alphas(folders, tmp_path):
    model = QAdapterModel.from_pretrained(folders["a"], base_model=tiny_base())
    save_random_adapter(tmp_path / "hot", seed=3, alpha_tilde=0.5)
    with pytest.raises(ValueError, match="alpha_tilde=0.5.*one alpha_tilde"):
        model.load_adapter(tmp_path / "hot", "hot")
    save_random_adapter(tmp_path / "other", seed=3, base_model="another-model")
    with pytest.raises(ValueError, match="trained on base model 'another-model'"):
        model.load_adapter(tmp_path / "other", "other")
    with pytest.raises(FileNotFoundError, match="qadapter_config.json"):
        model.load_adapter(tmp_path, "empty")
    for bad in ("", "x.y", "__base__", 3):
        with pytest.raises(ValueError, match="name"):
            model.load_adapter(folders["b"], bad)
    model.load_adapter(folders["b"], "b")
    with pytest.raises(ValueError, match="already loaded"):
        model.load_adapter(folders["b"], "b")
    assert model.adapter_names == ("default", "b")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)


def test_a_composed_model_saves_its_trained_adapter_alone(model, folders, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(p.name for p in folders["a"].iterdir())
    again = QAdapterModel.from_pretrained(tmp_path / "saved", base_model=tiny_base()).eval()
    ids = torch.tensor([PROMPTS[1]])
    assert torch.equal(again.generate(ids, max_new_tokens=6, temperature=0),
                       model.generate(ids, max_new_tokens=6, temperature=0))


@pytest.mark.parametrize("weights", [{"a": 0.5, "b": 1.5}, {"b": torch.tensor([1.0, 0.3, 0.0])}])
def test_logits_processor_composes_as_generate_does(model, weights):
    ids, mask = left_padded(PROMPTS)
    ours = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=EOS, pad_token_id=PAD,
                          adapters=weights)
    processor = QAdapterLogitsProcessor(model, attention_mask=mask, adapters=weights)
    theirs = model.peft_model.generate(input_ids=ids, attention_mask=mask, logits_processor=[processor],
                                       do_sample=False, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(theirs, ours)


def test_logits_processor_adapters_need_a_qadapter_model(model):
    with pytest.raises(TypeError, match="adapters= needs a QAdapterModel"):
        QAdapterLogitsProcessor(model.base_causal_lm, adapters={"a": 1.0})
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        QAdapterLogitsProcessor(model, adapters={"z": 1.0})


def test_a_zero_weight_turns_off_an_adapter_whose_logits_ban_a_token():
    """0 * -inf would be NaN: a row where the adapter is off must not see its -inf."""
    composed = composition({"x": torch.tensor([0.0, 1.0]), "y": 1.0}, 2, torch.device("cpu"),
                           PolicyParams(alpha_tilde=ALPHA_TILDE, alpha_0=ALPHA_0))
    banned = torch.tensor([[0.5, -float("inf"), 1.0]] * 2)
    other = torch.tensor([[0.1, 0.2, 0.3]] * 2)
    q = composed.q_logits([banned, other], torch.zeros(2, 3))
    assert torch.equal(q[0], other[0]) and q[1, 1] == -float("inf") and not q.isnan().any()
