"""Rejected peer messages: counted always, logged without letting a peer flood the log.

A hostile or broken peer can send tens of thousands of bad messages a second; a log
line for each (25,397 lines in 6 s were measured) fills a disk and buries everything
else. ``RejectLog`` logs the first reject of each (peer, reason) in an interval, counts
the rest, and sums them up in one line per (peer, reason) when the interval is over.
The counters that ``status`` reports are kept by the callers; this is only the log.
"""
from __future__ import annotations

import time
from typing import Callable

LOG_INTERVAL_S = 10.0
MAX_LOGGED_KEYS = 64  # (peer, reason) pairs logged per interval; the rest are summed


class RejectLog:
    """Rate-limited reject logging for one socket (``what`` prefixes every line)."""

    def __init__(self, log: Callable[[str], None], what: str,
                 interval: float = LOG_INTERVAL_S, max_keys: int = MAX_LOGGED_KEYS) -> None:
        self.log, self.what, self.interval, self.max_keys = log, what, interval, max_keys
        self._since = time.monotonic()
        self._repeats: dict[tuple[str, str], int] = {}
        self._unlogged = 0  # rejects of pairs beyond max_keys in this interval

    def __call__(self, peer: str, reason: str, message: str) -> None:
        """One reject: logged if it is the first of (peer, reason) in this interval."""
        self.flush()
        key = (peer, reason)
        if key in self._repeats:
            self._repeats[key] += 1
        elif len(self._repeats) >= self.max_keys:
            self._unlogged += 1
        else:
            self._repeats[key] = 0
            self.log(f"{self.what}: rejected a message from {peer}: {message} (repeats are "
                     f"counted and logged every {self.interval:g} s)")

    def flush(self) -> None:
        """At the end of an interval, one line per (peer, reason) that repeated."""
        now = time.monotonic()
        if now - self._since < self.interval:
            return
        span = now - self._since
        for (peer, reason), n in self._repeats.items():
            if n:
                self.log(f"{self.what}: {n} more {reason} rejects from {peer} in {span:.0f} s")
        if self._unlogged:
            self.log(f"{self.what}: {self._unlogged} more rejects from other peers in "
                     f"{span:.0f} s")
        self._repeats.clear()
        self._unlogged = 0
        self._since = now
