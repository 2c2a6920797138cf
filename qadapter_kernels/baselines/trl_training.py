"""SFT on the chosen answers and DPO (sigmoid loss, reference = adapter off) through TRL, with Q-Adapter's budget.

Both train the same LoRA as a Q-Adapter (``QAdapterConfig``'s r, alpha, dropout and target modules)
for the same optimizer steps, pairs per step, learning rate and data, so a comparison is fair.
The result is returned (and saved) as a ``QAdapterModel`` with ``alpha_tilde = 1, alpha_0 = 0``:
its "combined" policy is then the LoRA model's own softmax, so the evaluation code and the
lm-eval plug-in (``adapter=DIR``) score a baseline exactly as they score a Q-Adapter.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

import torch

from ..params import LEARNING_RATE, LR_SCHEDULER
from ..training import QAdapterConfig, QAdapterModel
from ..training.data import PreferenceExample

__all__ = ["BASELINE_METHODS", "TrainingBudget", "as_policy_model", "train_baseline", "trainable_plain_model"]

BASELINE_METHODS = ("sft", "dpo")


@dataclass(frozen=True)
class TrainingBudget:
    """What every method gets: optimizer steps, preference pairs per step, learning rate, tokens per sequence."""

    max_steps: int = 60
    batch_size: int = 4
    learning_rate: float = LEARNING_RATE
    max_length: int = 512
    seed: int = 42
    logging_steps: int = 10

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "max_length", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")


def _records(examples: list[PreferenceExample], method: str) -> list[dict]:
    if method == "sft":  # the chosen answer is the target; the prompt is not trained on
        return [{"prompt": e.prompt, "completion": e.chosen} for e in examples]
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]


def trainable_plain_model(causal_lm):
    """``causal_lm`` as ``transformers.Trainer`` accepts it (modified in place): a GGUF-loaded model keeps a
    quantizer marker that ``Trainer`` refuses, though its weights are already fp32."""
    quantizer = getattr(causal_lm, "hf_quantizer", None)
    if quantizer is not None:
        if any(p.dtype != torch.float32 for p in causal_lm.parameters()):
            raise ValueError("a quantized model must be dequantized to fp32 before SFT/DPO training")
        quantizer.remove_quantization_config(causal_lm)
    return causal_lm


def as_policy_model(peft_model, lora: QAdapterConfig) -> QAdapterModel:
    """A trained LoRA model as a ``QAdapterModel`` whose policy is the LoRA model's own (alpha_tilde=1, alpha_0=0)."""
    return QAdapterModel(peft_model, dataclasses.replace(lora, alpha_tilde=1.0, alpha_0=0.0))


def train_baseline(method: str, causal_lm, tokenizer, examples: list[PreferenceExample], *,
                   lora: QAdapterConfig | None = None, budget: TrainingBudget = TrainingBudget(),
                   dpo_beta: float = 0.1, output_dir: str | os.PathLike | None = None) -> QAdapterModel:
    """Trains ``causal_lm`` (modified in place: the LoRA is injected) with SFT or DPO; returns the policy model.

    ``lora``: the LoRA fields are used (default: ``QAdapterConfig()``'s, as ``qadapter train``).
    ``output_dir``: where the adapter folder (``QAdapterModel.save_pretrained`` + tokenizer) is written.
    """
    import datasets
    import transformers
    import trl

    if method not in BASELINE_METHODS:
        raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}")
    if not examples:
        raise ValueError("examples must hold at least one preference pair")
    if not dpo_beta > 0:
        raise ValueError(f"dpo_beta must be > 0, got {dpo_beta!r}")
    lora = (lora or QAdapterConfig()).validate()
    transformers.set_seed(budget.seed)  # the LoRA initialisation is random too
    common = dict(max_steps=budget.max_steps, per_device_train_batch_size=budget.batch_size,
                  learning_rate=budget.learning_rate, lr_scheduler_type=LR_SCHEDULER, weight_decay=0.0,
                  seed=budget.seed, logging_steps=budget.logging_steps, save_strategy="no", report_to=[],
                  bf16=False, fp16=False, max_length=budget.max_length, dataloader_num_workers=0,
                  gradient_checkpointing=False,  # TRL turns it on by default; the Q-Adapter trainer does not use it
                  dataloader_pin_memory=torch.cuda.is_available())
    dataset = datasets.Dataset.from_list(_records(examples, method))
    causal_lm = trainable_plain_model(causal_lm)
    with tempfile.TemporaryDirectory() as scratch:
        if method == "sft":
            args = trl.SFTConfig(output_dir=scratch, completion_only_loss=True, **common)
            trainer = trl.SFTTrainer(model=causal_lm, args=args, train_dataset=dataset, processing_class=tokenizer,
                                     peft_config=lora.lora_config())
        else:
            args = trl.DPOConfig(output_dir=scratch, beta=dpo_beta, loss_type=["sigmoid"], **common)
            # No ref_model: with a peft model, TRL's reference is the same model with the adapter off.
            trainer = trl.DPOTrainer(model=causal_lm, ref_model=None, args=args, train_dataset=dataset,
                                     processing_class=tokenizer, peft_config=lora.lora_config())
        trainer.train()
    model = as_policy_model(trainer.model, lora).eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model
