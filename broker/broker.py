"""The broker server: one source, one thread, three sockets.

* XPUB at ``pub``: every frame, fanned out as ``[topic, header, payload]``. XPUB
  (not PUB) so the broker sees subscriptions arrive and can hold the stream until
  ``wait_subscribers`` have joined, instead of sleeping and hoping.
* REP at ``control``: JSON requests (endpoints, status, snapshot, pause, resume, stop).
* ROUTER at ``work``: credit-based dispatch to consumer groups (see dispatch.py).
* with ``shm``: a second XPUB (an abstract ipc socket, see shm.py) carrying only
  SHM_FRAME headers that name a slot of the shared-memory ring the source captures
  into. tcp subscribers then get a copy of each frame in a pool buffer (only while
  any are subscribed), so their behaviour does not depend on the ring.

Payloads go out zero-copy from a pool of recycled buffers. A buffer is reused only
when libzmq has released every message that points into it (a MessageTracker per
send) and no group still needs it, so a frame on the wire is never overwritten. A
poll loop serves all sockets between frames; nothing blocks on a slow peer.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from . import __version__
from . import protocol as proto
from .client import cpu_seconds
from .dispatch import Dispatcher
from .security import PLAIN, Guard, Security, configure_socket
from .shm import SHM_SOCKET_BUFFER, Ring, pub_endpoint, ring_slots, shm_queue
from .sources import Pacer, Source, SourceError, format_shape

COMMANDS = ("endpoints", "status", "snapshot", "pause", "resume", "stop", "report")
MAX_REPORTING_CLIENTS = 256  # a peer inventing names cannot grow the table past this
SIGNAL_DRAIN_S = 0.4  # after SIGINT/SIGTERM: the most we wait for acknowledgements
SIGNAL_LINGER_S = 0.2  # ... and repeat END (the ``stop`` command waits the full times)
REPORT_EXPIRY_S = 30.0  # a client silent this long is dropped from status


@dataclass
class BrokerConfig:
    """Everything ``framebroker serve`` can tune (see the CLI for the flags)."""

    stream: str = "cam"
    pub: str = "tcp://127.0.0.1:5555"
    work: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    results: str = "tcp://127.0.0.1:5558"
    advertise: str = ""
    fps: float = 0.0
    frames: int = 0  # 0 = until stopped or the source ends
    sndhwm: int = 64
    wait_subscribers: int = 0
    wait_workers: int = 0
    wait_recorders: int = 0
    max_pending: int = 64
    worker_timeout: float = 2.0
    orphan_timeout: float = 10.0  # a work group with nobody in it is dissolved after this
    drain_timeout: float = 10.0
    end_linger: float = 1.0
    linger_ms: int = 500
    progress: float = 0.0  # seconds between progress lines on stderr; 0 = none
    pool_keep: int = 64
    security: Security = PLAIN  # CURVE keys (optional) and the ZMTP heartbeat
    shm: str = ""  # ring size ("64slots", "1GiB"); "" = no shared-memory transport


@dataclass(eq=False)
class Slot:
    """One frame buffer and what still refers to it."""

    array: np.ndarray
    trackers: list[zmq.MessageTracker] = field(default_factory=list)
    holds: int = 0
    index: int = -1  # the ring slot it is, -1 for a heap buffer

    def free(self) -> bool:
        if self.holds:
            return False
        if self.trackers and all(t.done for t in self.trackers):
            self.trackers.clear()
        return not self.trackers


class BufferPool:
    """Frame buffers recycled once zmq and the work groups are done with them.

    A busy slot is never waited for: a new buffer is allocated instead, so a slow
    subscriber (whose queue pins buffers up to its HWM) costs memory up to that
    bound, never capture time. At most ``keep`` idle buffers are retained.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, keep: int) -> None:
        self.shape, self.dtype, self.keep = shape, dtype, keep
        self._busy: deque[Slot] = deque()
        self.allocated = 0

    def acquire(self) -> Slot:
        """The most recently used free buffer (still in cache), else a new one."""
        busy = self._busy
        for i in range(len(busy) - 1, -1, -1):
            slot = busy[i]
            if slot.free():
                del busy[i]
                busy.append(slot)
                return slot
        slot = Slot(np.empty(self.shape, self.dtype))
        self.allocated += 1
        busy.append(slot)
        while len(busy) > self.keep and busy[0].free():
            busy.popleft()
        return slot

    def __len__(self) -> int:
        return len(self._busy)


