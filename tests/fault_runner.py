"""Runs ``qadapter ARGV`` with a fault injected at a chosen point: ``python fault_runner.py SPEC ARGV...``

SPEC is ``count`` (run normally, then print how often each point was reached, as JSON on the last
line of stderr) or ``SIGNAL@POINT:N``: at the N-th time POINT is reached, the process sends
SIGNAL (KILL, INT or TERM) to itself. Points:

- ``load``: loading the tokenizer, while the command is still starting (before any training);
- ``step``: the start of a training step;
- ``write``: ``torch.save`` (optimizer, scheduler, RNG states); the signal comes after HALF of
  the file is written, so a kill leaves a truncated file;
- ``tensors``: ``safetensors`` writing an adapter file (also cut in half);
- ``replace``: ``os.replace`` (an adapter file moved into place, a record written);
- ``rename``: ``os.rename`` (a checkpoint published, a doomed one renamed before deletion);
- ``rmtree``: ``shutil.rmtree`` (a staging folder or an old checkpoint deleted).

A KILL ends the process at once; INT and TERM run the program's handlers and let it go on.
"""
import io
import json
import os
import shutil
import signal
import sys
from collections import Counter

import peft.peft_model
import safetensors.torch
import torch

from qadapter_kernels.app import train as train_command
from qadapter_kernels.app.cli import main
from qadapter_kernels.training.trainer import QAdapterTrainer

POINTS = ("load", "step", "write", "tensors", "replace", "rename", "rmtree")
reached: Counter = Counter()
fault: tuple[str, int, int] | None = None  # (point, n, signal)


def _hit(point: str) -> bool:
    """Counts a visit; True when it is the one the fault is for."""
    reached[point] += 1
    return fault is not None and fault[0] == point and reached[point] == fault[1]


def _fire() -> None:
    os.kill(os.getpid(), fault[2])


def _wrap(owner, name: str, point: str, half_write_of=None) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if not _hit(point):
            return original(*args, **kwargs)
        if half_write_of is None or not isinstance(args[1], (str, os.PathLike)):
            _fire()
            return original(*args, **kwargs)
        data, path = half_write_of(original, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _fire()
            f.write(data[len(data) // 2:])
        return None

    setattr(owner, name, wrapped)


def _torch_bytes(original, obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    original(obj, buffer, *args, **kwargs)
    return buffer.getvalue(), f


def _safetensors_bytes(original, tensors, filename, metadata=None):
    return safetensors.torch.save(tensors, metadata=metadata), filename


def install() -> None:
    _wrap(train_command, "load_tokenizer", "load")
    _wrap(QAdapterTrainer, "training_step", "step")
    _wrap(torch, "save", "write", _torch_bytes)
    _wrap(peft.peft_model, "safe_save_file", "tensors", _safetensors_bytes)  # peft's own import of it
    _wrap(os, "replace", "replace")
    _wrap(os, "rename", "rename")
    _wrap(shutil, "rmtree", "rmtree")


def parse(spec: str) -> tuple[str, int, int] | None:
    if spec == "count":
        return None
    sig, _, rest = spec.partition("@")
    point, _, n = rest.partition(":")
    if point not in POINTS:
        raise SystemExit(f"unknown point {point!r}")
    return point, int(n), getattr(signal, f"SIG{sig}")


if __name__ == "__main__":
    fault = parse(sys.argv[1])
    install()
    try:
        code = main(sys.argv[2:])
    except SystemExit as e:
        code = e.code
    print(json.dumps(dict(reached)), file=sys.stderr, flush=True)
    sys.exit(code)
