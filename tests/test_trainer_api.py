"""The TRL-style trainer API (issue 12 item 2): QAdapterTrainingArguments and QAdapterTrainer(model=..., ...)."""
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
