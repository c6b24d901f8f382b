"""SIGTERM, SIGHUP and SIGINT as a request to stop cleanly, for the long-running parts.

``kill``, a closed terminal and Ctrl-C must not leave a recording or a results file open
for writing (plain h5py refuses such a file), so the sink and the recorder take these
signals over from the moment their file exists until they are closed. The first signal
asks them to stop; later ones are ignored, so that closing the file cannot itself be
interrupted (SIGKILL still ends the process at once: the files are crash-safe for that).
Before the file exists the signals keep their default effect: there is nothing to close.
The other parts take them over too, so that a stop ends them with their summary: a
worker from its start, ``watch`` and ``view`` while they receive, and ``workers`` and
``record --shards``, which pass the signal on to their processes.

A stop must also take effect at once, not at a loop's next poll timeout: a handler
that only records the signal lets pyzmq resume an interrupted poll for the rest of its
timeout, and a signal that lands on another thread interrupts no poll at all. So every
stop signal also writes a byte to a socketpair (``signal.set_wakeup_fd``: the C-level
handler does it, from whichever thread the kernel chose), and the long-running loops
register its read end, :func:`wakeup_fd`, in their pollers beside their zmq sockets.
"""
from __future__ import annotations

import select
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

_wakeup: tuple[socket.socket, socket.socket] | None = None
_armed = False  # set_wakeup_fd done (only the main thread may)


def wakeup_fd() -> int:
    """The read end of this process's wakeup socketpair, readable once a signal with a
    Python handler has arrived, until :func:`drain_wakeup` (a loop that goes on after a
    stop, draining what it accepted, drains it so that it does not spin). Call it
    from the main thread before installing the handlers, as Python requires for
    ``set_wakeup_fd``; from another thread it gives the socket, armed by the first call
    from the main thread."""
    global _wakeup, _armed
    if _wakeup is None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        _wakeup = r, w
    if not _armed and threading.current_thread() is threading.main_thread():
        signal.set_wakeup_fd(_wakeup[1].fileno(), warn_on_full_buffer=False)
        _armed = True
    return _wakeup[0].fileno()


def drain_wakeup() -> None:
    """Read what the signals wrote, so the wakeup socket polls idle again."""
    if _wakeup is not None:
        try:
            while _wakeup[0].recv(4096):
                pass
        except BlockingIOError:
            pass


def sleep(seconds: float) -> None:
    """``time.sleep`` that a stop signal cuts short (Python resumes a plain sleep after
    the handler has run)."""
    if select.select([wakeup_fd()], [], [], seconds)[0]:
        drain_wakeup()


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
        wakeup_fd()
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

    def check(self) -> None:
        """Raise Stopped if a stop signal has arrived: the callback of a poll loop that
        watches :func:`wakeup_fd`, so the wait it interrupts ends at once, where nothing
        is half done."""
        drain_wakeup()
        if self.signum:
            raise Stopped(self.signum)

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
