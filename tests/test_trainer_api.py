"""The TRL-style trainer API: QAdapterTrainingArguments and QAdapterTrainer(model=..., ...)."""
from __future__ import annotations

import dataclasses

import pytest
import transformers

import qadapter_kernels as qk
from qadapter_kernels.params import LengthNorm, QAdapterParams, RewardVariant, SequenceLimits
from qadapter_kernels.training import QAdapterConfig, QAdapterTrainingArguments


def test_arguments_carry_every_qadapter_parameter_with_its_default(tmp_path):
    args = QAdapterTrainingArguments(output_dir=str(tmp_path))
    assert isinstance(args, transformers.TrainingArguments)
    assert args.qadapter_params == QAdapterParams()
    for f in dataclasses.fields(QAdapterParams):
        assert getattr(args, f.name) == f.default
    assert (args.max_length, args.max_prompt_length) == dataclasses.astuple(SequenceLimits())
    # max_length alone (what a DPO script sets) leaves at least half of it to the responses.
    short = QAdapterTrainingArguments(output_dir=str(tmp_path), max_length=SequenceLimits().max_prompt_length)
    assert short.max_prompt_length == SequenceLimits().max_prompt_length // 2
    assert args.remove_unused_columns is False
    assert qk.QAdapterTrainingArguments is QAdapterTrainingArguments


def test_arguments_normalise_the_enums_and_the_length_norm_bool(tmp_path):
    args = QAdapterTrainingArguments(output_dir=str(tmp_path), variant="official", length_norm=True)
    assert args.variant is RewardVariant.OFFICIAL and args.length_norm is LengthNorm.PADDED
    config = args.qadapter_config(QAdapterConfig(lora_r=4))
    assert config.lora_r == 4 and config.variant is RewardVariant.OFFICIAL and config.length_norm is LengthNorm.PADDED
    assert '"variant": "official"' in args.to_json_string()


@pytest.mark.parametrize("bad, name", [
    ({"alpha_tilde": 0.0}, "alpha_tilde"), ({"alpha_0": -1.0}, "alpha_0"), ({"gamma": 1.5}, "gamma"),
    ({"beta": float("nan")}, "beta"), ({"variant": "dpo"}, "variant"), ({"length_norm": "tokens"}, "length_norm"),
    ({"max_length": 0}, "max_length"), ({"max_prompt_length": 10**6}, "max_prompt_length"),
    ({"prompt_truncation": "head"}, "prompt_truncation"), ({"tile_budget_mb": 0.0}, "tile_budget_mb"),
    ({"base_cache_max_gb": -2.0}, "base_cache_max_gb"), ({"precompute_base": "yes"}, "precompute_base"),
    ({"base_cache_dir": 3}, "base_cache_dir"),
])
def test_arguments_reject_bad_values_naming_the_field(tmp_path, bad, name):
    with pytest.raises((ValueError, TypeError), match=name):
        QAdapterTrainingArguments(output_dir=str(tmp_path), **bad)


def test_arguments_parse_from_the_command_line(tmp_path):
    parser = transformers.HfArgumentParser(QAdapterTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--alpha_0", "0.25", "--variant", "official", "--length_norm", "none",
        "--max_length", "64", "--max_prompt_length", "32", "--precompute_base", "true"])
    assert (args.alpha_0, args.variant, args.length_norm) == (0.25, RewardVariant.OFFICIAL, LengthNorm.NONE)
    assert (args.max_length, args.max_prompt_length, args.precompute_base) == (64, 32, True)


# --------------------------------------------------------------------------- the trainer, called like DPOTrainer

import difflib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402

