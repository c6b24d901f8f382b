"""``framebroker record``: frames from the broker into HDF5, lossless or live.

* **lossless** (default): the recorder is a member of the broker's ``record`` work
  group. It holds at most ``window`` frames and reports a frame DONE only once the
  writer has taken it, so a slow disk slows the credit, the credit slows the
  broker's dispatch, and the source waits: nothing is dropped anywhere. The queue
  in front of the writer is at least as deep as the window, so the receive loop
  never blocks and keeps heartbeating through a disk hiccup. The writer thread wakes
  the receive loop (a socket pair polled with the work socket), so DONE, and with it
  the credit and the frame's ring slot, goes back soon after the frame is safe: with
  the whole window held no next frame can arrive to trigger it.
  The window (``window=None``, the default) is the bandwidth-delay rule of
  :func:`auto_window`: enough frames to keep the disk busy for ``WINDOW_COVER_S``
  at ``disk_rate`` bytes/s (the time credit takes to come back as a new frame, with
  room for scheduling hiccups on a loaded machine), at least ``MIN_WINDOW``, and at
  most half the broker's ``max_pending`` (a window as large as ``max_pending`` stalled
  the stream: with four sharded recorders the frames they held kept the source at the
  ``max_pending`` bound). Over tcp the frames held are the recorder's own memory, so
  at most ``WINDOW_MEMORY`` bytes of them; over shm they stay in the broker's ring, so
  the bound is half the ring instead (the recorder never holds every slot the source
  needs): 24 MiB held only 4 frames at 1920x1080x3, too few to keep the writer busy.
  ``window=N`` (``--window N``) overrides it.
  The writer thread wakes the receive loop once a quarter of the window is written
  and unacknowledged, or when it has nothing left to write, not after every frame:
  the receive loop already returns credit whenever a frame arrives, and every wake-up
  costs the writer a GIL hand-over (a quarter of its time at 640x480x3).
* **live**: a PUB subscriber. A full queue drops the frame (counted); frames PUB
  dropped show up as id jumps. Either way the file's ``/gaps`` lists every missing id.
"""
from __future__ import annotations

import math
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from . import protocol as proto
from .client import (DEFAULT_BROKER, BrokerUnavailable, Control, Frame, ReceiveTimeout,
                     Subscriber, WorkConsumer, cpu_seconds)
from .hops import Hop
from .recorder import RecordingWriter, ThreadedRecorder
from .security import PLAIN, Security
from .signals import Stopped, StopSignals, drain_wakeup, wakeup_fd


DISK_RATE = 2e9          # bytes/s a new file takes here (measured.md: 0.4-9 GB/s)
WINDOW_COVER_S = 0.05    # seconds of writing the frames in flight cover
WINDOW_MEMORY = 24 << 20  # at most this many bytes of frames held (a tcp recorder's RSS)
MIN_WINDOW = 4
FALLBACK_WINDOW = 16     # frame size unknown (explicit endpoints, no control answer)


