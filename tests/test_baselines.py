"""SFT and DPO baselines through TRL on a tiny random Llama: they train the Q-Adapter's LoRA, move the
policy the way their loss says, and save a folder that loads and scores like a Q-Adapter's."""
import pytest
import torch

pytest.importorskip("trl")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from qadapter_kernels.baselines import TrainingBudget, train_baseline  # noqa: E402
from qadapter_kernels.baselines.__main__ import main as baselines_main  # noqa: E402
from qadapter_kernels.evaluation import PolicyScorer  # noqa: E402
from qadapter_kernels.training import QAdapterConfig, QAdapterModel  # noqa: E402
from qadapter_kernels.prompts import encode_prompt  # noqa: E402
from qadapter_kernels.training.data import PreferenceExample  # noqa: E402
from training_helpers import tiny_tokenizer  # noqa: E402

LORA = QAdapterConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
BUDGET = TrainingBudget(max_steps=10, batch_size=2, learning_rate=1e-2, max_length=64, logging_steps=5)
EXAMPLES = [
    PreferenceExample(prompt=[{"role": "user", "content": q}], chosen=[{"role": "assistant", "content": c}],
                      rejected=[{"role": "assistant", "content": c.capitalize()}])
    for q, c in [("What is the capital of France?", "paris."), ("What is two plus two?", "four."),
                 ("the quick brown fox", "jumps over the lazy dog.")]
]


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _response_logprob(scorer: PolicyScorer, tokenizer, example, response) -> float:
    prompt = encode_prompt(example.prompt, tokenizer)
    full = tokenizer.apply_chat_template([*example.prompt, *response], tokenize=True, return_dict=False)
    full = full["input_ids"] if isinstance(full, dict) else list(full)
    assert full[:len(prompt)] == prompt
    return scorer.continuation_logprobs([(prompt, full[len(prompt):])])[0][0]


def _margins(model: QAdapterModel, tokenizer) -> tuple[float, float]:
    """(sum of log-prob of chosen, DPO implicit margin) of the policy against the adapter-off reference."""
    policy, reference = (PolicyScorer(model, tokenizer, adapter=a) for a in (True, False))
    chosen = sum(_response_logprob(policy, tokenizer, e, e.chosen) for e in EXAMPLES)
    def log_ratio(example, response):
        return (_response_logprob(policy, tokenizer, example, response)
                - _response_logprob(reference, tokenizer, example, response))

    margin = sum(log_ratio(e, e.chosen) - log_ratio(e, e.rejected) for e in EXAMPLES)
    return chosen, margin


def test_sft_raises_the_likelihood_of_the_chosen_answers(tmp_path, tokenizer):
    before = QAdapterModel(_llama(), LORA)
    chosen_before, _ = _margins(before, tokenizer)
    model = train_baseline("sft", _llama(), tokenizer, EXAMPLES, lora=LORA, budget=BUDGET, output_dir=tmp_path)
    chosen_after, _ = _margins(model, tokenizer)
    assert chosen_after > chosen_before + 1.0
    config = model.qadapter_config
    assert (config.alpha_tilde, config.alpha_0, config.lora_r, config.lora_alpha) == (1.0, 0.0, 4, 8)
    assert sorted(config.target_modules) == sorted(LORA.target_modules)


def test_dpo_moves_the_policy_toward_chosen_against_the_adapter_off_reference(tmp_path, tokenizer):
    model = train_baseline("dpo", _llama(), tokenizer, EXAMPLES, lora=LORA, budget=BUDGET, dpo_beta=0.1,
                           output_dir=tmp_path)
    _, margin = _margins(model, tokenizer)
    assert margin > 0.5
    # The saved folder loads as a Q-Adapter folder and scores the same policy.
    loaded = QAdapterModel.from_pretrained(tmp_path, base_model=_llama()).eval()
    assert _margins(loaded, tokenizer)[1] == pytest.approx(margin, rel=1e-4, abs=1e-4)


def test_policy_of_a_baseline_is_the_lora_models_own_softmax(tmp_path, tokenizer):
    model = train_baseline("sft", _llama(), tokenizer, EXAMPLES[:2], lora=LORA,
                           budget=TrainingBudget(max_steps=1, batch_size=2, max_length=64, logging_steps=1))
    ids = encode_prompt(EXAMPLES[0].prompt, tokenizer)
    with torch.no_grad():
        logits = model.peft_model(input_ids=torch.tensor([ids + [40]])).logits[0, -2]
    expected = float(torch.log_softmax(logits.float(), -1)[40])
    got = PolicyScorer(model, tokenizer).continuation_logprobs([(ids, [40])])[0][0]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_bad_arguments(tmp_path, tokenizer, capsys):
    with pytest.raises(ValueError, match="method"):
        train_baseline("ppo", _llama(), tokenizer, EXAMPLES)
    with pytest.raises(ValueError, match="dpo_beta"):
        train_baseline("dpo", _llama(), tokenizer, EXAMPLES, dpo_beta=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        TrainingBudget(max_steps=0)
    assert baselines_main(["--method", "dpo", "--data", str(tmp_path / "missing.jsonl"),
                           "--output-dir", str(tmp_path / "out"), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qadapter baselines: error: ") and "missing.jsonl" in err[0]
