"""Result sink: collects worker results and emits them in frame-id order.

Results arrive out of order (several workers) and sometimes twice (a frame is
dispatched again when its worker is declared dead). The sink keeps a bounded reorder
window: it emits frame ``next`` as soon as it has it; when the window holds more
than ``reorder`` results it gives up on ``next``, records a gap, and moves on. A
result that arrives after its gap was recorded is *late* (counted, and the gap is
closed), which is how the sink tells a late frame from a lost one. Because the
broker never lets more than ``max_pending`` frames go unacknowledged, a window at
least that large never records a gap for a frame that is merely slow.

The sink acknowledges a result to the broker (the group's acker) only once it is
emitted and, with ``--out``, flushed to the file, so the broker forgets no frame
whose result a killed sink did not keep: a new sink joining is sent every result
the old one had not acknowledged. The broker sends END once everything is
acknowledged, and at END the sink knows the total and what, if anything, is missing.

**Untrusted results.** Anyone who can reach the results socket can push to it, so a
result must carry the broker's current session id (learnt from its status at start,
and asked again, at most twice a second, when results of another session arrive:
that is how a restarted broker is told from a spoofer) and a frame id below
``next + max_pending`` (the broker never dispatches further ahead than that). Any
other result is a counted reject and changes nothing: it is not stored, emitted or
acknowledged. Without a control endpoint (explicit ``--work``) the session is taken
from the first result after the start or an END.
"""
from __future__ import annotations

import os
import struct
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
import zmq

from . import protocol as proto
from .client import DEFAULT_BROKER, BrokerUnavailable, Control, cpu_seconds, resolve
from .hops import Hop
from .security import PLAIN, Guard, Security, configure_socket
from .signals import StopSignals, wakeup_fd

#: seconds between two status requests that check an unknown session id
SESSION_CHECK_S = 0.5


class SinkError(RuntimeError):
    """The sink cannot start (its results endpoint cannot be bound, its file cannot be
    created) or cannot go on (its file cannot be written: the disk is full)."""


class ResultMismatch(ValueError):
    """A result whose shape or dtype differs from the results already in the file."""


@dataclass
class SinkConfig:
    broker: str = DEFAULT_BROKER
    results: str | None = None  # bind address; default: what the broker hands out
    work: str | None = None
    reorder: int = 1024
    out: str | None = None  # .npy or .h5: results in frame-id order, crash-safe
    overwrite: bool = False  # replace an existing ``out``
    publish: str | None = None  # bind a PUB here: every result in order, for viewers
    timeout: float = 30.0  # seconds without any message before giving up
    keep_running: bool = False
    ack_interval: float = 0.01
    max_bytes: int = proto.DEFAULT_MAX_BYTES
    security: Security = PLAIN  # a CURVE sink is the server for workers: the server keys


