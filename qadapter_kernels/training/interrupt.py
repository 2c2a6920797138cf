"""Stopping a training run on SIGINT/SIGTERM at a safe point, without losing it."""
from __future__ import annotations

from transformers import TrainerCallback

from ..signal_latch import SignalLatch

__all__ = ["StopOnSignal"]


class StopOnSignal(TrainerCallback):
    """A Trainer callback: once ``latch`` has received a SIGINT or SIGTERM, the optimizer step under way
    finishes, a checkpoint is saved and training stops (a second signal raises ``KeyboardInterrupt``,
    see :class:`~qadapter_kernels.signal_latch.SignalLatch`)."""

    def __init__(self, latch: SignalLatch) -> None:
        self.latch = latch

    @property
    def received(self) -> int | None:
        """The signal that stopped the run (None: none came)."""
        return self.latch.received

    def on_step_end(self, args, state, control, **kwargs):
        if self.latch.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
