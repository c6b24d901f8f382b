"""Result sink: collects worker results and emits them in frame-id order.

Results arrive out of order (several workers) and sometimes twice (a frame is
dispatched again when its worker is declared dead). The sink keeps a bounded reorder
window: it emits frame ``next`` as soon as it has it; when the window holds more
than ``reorder`` results it gives up on ``next``, records a gap, and moves on. A
result that arrives after its gap was recorded is *late* (counted, and the gap is
closed), which is how the sink tells a late frame from a lost one. Because the
broker never lets more than ``max_pending`` frames go unacknowledged, a window at
least that large never records a gap for a frame that is merely slow.

The sink acknowledges every result it holds to the broker (the group's acker), so
the broker can forget the frame; the broker sends END once everything is
acknowledged, and at END the sink knows the total and what, if anything, is missing.
"""
from __future__ import annotations

import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from . import protocol as proto
from .client import DEFAULT_BROKER, BrokerUnavailable, Control, cpu_seconds, resolve
from .security import PLAIN, Guard, Security, configure_socket


class SinkError(RuntimeError):
    """The sink cannot start (its results endpoint cannot be bound)."""


@dataclass
class SinkConfig:
    broker: str = DEFAULT_BROKER
    results: str | None = None  # bind address; default: what the broker hands out
    work: str | None = None
    reorder: int = 1024
    out: str | None = None  # .npy or .h5: results in frame-id order
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
        self.guard = Guard(self.ctx, sec, self.log)
        self.pull = configure_socket(self.ctx.socket(zmq.PULL), "server", sec,
                                     cfg.max_bytes + 4096)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.guard.watch(self.pull, self.results_ep)
        try:
            self.pull.bind(self.results_ep)
        except zmq.ZMQError as exc:
            self.pull.close()
            self.guard.close()
            raise SinkError(f"cannot bind the results endpoint {self.results_ep}: "
                            f"{exc.strerror}") from None
        self.pub = self._bind_publisher(cfg.publish) if cfg.publish else None
        self.guard.start()
        self.dealer = configure_socket(self.ctx.socket(zmq.DEALER), "client", sec)
        self.dealer.setsockopt(zmq.LINGER, 1000)
        self.dealer.connect(self.work_ep)
        self._ready = proto.encode_ready(proto.Ready("fft", 1, "sink", "sink", "acker"))
        self._send_ready()
        self.next = self._first_expected(bool(eps))
        self.buffer: dict[int, tuple[proto.Header, np.ndarray]] = {}
        self.emitted = 0
        self.duplicates = 0
        self.late = 0
        self.gap_ids: set[int] = set()
        self.rejected: Counter[str] = Counter()
        self.per_worker: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=100_000)
        self.total: int | None = None
        self.session: int | None = None
        self.results: list[np.ndarray] = []
        self.result_ids: list[int] = []
        self._acks: list[int] = []
        self._last_ack = time.monotonic()
        self._t_first = 0.0
        self._t_last = 0.0

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
            self.pull.close()
            self.guard.close()
            raise SinkError(f"cannot bind the results PUB {endpoint}: {exc.strerror}") from None
        return pub

    def _first_expected(self, have_broker: bool) -> int:
        """The first id this sink will be sent: the FFT group's oldest unacknowledged
        frame, so a sink that replaces a dead one neither waits for ids its predecessor
        took nor calls them lost. (No acker means nothing is acknowledged until we join.)"""
        if not have_broker:
            return 0
        ctl = Control(self.cfg.broker, timeout=min(self.cfg.timeout, 5.0), ctx=self.ctx,
                      security=self.cfg.security)
        try:
            status = ctl.status()
        except (BrokerUnavailable, RuntimeError) as exc:
            raise SinkError(f"cannot ask the broker where the stream is: {exc}") from None
        finally:
            ctl.close()
        group = status["work"]["groups"].get("fft")
        if group is None or group["oldest_pending"] is None:
            return int(status["frames_sent"])
        return int(group["oldest_pending"])

    def _send_ready(self) -> None:
        self.dealer.send_multipart([proto.WorkCmd.READY.value, self._ready])
        self._last_ready = time.monotonic()

    # --- the loop ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        idle_since = time.monotonic()
        while True:
            events = dict(poller.poll(int(self.cfg.ack_interval * 1000)))
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
                    break
            self._flush_acks(now)
            if now - self._last_ready > 0.25:
                self._send_ready()  # heartbeat; re-joins a broker that forgot us
            if now - idle_since > self.cfg.timeout:
                self.log(f"no results and no end-of-stream for {self.cfg.timeout:g} s")
                break
        self._flush_acks(time.monotonic(), force=True)
        if self.cfg.out:
            self.write(Path(self.cfg.out))
        return self.summary()

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
        if self.cfg.keep_running:  # one line per session; the last summary is the caller's
            self.log(summary_line(self.summary()))
            self.next, self.total = 0, None
            return False
        return True

    def _result(self, parts: list[zmq.Frame]) -> None:
        try:
            header, array = proto.decode(parts, max_bytes=self.cfg.max_bytes)
            if header.kind != proto.Kind.RESULT:
                raise proto.UnknownKind(f"sink takes RESULT messages, got {header.kind.name}")
        except proto.ProtocolError as exc:
            self.rejected[exc.reason] += 1
            return
        if header.session != self.session:
            if self.session is not None:
                self.log(f"new broker session {header.session:#x}: frame ids restart")
                self._drain(until=None)
                self.next = 0
            self.session = header.session
        fid = header.frame_id
        self._acks.append(fid)
        now = time.monotonic()
        if not self._t_first:
            self._t_first = now
        self._t_last = now
        if fid < self.next or fid in self.buffer:
            if fid in self.gap_ids:
                self.gap_ids.discard(fid)
                self.late += 1
                self._emit(header, array)
            else:
                self.duplicates += 1
            return
        self.per_worker[header.worker_id] += 1
        self.latency_ms.append((time.time_ns() - header.timestamp_ns) / 1e6)
        self.buffer[fid] = (header, array)
        self._advance()
        while len(self.buffer) > self.cfg.reorder:
            self.gap_ids.add(self.next)  # waited a full window: give up on it for now
            self.log(f"frame {self.next} missing past the reorder window")
            self.next += 1
            self._advance()

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
        self.emitted += 1
        if self.pub is not None:
            self.pub.send_multipart([header.stream.encode(), proto.encode_header(header), array],
                                    copy=False)
        if self.cfg.out:
            self.results.append(np.array(array))  # own copy: the message buffer is zmq's
            self.result_ids.append(header.frame_id)

    def _flush_acks(self, now: float, force: bool = False) -> None:
        if self._acks and (force or len(self._acks) >= 256
                           or now - self._last_ack >= self.cfg.ack_interval):
            for i in range(0, len(self._acks), proto.MAX_IDS_PER_MESSAGE):
                chunk = self._acks[i:i + proto.MAX_IDS_PER_MESSAGE]
                self.dealer.send_multipart([proto.WorkCmd.ACK.value, proto.encode_ids(chunk)])
            self._acks.clear()
            self._last_ack = now
            self._last_ready = now

    # --- results ---------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        elapsed = self._t_last - self._t_first
        lat = np.fromiter(self.latency_ms, dtype=np.float64)
        return {"frames": self.emitted, "total": self.total,
                "seconds": round(elapsed, 3),
                "fps": round((self.emitted - 1) / elapsed, 2) if elapsed > 0 else 0.0,
                "duplicates": self.duplicates, "late": self.late,
                "gaps": len(self.gap_ids), "missing_ids": sorted(self.gap_ids)[:1000],
                "per_worker": {str(k): v for k, v in self.per_worker.items()},
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
                "rejected": dict(self.rejected), "auth_refused": self.guard.refused,
                "cpu_s": cpu_seconds()}


    def write(self, path: Path) -> None:
        """Results as emitted (frame-id order; a late frame comes where it arrived):
        .npy holds the stacked results, .h5 holds /result and /frame_id."""
        stacked = np.stack(self.results) if self.results else np.zeros((0,), np.float32)
        if path.suffix == ".npy":
            np.save(path, stacked)
            return
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("result", data=stacked)
            f.create_dataset("frame_id", data=np.array(self.result_ids, dtype=np.uint64))
            f.attrs["frames"] = self.emitted
            f.attrs["missing_ids"] = np.array(sorted(self.gap_ids), dtype=np.uint64)

    def close(self) -> None:
        self.pull.close(linger=0)
        if self.pub is not None:
            self.pub.close(linger=0)
        self.dealer.close(linger=500)
        self.guard.close()


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
