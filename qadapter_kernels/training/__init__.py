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
from ..model import QAdapterConfig

__all__ = [
    "PreferenceCollator", "PreferenceDataError", "PreferenceDataset", "PreferenceExample", "PreferenceStream",
    "QAdapterConfig", "QAdapterModel", "QAdapterTrainer", "QAdapterTrainingArguments", "TokenizedPair",
    "as_preference_dataset", "load_base_model", "load_preferences", "shipped_data_path",
    "tokenize_preference",
]


def __getattr__(name: str):
    # The trainer, its arguments and the model need transformers and peft: loaded on first use, so that
    # the data modules (and the command line's parser, which reads their defaults) import without them.
    if name == "QAdapterModel":
        from ..model import QAdapterModel

        return QAdapterModel
    if name == "QAdapterTrainingArguments":
        from .arguments import QAdapterTrainingArguments

        return QAdapterTrainingArguments
    if name == "QAdapterTrainer":
        from .trainer import QAdapterTrainer

        return QAdapterTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
