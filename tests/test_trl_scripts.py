"""TRL's own DPO script runs with the class swap alone, and every DPOConfig field has a stated fate.

``QAdapterTrainingArguments`` accepts every field of the installed TRL's ``DPOConfig``; each one that
``TrainingArguments`` does not declare is in exactly one table of ``training/dpo_fields.py``
(honoured, refused with a reason, ignored with a reason), so a field a new TRL adds fails here.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from qadapter_kernels.training import QAdapterTrainer, QAdapterTrainingArguments, load_preferences, shipped_data_path
from qadapter_kernels.training.dpo_fields import HONOURED, IGNORED, REFUSED

trl = pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parent.parent

# A value each refused field does not accept (DPO features the method does not have).
REFUSED_VALUES = {
    "router_aux_loss_coef": 0.01, "truncation_mode": "keep_end", "padding_free": True, "pad_to_multiple_of": 8,
    "loss_type": ["ipo"], "loss_weights": [1.0], "ld_alpha": 0.5, "f_divergence_type": "js_divergence",
    "label_smoothing": 0.1, "use_weighting": True, "activation_offloading": True, "sync_ref_model": True,
    "pad_token": "<pad>",
}


def dpo_only_fields() -> list[dataclasses.Field]:
    inherited = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return [f for f in dataclasses.fields(trl.DPOConfig) if f.name not in inherited]


def test_every_dpo_config_field_is_honoured_refused_or_ignored():
    tables = {"honoured": set(HONOURED), "refused": set(REFUSED), "ignored": set(IGNORED)}
    for f in dpo_only_fields():
        homes = [name for name, fields in tables.items() if f.name in fields]
        assert len(homes) == 1, f"DPOConfig.{f.name} must be in exactly one table of dpo_fields.py, is in {homes}"
    known = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    assert set().union(*tables.values()) <= known, "a table names a field this TRL's DPOConfig does not have"
    ours = {f.name for f in dataclasses.fields(QAdapterTrainingArguments)}
    assert known <= ours, f"QAdapterTrainingArguments lacks {sorted(known - ours)}"
    assert all(reason.strip() for reason in [*IGNORED.values(), *(r for _, r in REFUSED.values())])


def test_dpo_config_defaults_are_accepted_and_refused_values_name_the_field(tmp_path):
    defaults = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for f in dpo_only_fields() if f.name in REFUSED}
    QAdapterTrainingArguments(output_dir=str(tmp_path), **defaults)  # what TRL's parser passes by default
    assert set(REFUSED_VALUES) == set(REFUSED)
    for name, value in REFUSED_VALUES.items():
        with pytest.raises(ValueError, match=rf"^{name}=.*: {re.escape(REFUSED[name][1])}$"):
            QAdapterTrainingArguments(output_dir=str(tmp_path), **{name: value})


def test_honoured_fields_take_effect_in_the_arguments(tmp_path):
    args = QAdapterTrainingArguments(output_dir=str(tmp_path), precompute_ref_log_probs=True, loss_type="sigmoid",
                                     model_init_kwargs='{"dtype": "bfloat16"}', pad_to_multiple_of="auto")
    assert args.precompute_base is True and args.loss_type == ["sigmoid"] and args.pad_to_multiple_of is None
    assert args.model_init_kwargs == {"dtype": "bfloat16"}  # the command line's JSON, parsed as DPOConfig does


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from cli_helpers import save_tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder)
    return folder


def rows(n: int = 6) -> list[dict]:
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
            for e in load_preferences(shipped_data_path())[:n]]


def fast_args(output_dir, **overrides) -> QAdapterTrainingArguments:
    settings = dict(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                    max_length=96, save_strategy="no", disable_tqdm=True, report_to="none")
    return QAdapterTrainingArguments(**{**settings, **overrides})


def test_trainer_honours_model_init_kwargs_dropout_and_refuses_a_reference_model(tmp_path, model_folder):
    args = fast_args(tmp_path, model_init_kwargs={"dtype": torch.bfloat16}, disable_dropout=True)
    trainer = QAdapterTrainer(model=str(model_folder), args=args, train_dataset=rows())
    assert trainer.model.peft_model.get_base_model().dtype == torch.bfloat16
    dropouts = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.0 for p in dropouts) and trainer.model.qadapter_config.lora_dropout == 0.0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model_folder)
    with pytest.raises(ValueError, match="model_init_kwargs or quantization_config"):
        QAdapterTrainer(model=loaded, args=args, train_dataset=rows())
    with pytest.raises(ValueError, match="ref_model must be None"):
        QAdapterTrainer(model=str(model_folder), ref_model=loaded, args=fast_args(tmp_path), train_dataset=rows())


# --------------------------------------------------------------------------- TRL's real dpo.py


def swapped_dpo_script() -> tuple[str, str]:
    """(TRL's scripts/dpo.py, the same with DPOConfig/DPOTrainer swapped for the Q-Adapter classes)."""
    source = (Path(trl.__file__).parent / "scripts" / "dpo.py").read_text()
    swapped = source
    for trl_name, ours in (("DPOTrainer", "QAdapterTrainer"), ("DPOConfig", "QAdapterTrainingArguments")):
        # The name leaves TRL's import line and gets one of its own from qadapter_kernels.
        swapped, count = re.subn(rf"^([ \t]*)from trl import (.*)\b{trl_name}, ",
                                 rf"\1from qadapter_kernels import {ours}\n\1from trl import \2", swapped,
                                 flags=re.MULTILINE)
        assert count == 1, f"TRL's dpo.py no longer imports {trl_name} as this swap expects"
        swapped = re.sub(rf"\b{trl_name}\b", ours, swapped)
    return source, swapped


def changed_lines(before: str, after: str) -> tuple[int, int]:
    """(lines removed, lines added) of the unified diff."""
    diff = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="")][2:]
    return sum(line.startswith("-") for line in diff), sum(line.startswith("+") for line in diff)


def test_the_docs_state_the_real_number_of_changed_lines():
    removed, added = changed_lines(*swapped_dpo_script())
    docs = (ROOT / "docs" / "from-trl.md").read_text()
    assert f"TRL's own `trl/scripts/dpo.py` changes in {removed} lines (and gains {added - removed} import" in docs


def test_trls_dpo_script_trains_with_the_class_swap_alone(tmp_path, model_folder):
    _, swapped = swapped_dpo_script()
    script = tmp_path / "dpo_qadapter.py"
    script.write_text(swapped)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows()))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--dataset_name", str(data), "--model_name_or_path", str(model_folder),
         "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "96",
         "--use_cpu", "--report_to", "none", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
         "--lora_target_modules", "q_proj", "v_proj", "--eval_strategy", "steps", "--eval_steps", "2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    from qadapter_kernels.model import QAdapterModel

    model = QAdapterModel.from_pretrained(out)
    assert model.qadapter_config.lora_r == 4 and model.qadapter_config.base_model == str(model_folder)
    assert sorted(model.qadapter_config.target_modules) == ["q_proj", "v_proj"]