class Sink:
    def __init__(self, cfg: SinkConfig, log: Callable[[str], None] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.log = log or (lambda m: print(f"framebroker sink: {m}", file=sys.stderr, flush=True))
        sec = cfg.security
        self.work_ep, eps = resolve(cfg.broker, cfg.work, "work", cfg.timeout, self.ctx, sec)
        self.results_ep = cfg.results or eps["results"]
        self._ctl = (Control(cfg.broker, timeout=min(cfg.timeout, 2.0), ctx=self.ctx,
                             security=sec) if eps else None)
        self.session: int | None = None
        self.window = cfg.reorder  # how far past ``next`` a result may be: max_pending
        self.next = 0
        if self._ctl is not None:
            self._position(self._broker_status(start=True))
        self._last_check = time.monotonic()
        self.guard = Guard(self.ctx, sec, self.log)
        self.pull = configure_socket(self.ctx.socket(zmq.PULL), "server", sec,
                                     cfg.max_bytes + 4096)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.guard.watch(self.pull, self.results_ep)
        try:
            self.pull.bind(self.results_ep)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise SinkError(f"cannot bind the results endpoint {self.results_ep}: "
                            f"{exc.strerror}") from None
        self.pub = self._bind_publisher(cfg.publish) if cfg.publish else None
        self.signals = StopSignals()  # from the moment the file exists: it must be closed
        self.signals.install()
        try:
            self.file = open_results(Path(cfg.out), cfg.overwrite) if cfg.out else None
        except SinkError:
            self.signals.restore()
            self._close_sockets()
            raise
        self.guard.start()
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(wakeup_fd(), zmq.POLLIN)  # a stop signal ends the wait
        self._ready = proto.encode_ready(proto.Ready("fft", 1, "sink", "sink", "acker"))
        self.dealer: zmq.Socket | None = None
        self._connect_dealer()
        self.buffer: dict[int, tuple[proto.Header, np.ndarray]] = {}
        self.emitted = 0
        self.duplicates = 0
        self.late = 0
        self.gap_ids: set[int] = set()
        self.rejected: Counter[str] = Counter()
        self.per_worker: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=100_000)
        self.hop = Hop("capture_to_sink")
        self.total: int | None = None
        self._unsaved: list[int] = []  # handled, to acknowledge once the file has them
        self._last_ack = time.monotonic()
        self._t_first = 0.0
        self._t_last = 0.0
        self._first_unix: float | None = None  # wall clock: run's start-up to a result

    def _bind_publisher(self, endpoint: str) -> zmq.Socket:
        """A PUB of the ordered results (topic: the stream name), for live viewers. It
        never slows the sink: a viewer that falls 4 results behind misses some."""
        pub = configure_socket(self.ctx.socket(zmq.PUB), "server", self.cfg.security)
        pub.setsockopt(zmq.SNDHWM, 4)
        pub.setsockopt(zmq.LINGER, 0)
        self.guard.watch(pub, endpoint)
        try:
            pub.bind(endpoint)
        except zmq.ZMQError as exc:
            pub.close()
            self._close_sockets()
            raise SinkError(f"cannot bind the results PUB {endpoint}: {exc.strerror}") from None
        return pub

    def _close_sockets(self) -> None:
        self.pull.close(linger=0)
        self.guard.close()
        if self._ctl is not None:
            self._ctl.close()

    def _connect_dealer(self) -> None:
        """(Re)join the broker as the FFT group's acker. A new socket is a new identity,
        and a new acker is sent again every result the broker still waits for."""
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.dealer.close(linger=0)  # queued ACKs are for the old session's ids
        self.dealer = configure_socket(self.ctx.socket(zmq.DEALER), "client",
                                       self.cfg.security)
        self.dealer.setsockopt(zmq.LINGER, 1000)
        self.dealer.connect(self.work_ep)
        self.poller.register(self.dealer, zmq.POLLIN)
        self._send_ready()

    def _broker_status(self, start: bool = False) -> dict[str, Any] | None:
        assert self._ctl is not None
        try:
            return self._ctl.status()
        except (BrokerUnavailable, RuntimeError) as exc:
            if start:
                raise SinkError(f"cannot ask the broker where the stream is: {exc}") from None
            return None

    def _position(self, status: dict[str, Any]) -> None:
        """Session, window and the first id this sink will be sent: the FFT group's oldest
        unacknowledged frame, so a sink that replaces a dead one neither waits for ids its
        predecessor took nor calls them lost. (No acker means nothing is acknowledged
        until we join.)"""
        self.session = session_id(status["session"])
        self.window = int(status["work"].get("max_pending", self.cfg.reorder))
        group = status["work"]["groups"].get("fft")
        if group is None or group["oldest_pending"] is None:
            self.next = int(status["frames_sent"])
        else:
            self.next = int(group["oldest_pending"])

    def _send_ready(self) -> None:
        self.dealer.send_multipart([proto.WorkCmd.READY.value, self._ready])
        self._last_ready = time.monotonic()

    # --- the loop ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Until END (or the timeout, or SIGTERM/SIGHUP/SIGINT); the file is then closed."""
        try:
            self._loop()
            if self.signals.signum:
                self.log(f"stopped by {self.signals.name}: closing {self.cfg.out or 'down'}")
            self._save_and_ack(time.monotonic(), force=True)
            if self.file is not None:
                self.file.close(self.gap_ids)
        except SinkError as exc:
            self.log(f"stopping: {exc}; the file keeps every result acknowledged before")
            if self.file is not None:
                self.file.abandon()
            raise
        return self.summary()

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while not self.signals.signum:
            events = dict(self.poller.poll(int(self.cfg.ack_interval * 1000)))
            now = time.monotonic()
            if self.pull in events:
                for _ in range(1024):
                    try:
                        parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._result(parts)
                idle_since = now
            if self.dealer in events:
                idle_since = now
                if self._control(self.dealer.recv_multipart(copy=False)):
                    return
            self._save_and_ack(now)
            if now - self._last_ready > 0.25:
                self._send_ready()  # heartbeat; re-joins a broker that forgot us
            if now - idle_since > self.cfg.timeout:
                self.log(f"no results and no end-of-stream for {self.cfg.timeout:g} s")
                return

    def _control(self, parts: list[zmq.Frame]) -> bool:
        """A message from the broker: only END is expected. True = finished."""
        try:
            header, _ = proto.decode(parts, max_bytes=0)
        except proto.ProtocolError as exc:
            self.rejected[exc.reason] += 1
            return False
        if header.kind != proto.Kind.END:
            self.rejected["unexpected_kind"] += 1
            return False
        self.total = header.total
        self._drain(until=header.total)
        self._save_and_ack(time.monotonic(), force=True)
        if self.cfg.keep_running:  # one line per session; the last summary is the caller's
            self.log(summary_line(self.summary()))
            self.next, self.total = 0, None
            if self._ctl is None:
                self.session = None  # the next session's first result names it
            return False
        return True

    def _result(self, parts: list[zmq.Frame]) -> None:
        try:
            header, array = proto.decode(parts, max_bytes=self.cfg.max_bytes)
            if header.kind != proto.Kind.RESULT:
                raise proto.UnknownKind(f"sink takes RESULT messages, got {header.kind.name}")
        except proto.ProtocolError as exc:
            self._reject(exc.reason, str(exc))
            return
        if not self._current_session(header.session):
            self._reject("foreign_session", f"result {header.frame_id} of session "
                                            f"{header.session:#x}, the broker's is "
                                            f"{self.session or 0:#x}")
            return
        fid = header.frame_id
        if fid >= self.next + self.window:
            self._reject("out_of_window", f"result {fid} is past the window "
                                          f"({self.next} + {self.window})")
            return
        now = time.monotonic()
        if not self._t_first:
            self._t_first = now
            self._first_unix = time.time()
        self._t_last = now
        if fid < self.next or fid in self.buffer:
            if fid in self.gap_ids:
                self.gap_ids.discard(fid)
                self.late += 1
                self._emit(header, array)
            elif fid in self.buffer:
                self.duplicates += 1  # acknowledged when the one held is emitted
            else:
                self.duplicates += 1
                self._unsaved.append(fid)
            return
        self.per_worker[header.worker_id] += 1
        now_ns = time.time_ns()
        self.latency_ms.append((now_ns - header.timestamp_ns) / 1e6)
        self.hop.observe((now_ns - header.timestamp_ns) * 1e-9)
        self.buffer[fid] = (header, array)
        self._advance()
        while len(self.buffer) > self.cfg.reorder:
            self.gap_ids.add(self.next)  # waited a full window: give up on it for now
            self.log(f"frame {self.next} missing past the reorder window")
            self.next += 1
            self._advance()

    def _reject(self, reason: str, detail: str) -> None:
        """Count; say it once per reason (a flood of them must not flood the log)."""
        self.rejected[reason] += 1
        if self.rejected[reason] == 1:
            self.log(f"rejected a result ({reason}): {detail}; further ones are counted only")

    def _current_session(self, session: int) -> bool:
        """True if ``session`` is the broker's. An unknown one is checked with the broker
        (at most every SESSION_CHECK_S): a restarted broker's is adopted, anything else
        is refused."""
        if session == self.session:
            return True
        if self._ctl is None:
            if self.session is None:
                self.session = session
                return True
            return False
        now = time.monotonic()
        if now - self._last_check < SESSION_CHECK_S:
            return False
        self._last_check = now
        status = self._broker_status()
        if status is not None and session_id(status["session"]) != self.session:
            self._new_session(status)
        return session == self.session

    def _new_session(self, status: dict[str, Any]) -> None:
        """The broker restarted: finish the old session, start from the new one's
        position, and re-join as a new acker so that results refused before the new
        session was known are sent again."""
        self.log(f"new broker session {session_id(status['session']):#x}: frame ids restart")
        self._drain(until=None)
        self._save_and_ack(time.monotonic(), force=True, send=False)  # the old broker is gone
        self._position(status)
        self._connect_dealer()

    def _advance(self) -> None:
        while self.next in self.buffer:
            self._emit(*self.buffer.pop(self.next))
            self.next += 1

    def _drain(self, until: int | None) -> None:
        """Emit what is buffered in order; ids below ``until`` never seen are gaps."""
        stop = until if until is not None else (max(self.buffer) + 1 if self.buffer else self.next)
        while self.next < stop:
            if self.next in self.buffer:
                self._emit(*self.buffer.pop(self.next))
            else:
                self.gap_ids.add(self.next)
            self.next += 1

    def _emit(self, header: proto.Header, array: np.ndarray) -> None:
        if self.file is not None:
            try:
                self.file.append(header.frame_id, array)
            except ResultMismatch as exc:  # valid on the wire, not for this file: a gap
                self._reject("mismatched", str(exc))
                self.gap_ids.add(header.frame_id)
                self._unsaved.append(header.frame_id)
                return
        self.emitted += 1
        self._unsaved.append(header.frame_id)
        if self.pub is not None:
            self.pub.send_multipart([header.stream.encode(), proto.encode_header(header), array],
                                    copy=False)

    def _save_and_ack(self, now: float, force: bool = False, send: bool = True) -> None:
        """Flush the file, then acknowledge what it now holds: never a result that a
        kill could still lose."""
        if self._unsaved and (force or len(self._unsaved) >= 256
                              or now - self._last_ack >= self.cfg.ack_interval):
            if self.file is not None:
                self.file.flush(self.gap_ids)
            for i in range(0, len(self._unsaved) if send else 0, proto.MAX_IDS_PER_MESSAGE):
                chunk = self._unsaved[i:i + proto.MAX_IDS_PER_MESSAGE]
                self.dealer.send_multipart([proto.WorkCmd.ACK.value, proto.encode_ids(chunk)])
            self._unsaved.clear()
            self._last_ack = now
            self._last_ready = now

    # --- results ---------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        elapsed = self._t_last - self._t_first
        lat = np.fromiter(self.latency_ms, dtype=np.float64)
        return {"frames": self.emitted, "total": self.total,
                "seconds": round(elapsed, 3),
                "fps": round((self.emitted - 1) / elapsed, 2) if elapsed > 0 else 0.0,
                "first_result_unix": self._first_unix,
                "duplicates": self.duplicates, "late": self.late,
                "gaps": len(self.gap_ids), "missing_ids": sorted(self.gap_ids)[:1000],
                "per_worker": {str(k): v for k, v in self.per_worker.items()},
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
                "rejected": dict(self.rejected), "auth_refused": self.guard.refused,
                "out": self.cfg.out, "saved": self.file.flushed if self.file else None,
                "stopped_by": self.signals.name,
                "cpu_s": cpu_seconds(), "hops": {self.hop.name: self.hop.summary()}}

    def close(self) -> None:
        self.pull.close(linger=0)
        if self.pub is not None:
            self.pub.close(linger=0)
        self.dealer.close(linger=500)
        self.guard.close()
        if self._ctl is not None:
            self._ctl.close()
        self.signals.restore()


