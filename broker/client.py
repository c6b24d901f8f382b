"""Client API: subscribe to frames, consume work, and control a broker.

A client needs one address, the broker's control endpoint; it asks ``endpoints``
for the data sockets. Every receive has a timeout and every request recovers from a
broker that went away (the REQ socket is recreated: the "lazy pirate" pattern), so
no client hangs forever on a dead peer.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import zmq

from . import protocol as proto
from .shm import SHM_SOCKET_BUFFER, FrameOverwritten, RingReader, shm_queue

DEFAULT_BROKER = "tcp://127.0.0.1:5557"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (for every part's summary)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


class BrokerUnavailable(TimeoutError):
    """The broker did not answer in time."""


class ReceiveTimeout(TimeoutError):
    """No message arrived within the receive timeout."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A received frame: the header fields and a read-only array over the message buffer.

    Over tcp/ipc the array shares memory with the zmq message: it stays valid as long
    as you hold the Frame. Over shm (``transport == "shm"``) it is a view of a ring
    slot: a live subscriber's frame is valid only until the broker reuses the slot
    (about ``slots`` frames later), so check ``intact()`` after using it, or take
    ``copy()`` (which checks for you) to keep it. A work consumer's frame stays valid
    until its ``done()`` (or the sink's ACK): the broker holds the slot until then.
    """

    header: proto.Header
    array: np.ndarray
    ring: RingReader | None = None

    @property
    def transport(self) -> str:
        return "tcp" if self.ring is None else "shm"

    def intact(self) -> bool:
        """True if the pixels are still this frame's (always over tcp): the seqlock's
        check after reading; False means what you read may be a later frame's."""
        return self.ring is None or self.ring.intact(self.header.slot, self.header.stamp)

    def copy(self) -> np.ndarray:
        """A private, writable copy of the pixels; raises FrameOverwritten if the broker
        reused the slot before the copy was complete."""
        out = self.array.copy()
        if not self.intact():
            raise FrameOverwritten(f"frame {self.frame_id} was overwritten while copied")
        return out

    @property
    def frame_id(self) -> int:
        return self.header.frame_id

    @property
    def timestamp_ns(self) -> int:
        return self.header.timestamp_ns

    @property
    def stream(self) -> str:
        return self.header.stream


class Control:
    """REQ client for the broker's control socket, with timeouts and reconnects."""

    def __init__(self, endpoint: str = DEFAULT_BROKER, timeout: float = 2.0,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(self.timeout * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
            sock.setsockopt(zmq.MAXMSGSIZE, proto.DEFAULT_MAX_BYTES + 4096)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request_parts(self, cmd: str) -> tuple[dict[str, Any], list[zmq.Frame]]:
        """Send ``cmd``; returns the decoded reply and any further parts (zero-copy)."""
        sock = self._socket()
        try:
            sock.send(proto.encode_request(cmd))
            parts = sock.recv_multipart(copy=False)
        except zmq.Again:
            self._reset()
            raise BrokerUnavailable(f"broker at {self.endpoint} did not answer {cmd!r} within "
                                    f"{self.timeout:g} s") from None
        reply = proto.decode_reply(parts[0].bytes)
        if not reply["ok"]:
            raise RuntimeError(f"broker refused {cmd!r}: {reply.get('error', 'no reason given')}")
        return reply, parts[1:]

    def request(self, cmd: str) -> dict[str, Any]:
        return self.request_parts(cmd)[0]

    def endpoints(self) -> dict[str, Any]:
        return self.request("endpoints")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def pause(self) -> dict[str, Any]:
        return self.request("pause")

    def resume(self) -> dict[str, Any]:
        return self.request("resume")

    def stop(self) -> dict[str, Any]:
        return self.request("stop")

    def snapshot(self, max_bytes: int = proto.DEFAULT_MAX_BYTES) -> Frame:
        """The broker's latest frame (header + payload, validated like any frame)."""
        _, parts = self.request_parts("snapshot")
        header, array = proto.decode(parts, max_bytes=max_bytes)
        if array is None:
            raise proto.UnknownKind("snapshot reply carried an end-of-stream message")
        return Frame(header, array)

    def wait(self, deadline_s: float) -> dict[str, Any]:
        """Ask for ``endpoints`` until the broker answers or ``deadline_s`` passes.

        This is what makes "client first, broker later" work without sleeps in user code.
        """
        end = time.monotonic() + deadline_s
        while True:
            try:
                return self.endpoints()
            except BrokerUnavailable:
                if time.monotonic() >= end:
                    raise

    def close(self) -> None:
        self._reset()


def resolve(broker: str, override: str | None, key: str, wait_s: float = 10.0,
            ctx: zmq.Context | None = None) -> tuple[str, dict[str, Any]]:
    """The endpoint for ``key`` ("pub", "work", "results"): ``override`` if given, else
    asked from the broker's control socket (waiting up to ``wait_s`` for it)."""
    if override:
        return override, {}
    ctl = Control(broker, timeout=min(1.0, wait_s), ctx=ctx)
    try:
        eps = ctl.wait(wait_s)
    finally:
        ctl.close()
    return eps[key], eps


class _Receiver:
    """Stream bookkeeping shared by subscribers and work consumers: gaps, rejects, END,
    and the transport: a ring it maps (shm) or payloads over the socket (tcp)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.ring: RingReader | None = None
        self.shm_fallback = ""  # why the ring was not used, if the broker offered one
        self.overwritten = 0  # shm frames the broker reused before they were read
        self.received = 0
        self.bytes = 0
        self.gaps = 0  # frame ids skipped between received frames
        self.rejected: Counter[str] = Counter()
        self.last_error = ""
        self.sessions = 0
        self.session: int | None = None
        self.last_id: int | None = None
        self.first_id: int | None = None
        self.ended = False
        self.total: int | None = None
        self.end_header: proto.Header | None = None

    def _reject(self, exc: proto.ProtocolError) -> None:
        self.rejected[exc.reason] += 1
        self.last_error = str(exc)

    @property
    def transport(self) -> str:
        return "tcp" if self.ring is None else "shm"

    def _map_ring(self, eps: dict[str, Any], use_shm: bool) -> None:
        """Map the broker's ring if it offers one and it is really here (same boot,
        same file); otherwise stay on tcp and remember why."""
        advert = eps.get("shm")
        if not (use_shm and advert):
            return
        try:
            self.ring = RingReader(advert)
        except (OSError, proto.ProtocolError) as exc:
            self.shm_fallback = str(exc)

    def _frame(self, header: proto.Header, array: np.ndarray | None) -> Frame | None:
        """The Frame for a decoded FRAME or SHM_FRAME; None (counted) if its slot was
        already overwritten. Bad headers raise ProtocolError for the caller to count."""
        if header.kind != proto.Kind.SHM_FRAME:
            return Frame(header, array)
        if self.ring is None:
            raise proto.UnknownKind("SHM_FRAME for a receiver that has no ring mapped")
        try:
            return Frame(header, self.ring.view(header), self.ring)
        except FrameOverwritten:
            self.overwritten += 1
            return None

    def _account(self, header: proto.Header) -> None:
        if header.session != self.session:
            self.session = header.session
            self.sessions += 1
            self.last_id = None
            self.ended = False
        if header.kind == proto.Kind.END:
            self.ended, self.total, self.end_header = True, header.total, header
            return
        if self.first_id is None:
            self.first_id = header.frame_id
        if self.last_id is not None and header.frame_id > self.last_id + 1:
            self.gaps += header.frame_id - self.last_id - 1
        self.last_id = header.frame_id
        self.received += 1
        self.bytes += header.nbytes

    @property
    def missed(self) -> int | None:
        """Frames of the stream this receiver never got (known once END arrived)."""
        return None if self.total is None else self.total - self.received

    def stats(self) -> dict[str, Any]:
        return {"received": self.received, "bytes": self.bytes, "gaps": self.gaps,
                "rejected": dict(self.rejected), "ended": self.ended, "total": self.total,
                "missed": self.missed, "sessions": self.sessions, "last_error": self.last_error,
                "transport": self.transport, "overwritten": self.overwritten,
                "shm_fallback": self.shm_fallback}


def parse_policy(text: str) -> int:
    """``drop`` -> 0; ``latest:N`` -> N (keep only the newest N complete frames)."""
    if text == "drop":
        return 0
    kind, _, n = text.partition(":")
    if kind == "latest" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise ValueError(f"policy {text!r} must be 'drop' or 'latest:N' with N >= 1")


class Subscriber(_Receiver):
    """SUB client: iterate to get ``Frame`` objects until end-of-stream.

    Invalid messages are counted in ``rejected`` (by reason) and skipped; gaps in
    frame ids are counted in ``gaps``. ``timeout`` (seconds) bounds every wait and
    raises ReceiveTimeout.

    ``policy`` says what happens when the consumer is slower than the stream:
    ``drop`` (default) lets ZeroMQ's HWM drop at the broker (seen here as gaps);
    ``latest:N`` receives in a background thread and keeps only the newest N
    complete frames, so a slow viewer always gets a fresh frame and the broker's
    queue for it stays empty. Frames it discards are counted in ``dropped``
    (``received`` counts every frame that arrived). ZeroMQ's CONFLATE cannot do
    this: it breaks multipart messages.

    ``shm`` (default True): if the broker offers a shared-memory ring and it is on
    this host, subscribe to its header-only PUB and read pixels from the ring
    (``transport`` says which was chosen, ``shm_fallback`` why not). Slots the broker
    reused before we read them are counted in ``overwritten`` (and, like every lost
    frame, in ``gaps``); never delivered. See ``Frame`` for how long a frame is valid.
    """

    def __init__(self, endpoint: str | None = None, *, broker: str = DEFAULT_BROKER,
                 topics: tuple[str, ...] | None = None, timeout: float = 5.0,
                 rcvhwm: int = 64, max_bytes: int = proto.DEFAULT_MAX_BYTES,
                 connect_wait: float = 10.0, policy: str = "drop", shm: bool = True,
                 ctx: zmq.Context | None = None) -> None:
        super().__init__(max_bytes)
        self.keep = parse_policy(policy)
        self.policy = policy
        self.dropped = 0
        self.ctx = ctx or zmq.Context.instance()
        self.endpoint, eps = resolve(broker, endpoint, "pub", connect_wait, self.ctx)
        self._map_ring(eps, shm)
        if self.ring is not None:
            self.endpoint = eps["shm"]["pub"]
        if topics is None:
            topics = (eps["stream"],) if eps else ("",)
        self.timeout = timeout
        self.sock = self.ctx.socket(zmq.SUB)
        if self.ring is not None:
            self.sock.setsockopt(zmq.RCVBUF, SHM_SOCKET_BUFFER)
            rcvhwm = shm_queue(rcvhwm, self.ring.info.nslots)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + 4096)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sock.connect(self.endpoint)
        self._latest: deque[Frame | None] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        if self.keep:
            self._thread = threading.Thread(target=self._pump, name="fb-latest", daemon=True)
            self._thread.start()

    def _next(self, wait_ms: int) -> Frame | None:
        """Read until a valid frame (or END: None) arrives; raises ReceiveTimeout."""
        while True:
            if not self.sock.poll(wait_ms):
                raise ReceiveTimeout(f"no frame from {self.endpoint} within {wait_ms / 1000:g} s")
            parts = self.sock.recv_multipart(copy=False)
            try:
                header, array = proto.decode_topic(parts, self.max_bytes)
            except proto.ProtocolError as exc:
                self._reject(exc)
                continue
            if header.kind == proto.Kind.END:
                if self.ended and header.session == self.session:
                    continue  # the broker repeats END; one is enough
                self._account(header)
                return None
            if header.kind not in (proto.Kind.FRAME, proto.Kind.SHM_FRAME):
                self._reject(proto.UnknownKind(f"{header.kind.name} on a frame stream"))
                continue
            try:
                frame = self._frame(header, array)
            except proto.ProtocolError as exc:
                self._reject(exc)
                continue
            if frame is None:
                continue  # overwritten before we got to it: counted, and a gap
            self._account(header)
            return frame

    def _pump(self) -> None:
        """latest:N: the only user of the socket; keeps the newest N items."""
        while not self._closing:
            try:
                item = self._next(100)
            except ReceiveTimeout:
                continue
            with self._cond:
                if len(self._latest) >= self.keep:
                    if self._latest.popleft() is not None:
                        self.dropped += 1
                self._latest.append(item)
                self._cond.notify()

    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next valid frame, or None at end-of-stream; raises ReceiveTimeout."""
        wait = self.timeout if timeout is None else timeout
        if not self.keep:
            return self._next(int(wait * 1000))
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                left = deadline - time.monotonic()
                if not self._cond.wait_for(lambda: self._latest, timeout=max(left, 0)):
                    raise ReceiveTimeout(f"no frame from {self.endpoint} within {wait:g} s")
                frame = self._latest.popleft()
                if frame is None or self.confirm(frame):
                    return frame

    def confirm(self, frame: Frame) -> bool:
        """The seqlock's check after use: True if ``frame``'s pixels were not overwritten
        while you read them; False (counted in ``overwritten``) if they may have been."""
        if frame.intact():
            return True
        self.overwritten += 1
        return False

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "policy": self.policy, "dropped": self.dropped}

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.recv()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        self._closing = True
        if self._thread is not None:
            self._thread.join()
        self.sock.close(linger=0)

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WorkConsumer(_Receiver):
    """DEALER member of a work group: frames arrive only while we have credit.

    With ``shm`` (default) and a broker that offers a ring on this host, frames are
    views of ring slots that the broker keeps until this frame is finished (DONE, or
    the sink's ACK), so they need no copy and are never overwritten under us.

    Call ``done(frame_id)`` when a frame is finished; that returns the credit (and,
    in an ``acks="self"`` group, acknowledges it so the broker can forget it).
    While idle it heartbeats and repeats READY, so a broker that declared it dead or
    restarted takes it back.
    """

    def __init__(self, endpoint: str | None = None, *, broker: str = DEFAULT_BROKER,
                 group: str = "fft", window: int = 4, acks: str = "self", name: str = "",
                 heartbeat: float = 0.25, max_bytes: int = proto.DEFAULT_MAX_BYTES,
                 connect_wait: float = 10.0, shm: bool = True,
                 ctx: zmq.Context | None = None) -> None:
        super().__init__(max_bytes)
        self.ctx = ctx or zmq.Context.instance()
        self.broker = broker
        self.endpoint, self.endpoints = resolve(broker, endpoint, "work", connect_wait, self.ctx)
        self._map_ring(self.endpoints, shm)
        self.ready = proto.Ready(group, window, acks, name or f"{group}-{os.getpid()}",
                                 "consumer", self.transport)
        self.heartbeat = heartbeat
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + 4096)
        self.sock.connect(self.endpoint)
        self._last_sent = 0.0
        self._join()

    def _join(self) -> None:
        self.sock.send_multipart([proto.WorkCmd.READY.value, proto.encode_ready(self.ready)])
        self._last_sent = time.monotonic()

    def recv(self, timeout: float = 5.0) -> Frame | None:
        """Next frame, or None at end-of-stream; raises ReceiveTimeout after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ReceiveTimeout(f"no work from {self.endpoint} within {timeout:g} s")
            if self.sock.poll(int(min(left, self.heartbeat) * 1000) + 1):
                parts = self.sock.recv_multipart(copy=False)
                try:
                    header, array = proto.decode(parts, max_bytes=self.max_bytes)
                    if header.kind == proto.Kind.END:
                        self._account(header)
                        return None
                    if (header.kind == proto.Kind.SHM_FRAME and self.ring is not None
                            and header.session != self.ring.info.session):
                        self._remap()
                    frame = self._frame(header, array)
                except proto.ProtocolError as exc:
                    self._reject(exc)
                    continue
                if frame is None:  # the broker holds our slots: only a broker bug
                    self._reject(proto.BadSlot(f"slot of frame {header.frame_id} was "
                                               f"reused before DONE"))
                    continue
                self._account(header)
                return frame
            if time.monotonic() - self._last_sent >= self.heartbeat:
                self._join()  # doubles as heartbeat: idempotent at the broker

    def _remap(self) -> None:
        """A new broker session (we re-joined a restarted broker) has a new ring: map it."""
        try:
            _, eps = resolve(self.broker, None, "work", 2.0, self.ctx)
        except BrokerUnavailable:
            return
        self.ring = None
        self._map_ring(eps, True)

    def heartbeat_now(self) -> None:
        """Tell the broker we are alive while busy with something other than frames."""
        self.sock.send_multipart([proto.WorkCmd.HB.value])
        self._last_sent = time.monotonic()

    def done(self, *frame_ids: int) -> None:
        self.sock.send_multipart([proto.WorkCmd.DONE.value, proto.encode_ids(frame_ids)])
        self._last_sent = time.monotonic()

    def close(self) -> None:
        try:
            self.sock.send_multipart([proto.WorkCmd.BYE.value], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(linger=500)
