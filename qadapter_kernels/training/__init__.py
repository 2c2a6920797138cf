"""Training layer for Q-Adapter: preference data, model and trainer."""
from .data import (
    PreferenceCollator,
    PreferenceDataError,
    PreferenceDataset,
    PreferenceExample,
    PreferenceStream,
    TokenizedPair,
    as_preference_dataset,
    load_preferences,
    shipped_data_path,
    tokenize_preference,
)
from ..loading import load_base_model
from .arguments import QAdapterTrainingArguments
from ..model import QAdapterConfig, QAdapterModel
from .trainer import QAdapterTrainer

__all__ = [
    "PreferenceCollator", "PreferenceDataError", "PreferenceDataset", "PreferenceExample", "PreferenceStream",
    "QAdapterConfig", "QAdapterModel", "QAdapterTrainer", "QAdapterTrainingArguments", "TokenizedPair",
    "as_preference_dataset", "load_base_model", "load_preferences", "shipped_data_path",
    "tokenize_preference",
]
