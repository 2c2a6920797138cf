"""The output folder of ``qadapter train``: whose run it holds, what to resume, what is finished.

A folder belongs to one run, described by its record (``qadapter_run.json``: a hash of the data,
the model, the hyper-parameters that change the result). A new run refuses a non-empty folder
unless told to overwrite it; a resume continues only the checkpoints that carry the same record,
from the newest complete one, after removing what interrupted saves left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..training import checkpoints
from ..model.adapter_files import ADAPTER_WEIGHTS_NAME
from ..model import QADAPTER_CONFIG_NAME
from .common import UserError

__all__ = ["ResumePlan", "adapter_is_published", "check_free_space", "data_sha256", "file_sha256", "plan_run",
           "publish_final_adapter", "read_record", "write_record"]

# Keys of a record that change as the run goes on, not what run it is.
PROGRESS_KEYS = ("completed_steps",)
# Top-level files a run writes (besides the tokenizer), removed by --overwrite.
_RUN_FILES = (ADAPTER_WEIGHTS_NAME, "adapter_config.json", QADAPTER_CONFIG_NAME, "training_args.json", "README.md",
              checkpoints.RUN_RECORD_NAME)
_ADAPTER_FILES = (ADAPTER_WEIGHTS_NAME, "adapter_config.json", QADAPTER_CONFIG_NAME)


def data_sha256(source: Path | str) -> str:
    """The hash of ``--data``'s bytes: a file's own hash; for a folder or a cached dataset, the hash
    of its files' names and hashes in order."""
    from ..training.sources import source_files

    if isinstance(source, Path) and source.is_file():
        return file_sha256(source)
    if isinstance(source, Path):
        files = source_files(source)
    else:
        name, _, split = source.partition(":")
        files = source_files(name, split or None)
    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in files).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(folder: Path) -> dict | None:
    """The run record in ``folder`` without its progress keys (None: absent or unreadable)."""
    try:
        record = json.loads((folder / checkpoints.RUN_RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {k: v for k, v in record.items() if k not in PROGRESS_KEYS}


def completed_steps(folder: Path) -> int | None:
    """The steps of a finished run whose final adapter is in ``folder`` (None: not finished)."""
    try:
        steps = json.loads((folder / checkpoints.RUN_RECORD_NAME).read_text()).get("completed_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def write_record(folder: Path, record: dict, **progress) -> None:
    """Writes the record atomically (a temporary file renamed over the old one)."""
    text = json.dumps({**record, **progress}, indent=2, sort_keys=True)
    tmp = folder / f".{checkpoints.RUN_RECORD_NAME}.tmp-{os.getpid()}"
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / checkpoints.RUN_RECORD_NAME)


def _differences(saved: dict | None, record: dict) -> str:
    if saved is None:
        return "no qadapter run record"
    keys = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
    nested = []
    for key in keys:
        a, b = saved.get(key), record.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            nested += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            nested.append(key)
    return "differs in " + ", ".join(nested)


@dataclass(frozen=True)
class ResumePlan:
    """What ``qadapter train`` does in its folder: ``checkpoint`` to resume (None: from step 0),
    ``removed`` leftovers of interrupted saves, ``finished_at`` when the run already ended there."""

    checkpoint: Path | None
    removed: tuple[Path, ...]
    finished_at: int | None = None


def plan_run(output_dir: Path, record: dict, resume: bool | str | None, overwrite: bool,
             target_steps) -> ResumePlan:
    """Checks the folder against this run and says where to start (``UserError`` when it must not).

    ``target_steps(trainer_state_folder) -> int | None``: the step count this command trains to,
    given a checkpoint (None: unknown, train on).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file")
    # The temporary files and folders of interrupted saves say nothing about whose folder it is (an
    # incomplete checkpoint-N might be another tool's: it counts, and is only removed from our own run).
    stray = {p for p in checkpoints.leftovers(output_dir) if checkpoints.checkpoint_step(p) is None}
    entries = sorted(set(output_dir.iterdir()) - stray) if output_dir.is_dir() else []
    if overwrite:
        if resume:
            raise UserError("--overwrite starts the run over: it cannot be combined with --resume-from-checkpoint")
        _clear_run(output_dir)
        return ResumePlan(None, ())
    saved = read_record(output_dir) if entries else None
    if entries and saved != record:
        raise UserError(f"--output-dir {output_dir} is not empty and holds another run ({_differences(saved, record)}):"
                        " pass --overwrite to replace it, or choose another folder")
    if not resume:
        if entries:
            raise UserError(f"--output-dir {output_dir} already holds this run: pass --resume-from-checkpoint to "
                            "continue it, or --overwrite to start over")
        return ResumePlan(None, tuple(checkpoints.remove_paths(sorted(stray))))
    if not entries:
        raise UserError(f"no checkpoint to resume: {output_dir} holds no run")
    removed = tuple(checkpoints.remove_leftovers(output_dir))
    if isinstance(resume, str):
        checkpoint = Path(resume)
        if not checkpoints.is_complete(checkpoint):
            raise UserError(f"--resume-from-checkpoint {checkpoint} is not a complete checkpoint")
        if read_record(checkpoint) != record:
            differences = _differences(read_record(checkpoint), record)
            raise UserError(f"{checkpoint} is a checkpoint of another run ({differences})")
    else:
        ours = [c for c in checkpoints.complete_checkpoints(output_dir) if read_record(c) == record]
        checkpoint = ours[-1] if ours else None
    done, target = completed_steps(output_dir), target_steps(None)
    if done is not None and target is not None and done >= target and adapter_is_published(output_dir):
        return ResumePlan(checkpoint, removed, finished_at=done)
    if checkpoint is not None:
        target = target_steps(checkpoint)
        steps = checkpoints.trained_steps(checkpoint)
        if target is not None and steps is not None and steps >= target:
            return ResumePlan(checkpoint, removed, finished_at=steps)
    return ResumePlan(checkpoint, removed)


def _clear_run(output_dir: Path) -> None:
    if not output_dir.is_dir():
        return
    checkpoints.remove_leftovers(output_dir)
    for checkpoint in checkpoints.complete_checkpoints(output_dir):
        checkpoints.remove_checkpoint(checkpoint)
    for name in _RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)


def adapter_is_published(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _ADAPTER_FILES)


def publish_final_adapter(checkpoint: Path, output_dir: Path) -> None:
    """Copies a checkpoint's adapter files to the top of the output folder, each replaced atomically."""
    for name in _ADAPTER_FILES:
        tmp = output_dir / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(checkpoint / name, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output_dir / name)


def check_free_space(output_dir: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise UserError(f"--output-dir {output_dir} has {free / 2**20:.1f} MiB free; a checkpoint of this run takes "
                        f"about {needed_bytes / 2**20:.1f} MiB")
