"""SIGINT/SIGTERM recorded for the work to stop at its next safe point, not wherever they land.

A signal handled the default way raises ``KeyboardInterrupt`` at whatever line runs: in the middle
of a save, or of an import of a native module (which then cannot be imported again in the process).
The latch only records the first signal; the program checks ``received`` where stopping is safe.
Standard library only, so it can be armed before the heavy imports.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType

__all__ = ["SignalLatch"]


class SignalLatch:
    """A context manager (main thread only): inside it, the first SIGINT or SIGTERM sets ``received``;
    a second one raises ``KeyboardInterrupt`` (the user insists). The previous handlers come back on exit.

    ``announce``: what the first signal prints to stderr at once, given the signal's number: what the
    program will do now and how long it may take, so that the user does not press Ctrl-C again to
    find out. Reassign it as the work moves on (None: print nothing).

    ``abort_message``: None, a second signal raises ``KeyboardInterrupt`` where the program is; set, it
    prints this line and ends the process at once with status 130. For imports: an exception raised
    inside the import of a native module leaves it half-loaded, and the next import of it fails with an
    unrelated ``ImportError`` instead of stopping.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: Callable[[int], str] | None = None, abort_message: str | None = None) -> None:
        self.received: int | None = None
        self.announce = announce
        self.abort_message = abort_message
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "SignalLatch":
        self.received = None
        self._previous = {s: signal.signal(s, self._first) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def loading(self, prefix: str) -> None:
        """The program (named by ``prefix``, e.g. ``"qadapter train"``) is importing or loading and has
        written nothing: the first signal stops it when loading ends, a second one ends it at once."""

        def announce(signum: int) -> str:
            return (f"{prefix}: {signal.Signals(signum).name} received: stopping as soon as loading ends (nothing "
                    "is written); Ctrl-C again aborts now")

        self.announce = announce
        self.abort_message = f"{prefix}: interrupted while loading: nothing was written"

    def disarm(self) -> None:
        """Hands the signals back to the previous handlers now (from here a Ctrl-C interrupts at once);
        ``KeyboardInterrupt`` when one came while armed, so that the work it deferred does not start."""
        self.__exit__()
        if self.received is not None:
            raise KeyboardInterrupt

    def _first(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, self._second)
        if self.announce is not None:
            # os.write, not print: the signal may have landed inside a print to the same stream.
            os.write(2, (self.announce(signum) + "\n").encode())

    def _second(self, signum: int, frame: FrameType | None) -> None:
        if self.abort_message is not None:
            os.write(2, (self.abort_message + "\n").encode())
            os._exit(128 + signal.SIGINT)
        raise KeyboardInterrupt