def session_id(value: int | str) -> int:
    """A session id from JSON: an integer, or (protocol v1) a hex string."""
    return int(value, 16) if isinstance(value, str) else int(value)


# --- the results file ---------------------------------------------------------------

_NPY_HEADER = 256  # bytes: room for any shape, so the header is rewritten in place


class _NpyResults:
    """Results appended to a .npy file whose header is rewritten with the count at each
    flush: after a kill ``np.load`` reads every result up to the last flush (it ignores
    bytes past the count the header gives). A .npy holds no frame ids: use .h5 for them."""

    def __init__(self, path: Path, overwrite: bool) -> None:
        self.path = path
        self.written = 0
        self.flushed = 0
        self._item: tuple[tuple[int, ...], np.dtype] | None = None
        try:
            self._f = open(path, "wb" if overwrite else "xb")
            self._header((0,), np.dtype(np.float32))
        except FileExistsError:
            raise SinkError(f"{path}: file exists (pass --overwrite to replace it)") from None
        except OSError as exc:
            raise SinkError(f"{path}: cannot create the results file: {exc}") from None

    def _header(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                     "shape": shape}).encode("latin1")
        pad = _NPY_HEADER - 10 - len(text) - 1
        self._f.seek(0)
        self._f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER - 10) + text
                      + b" " * pad + b"\n")
        self._f.flush()
        self._f.seek(0, os.SEEK_END)

    def append(self, frame_id: int, array: np.ndarray) -> None:
        item = (array.shape, array.dtype)
        if self._item is None:
            self._item = item
        elif item != self._item:
            raise ResultMismatch(f"result {frame_id} is {array.shape} {array.dtype}, the file "
                                 f"holds {self._item[0]} {self._item[1]}")
        self._io("writing a result", self._f.write, memoryview(np.ascontiguousarray(array)))
        self.written += 1

    def flush(self, missing: Collection[int]) -> None:
        if self.written == self.flushed or self._item is None:
            return
        self._io("flushing", self._f.flush)
        self._io("writing the header", self._header, (self.written, *self._item[0]),
                 self._item[1])
        self.flushed = self.written

    def close(self, missing: Collection[int]) -> None:
        try:
            self.flush(missing)
        finally:
            self._f.close()

    def abandon(self) -> None:
        """After a failed write: the header still gives the last flushed count."""
        try:
            self._f.close()
        except OSError:
            pass  # the buffered tail cannot be written: it was never counted

    def _io(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except OSError as exc:
            raise SinkError(f"{self.path}: {what} failed: {exc}") from exc


def open_results(path: Path, overwrite: bool = False) -> Any:
    """The crash-safe writer for ``path`` (.npy or .h5: h5py is imported only for .h5)."""
    if path.suffix == ".npy":
        return _NpyResults(path, overwrite)
    if path.suffix == ".h5":
        from .results_h5 import H5Results

        return H5Results(path, overwrite)
    raise SinkError(f"{path}: use a .npy or .h5 file name")


def summary_line(s: dict[str, Any]) -> str:
    """One line of a sink summary, for logs and the CLI."""
    from .humanize import counts, maybe

    total = "" if s["total"] is None else f" of {s['total']}"
    return (f"{s['frames']} results{total} in {s['seconds']} s ({s['fps']} fps), "
            f"duplicates {s['duplicates']}, late {s['late']}, gaps {s['gaps']}, "
            f"from workers {counts({str(k): v for k, v in s['per_worker'].items()})}"
            + maybe("latency p50", s["latency_ms_p50"], "ms")
            + maybe("p99", s["latency_ms_p99"], "ms")
            + f", rejected {counts(s['rejected'])}")
