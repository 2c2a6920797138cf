"""Pieces shared by the ``qadapter`` commands and the demo: argument types, the hyper-parameter
flags (generated from ``qadapter_kernels.params``), data and model resolution as one-line user
errors, pair evaluation and side-by-side printing."""
from __future__ import annotations

import argparse
import dataclasses
import enum
import itertools
import math
import os
import shutil
import textwrap
from pathlib import Path

from ..params import PRESETS, QAdapterParams

__all__ = [
    "ArgumentParser", "HelpFormatter", "UserError", "add_param_arguments", "build_dataset", "check_writable_file",
    "check_writable_folder", "config_from_args", "evaluate_pairs", "finite_float", "load_base", "load_tokenizer",
    "on_main_process", "positive_float", "positive_int", "resolve_data_path", "resolve_model_path", "side_by_side",
]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as ``qadapter CMD: error: message``, exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every flag's default (unless its help already says it,
    or it has none: a required flag, or an optional one whose absence the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as ONE line, ``prog: error: message`` (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


# ----------------------------------------------------------------------------- hyper-parameter flags

# Why a flag matters, for the fields whose name does not say it; names and defaults come from the dataclasses.
_FIELD_HELP = {
    "alpha_tilde": "temperature of the customised policy",
    "alpha_0": "weight of the base policy in the customised policy",
    "gamma": "Bellman discount",
    "beta": "weight of the squared-reward regulariser",
    "variant": "reward variant",
    "length_norm": "length normalisation of each response's score",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "comma-separated names of the modules that get LoRA",
}
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")


def _flag_type(field: dataclasses.Field):
    """The argparse type of a field, from its annotation (a string: the dataclasses use postponed annotations)."""
    if isinstance(field.default, enum.Enum):
        return str
    kind = str(field.type)
    if kind == "int":
        return positive_int
    if kind == "float":
        return finite_float
    if kind.startswith("tuple[str"):
        return lambda text: tuple(m.strip() for m in text.split(",") if m.strip())
    raise AssertionError(f"no command-line type for {field.name}: {kind}")


def _shown(default: object) -> str:
    if isinstance(default, enum.Enum):
        return str(default.value)
    if isinstance(default, tuple):
        return ",".join(default)
    return str(default)


def add_param_arguments(parser: argparse.ArgumentParser, with_lora: bool = True, defaults=None) -> None:
    """One flag per ``QAdapterParams`` field (and LoRA field of ``QAdapterConfig``), default shown in help.

    The flags default to None ("not given"), so a saved adapter's config or a preset stays in force
    unless a flag overrides it. ``defaults``: the config whose values the help shows (None: the
    dataclasses' defaults).
    """
    from ..model.config import QAdapterConfig

    defaults = defaults if defaults is not None else QAdapterConfig()

    group = parser.add_argument_group("Q-Adapter hyper-parameters (qadapter_kernels/params.py)")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="starting values (authors: the released code's reward and its padded length "
                            "normalisation); the flags below override them (default: default)")
    wanted = {f.name for f in dataclasses.fields(QAdapterParams)} | (set(LORA_FIELDS) if with_lora else set())
    fields = [f for f in dataclasses.fields(QAdapterConfig) if f.name in wanted]
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{_FIELD_HELP.get(field.name, field.name)} (default: {_shown(getattr(defaults, field.name))})"
        if isinstance(field.default, bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        choices = [v.value for v in type(field.default)] if isinstance(field.default, enum.Enum) else None
        group.add_argument(flag, dest=field.name, type=_flag_type(field), choices=choices, default=None,
                           help=help_text)


def config_from_args(args: argparse.Namespace, base=None):
    """A validated ``QAdapterConfig``: ``base`` (else the preset, else the defaults) with the flags given on top."""
    from ..model.config import QAdapterConfig

    preset_name = getattr(args, "preset", None)
    if base is None or preset_name is not None:
        preset = PRESETS[preset_name or "default"]
        base = dataclasses.replace(base or QAdapterConfig(),
                                   **{f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)})
    names = {f.name for f in dataclasses.fields(QAdapterConfig)}
    overrides = {name: value for name, value in vars(args).items() if name in names and value is not None}
    try:
        return dataclasses.replace(base, **overrides).validate()
    except (ValueError, TypeError) as e:
        raise UserError(f"bad hyper-parameter: {e}") from None


# ----------------------------------------------------------------------------- data and model


def parse_shipped_data(spec: str) -> tuple[str, str]:
    """(preference name, split) of ``shipped``, ``shipped:SPLIT``, ``shipped:NAME`` or ``shipped:NAME:SPLIT``.

    The name defaults to ``preferences.DEFAULT_PREFERENCE``, the split to train.
    """
    from ..preferences import DEFAULT_PREFERENCE, PREFERENCE_CHECKERS
    from ..training.data import SHIPPED_SPLITS

    head, *rest = spec.split(":")
    name = rest.pop(0) if rest and rest[0] not in SHIPPED_SPLITS else DEFAULT_PREFERENCE
    split = rest.pop(0) if rest else SHIPPED_SPLITS[0]
    if head != "shipped" or rest:
        raise UserError(f"bad shipped data {spec!r}: use shipped[:NAME][:SPLIT]")
    if name not in PREFERENCE_CHECKERS:
        raise UserError(f"no shipped preference {name!r} in {spec!r}; shipped: {', '.join(PREFERENCE_CHECKERS)}")
    if split not in SHIPPED_SPLITS:
        raise UserError(f"no shipped split {split!r} in {spec!r}; splits: {', '.join(SHIPPED_SPLITS)}")
    return name, split


