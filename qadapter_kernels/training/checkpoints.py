"""Trainer checkpoints that are whole or absent: staged, flushed, then renamed into place.

A checkpoint is written into ``.saving-checkpoint-N/checkpoint-N`` beside the final ones, every
file flushed to disk, then renamed to ``checkpoint-N`` in one ``rename``; a kill at any point
leaves either the previous checkpoints alone or the new one complete. Rotation renames a doomed
checkpoint to ``.deleting-checkpoint-N`` before removing it, so a half-deleted folder never
carries a checkpoint's name. Whatever a kill leaves (staging and deleting folders, the staging
folders of ``QAdapterModel.save_pretrained``, a ``checkpoint-N`` another tool left incomplete) is
found by ``leftovers`` and removed by ``remove_leftovers``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

__all__ = ["CHECKPOINT_PREFIX", "RUN_RECORD_NAME", "TRAINER_STATE_NAME", "checkpoint_step", "complete_checkpoints",
           "fsync_tree", "is_complete", "leftovers", "publish_checkpoint", "remove_checkpoint", "remove_leftovers",
           "remove_paths", "rotate_checkpoints", "staging_folder", "trained_steps"]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
# What the run that wrote a folder was (data, model, hyper-parameters): written by the trainer when given one.
RUN_RECORD_NAME = "qadapter_run.json"
_STAGING_PREFIX = ".saving-"
_DELETING_PREFIX = ".deleting-"
# QAdapterModel.save_pretrained's staging folders and the temporary files of atomic replacements.
_TEMPORARY = re.compile(r"^\..+\.(saving-[0-9a-f]+|tmp-[0-9]+)$")
_REQUIRED = (TRAINER_STATE_NAME, "adapter_model.safetensors", "qadapter_config.json")


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    name = path.name
    if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def trained_steps(checkpoint: Path) -> int | None:
    """The optimizer steps recorded in a checkpoint's trainer state (None: unreadable)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
        steps = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def is_complete(checkpoint: Path) -> bool:
    """A ``checkpoint-N`` folder holding the files resume reads and a trainer state at step N."""
    step = checkpoint_step(checkpoint)
    return (step is not None and checkpoint.is_dir() and all((checkpoint / n).is_file() for n in _REQUIRED)
            and trained_steps(checkpoint) == step)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``output_dir``, oldest (fewest steps) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """What interrupted saves left in ``output_dir``: staging/deleting folders and incomplete checkpoints."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.iterdir():
        name = path.name
        if name.startswith((_STAGING_PREFIX, _DELETING_PREFIX)) or _TEMPORARY.match(name):
            out.append(path)
        elif checkpoint_step(path) is not None and not is_complete(path):
            out.append(path)
    return sorted(out)


def remove_paths(paths: list[Path]) -> list[Path]:
    """Removes each file or folder; returns ``paths``."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return paths


def remove_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Removes ``leftovers(output_dir)``; returns what was removed."""
    return remove_paths(leftovers(output_dir))


def staging_folder(output_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is published (the same path on every process)."""
    return Path(output_dir) / f"{_STAGING_PREFIX}{CHECKPOINT_PREFIX}{step}"


def fsync_tree(root: Path) -> None:
    """Flushes every file under ``root`` and the folders holding them to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_folder(Path(folder))


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Flushes ``staged`` and renames it to ``final`` (an older folder of that name is retired first)."""
    fsync_tree(staged)
    if final.exists():
        remove_checkpoint(final)
    os.rename(staged, final)
    _fsync_folder(final.parent)


def remove_checkpoint(checkpoint: Path) -> None:
    """Renames the folder out of the checkpoint names, then deletes it."""
    doomed = checkpoint.parent / f"{_DELETING_PREFIX}{checkpoint.name}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed)


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Keeps the ``keep`` newest complete checkpoints (None: all)."""
    if keep is None:
        return
    for checkpoint in complete_checkpoints(output_dir)[:-keep] if keep > 0 else complete_checkpoints(output_dir):
        remove_checkpoint(checkpoint)
