"""Stopping a training run on SIGINT/SIGTERM at a safe point, without losing it."""
from __future__ import annotations

import signal

from transformers import TrainerCallback

from ..signal_latch import SignalLatch

__all__ = ["StopOnSignal"]


class StopOnSignal(TrainerCallback):
    """A Trainer callback: once ``latch`` has received a SIGINT or SIGTERM, the optimizer step under way
    finishes, a checkpoint is saved and training stops (a second signal raises ``KeyboardInterrupt``,
    see :class:`~qadapter_kernels.signal_latch.SignalLatch`).

    From construction on, the first signal prints at once which step will finish before the save
    (``prefix`` starts the line: the program's name), since a step may take minutes.
    """

    def __init__(self, latch: SignalLatch, prefix: str = "", first_step: int = 1) -> None:
        self.latch = latch
        self.prefix = prefix
        self._step = first_step  # the step that runs or will run next
        latch.announce = self._announce

    @property
    def received(self) -> int | None:
        """The signal that stopped the run (None: none came)."""
        return self.latch.received

    def _announce(self, signum: int) -> str:
        return (f"{self.prefix}{signal.Signals(signum).name} received: finishing step {self._step}, then saving a "
                f"resumable checkpoint; Ctrl-C again aborts without saving")

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._step = state.global_step + 1  # a signal during the evaluation or save that follow: the next step
        if self.latch.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