def resolve_data_path(data: str) -> Path | str:
    """``--data``'s source: ``shipped[:NAME][:SPLIT]`` (preference data shipped with the package), a
    file or a ``Dataset.save_to_disk`` folder (a Path), or a dataset name in the local Hugging Face
    cache, ``NAME[:SPLIT]`` (kept as given; loading says whether the cache has it)."""
    from ..training.data import shipped_data_path
    from ..training.sources import is_dataset_name

    if data == "shipped" or data.startswith("shipped:"):
        name, split = parse_shipped_data(data)
        return shipped_data_path(split, name)
    path = Path(data).expanduser()
    if path.exists():
        return path
    if is_dataset_name(data.partition(":")[0]):
        return data
    raise UserError(f"data file not found: {path}")


def resolve_model_path(model: str | None) -> Path:
    """``--model``'s path, or the embedded default; checked with the loader's rule before anything loads."""
    from ..loading import EMBEDDED_MODEL, ModelLoadError, embedded_model_path, find_model_files

    try:
        path = embedded_model_path() if model in (None, EMBEDDED_MODEL) else Path(model)
        find_model_files(path)
    except ModelLoadError as e:
        raise UserError(str(e)) from None
    return path


def load_tokenizer(path: Path):
    from .. import loading

    try:
        return loading.load_tokenizer(path)
    except loading.ModelLoadError as e:
        raise UserError(str(e)) from None


def load_base(path: Path):
    from .. import loading

    try:
        return loading.load_base_model(path)
    except loading.ModelLoadError as e:
        raise UserError(str(e)) from None


def build_dataset(data: str, tokenizer, max_length: int, max_prompt_length: int, **options):
    """Loads and tokenizes ``--data`` (see ``resolve_data_path``); bad rows become ``UserError``.

    ``options``: further keywords of ``PreferenceDataset`` (how prompts are cut).
    """
    from ..training.data import PreferenceDataset

    source, split = resolve_data_path(data), None
    if isinstance(source, str):
        source, _, split = source.partition(":")
    try:
        return PreferenceDataset(source, tokenizer, max_length, max_prompt_length, split=split or None, **options)
    except (ValueError, FileNotFoundError) as e:  # PreferenceDataError included
        raise UserError(str(e)) from None


def check_writable_folder(folder: str | os.PathLike, flag: str) -> None:
    """Fails now, not after the work, when nothing can be written in ``folder`` (created if needed)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.tmp-{os.getpid()}"  # a name training.checkpoints.leftovers knows
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write in {flag} {folder}: {e.strerror or e}") from None


def on_main_process(work):
    """``work()`` run by the main process alone; every process of the launched group returns its result,
    or raises its ``UserError``. Without a process group it is just ``work()``."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    box = [None]
    if not grouped or dist.get_rank() == 0:
        try:
            box = [(work(), None)]
        except UserError as e:
            box = [(None, str(e))]
    if grouped:
        dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """Fails now, not after the work, when ``path`` cannot be written (its folder is created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file")
    check_writable_folder(path.parent, flag)


# ----------------------------------------------------------------------------- evaluation and printing


def evaluate_pairs(model, dataset, collator, batch_size: int, progress: str | None = None) -> dict[str, float]:
    """Pair accuracy (chosen score > rejected score), mean margin and mean loss over ``dataset``.

    ``progress``: the label of a progress bar over the batches (None: no bar).
    """
    import torch
    from tqdm.auto import tqdm

    model.eval()
    correct, margins, loss_sum = 0, [], 0.0
    starts = range(0, len(dataset), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
            pairs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            out = model.compute_loss(**collator(pairs))
            margin = (out.chosen_scores - out.rejected_scores).float()
            correct += int((margin > 0).sum())
            margins.extend(margin.tolist())
            loss_sum += float(out.loss) * len(pairs)
    n = len(dataset)
    return {"pairs": n, "accuracy": correct / n, "mean_margin": sum(margins) / n, "mean_loss": loss_sum / n}


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int | None = None) -> str:
    """Two texts in two wrapped columns under their titles."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    col = max((width - 3) // 2, 20)

    def wrap(text: str) -> list[str]:
        return textwrap.wrap(text, col, replace_whitespace=True) or [""]

    lines = [f"{left_title:<{col}} | {right_title}", f"{'-' * col}-+-{'-' * col}"]
    lines += [f"{a:<{col}} | {b}" for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue="")]
    return "\n".join(lines)