def free_tcp_endpoints(n: int, host: str = "127.0.0.1") -> list[str]:
    """``n`` tcp endpoints on distinct free ports of ``host`` (all held open while
    choosing, so no two are the same), for tests, benchmarks and ad-hoc pipelines."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [f"tcp://{host}:{s.getsockname()[1]}" for s in socks]


def advertised(endpoint: str, host: str) -> str:
    """The address a client should connect to for a bound ``endpoint``.

    A wildcard bind (``*`` or ``0.0.0.0``) is not connectable; ``host`` (from
    ``--advertise``) replaces it, and loopback is the default.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return endpoint
    addr, _, port = rest.rpartition(":")
    if addr in ("*", "0.0.0.0", "[::]", "::"):
        addr = host or "127.0.0.1"
    return f"{scheme}://{addr}:{port}"


class Broker:
    """Runs one stream from ``source`` until stopped, the frame limit, or the source ends."""

    def __init__(self, source: Source, cfg: BrokerConfig, log: Callable[[str], None] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.source, self.cfg = source, cfg
        self.log = log or (lambda msg: print(f"framebroker serve: {msg}", file=sys.stderr,
                                              flush=True))
        self.session = int.from_bytes(os.urandom(8), "little") >> 1
        self.ctx = ctx or zmq.Context.instance()
        self.pool = BufferPool(source.shape, source.dtype, cfg.pool_keep)
        self.topic = cfg.stream.encode()
        self.frame_bytes = int(np.prod(source.shape)) * source.dtype.itemsize
        self.sent = 0
        self.bytes_sent = 0
        self.subscribers = 0
        self.peak_subscribers = 0
        self.paused = False
        self.state = "starting"
        self.error = ""
        self.control_rejected: dict[str, int] = {}
        self.clients: dict[str, tuple[float, dict[str, Any]]] = {}
        self.backpressure_waits = 0
        self.shm_stalls = 0
        self.shm_subscribers = 0
        self.ring: Ring | None = None
        self.ring_slots: list[Slot] = []
        self._ring_next = 0
        self._ring_ready: Slot | None = None
        self.latest: tuple[bytes, Slot] | None = None
        self._stop_requested = False
        self.hurry = False  # a signal asked us to stop: end within a second
        self._t_start = time.monotonic()
        self._t_first = 0.0
        self._t_last = 0.0
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=64)
        self._pacer = Pacer(cfg.fps)
        if cfg.shm:
            self.ring = Ring(cfg.stream, self.session, source.shape, source.dtype,
                             ring_slots(cfg.shm, self.frame_bytes))
            self.ring_slots = [Slot(a, index=i) for i, a in enumerate(self.ring.pixels)]
            for path in self.ring.removed_stale:
                self.log(f"removed stale ring {path} (its broker is gone)")
        try:
            self._bind()
        except BaseException:
            self.close()
            raise

    # --- sockets ------------------------------------------------------------------
    def _bind(self) -> None:
        cfg = self.cfg
        self.guard = Guard(self.ctx, cfg.security, self.log)
        self.pub = self._server_socket(zmq.XPUB, None)
        self.pub.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.pub.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        self.control = self._server_socket(zmq.REP, proto.MAX_CONTROL_BYTES)
        self.work = self._server_socket(zmq.ROUTER, 16 * 1024 * 1024)
        self.work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished consumer fails the send
        self.work.setsockopt(zmq.SNDHWM, 0)  # credit windows bound the queue, not the HWM
        socks = [(self.pub, cfg.pub), (self.control, cfg.control), (self.work, cfg.work)]
        self.shm_pub: zmq.Socket | None = None
        if self.ring is not None:
            self.shm_pub = self._server_socket(zmq.XPUB, None)
            self.shm_pub.setsockopt(zmq.XPUB_VERBOSER, 1)
            # a header queued longer than the ring is long names an overwritten slot, so
            # the queue (HWM, and the kernel buffer: headers are small) stays well short
            self.shm_pub.setsockopt(zmq.SNDHWM, shm_queue(cfg.sndhwm, self.ring.info.nslots))
            self.shm_pub.setsockopt(zmq.SNDBUF, SHM_SOCKET_BUFFER)
            socks.append((self.shm_pub, pub_endpoint(cfg.stream, self.session)))
        try:
            for sock, ep in socks:
                sock.setsockopt(zmq.LINGER, cfg.linger_ms)
                self.guard.watch(sock, ep)
                sock.bind(ep)
        except zmq.ZMQError as exc:
            self.close()
            raise SourceError(f"cannot bind {ep}: {exc.strerror}") from None
        self.guard.start()
        self.dispatcher = Dispatcher(self.work, max_pending=cfg.max_pending,
                                     timeout=cfg.worker_timeout,
                                     orphan_timeout=cfg.orphan_timeout, send=self._send_work,
                                     release=self._release, log=self.log)
        self.poller = zmq.Poller()
        for sock, _ in socks:
            self.poller.register(sock, zmq.POLLIN)

    def _server_socket(self, kind: int, max_bytes: int | None) -> zmq.Socket:
        return configure_socket(self.ctx.socket(kind), "server", self.cfg.security, max_bytes)

    def endpoints(self) -> dict[str, Any]:
        host = self.cfg.advertise
        return {"pub": advertised(self.cfg.pub, host), "work": advertised(self.cfg.work, host),
                "control": advertised(self.cfg.control, host),
                "results": advertised(self.cfg.results, host), "stream": self.cfg.stream,
                "session": self.session,
                **({"shm": self.ring.advert(pub_endpoint(self.cfg.stream, self.session))}
                   if self.ring is not None else {})}

    def close(self) -> None:
        """Close the sockets and unlink the ring (safe to call more than once)."""
        for name in ("pub", "control", "work", "shm_pub"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=self.cfg.linger_ms)
        self.guard.close()
        if self.ring is not None:
            self.ring.close()

    # --- buffers ------------------------------------------------------------------
    def _hold(self, slot: Slot) -> None:
        slot.holds += 1

    def _release(self, slot: Slot) -> None:
        slot.holds -= 1

    def _send_work(self, ident: bytes, header: bytes, slot: Slot, shm: bool) -> None:
        """Frame to a work member: the header alone for a ring reader (the group's hold
        keeps the slot), else header + zero-copy payload (tracked)."""
        if shm:
            self.work.send_multipart([ident, header, b""], flags=zmq.NOBLOCK)
            return
        tracker = self.work.send_multipart([ident, header, slot.array], copy=False, track=True,
                                           flags=zmq.NOBLOCK)
        slot.trackers.append(tracker)

    def _free_ring_slot(self) -> Slot | None:
        """The next ring slot, in write order, that no group, snapshot or zero-copy send
        still needs; None when every slot is busy (the source must wait)."""
        n = len(self.ring_slots)
        for k in range(n):
            slot = self.ring_slots[(self._ring_next + k) % n]
            if slot.free():
                self._ring_next = (slot.index + 1) % n
                return slot
        return None

    # --- the loop -------------------------------------------------------------------
    def stop_soon(self, *_: Any) -> None:
        """SIGINT/SIGTERM: finish the stream as ``request_stop`` does, but give the work
        groups and END at most SIGNAL_DRAIN_S, so the process ends within a second."""
        self.hurry = True
        self.request_stop()

    def request_stop(self, *_: Any) -> None:
        """Finish the stream cleanly (signal handler and ``stop`` command)."""
        self._stop_requested = True

    def run(self) -> dict[str, Any]:
        """Stream until done; returns the final status."""
        pacer = self._pacer
        next_progress = time.monotonic() + self.cfg.progress if self.cfg.progress else None
        try:
            while not self._stop_requested:
                waiting = self._waiting()
                self.state = "paused" if self.paused else "waiting" if waiting else "streaming"
                if next_progress is not None and time.monotonic() >= next_progress:
                    self.log(self.progress_line())  # paused or waiting too: say so
                    next_progress = time.monotonic() + self.cfg.progress
                if self.paused or waiting:
                    self._serve(100)
                    pacer.reset()
                    continue
                if not self.dispatcher.has_room(self.sent):
                    self.backpressure_waits += 1
                    self._serve(50)
                    continue
                if self.ring is not None and self._ring_ready is None:
                    self._ring_ready = self._free_ring_slot()
                    if self._ring_ready is None:  # lossless consumers hold every slot
                        self.shm_stalls += 1
                        self._serve(1)
                        continue
                delay = pacer.wait_time()
                self._serve(delay * 1000 if delay > 0.0005 else 0)
                if delay > 0.0005 or self._stop_requested:
                    continue
                if not self._capture_and_send():
                    break
                pacer.tick()
                if self.cfg.frames and self.sent >= self.cfg.frames:
                    break
        except SourceError as exc:
            self.error = str(exc)
            self.log(f"error: {exc}")
        self._finish()
        return self.status()

    def _waiting(self) -> bool:
        """Hold the start until the awaited peers are there; once streaming, never again
        (a consumer that dies later must not stop the camera)."""
        cfg = self.cfg
        if self.sent:
            return False
        blocking = self.dispatcher.members_prefixed(proto.BLOCK_GROUP_PREFIX)
        fft = self.dispatcher.groups.get("fft")
        # workers whose results a sink acknowledges: wait for the sink too, or the frames
        # they finish before it joins are dispatched again when it does (duplicates)
        no_sink = cfg.wait_workers > 0 and fft is not None and fft.acks == "sink" \
            and not fft.ackers
        return (self.subscribers + self.shm_subscribers + blocking < cfg.wait_subscribers
                or no_sink or self.dispatcher.members("fft") < cfg.wait_workers
                or self.dispatcher.members("record") < cfg.wait_recorders)

    def _serve(self, timeout_ms: float) -> None:
        """Handle whatever arrived on any socket, waiting at most ``timeout_ms``."""
        events = dict(self.poller.poll(timeout_ms))
        if self.control in events:
            self._handle_control()
        if self.pub in events:
            self.subscribers += self._subscription_changes(self.pub)
            self.peak_subscribers = max(self.peak_subscribers,
                                        self.subscribers + self.shm_subscribers)
        if self.shm_pub is not None and self.shm_pub in events:
            self.shm_subscribers += self._subscription_changes(self.shm_pub)
            self.peak_subscribers = max(self.peak_subscribers,
                                        self.subscribers + self.shm_subscribers)
        if self.work in events:
            for _ in range(256):
                try:
                    parts = self.work.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.dispatcher.handle(parts)
        self.dispatcher.reap()

    def _capture_and_send(self) -> bool:
        fid = self.sent
        if self.ring is None:
            slot, header, shm_header = self._capture_into_pool(fid)
        else:
            ready, self._ring_ready = self._ring_ready, None
            slot, header, shm_header = self._capture_into_ring(ready, fid)
        if slot is None:
            return False
        self.dispatcher.submit(fid, header, slot, self._hold, shm_header)
        if self.latest is not None:
            self._release(self.latest[1])
        self._hold(slot)
        self.latest = (header, slot)
        self.sent += 1
        self.bytes_sent += slot.array.nbytes
        now = time.monotonic()
        if not self._t_first:
            self._t_first = now
        self._t_last = now
        self._rate_window.append((now, self.sent))
        return True

    def _publish(self, slot: Slot, header: bytes) -> None:
        """The frame to tcp/ipc subscribers, zero-copy from ``slot`` (tracked)."""
        tracker = self.pub.send_multipart([self.topic, header, slot.array], copy=False,
                                          track=True)
        slot.trackers.append(tracker)

    def _capture_into_pool(self, fid: int) -> tuple[Slot | None, bytes, bytes]:
        """Capture frame ``fid`` into a recycled buffer and publish it (no ring)."""
        slot = self.pool.acquire()
        if not self.source.read_into(slot.array):
            return None, b"", b""
        header = proto.frame_header(self.cfg.stream, fid, time.time_ns(), slot.array,
                                    self.session)
        self._publish(slot, header)
        return slot, header, b""

    def _capture_into_ring(self, slot: Slot, fid: int) -> tuple[Slot | None, bytes, bytes]:
        """Capture frame ``fid`` into ring ``slot`` under the seqlock; headers to the shm
        subscribers, and a pool copy to tcp subscribers if there are any. Returns
        (slot or None at the source's end, FRAME header, SHM_FRAME header)."""
        ring, stamp = self.ring, fid + 1
        ring.begin(slot.index, stamp, fid)
        if not self.source.read_into(slot.array):
            return None, b"", b""
        ts = time.time_ns()
        ring.end(slot.index, stamp, ts)
        stream = self.cfg.stream
        header = proto.frame_header(stream, fid, ts, slot.array, self.session)
        shm_header = proto.shm_frame_header(stream, fid, ts, slot.array, self.session,
                                            slot.index, stamp)
        if self.shm_subscribers > 0:
            self.shm_pub.send_multipart([self.topic, shm_header, b""])
        if self.subscribers > 0:
            copy = self.pool.acquire()
            np.copyto(copy.array, slot.array)
            self._publish(copy, header)
        return slot, header, shm_header

    def _finish(self) -> None:
        """End of stream: END on PUB, drain the work groups, END to every consumer."""
        self.state = "draining"
        end = proto.end_header(self.cfg.stream, self.sent, time.time_ns(), self.session)
        drain, linger = self.cfg.drain_timeout, self.cfg.end_linger
        if self.hurry:
            drain, linger = min(drain, SIGNAL_DRAIN_S), min(linger, SIGNAL_LINGER_S)
        deadline = time.monotonic() + drain
        while not self.dispatcher.idle() and time.monotonic() < deadline:
            self._serve(20)
        if not self.dispatcher.idle():
            self.log(f"drain timeout: {sum(len(g.pending) for g in self.dispatcher.groups.values())}"
                     f" frames were never acknowledged")
        self.dispatcher.end_of_stream(end)
        # PUB drops when a subscriber's queue is full, so END is repeated until every
        # subscriber has gone (they unsubscribe when they close) or end_linger passes.
        linger_end = time.monotonic() + linger
        while True:
            self.pub.send_multipart([self.topic, end, b""])
            if self.shm_pub is not None:
                self.shm_pub.send_multipart([self.topic, end, b""])
            if (self.subscribers <= 0 and self.shm_subscribers <= 0
                    or time.monotonic() >= linger_end):
                break
            self._serve(50)
        self.state = "stopped"

    # --- subscriptions and control ------------------------------------------------
    def _subscription_changes(self, sock: zmq.Socket) -> int:
        """Net (un)subscriptions to our stream that arrived on XPUB ``sock``."""
        change = 0
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return change
            if not msg or msg[0] not in (0, 1) or not self.topic.startswith(msg[1:]):
                continue
            change += 1 if msg[0] == 1 else -1

    def _handle_control(self) -> None:
        try:
            raw = self.control.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            if len(raw) != 1:
                raise proto.BadPartCount(f"control request must be 1 part, got {len(raw)}")
            req = proto.decode_request(raw[0])
            cmd = req["cmd"]
            if cmd not in COMMANDS:
                raise proto.BadControlMessage(f"unknown command {cmd[:40]!r}; known: "
                                              f"{', '.join(COMMANDS)}")
            if cmd == "report":
                report = proto.validate_report(req)
            elif set(req) != {"cmd"}:
                raise proto.BadControlMessage(f"command {cmd!r} takes no arguments, got "
                                              f"{sorted(set(req) - {'cmd'})}")
        except proto.ProtocolError as exc:
            self.control_rejected[exc.reason] = self.control_rejected.get(exc.reason, 0) + 1
            self.control.send(proto.encode_reply(False, error=str(exc)))
            return
        if cmd == "snapshot":
            self._reply_snapshot()
            return
        if cmd == "endpoints":
            reply = self.endpoints()
        elif cmd == "status":
            reply = self.status()
        elif cmd == "pause":
            self.paused = True
            reply = {"paused": True}
        elif cmd == "resume":
            self.paused = False
            reply = {"paused": False}
        elif cmd == "report":
            self._store_report(report)
            reply = {}
        else:
            self.request_stop()
            reply = {"stopping": True, "frames": self.sent}
        self.control.send(proto.encode_reply(True, **reply))

    def _reply_snapshot(self) -> None:
        if self.latest is None:
            self.control.send(proto.encode_reply(False, error="no frame captured yet"))
            return
        header, slot = self.latest
        tracker = self.control.send_multipart([proto.encode_reply(True), header, slot.array],
                                              copy=False, track=True)
        slot.trackers.append(tracker)

    def _store_report(self, report: dict[str, Any]) -> None:
        """Keep a subscriber's latest counters: drops happen at the subscriber (its HWM or
        its latest:N queue), so only it can say how many; status shows them per client."""
        self.clients.pop(report["client"], None)
        self.clients[report["client"]] = (time.monotonic(), report)
        while len(self.clients) > MAX_REPORTING_CLIENTS:
            del self.clients[next(iter(self.clients))]

    def consumers(self) -> dict[str, dict[str, Any]]:
        """Clients that reported within REPORT_EXPIRY_S, with the age of their report."""
        now = time.monotonic()
        for name in [n for n, (t, _) in self.clients.items() if now - t > REPORT_EXPIRY_S]:
            del self.clients[name]
        return {name: {**{k: v for k, v in r.items() if k != "client"},
                       "age_s": round(now - t, 2)} for name, (t, r) in self.clients.items()}

    # --- reporting -------------------------------------------------------------------
    def rate(self) -> float:
        """Frames per second over the recent window (the live rate, not the average)."""
        if len(self._rate_window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_window[0], self._rate_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self) -> dict[str, Any]:
        elapsed = self._t_last - self._t_first
        avg = (self.sent - 1) / elapsed if elapsed > 0 else 0.0
        return {"version": __version__, "stream": self.cfg.stream, "session": self.session,
                "state": self.state, "source": self.source.description,
                "shape": list(self.source.shape), "dtype": str(self.source.dtype),
                "frames_sent": self.sent, "bytes_sent": self.bytes_sent,
                "rate_fps": 0.0 if self.paused else round(self.rate(), 2),  # none while paused
                "avg_fps": round(avg, 2),
                "mb_per_s": round(avg * self.frame_bytes / 1e6, 2),
                "uptime_s": round(time.monotonic() - self._t_start, 3),
                "subscribers": self.subscribers + self.shm_subscribers,
                "peak_subscribers": self.peak_subscribers,
                "transports": self.transports(), "shm": self.shm_status(),
                "paused": self.paused, "sndhwm": self.cfg.sndhwm,
                "buffers_allocated": self.pool.allocated, "buffers_live": len(self.pool),
                "backpressure_waits": self.backpressure_waits,
                "control_rejected": dict(self.control_rejected),
                "auth_refused": self.guard.refused, "curve": self.cfg.security.curve,
                "error": self.error,
                "cpu_s": cpu_seconds(), "pacer_resyncs": self._pacer.resyncs,
                "consumers": self.consumers(),
                "endpoints": self.endpoints(), "work": self.dispatcher.status()}

    def transports(self) -> dict[str, dict[str, int]]:
        """How many subscribers and work members use each transport."""
        return {"subscribers": {"tcp": self.subscribers, "shm": self.shm_subscribers},
                "workers": self.dispatcher.transports()}

    def shm_status(self) -> dict[str, Any] | None:
        """The ring's geometry and how often lossless consumers made the source wait."""
        if self.ring is None:
            return None
        info = self.ring.info
        return {"path": str(self.ring.path), "slots": info.nslots,
                "slot_bytes": info.slot_stride, "ring_bytes": info.file_size,
                "stalls": self.shm_stalls,
                "slots_held": sum(1 for s in self.ring_slots if not s.free())}

    def progress_line(self) -> str:
        s = self.status()
        groups = " ".join(f"{n}:{g['acked']}/{g['dispatched']}"
                          for n, g in s["work"]["groups"].items())
        mbps = s["rate_fps"] * self.frame_bytes / 1e6
        if s["state"] != "streaming":  # paused or waiting: no rate to speak of
            return (f"{s['state']}: {s['frames_sent']} frames sent, {s['subscribers']} "
                    f"subscribers {groups}").rstrip()
        return (f"{s['frames_sent']} frames, {s['rate_fps']:.0f} fps, {mbps:.1f} MB/s, "
                f"{s['subscribers']} subscribers ({s['transports']['subscribers']['shm']} shm) "
                f"{groups}").rstrip()

    def summary_line(self) -> str:
        s = self.status()
        redis = sum(g["redispatched"] for g in s["work"]["groups"].values())
        return (f"stream {s['stream']!r} ({format_shape(self.source.shape)} {s['dtype']}): "
                f"sent {s['frames_sent']} frames in {self._t_last - self._t_first:.2f} s, "
                f"{s['avg_fps']:.1f} fps, {s['mb_per_s']:.1f} MB/s, peak subscribers "
                f"{s['peak_subscribers']}, re-dispatched {redis}"
                + (f", error: {self.error}" if self.error else ""))


def install_signal_handlers(broker: Broker) -> None:
    """SIGINT/SIGTERM end the stream cleanly: END is sent, sockets close with a linger."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, broker.stop_soon)
