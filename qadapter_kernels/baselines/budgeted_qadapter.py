"""A Q-Adapter trained under a ``TrainingBudget``: the comparison partner of the SFT and DPO baselines."""
from __future__ import annotations

import tempfile

import torch

from ..params import LR_SCHEDULER
from ..training import PreferenceCollator, PreferenceDataset, QAdapterConfig, QAdapterModel, QAdapterTrainer
from ..training.data import PreferenceExample
from .trl_training import TrainingBudget

__all__ = ["train_qadapter"]


def train_qadapter(causal_lm, tokenizer, examples: list[PreferenceExample], config: QAdapterConfig,
                   budget: TrainingBudget = TrainingBudget()) -> QAdapterModel:
    """Trains a Q-Adapter on ``causal_lm`` (modified in place) with the same optimizer settings as the baselines."""
    import transformers

    transformers.set_seed(budget.seed)  # the LoRA initialisation is random too
    model = QAdapterModel(causal_lm, config)
    dataset = PreferenceDataset(examples, tokenizer, max_length=budget.max_length)
    with tempfile.TemporaryDirectory() as scratch:
        args = transformers.TrainingArguments(
            output_dir=scratch, max_steps=budget.max_steps, per_device_train_batch_size=budget.batch_size,
            learning_rate=budget.learning_rate, lr_scheduler_type=LR_SCHEDULER, weight_decay=0.0, seed=budget.seed,
            logging_steps=budget.logging_steps, save_strategy="no", report_to=[], bf16=False,
            remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available())
        QAdapterTrainer(model=model, args=args, train_dataset=dataset,
                        data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer).train()
    return model.eval()