from qadapter_kernels.training import QAdapterModel, QAdapterTrainer, load_preferences, shipped_data_path  # noqa: E402
from test_training_model import lora_state, tiny_llama  # noqa: E402
from training_helpers import tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAIRS = 6


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Shipped preference pairs as plain dicts (conversations), as a user's list or datasets.Dataset holds them."""
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
            for e in load_preferences(shipped_data_path())[:PAIRS]]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fast_args(output_dir, **overrides) -> QAdapterTrainingArguments:
    settings = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                    max_length=96, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=3,
                    dataloader_num_workers=0)
    return QAdapterTrainingArguments(**{**settings, **overrides})


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_from_a_model_path_rows_and_a_lora_config_saves_a_loadable_folder(tmp_path, model_folder, rows):
    import datasets
    from qadapter_kernels.evaluation.lm_eval_model import QAdapterLM

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"])
    args = fast_args(tmp_path / "run", alpha_0=0.25, variant="official", length_norm="padded")
    # No processing_class: the tokenizer saved with the model is loaded, as DPOTrainer does.
    trainer = QAdapterTrainer(model=str(model_folder), args=args, train_dataset=rows,
                              eval_dataset=datasets.Dataset.from_list(rows), peft_config=lora)
    trainer.train()
    assert len(logged_losses(trainer)) == 2 and all(map(torch.isfinite, torch.tensor(logged_losses(trainer))))
    assert "eval_pref_loss" in trainer.evaluate()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))

    recorded = json.loads((out / "qadapter_config.json").read_text())
    assert (recorded["lora_r"], recorded["lora_alpha"], recorded["lora_dropout"]) == (4, 8, 0.0)
    assert recorded["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert (recorded["alpha_0"], recorded["variant"], recorded["length_norm"]) == (0.25, "official", "padded")
    assert recorded["base_model"] == str(model_folder)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # peft's own record of the LoRA

    loaded = QAdapterModel.from_pretrained(out)  # the base model recorded at save time
    trained = lora_state(trainer.model)
    assert all(torch.equal(trained[name], value) for name, value in lora_state(loaded).items())
    assert loaded.qadapter_config.alpha_0 == 0.25
    lm = QAdapterLM(adapter=str(out))  # the lm-eval plug-in, with the tokenizer saved beside the adapter
    assert lm.scorer.model.qadapter_config == loaded.qadapter_config


def test_trainer_takes_a_causal_lm_a_peft_model_or_a_qadapter_model(tmp_path, tokenizer, rows):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    causal_lm = QAdapterTrainer(model=tiny_llama(vocab=len(tokenizer)), args=fast_args(tmp_path), train_dataset=rows,
                                processing_class=tokenizer, peft_config=lora)
    assert causal_lm.model.qadapter_config.lora_r == 2
    peft_model = peft.get_peft_model(tiny_llama(vocab=len(tokenizer)), peft.LoraConfig(r=3, target_modules=["v_proj"]))
    from_peft = QAdapterTrainer(model=peft_model, args=fast_args(tmp_path), train_dataset=rows,
                                processing_class=tokenizer)
    assert from_peft.model.peft_model is peft_model
    assert (from_peft.model.qadapter_config.lora_r, from_peft.model.qadapter_config.target_modules) == (3, ("v_proj",))

    own = QAdapterModel(tiny_llama(vocab=len(tokenizer)), QAdapterConfig(alpha_0=0.5))
    # Plain TrainingArguments: the model's own hyper-parameters stay (today's usage).
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert QAdapterTrainer(model=own, args=plain, train_dataset=rows, processing_class=tokenizer
                           ).model.qadapter_config.alpha_0 == 0.5
    # QAdapterTrainingArguments: they set them (the LoRA fields stay the model's).
    overridden = QAdapterTrainer(model=own, args=fast_args(tmp_path, alpha_0=0.125), train_dataset=rows,
                                 processing_class=tokenizer)
    assert overridden.model.qadapter_config.alpha_0 == 0.125
    assert overridden.model.qadapter_config.lora_r == QAdapterConfig().lora_r


@pytest.mark.parametrize("model_kind, peft_config, error, match", [
    ("linear", None, TypeError, "model must be"),
    ("causal_lm", peft.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), TypeError, "LoraConfig"),
    ("causal_lm", peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), ValueError,
     "modules_to_save"),
    ("causal_lm", peft.LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLS"), ValueError, "task_type"),
    ("peft", peft.LoraConfig(target_modules=["q_proj"]), ValueError, "already holds its LoRA"),
])
def test_trainer_refuses_a_model_or_lora_it_cannot_train(tmp_path, tokenizer, model_kind, peft_config, error, match):
    model = {"linear": lambda: torch.nn.Linear(2, 2), "causal_lm": lambda: tiny_llama(vocab=len(tokenizer)),
             "peft": lambda: peft.get_peft_model(tiny_llama(vocab=len(tokenizer)),
                                                 peft.LoraConfig(target_modules=["q_proj"]))}[model_kind]()
    with pytest.raises(error, match=match):
        QAdapterTrainer(model=model, args=fast_args(tmp_path), processing_class=tokenizer, peft_config=peft_config)


