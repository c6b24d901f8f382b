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
from . import signals
from .client import cpu_seconds
from .dispatch import Dispatcher
from .hops import Hop
from .rejects import RejectLog
from .security import PLAIN, REFUSAL_EVENTS, Guard, Security, configure_socket
from .shm import SHM_SOCKET_BUFFER, Ring, pub_endpoint, ring_slots, shm_queue
from .sources import Pacer, Source, SourceError, format_shape
from .subscriptions import (MAX_SUBSCRIBED_BYTES, MAX_SUBSCRIPTION_MESSAGE, MAX_SUBSCRIPTIONS,
                            Subscriptions)

COMMANDS = ("endpoints", "status", "snapshot", "pause", "resume", "stop", "report")
MAX_REPORTING_CLIENTS = 256  # a peer inventing names cannot grow the table past this
SIGNAL_DRAIN_S = 0.4  # after SIGINT/SIGTERM: the most we wait for acknowledgements
SIGNAL_LINGER_S = 0.2  # ... and repeat END (the ``stop`` command waits the full times)
REPORT_EXPIRY_S = 30.0  # a client silent this long is dropped from status
XPUB_REBIND_S = 5.0  # how long a reset XPUB may take to get its address back


@dataclass
class ClientReport:
    """A reporting client's latest counters, when it last reported and how often."""

    seen: float
    report: dict[str, Any]
    reports: int = 1


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
    #: an unpaced on-demand source with a lone tcp subscriber makes its next frame only
    #: while fewer than this many are still on their way to it (see Broker._pub_busy);
    #: 0 = never wait (make frames flat out, the HWM drops what it cannot take)
    pub_inflight: int = 2
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


