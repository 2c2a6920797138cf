"""Baselines for Q-Adapter with the same budget: SFT on the chosen answers and DPO, through TRL (``baselines`` extra).

    python3 -m qadapter_kernels.baselines --method dpo --data pairs.jsonl --output-dir out/dpo
"""
from .budgeted_qadapter import train_qadapter
from .trl_training import BASELINE_METHODS, TrainingBudget, as_policy_model, train_baseline

__all__ = ["BASELINE_METHODS", "TrainingBudget", "as_policy_model", "train_baseline", "train_qadapter"]