def test_bad_rows_are_named_by_their_index(tmp_path, tokenizer, rows):
    bad = [rows[0], {"prompt": "hi", "chosen": "a"}]
    with pytest.raises(ValueError, match=r"train_dataset: .*row 1.*rejected"):
        QAdapterTrainer(model=tiny_llama(vocab=len(tokenizer)), args=fast_args(tmp_path), train_dataset=bad,
                        processing_class=tokenizer)
    with pytest.raises(ValueError, match="processing_class"):
        QAdapterTrainer(model=tiny_llama(vocab=len(tokenizer)), args=fast_args(tmp_path), train_dataset=rows)


def test_a_model_name_is_found_in_the_local_hugging_face_cache(tmp_path, monkeypatch, model_folder):
    import huggingface_hub

    revision = "0" * 40
    snapshot = tmp_path / "models--tiny-org--tiny-llama" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in model_folder.iterdir():
        (snapshot / file.name).symlink_to(file)
    (tmp_path / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    trainer = QAdapterTrainer(model="tiny-org/tiny-llama", args=fast_args(tmp_path / "run"),
                              train_dataset=str(shipped_data_path()))
    assert trainer.model.qadapter_config.base_model == "tiny-org/tiny-llama"
    assert trainer.processing_class.vocab_size == tiny_tokenizer().vocab_size
    from qadapter_kernels.loading import ModelLoadError, load_base_model
    with pytest.raises(ModelLoadError, match="Hugging Face cache"):
        load_base_model("tiny-org/not-downloaded")


@pytest.mark.parametrize("eval_batch_size", [3, 8])
def test_evaluate_reports_per_pair_metrics_equal_to_qadapter_eval(tmp_path, tokenizer, eval_batch_size):
    """10 pairs in batches of 3 or 8 leave a smaller last batch: a mean over batches would differ."""
    from qadapter_kernels.app.common import evaluate_pairs
    from qadapter_kernels.training import PreferenceCollator, PreferenceDataset
    from test_training_model import perturb_lora_b

    model = QAdapterModel(tiny_llama(vocab=len(tokenizer)))
    perturb_lora_b(model, seed=5)  # a fresh LoRA scores every pair as the base does: make the adapter matter
    pairs = PreferenceDataset(shipped_data_path("heldout"), tokenizer, max_length=96, max_prompt_length=48)
    pairs = torch.utils.data.Subset(pairs, range(10))
    expected = evaluate_pairs(model, pairs, PreferenceCollator.for_tokenizer(tokenizer), batch_size=4)
    assert 0.0 < expected["accuracy"] < 1.0  # neither all nor none right: the averaging shows
    trainer = QAdapterTrainer(model=model, args=fast_args(tmp_path, per_device_eval_batch_size=eval_batch_size),
                              data_collator=PreferenceCollator.for_tokenizer(tokenizer), processing_class=tokenizer)
    metrics = trainer.evaluate(pairs)
    assert metrics["eval_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert metrics["eval_margin"] == pytest.approx(expected["mean_margin"], rel=1e-5, abs=1e-6)
    # The regulariser is a mean over the batch's scored tokens, so the loss is per pair given the batching.
    same_batches = evaluate_pairs(model, pairs, PreferenceCollator.for_tokenizer(tokenizer), eval_batch_size)
    assert metrics["eval_loss"] == pytest.approx(same_batches["mean_loss"], rel=1e-5)


def _count_layer_calls(model: QAdapterModel) -> list[int]:
    """Calls of a module inside the first decoder layer (transformers checkpoints the layer's forward,
    so a hook on the layer itself would run outside the checkpoint, once)."""
    calls = [0]
    model.decoder.layers[0].self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_and_trains_the_same_adapter(tmp_path, tokenizer, rows):
    results = {}
    for checkpointing in (False, True):
        transformers.set_seed(0)
        trainer = QAdapterTrainer(model=tiny_llama(vocab=len(tokenizer)), processing_class=tokenizer,
                                  args=fast_args(tmp_path, gradient_checkpointing=checkpointing, max_steps=1,
                                                 learning_rate=1e-2), train_dataset=rows,
                                  peft_config=peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        calls = _count_layer_calls(trainer.model)
        trainer.train()
        results[checkpointing] = (calls[0], lora_state(trainer.model), logged_losses(trainer))
    # One step = an adapter pass and a base pass; checkpointing recomputes the adapter pass in backward.
    assert (results[False][0], results[True][0]) == (2, 3)
    assert results[True][2] == results[False][2]
    plain, checkpointed = results[False][1], results[True][1]
    assert any(not torch.equal(value, lora_state(QAdapterModel(tiny_llama(vocab=len(tokenizer))))[name])
               for name, value in plain.items() if "lora_B" in name)  # the step did train
    assert all(torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=0) for name in plain)


def test_bf16_trains_under_cpu_autocast(tmp_path, tokenizer, rows):
    dtypes = set()
    losses = {}
    for bf16 in (False, True):
        transformers.set_seed(0)
        trainer = QAdapterTrainer(model=tiny_llama(vocab=len(tokenizer)), processing_class=tokenizer,
                                  args=fast_args(tmp_path, bf16=bf16, max_steps=1), train_dataset=rows)
        if bf16:
            trainer.model.decoder.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        trainer.train()
        losses[bf16] = logged_losses(trainer)[0]
    assert dtypes == {torch.bfloat16}  # autocast ran the decoder's matrix products in bf16
    assert losses[True] == pytest.approx(losses[False], rel=0.05)  # the fused loss itself accumulates in fp32


# --------------------------------------------------------------------------- examples/: DPO to Q-Adapter in one line

SWAPPED = [("from trl import DPOConfig, DPOTrainer", "from qadapter_kernels import QAdapterTrainer, QAdapterTrainingArguments"),
           ("args = DPOConfig(", "args = QAdapterTrainingArguments("),
           ("trainer = DPOTrainer(", "trainer = QAdapterTrainer(")]


def example_diff() -> list[str]:
    dpo, qadapter = ((ROOT / "examples" / name).read_text().splitlines() for name in ("train_dpo.py",
                                                                                      "train_qadapter.py"))
    return list(difflib.unified_diff(dpo, qadapter, "examples/train_dpo.py", "examples/train_qadapter.py",
                                     lineterm=""))


def test_the_qadapter_script_is_the_dpo_script_with_the_trainer_and_config_swapped():
    changed = [(line[0], line[1:]) for line in example_diff()[2:] if line[:1] in "+-"]
    assert changed == [(sign, pair[i]) for pair in SWAPPED for i, sign in enumerate("-+")]
    guide = (ROOT / "docs" / "from-trl.md").read_text()
    assert "\n".join(example_diff()) in guide  # the guide shows the real diff


@pytest.mark.parametrize("script", ["train_qadapter.py", "train_dpo.py"])
def test_example_script_trains_a_tiny_model_offline(tmp_path, model_folder, script):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in
                            [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
                             for e in load_preferences(shipped_data_path())[:PAIRS]]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(model_folder), str(data), str(out), "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    if script == "train_qadapter.py":
        model = QAdapterModel.from_pretrained(out)
        assert model.qadapter_config.lora_r == 8 and model.qadapter_config.base_model == str(model_folder)


def test_a_4bit_bitsandbytes_base_trains(tmp_path, model_folder, tokenizer, rows):
    pytest.importorskip("bitsandbytes")  # optional: pip install bitsandbytes (0.50.2 runs 4-bit on CPU)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def quantized_base():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(model_folder, quantization_config=quantization, device_map="cpu")

    base = peft.prepare_model_for_kbit_training(quantized_base(), use_gradient_checkpointing=False)
    trainer = QAdapterTrainer(model=base, args=fast_args(tmp_path), train_dataset=rows, processing_class=tokenizer,
                              peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert len(logged_losses(trainer)) == 2 and all(map(torch.isfinite, torch.tensor(logged_losses(trainer))))
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", base_model=quantized_base())
    trained = lora_state(trainer.model)
    assert all(torch.equal(trained[name], value) for name, value in lora_state(loaded).items())
