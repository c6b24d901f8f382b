"""``framebroker watch``: a subscriber that says how the stream is doing.

It receives until end-of-stream, ``frames`` frames or a stop signal (Ctrl-C, SIGTERM,
SIGHUP), optionally checks every frame against the synthetic source, prints a progress
line every ``progress`` seconds, and returns one summary: what arrived, what was lost
and how late it was.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable

import numpy as np

from .client import BlockingSubscriber, ReceiveTimeout, Subscriber
from .hops import Hop
from .signals import Stopped, StopSignals
from .sources import check_synthetic


def watch_stream(sub: Subscriber | BlockingSubscriber, *, frames: int, progress: float,
                 verify: bool, log: Callable[[str], None],
                 hop: Hop | None = None) -> dict[str, Any]:
    """Receive and account until done; always closes ``sub``. Raises ReceiveTimeout
    only if nothing at all arrived (a stream that stops later just ends the watch).
    ``hop`` (capture_to_receive) is the caller's when it exposes it as a metric."""
    hop = hop or Hop("capture_to_receive")
    latencies: deque[float] = deque(maxlen=100_000)
    corrupt = restarts_seen = 0
    t0 = time.monotonic()
    next_line = t0 + progress if progress else None
    last_n, last_t = 0, t0
    first_unix: float | None = None  # wall clock: a start-up measure (bench/startup.py)
    stop = StopSignals()  # SIGTERM and SIGHUP end it as Ctrl-C does: with the summary
    stop.install()
    try:
        with stop.raising():
            while not frames or sub.received < frames:
                frame = sub.recv()
                if frame is None:
                    break
                if first_unix is None:
                    first_unix = time.time()
                lat_ns = time.time_ns() - frame.timestamp_ns
                latencies.append(lat_ns / 1e6)
                hop.observe(lat_ns * 1e-9)
                # a ring slot reused while we checked it is a drop (counted), not corruption
                if (verify and check_synthetic(frame.array, frame.frame_id) >= 0
                        and sub.confirm(frame)):
                    corrupt += 1
                if len(sub.restarts) != restarts_seen:
                    restarts_seen = len(sub.restarts)
                    old, last, new, first = sub.restarts[-1]
                    log(f"watch: new broker session {new:#x} (the last id of session {old:#x} was "
                        f"{last}); joined at id {first}, {first} ids of it missed")
                now = time.monotonic()
                if next_line is not None and now >= next_line:
                    rate = (sub.received - last_n) / (now - last_t)
                    log(f"watch ({sub.transport}): {sub.received} frames, {rate:.1f} fps, "
                        f"{rate * frame.header.nbytes / 1e6:.1f} MB/s, gaps {sub.gaps}, "
                        f"latency {np.median(list(latencies)[-256:]):.2f} ms")
                    last_n, last_t, next_line = sub.received, now, now + progress
    except ReceiveTimeout as exc:
        if sub.received == 0:
            raise
        log(f"watch: {exc}")
    except (KeyboardInterrupt, Stopped):
        pass
    finally:
        stop.restore()
        sub.close()
    elapsed = time.monotonic() - t0
    summary: dict[str, Any] = {**sub.stats(), "seconds": round(elapsed, 3),
                               "fps": round(sub.received / elapsed, 2) if elapsed else 0.0,
                               "mb_per_s": round(sub.bytes / elapsed / 1e6, 2) if elapsed else 0.0,
                               "latency_ms_p50": _pct(latencies, 50),
                               "latency_ms_p99": _pct(latencies, 99),
                               "hops": {hop.name: hop.summary()},
                               "first_frame_unix": first_unix}
    if verify:
        summary["corrupt"] = corrupt
    return summary


def summary_line(s: dict[str, Any]) -> str:
    """The summary for people: one line, unknown values left out."""
    return (f"watch: {s['received']} frames over {s['transport']} in {s['seconds']:.2f} s "
            f"({s['fps']} fps, {s['mb_per_s']} MB/s), gaps {s['gaps']}, "
            f"overwritten {s['overwritten']}"
            + (f", missed {s['missed']}" if s["missed"] is not None else "")
            + f", dropped by --policy {s['dropped']}, rejected {sum(s['rejected'].values())}"
            + (f", latency p50 {s['latency_ms_p50']} ms p99 {s['latency_ms_p99']} ms"
               if s["latency_ms_p50"] is not None else "")
            + (f", corrupt {s['corrupt']}" if "corrupt" in s else ""))


def lost(s: dict[str, Any]) -> bool:
    """Did the watch miss or see a wrong frame (exit status 3)?"""
    return bool(s["gaps"] or (s["missed"] or 0) or s.get("corrupt", 0))


def _pct(values: Iterable[float], q: float) -> float | None:
    arr = np.fromiter(values, dtype=np.float64)
    return round(float(np.percentile(arr, q)), 3) if arr.size else None
