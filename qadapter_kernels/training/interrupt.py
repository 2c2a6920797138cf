"""Stopping a training run on SIGINT/SIGTERM without losing it."""
from __future__ import annotations

import signal
from types import FrameType

from transformers import TrainerCallback

__all__ = ["StopOnSignal"]


class StopOnSignal(TrainerCallback):
    """A Trainer callback and context manager: the first SIGINT or SIGTERM finishes the optimizer
    step under way, saves a checkpoint and stops training; a second one raises ``KeyboardInterrupt``.

    Use it as ``with stop: trainer.train()`` with ``stop`` in the trainer's callbacks; ``received``
    is the signal number that stopped the run (None: none came). Handlers can only be installed from
    the main thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        self.received = None
        self._previous = {s: signal.signal(s, self._first) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _first(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, self._second)

    def _second(self, signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