def _none() -> None:
    return None


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
        self.clients: dict[str, ClientReport] = {}
        self.backpressure_waits = 0
        self.xpub_resets = 0
        self.waiting_for: dict[str, Any] | None = None  # the stall status reports
        self._stalled_since = 0.0
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
        self._first_frame_unix: float | None = None  # wall clock: run's start-up figure
        self._t_last = 0.0
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=64)
        self._pub_trackers: deque[zmq.MessageTracker] = deque()  # PUB sends not yet released
        self._unsent: tuple[Slot, bytes] | None = None  # no room for it at the lone subscriber
        self._nodrop = False  # XPUB_NODROP as last set
        self.pub_waits = 0
        self.hop = Hop("capture_to_publish")  # per frame, see _capture_and_send
        self._captured_ns = 0  # the last frame's capture time (its header's timestamp)
        own = getattr(source, "pacer", None)  # a recording's own timestamps, unless --fps
        self._pacer = (own() if own and not cfg.fps else None) or Pacer(cfg.fps)
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
        self.pub = self._xpub(cfg.sndhwm)
        self.control = self._server_socket(zmq.REP, proto.MAX_CONTROL_WIRE_BYTES)
        self.work = self._server_socket(zmq.ROUTER, 16 * 1024 * 1024)
        self.work.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished consumer fails the send
        self.work.setsockopt(zmq.SNDHWM, 0)  # credit windows bound the queue, not the HWM
        socks = [(self.pub, cfg.pub), (self.control, cfg.control), (self.work, cfg.work)]
        self.shm_pub: zmq.Socket | None = None
        if self.ring is not None:
            # a header queued longer than the ring is long names an overwritten slot, so
            # the queue (HWM, and the kernel buffer: headers are small) stays well short
            self.shm_pub = self._xpub(shm_queue(cfg.sndhwm, self.ring.info.nslots))
            self.shm_pub.setsockopt(zmq.SNDBUF, SHM_SOCKET_BUFFER)
            socks.append((self.shm_pub, pub_endpoint(cfg.stream, self.session)))
        self.xpub_endpoints = {id(sock): ep for sock, ep in socks if sock.type == zmq.XPUB}
        self.subs: dict[int, Subscriptions] = {}  # id(XPUB) -> its subscriptions
        try:
            for sock, ep in socks:
                sock.setsockopt(zmq.LINGER, cfg.linger_ms)
                if sock.type == zmq.XPUB:
                    self.subs[id(sock)] = self._subscriptions(sock, ep)
                else:
                    self.guard.watch(sock, ep)
                sock.bind(ep)
        except zmq.ZMQError as exc:
            self.close()
            raise SourceError(f"cannot bind {ep}: {exc.strerror}") from None
        self.guard.start()
        self.control_log = RejectLog(self.log, "control")
        self.dispatcher = Dispatcher(self.work, max_pending=cfg.max_pending,
                                     timeout=cfg.worker_timeout,
                                     orphan_timeout=cfg.orphan_timeout, send=self._send_work,
                                     release=self._release, log=self.log)
        self.poller = zmq.Poller()
        self._wakeup = -1  # the stop signals' wakeup fd, once they are installed
        for sock, _ in socks:
            self.poller.register(sock, zmq.POLLIN)
        if getattr(self.source, "socket", None) is not None:  # a network source (imagezmq)
            self.poller.register(self.source.socket, zmq.POLLIN)  # wakes _serve on arrival

    def _server_socket(self, kind: int, max_bytes: int | None) -> zmq.Socket:
        return configure_socket(self.ctx.socket(kind), "server", self.cfg.security, max_bytes)

    def _xpub(self, sndhwm: int) -> zmq.Socket:
        """A frame XPUB: every subscription message reported (VERBOSER) and at most a
        stream name long (longer ones cost the sender its connection)."""
        sock = self._server_socket(zmq.XPUB, MAX_SUBSCRIPTION_MESSAGE)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        return sock

    def _subscriptions(self, sock: zmq.Socket, endpoint: str) -> Subscriptions:
        refusals = REFUSAL_EVENTS if self.cfg.security.curve else 0
        return Subscriptions(sock, self.topic, refusals,
                             lambda event: self.guard.on_event(endpoint, event))

    def _reset_xpub(self, name: str) -> None:
        """Close XPUB ``name`` (pub or shm_pub) and bind a new one at its address: the
        only way to make libzmq free the subscriptions a peer made it hold. Its
        subscribers reconnect and subscribe again; the reset is counted."""
        old = getattr(self, name)
        ep = self.xpub_endpoints.pop(id(old))
        subs = self.subs.pop(id(old))
        subs.close()
        self.poller.unregister(old)
        sndhwm = old.getsockopt(zmq.SNDHWM)
        sndbuf = old.getsockopt(zmq.SNDBUF)
        old.close(linger=0)
        sock = self._xpub(sndhwm)
        sock.setsockopt(zmq.SNDBUF, sndbuf)
        sock.setsockopt(zmq.LINGER, self.cfg.linger_ms)
        new = self._subscriptions(sock, ep)
        new.rejected = subs.rejected
        t0 = time.monotonic()
        deadline = t0 + XPUB_REBIND_S
        while True:  # closing is asynchronous in libzmq: the address comes back soon
            try:
                sock.bind(ep)
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        setattr(self, name, sock)
        self.xpub_endpoints[id(sock)] = ep
        self.subs[id(sock)] = new
        self.poller.register(sock, zmq.POLLIN)
        self.xpub_resets += 1
        self.log(f"{name}: reset (a peer made it hold more than {MAX_SUBSCRIPTIONS} distinct "
                 f"subscriptions or {MAX_SUBSCRIBED_BYTES} bytes of them) in "
                 f"{(time.monotonic() - t0) * 1000:.0f} ms; its subscribers reconnect")

    def endpoints(self) -> dict[str, Any]:
        host = self.cfg.advertise
        return {"pub": advertised(self.cfg.pub, host), "work": advertised(self.cfg.work, host),
                "control": advertised(self.cfg.control, host),
                "results": advertised(self.cfg.results, host), "stream": self.cfg.stream,
                "session": proto.encode_id(self.session),
                **({"shm": self.ring.advert(pub_endpoint(self.cfg.stream, self.session))}
                   if self.ring is not None else {})}

    def close(self) -> None:
        """Close the sockets and unlink the ring (safe to call more than once). After a
        stop signal, unsent messages get at most SIGNAL_LINGER_S: END was repeated already."""
        linger = self.cfg.linger_ms
        if getattr(self, "hurry", False):
            linger = min(linger, int(SIGNAL_LINGER_S * 1000))
        for subs in getattr(self, "subs", {}).values():
            subs.close()
        for name in ("pub", "control", "work", "shm_pub"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=linger)
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

    def wake_on(self, fd: int) -> None:
        """Poll ``fd`` (the stop signals' wakeup socket) with the sockets: a signal then
        ends any wait of the loop at once, whatever its timeout."""
        self._wakeup = fd
        self.poller.register(fd, zmq.POLLIN)

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
                    self._stalled(None)
                    self._serve(100)
                    pacer.reset()
                    continue
                if not self.dispatcher.has_room(self.sent):
                    self.backpressure_waits += 1
                    self._stalled(self.dispatcher.blocker(self.sent))
                    self._serve(50)
                    continue
                self._stalled(None)
                if self.ring is not None and self._ring_ready is None:
                    self._ring_ready = self._free_ring_slot()
                    if self._ring_ready is None:  # lossless consumers hold every slot
                        self.shm_stalls += 1
                        self._serve(1)
                        continue
                if self._pub_busy():
                    continue
                if not self._source_ready():
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

    def _source_ready(self) -> bool:
        """A network source (one with ``ready``) has a frame; if not, serve the sockets
        until something arrives (its socket is polled too) instead of blocking in
        ``read_into`` where control requests and signals would wait."""
        ready = getattr(self.source, "ready", None)
        if ready is None:
            return True
        if getattr(self.source, "socket", None) is None:
            # it waits on sockets of its own (stream2 replaces its socket when it
            # reconnects): up to 20 ms there, then control is answered without waiting
            if ready(20):
                return True
            self._serve(0)
            return False
        if ready():
            return True
        self._serve(50)
        return False

    def _stalled(self, blocker: tuple[str, str | None] | None) -> None:
        """Note (for status) which group and member the source is waiting for, since when."""
        if blocker is None:
            self.waiting_for = None
            return
        if self.waiting_for is None:
            self._stalled_since = time.monotonic()
        self.state = "waiting"
        self.waiting_for = {"group": blocker[0], "member": blocker[1]}

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
                or self.dispatcher.members_prefixed("record") < cfg.wait_recorders)

    def _serve(self, timeout_ms: float) -> None:
        """Handle whatever arrived on any socket, waiting at most ``timeout_ms``."""
        events = dict(self.poller.poll(timeout_ms))
        if self._wakeup in events:  # a stop signal: its handler has run (or runs now)
            signals.drain_wakeup()
        if self.control in events:
            for _ in range(64):  # a flood drains quickly; frames still go out between
                if not self._handle_control():
                    break
        self._update_subscribers()
        if self.work in events:
            for _ in range(256):
                try:
                    parts = self.work.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.dispatcher.handle(parts)
        self.dispatcher.reap()
        self.control_log.flush()
        self.dispatcher.reject_log.flush()

    def _update_subscribers(self) -> None:
        """Subscribers by connection on each XPUB (see subscriptions.py); an XPUB a peer
        filled with subscriptions is reset."""
        for name in ("pub", "shm_pub"):
            sock = getattr(self, name)
            if sock is None:
                continue
            subs = self.subs[id(sock)]
            changed = subs.update()
            if subs.over_limit:
                self._reset_xpub(name)
                subs, changed = self.subs[id(getattr(self, name))], True
            if changed:
                n = subs.subscribers()
                if name == "pub":
                    self.subscribers = n
                else:
                    self.shm_subscribers = n
                self.peak_subscribers = max(self.peak_subscribers,
                                            self.subscribers + self.shm_subscribers)

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
        self.hop.since_capture(self._captured_ns)  # published and dispatched
        if self.latest is not None:
            self._release(self.latest[1])
        self._hold(slot)
        self.latest = (header, slot)
        self.sent += 1
        self.bytes_sent += slot.array.nbytes
        now = time.monotonic()
        if not self._t_first:
            self._t_first = now
            self._first_frame_unix = time.time()
        self._t_last = now
        self._rate_window.append((now, self.sent))
        return True

    def _publish(self, slot: Slot, header: bytes) -> None:
        """The frame to tcp/ipc subscribers, zero-copy from ``slot`` (tracked).

        Paced by a lone subscriber (see ``_paced_by_subscriber``), the XPUB does not
        drop (XPUB_NODROP) and the send does not block: a full queue leaves the frame
        in ``_unsent`` (its slot held) to be sent when there is room, instead of the
        HWM dropping it. Otherwise the XPUB drops per subscriber, as PUB does."""
        paced = self._paced_by_subscriber()
        if paced != self._nodrop:
            self.pub.setsockopt(zmq.XPUB_NODROP, int(paced))
            self._nodrop = paced
        try:
            tracker = self.pub.send_multipart([self.topic, header, slot.array], copy=False,
                                              track=True, flags=zmq.NOBLOCK if paced else 0)
        except zmq.Again:
            if self._unsent is None:
                self._hold(slot)
            self._unsent = (slot, header)
            return
        if self._unsent is not None:
            self._unsent = None
            self._release(slot)
        slot.trackers.append(tracker)
        if paced:
            self._pub_trackers.append(tracker)

    def _paced_by_subscriber(self) -> bool:
        """True when the only consumer is one tcp subscriber and the source makes frames
        on demand, unpaced: then every frame it cannot take yet would be made only to be
        dropped at the HWM, and nobody else is there to want it."""
        return (self.cfg.pub_inflight > 0 and self.subscribers == 1
                and not self.shm_subscribers and not self._pacer.period and getattr(self.source, "on_demand", False)
                and not self.dispatcher.members_prefixed(""))

    def _pub_busy(self) -> bool:
        """True (after waiting a slice) while the lone subscriber cannot take a new frame:
        one is still unsent for want of room, or ``pub_inflight`` zero-copy frames are
        still on their way (libzmq has not released them). So frames nobody can take
        are not made, the broker's thread leaves the CPU to libzmq's I/O thread, and
        the few buffers in flight stay in the cache. Control and work sockets are
        served between slices."""
        trackers = self._pub_trackers
        while trackers and trackers[0].done:
            trackers.popleft()
        if self._unsent is not None:
            self._publish(*self._unsent)  # dropping XPUB_NODROP too, if pacing ended
            if self._unsent is None:
                return False
            self.pub_waits += 1
            self._serve(0)
            time.sleep(0.0002)  # no POLLOUT tells when a PUB queue has room
            return True
        if not self._paced_by_subscriber():
            trackers.clear()
            return False
        if len(trackers) < self.cfg.pub_inflight:
            return False
        self.pub_waits += 1
        try:
            trackers[0].wait(0.002)
        except zmq.NotDone:
            pass
        self._serve(0)
        return True

    def _capture_into_pool(self, fid: int) -> tuple[Slot | None, bytes, bytes]:
        """Capture frame ``fid`` into a recycled buffer and publish it (no ring)."""
        slot = self.pool.acquire()
        if not self.source.read_into(slot.array):
            return None, b"", b""
        self._captured_ns = time.time_ns()
        header = proto.frame_header(self.cfg.stream, fid, self._captured_ns, slot.array,
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
        ts = self._captured_ns = time.time_ns()
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
        while self._unsent is not None and time.monotonic() < deadline:
            self._pub_busy()  # the last frame made still waits for room: send it first
        if self._unsent is not None:
            self._release(self._unsent[0])
            self._unsent = None
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
    def _handle_control(self) -> bool:
        """Answer one control request; False if none was waiting. Every bad request is
        answered with an error, counted by reason, and logged at a bounded rate."""
        try:
            frames = self.control.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        try:
            if len(frames) != 1:
                raise proto.BadPartCount(f"control request must be 1 part, got {len(frames)}")
            req = proto.decode_request(frames[0].bytes)
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
            self.control_log(_peer(frames[0]), exc.reason, str(exc)[:200])
            self.control.send(proto.encode_reply(False, error=str(exc)))
            return True
        if cmd == "snapshot":
            self._reply_snapshot()
            return True
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
        return True

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
        its latest:N queue), so only it can say how many; status shows them per client.

        A full table evicts stale entries first, then the names that reported least
        (ties: the longest silent). A live client reports every second, so names
        invented by a peer (each sent a few times) go before it, and a flood of new
        names evicts only other new names."""
        now, name = time.monotonic(), report["client"]
        known = self.clients.get(name)
        if known is not None:
            known.seen, known.report, known.reports = now, report, known.reports + 1
            return
        self.clients[name] = ClientReport(now, report)
        if len(self.clients) > MAX_REPORTING_CLIENTS:
            victim = min(self.clients.items(), key=lambda kv: (
                now - kv[1].seen <= REPORT_EXPIRY_S, kv[1].reports, kv[1].seen))[0]
            del self.clients[victim]

    def consumers(self, expire: bool = True) -> dict[str, dict[str, Any]]:
        """Clients that reported within REPORT_EXPIRY_S, with the age of their report;
        the others are forgotten, unless ``expire`` is False (a --metrics scrape, in
        another thread, only reads: the loop's own thread alone changes the table)."""
        now = time.monotonic()
        clients = list(self.clients.items())
        if expire:
            for name in [n for n, c in clients if now - c.seen > REPORT_EXPIRY_S]:
                del self.clients[name]
        return {name: {**{k: v for k, v in c.report.items() if k != "client"},
                       "age_s": round(now - c.seen, 2)} for name, c in clients
                if now - c.seen <= REPORT_EXPIRY_S}

    # --- reporting -------------------------------------------------------------------
    def rate(self) -> float:
        """Frames per second over the recent window up to now (the live rate, not the
        average): while the source waits or is paused it falls, instead of showing the
        rate of the last frames sent."""
        if len(self._rate_window) < 2:
            return 0.0
        (t0, n0), (_, n1) = self._rate_window[0], self._rate_window[-1]
        now = time.monotonic()
        return (n1 - n0) / (now - t0) if now > t0 else 0.0

    def status(self, expire: bool = True) -> dict[str, Any]:
        """The ``status`` reply; ``expire=False`` changes nothing (see ``consumers``)."""
        elapsed = self._t_last - self._t_first
        avg = (self.sent - 1) / elapsed if elapsed > 0 else 0.0
        return {"version": __version__, "stream": self.cfg.stream,
                "session": proto.encode_id(self.session),
                "state": self.state, "source": self.source.description,
                "shape": list(self.source.shape), "dtype": str(self.source.dtype),
                "frames_sent": self.sent, "bytes_sent": self.bytes_sent,
                "rate_fps": 0.0 if self.paused else round(self.rate(), 2),  # none while paused
                "avg_fps": round(avg, 2),
                "mb_per_s": round(avg * self.frame_bytes / 1e6, 2),
                "uptime_s": round(time.monotonic() - self._t_start, 3),
                "first_frame_unix": self._first_frame_unix,
                "subscribers": self.subscribers + self.shm_subscribers,
                "peak_subscribers": self.peak_subscribers,
                "transports": self.transports(), "shm": self.shm_status(),
                "paused": self.paused, "sndhwm": self.cfg.sndhwm,
                "buffers_allocated": self.pool.allocated, "buffers_live": len(self.pool),
                "backpressure_waits": self.backpressure_waits, "pub_waits": self.pub_waits,
                "waiting": None if self.waiting_for is None else {
                    **self.waiting_for,
                    "seconds": round(time.monotonic() - self._stalled_since, 3)},
                "subscriptions": {name: self.subs[id(sock)].status() for name, sock in
                                  (("pub", self.pub), ("shm_pub", self.shm_pub))
                                  if sock is not None},
                "xpub_resets": self.xpub_resets,
                "control_rejected": dict(self.control_rejected),
                "source_rejected": dict(getattr(self.source, "rejected", {})),
                "source_senders": (dict(self.source.senders)
                                   if hasattr(self.source, "senders") else None),
                "auth_refused": self.guard.refused, "curve": self.cfg.security.curve,
                "error": self.error,
                "cpu_s": cpu_seconds(), "pacer_resyncs": self._pacer.resyncs,
                "consumers": self.consumers(expire),
                "hops": {self.hop.name: self.hop.summary()},
                "endpoints": self.endpoints(), "work": self.dispatcher.status(),
                "source_detail": getattr(self.source, "detail", _none)()}

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


def _peer(frame: zmq.Frame) -> str:
    """The peer's address as libzmq saw it (for reject logs), or "?"."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "?"


def install_signal_handlers(broker: Broker) -> None:
    """SIGINT/SIGTERM end the stream cleanly: END is sent, sockets close with a linger.
    The loop polls the signals' wakeup socket, so a stop cuts any wait short."""
    broker.wake_on(signals.wakeup_fd())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, broker.stop_soon)
