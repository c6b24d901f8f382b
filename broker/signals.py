"""SIGTERM, SIGHUP and SIGINT as a request to stop cleanly, for the parts that hold files.

``kill``, a closed terminal and Ctrl-C must not leave a recording or a results file open
for writing (plain h5py refuses such a file), so the sink and the recorder take these
signals over from the moment their file exists until they are closed. The first signal
asks them to stop; later ones are ignored, so that closing the file cannot itself be
interrupted (SIGKILL still ends the process at once: the files are crash-safe for that).
Before the file exists the signals keep their default effect: there is nothing to close.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(Exception):
    """Raised in the main thread, inside :meth:`StopSignals.raising`, by a stop signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class StopSignals:
    """The stop signals, once :meth:`install`-ed: ``signum`` is the first one received
    (0: none yet), for loops that poll it; inside :meth:`raising` a signal raises
    :class:`Stopped` instead, for loops that cannot poll (``finally`` closes the file)."""

    def __init__(self) -> None:
        self.signum = 0
        self._raise = False
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def install(self) -> None:
        """Take the signals over (a no-op outside the main thread, where Python cannot)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Within: a stop signal (or one received before) raises Stopped."""
        self._raise = True
        try:
            if self.signum:
                raise Stopped(self.signum)
            yield
        finally:
            self._raise = False

    def calm(self) -> None:
        """From now on a signal is only recorded: what runs next (closing the file) must
        not be interrupted."""
        self._raise = False

    def _handler(self, signum: int, _frame: object) -> None:
        if self.signum:
            return
        self.signum = signum
        if self._raise:
            raise Stopped(signum)
