"""Hooks of the shipped lm-eval tasks (lm-eval loads this file by path through ``!function utils.NAME``)."""
import datasets

from qadapter_kernels.evaluation.checkers import (  # noqa: F401  (named by the task YAMLs)
    preference_process_results,
    read_task_records,
    retention_choices,
    retention_process_results,
)


def load_retention(**_metadata) -> datasets.DatasetDict:
    """The retention probe from the package's own file (no path relative to the working directory)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_task_records("retention"))})


def load_preference(preference: str = "lowercase", **_metadata) -> datasets.DatasetDict:
    """A preference-satisfaction task's prompts; ``preference`` comes from the task YAML's ``dataset_kwargs``."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_task_records("preference", preference))})