def auto_window(frame_bytes: int, disk_rate: float = DISK_RATE, max_pending: int | None = None,
                ring_slots: int | None = None) -> int:
    """Frames a lossless recorder holds at once (the module docstring has the rule).
    Too few and the disk waits for every credit round trip; too many only costs memory."""
    want = math.ceil(disk_rate * WINDOW_COVER_S / max(frame_bytes, 1))
    # over shm the frames held are ring slots, not the recorder's memory
    limits = [ring_slots // 2] if ring_slots else [WINDOW_MEMORY // max(frame_bytes, 1)]
    limits += [max(1, max_pending // 2)] if max_pending else []
    return max(MIN_WINDOW, min(want, *limits))


class _Wakeup:
    """A socket pair: ``set()`` from any thread makes ``fileno()`` readable until
    ``clear()``. At most one byte is in flight however often it is set, so the writer
    thread never blocks on it and the reader drains one byte per wake-up."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._pending = False

    def fileno(self) -> int:
        return self._r.fileno()

    def set(self) -> None:
        if not self._pending:
            self._pending = True
            self._w.send(b"\0")

    def clear(self) -> None:
        """Call before looking at what changed: a set() after this wakes again."""
        self._pending = False
        try:
            self._r.recv(64)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


@dataclass
class RecordConfig:
    path: str
    broker: str = DEFAULT_BROKER
    work: str | None = None
    pub: str | None = None
    mode: str = "lossless"
    frames: int | None = None  # expected count: preallocate; None = grow
    stop_after: int = 0  # stop after this many frames (0 = at end-of-stream)
    window: int | None = None  # None: auto_window() from the frame size and disk_rate
    disk_rate: float = DISK_RATE
    queue_frames: int = 64  # raised to the window when the window is automatic
    chunk_frames: int = 1
    grow_frames: int = 1024
    compression: str = "none"
    level: int | None = None
    swmr: bool = True
    flush_frames: int = 64
    flush_seconds: float = 1.0
    max_frames_per_file: int = 0
    max_bytes_per_file: int = 0
    overwrite: bool = False
    compress_threads: int = 2
    throttle_s: float = 0.0  # per-frame sleep in the writer: simulates a slow disk
    timeout: float = 30.0
    security: Security = PLAIN  # CURVE client keys (optional) and the ZMTP heartbeat
    shm: bool = True  # lossless only: the broker holds a ring slot until DONE
    shard: proto.Shard | None = None  # lossless only: record just this shard's frames
    group: str = "record"  # work group (a shard has its own, see broker/shards.py)


class Recording:
    """One recording session; ``run()`` returns the summary."""

    def __init__(self, cfg: RecordConfig, log: Callable[[str], None] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        if cfg.mode not in ("lossless", "live"):
            raise ValueError(f"mode must be lossless or live, got {cfg.mode!r}")
        if cfg.shard is not None and cfg.mode != "lossless":
            raise ValueError("a shard is a lossless recorder: --mode live takes every frame")
        if cfg.window is not None and cfg.queue_frames < cfg.window:
            raise ValueError(f"queue_frames ({cfg.queue_frames}) must be >= window "
                             f"({cfg.window}) so the receive loop never blocks")
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.log = log or (lambda m: print(f"framebroker record: {m}", file=sys.stderr,
                                           flush=True))
        self.rec: ThreadedRecorder | None = None
        self.status: dict[str, Any] = {}
        self.latency_ms: deque[float] = deque(maxlen=100_000)
        self.receive_hop = Hop("capture_to_receive")
        self.disk_hop = Hop("receive_to_disk")  # observed by the writer thread
        self._queued_ids: deque[int] = deque()
        self._acked_written = 0
        self._last_id = -1
        self.duplicates = 0
        self.mismatched = 0
        self.session_changed = False
        self.signals = StopSignals()  # installed once the file exists
        self.taken = 0  # frames handed to the writer (or dropped by it, in live mode)
        self._session: int | None = None
        self._t0 = 0.0
        self._t1 = 0.0
        self._wakeup = _Wakeup()
        self.window = cfg.window or FALLBACK_WINDOW
        self._queue_frames = cfg.queue_frames
        self._open_from_status()
        if cfg.mode == "lossless":
            self.source: WorkConsumer | Subscriber = WorkConsumer(
                cfg.work, broker=cfg.broker, group=cfg.group, window=self.window,
                acks="self", name=f"recorder-{Path(cfg.path).name}", connect_wait=cfg.timeout,
                shm=cfg.shm, ctx=self.ctx, security=cfg.security, shard=cfg.shard)
            self.source.watch(self._wakeup.fileno(), self._written)
            # a stop signal ends the wait at once: its handler raises Stopped as the
            # receiving loop resumes, wherever the kernel delivered the signal
            self.source.watch(wakeup_fd(), drain_wakeup)
        else:  # queued frames outlive a live ring slot: always take payloads
            self.source = Subscriber(cfg.pub, broker=cfg.broker, timeout=cfg.timeout,
                                     rcvhwm=cfg.queue_frames, connect_wait=cfg.timeout,
                                     shm=False, ctx=self.ctx, security=cfg.security)

    def _open_from_status(self) -> None:
        """Create the file before joining, so a bad path fails before any frame is held."""
        ctl = Control(self.cfg.broker, timeout=min(2.0, self.cfg.timeout), ctx=self.ctx,
                      security=self.cfg.security)
        try:
            ctl.wait(self.cfg.timeout)
            self.status = ctl.status()
        except BrokerUnavailable:
            if not (self.cfg.work or self.cfg.pub):
                raise
            return  # explicit endpoints and no control: open on the first frame
        finally:
            ctl.close()
        shape, dtype = tuple(self.status["shape"]), np.dtype(self.status["dtype"])
        if self.cfg.window is None:
            ring = self.status.get("shm") if self.cfg.shm else None
            self.window = auto_window(int(np.prod(shape)) * dtype.itemsize, self.cfg.disk_rate,
                                      self.status.get("work", {}).get("max_pending"),
                                      ring["slots"] if ring else None)
            self._queue_frames = max(self.cfg.queue_frames, self.window)
        self._open(shape, dtype)

    def _open(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        c = self.cfg
        self.signals.install()
        expected = c.frames
        if c.shard is not None and expected is not None:  # preallocate this shard's part
            expected = max(1, c.shard.owned_before(expected))
        writer = RecordingWriter(
            path=c.path, shape=shape, dtype=dtype, stream=self.status.get("stream", ""),
            source=self.status.get("source", ""), frames_expected=expected,
            chunk_frames=c.chunk_frames, grow_frames=c.grow_frames, compression=c.compression,
            level=c.level, swmr=c.swmr, flush_frames=c.flush_frames,
            flush_seconds=c.flush_seconds, max_frames_per_file=c.max_frames_per_file,
            max_bytes_per_file=c.max_bytes_per_file, overwrite=c.overwrite,
            compress_threads=c.compress_threads, shard=c.shard,
            source_attrs=(self.status.get("source_detail") or {}).get("series"))
        self.rec = ThreadedRecorder(writer, queue_frames=self._queue_frames,
                                    throttle_s=c.throttle_s, on_written=self._on_written,
                                    hop=self.disk_hop)

    # --- the loop ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Record until END or the timeout; SIGTERM, SIGHUP and SIGINT stop it the same
        way (the queued frames are written and the file closed), so ``kill`` or a closed
        terminal leave a file plain h5py opens."""
        try:
            with self.signals.raising():
                return self._receive()
        except Stopped as exc:
            self.log(f"{exc}: the file is closed")
            return self.summary()

    def _receive(self) -> dict[str, Any]:
        lossless = self.cfg.mode == "lossless"
        idle_since = time.monotonic()
        try:
            while True:
                try:
                    frame = self.source.recv(timeout=0.1)
                except ReceiveTimeout:
                    if time.monotonic() - idle_since > self.cfg.timeout:
                        self.log(f"no frame and no end-of-stream for {self.cfg.timeout:g} s")
                        break
                    self._ack_written()
                    continue
                idle_since = time.monotonic()
                if frame is None:
                    break
                if self._session is None:
                    self._session = frame.header.session
                elif frame.header.session != self._session:
                    # ids restart with a new broker run; one file holds one session
                    self.log("the broker restarted (new session): closing this recording")
                    self.session_changed = True
                    break
                self._take(frame, lossless)
                self._ack_written()
                if self.cfg.stop_after and self.taken >= self.cfg.stop_after:
                    break
        finally:
            self._finish()
        return self.summary()

    def _take(self, frame: Frame, lossless: bool) -> None:
        h = frame.header
        if h.frame_id <= self._last_id:  # at-least-once delivery: already have it
            self.duplicates += 1
            if lossless:
                self.source.done(h.frame_id)
            return
        if self.rec is None:
            self._open(h.shape, h.dtype)
        assert self.rec is not None
        w = self.rec.writer
        if h.shape != w.shape or h.dtype != w.dtype:  # valid on the wire, not for this file
            self.mismatched += 1
            self.log(f"frame {h.frame_id} is {h.shape} {h.dtype}, the file holds {w.shape} "
                     f"{w.dtype}: not recorded (it will show as a gap)")
            if lossless:
                self.source.done(h.frame_id)
            return
        if not self._t0:
            self._t0 = time.monotonic()
        self._t1 = time.monotonic()
        self._last_id = h.frame_id  # received, whether queued or dropped (the recorder
        # declares its own drops; _finish declares only ids never received)
        self.taken += 1
        received = time.perf_counter()
        self.receive_hop.since_capture(h.timestamp_ns)  # every frame taken, even if dropped
        if self.rec.put(h.frame_id, h.timestamp_ns, frame.array, block=lossless,
                        received=received):
            if lossless:
                self._queued_ids.append(h.frame_id)
            self.latency_ms.append((time.time_ns() - h.timestamp_ns) / 1e6)

    def _on_written(self) -> None:
        """In the writer thread, after each frame: wake the receive loop when a quarter of
        the window waits for DONE or the queue is empty (the module docstring says why)."""
        assert self.rec is not None
        unacked = self.rec.writer.frames_written - self._acked_written
        if unacked >= max(1, self.window // 4) or self.rec.queue_depth == 0:
            self._wakeup.set()

    def _written(self) -> None:
        """The writer thread woke us: credit back now, and its error, if any, surfaces."""
        self._wakeup.clear()
        assert self.rec is not None
        self.rec.raise_error()
        self._ack_written()

    def _ack_written(self) -> None:
        """DONE for the frames the writer has taken since the last call (in order)."""
        if self.rec is None or self.cfg.mode != "lossless":
            return
        n = self.rec.writer.frames_written - self._acked_written
        if n > 0:
            ids = [self._queued_ids.popleft() for _ in range(n)]
            self._acked_written += n
            self.source.done(*ids)

    def _finish(self) -> None:
        self.signals.calm()
        if self.rec is None:
            return
        total = None if self.session_changed else self.source.total
        if total is not None and total > self._last_id + 1:
            self.rec.add_gap(self._last_id + 1, total - self._last_id - 1)
        try:
            self.rec.close()
        finally:
            self._ack_written()
            if self._t0:  # the rate runs until the last frame is in the file
                self._t1 = time.monotonic()

    def summary(self) -> dict[str, Any]:
        w = self.rec.writer if self.rec else None
        lat = np.fromiter(self.latency_ms, dtype=np.float64)
        elapsed = self._t1 - self._t0
        return {"mode": self.cfg.mode, "frames_written": w.frames_written if w else 0,
                "frames_missed": w.frames_missed if w else 0,
                "dropped": self.rec.dropped if self.rec else 0, "duplicates": self.duplicates,
                "total": self.source.total, "ended": self.source.ended,
                "stopped_after": bool(self.cfg.stop_after) and self.taken >= self.cfg.stop_after,
                "files": [str(p) for p in w.files] if w else [],
                "bytes_written": w.bytes_written if w else 0,
                "bytes_stored": w.bytes_stored if w else 0,
                "seconds": round(elapsed, 3),
                "fps": round((w.frames_written - 1) / elapsed, 2) if w and elapsed > 0 else 0.0,
                "mb_per_s": round(w.bytes_written / elapsed / 1e6, 2) if w and elapsed > 0 else 0,
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
                "rejected": dict(self.source.rejected), "mismatched": self.mismatched,
                "session_changed": self.session_changed, "transport": self.source.transport,
                "stopped_by": self.signals.name,
                "window": self.window if self.cfg.mode == "lossless" else None,
                "writer_busy_s": round(self.rec.busy_s, 3) if self.rec else 0.0,
                "writer_fps": round(w.frames_written / self.rec.busy_s, 2)
                if w and self.rec and self.rec.busy_s > 0 else None,
                "cpu_s": cpu_seconds(),
                "hops": {h.name: h.summary() for h in (self.receive_hop, self.disk_hop)}}

    def close(self) -> None:
        self.source.close()
        self.signals.restore()
        self._wakeup.close()
