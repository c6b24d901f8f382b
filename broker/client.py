"""Client API: subscribe to frames, consume work, and control a broker.

A client needs one address, the broker's control endpoint; it asks ``endpoints``
for the data sockets. Every receive has a timeout and every request recovers from a
broker that went away (the REQ socket is recreated: the "lazy pirate" pattern), so
no client hangs forever on a dead peer.

Every client takes ``security`` (broker/security.py): CURVE keys, when the broker
uses them, and the ZMTP heartbeat interval. The default is plain, heartbeats on.
"""
from __future__ import annotations

import itertools
import os
import resource
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import zmq

from . import protocol as proto
from .security import PLAIN, Security, configure_socket
from .shm import SHM_SOCKET_BUFFER, FrameOverwritten, RingReader, shm_queue

DEFAULT_BROKER = "tcp://127.0.0.1:5557"
RESEND_S = 5.0  # Control.wait: ask again on a fresh socket this often
_R = TypeVar("_R", bound="_Receiver")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (for every part's summary)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


API_CURVE_HINT = ("if it runs with CURVE, pass security=Security(secret=..., "
                  "server_key=...)")
KEY_REFUSED_HINT = "if it is up, it may have refused our key: see its log"


class BrokerUnavailable(TimeoutError):
    """The broker did not answer in time.

    It carries what was tried (``endpoint``, ``cmd``, ``attempts``) and the real time
    waited (``waited``), so each caller can word it for its audience: ``str()`` names
    the Python API's parameters; the CLI calls ``explain`` with its flags.
    """

    def __init__(self, endpoint: str, cmd: str, waited: float, attempts: int = 1,
                 curve: bool = False) -> None:
        self.endpoint, self.cmd, self.waited = endpoint, cmd, waited
        self.attempts, self.curve = attempts, curve
        super().__init__(self.explain(API_CURVE_HINT))

    def explain(self, plain_hint: str) -> str:
        """The message with ``plain_hint`` (what to do if the broker uses CURVE and we
        do not) or, if we do use CURVE, the key-refused hint."""
        asked = f"asked {self.cmd!r} " + ("once" if self.attempts == 1
                                          else f"{self.attempts} times")
        return (f"no answer from the broker at {self.endpoint} after {self.waited:.1f} s "
                f"({asked}; {KEY_REFUSED_HINT if self.curve else plain_hint})")


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
                 ctx: zmq.Context | None = None, security: Security = PLAIN) -> None:
        self.endpoint, self.timeout, self.security = endpoint, timeout, security
        self.ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = configure_socket(self.ctx.socket(zmq.REQ), "client", self.security,
                                    proto.DEFAULT_MAX_BYTES + 4096)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(self.timeout * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request_parts(self, cmd: str, **args: Any) -> tuple[dict[str, Any], list[zmq.Frame]]:
        """Send ``cmd``; returns the decoded reply and any further parts (zero-copy)."""
        sock = self._socket()
        t0 = time.monotonic()
        try:
            sock.send(proto.encode_request(cmd, **args))
            parts = sock.recv_multipart(copy=False)
        except zmq.Again:
            self._reset()
            raise BrokerUnavailable(self.endpoint, cmd, time.monotonic() - t0,
                                    curve=self.security.curve) from None
        reply = proto.decode_reply(parts[0].bytes)
        if not reply["ok"]:
            raise RuntimeError(f"broker refused {cmd!r}: {reply.get('error', 'no reason given')}")
        return reply, parts[1:]

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return self.request_parts(cmd, **args)[0]

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

    def wait(self, deadline_s: float,
             on_wait: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Ask for ``endpoints`` until the broker answers or ``deadline_s`` passes.

        This is what makes "client first, broker later" work without sleeps in user code.
        The request stays queued on its socket (ZeroMQ delivers it once the broker is up,
        and a slow broker's late answer still counts); it is sent again on a fresh socket
        every RESEND_S in case a broker that took it died. ``on_wait(seconds_so_far)`` is
        called once a second after the first, so a caller can say that it is waiting. The
        timeout's error reports the whole time waited and how many times it asked.
        """
        t0 = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            self._reset()
            sock = self._socket()
            sock.send(proto.encode_request("endpoints"))
            resend = min(time.monotonic() + RESEND_S, t0 + deadline_s)
            while True:
                now = time.monotonic()
                if sock.poll(max(1, int(min(1.0, resend - now) * 1000))):
                    reply = proto.decode_reply(sock.recv())
                    if not reply["ok"]:
                        raise RuntimeError(f"broker refused 'endpoints': "
                                           f"{reply.get('error', 'no reason given')}")
                    return reply
                now = time.monotonic()  # one reading for both checks: the last resend
                waited = now - t0  # falls on the deadline, and must not ask once more
                if waited >= deadline_s:
                    self._reset()
                    raise BrokerUnavailable(self.endpoint, "endpoints", waited, attempts,
                                            self.security.curve)
                if on_wait is not None and waited >= 1.0:
                    on_wait(waited)
                if now >= resend:
                    break

    def close(self) -> None:
        self._reset()


_WILDCARDS = ("*", "0.0.0.0", "::")
_HOST_LOCAL = ("127.0.0.1", "localhost", "::1")  # what a broker advertises for its own host


def _tcp_host(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a tcp endpoint (IPv6 brackets removed), None for ipc/inproc."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return None
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), port


def reachable(endpoints: dict[str, Any], control: str) -> dict[str, Any]:
    """The ``endpoints`` reply with every address this client can reach.

    A broker bound to a wildcard without ``--advertise`` hands out 127.0.0.1 (or the
    wildcard itself): right on its own host, wrong from anywhere else. A client that
    reached the control socket through another host name knows a name that reaches
    the broker's host, so a wildcard or host-local data host is replaced by the
    control host, unless that is itself host-local (then we are on the broker's host
    and nothing changes). Other hosts (``--advertise``, explicit binds) are kept.
    """
    ctl = _tcp_host(control)
    if ctl is None or ctl[0] in _HOST_LOCAL:
        return endpoints
    host = f"[{ctl[0]}]" if ":" in ctl[0] else ctl[0]
    out = dict(endpoints)
    for key in ("pub", "work", "control", "results"):
        ep = endpoints.get(key)
        data = _tcp_host(ep) if isinstance(ep, str) else None
        if data is not None and (data[0] in _WILDCARDS or data[0] in _HOST_LOCAL):
            out[key] = f"tcp://{host}:{data[1]}"
    return out


def resolve(broker: str, override: str | None, key: str, wait_s: float = 10.0,
            ctx: zmq.Context | None = None,
            security: Security = PLAIN) -> tuple[str, dict[str, Any]]:
    """The endpoint for ``key`` ("pub", "work", "results"): ``override`` if given, else
    asked from the broker's control socket (waiting up to ``wait_s`` for it), made
    reachable from here (see ``reachable``)."""
    if override:
        return override, {}
    ctl = Control(broker, timeout=min(1.0, wait_s), ctx=ctx, security=security)
    try:
        eps = reachable(ctl.wait(wait_s), broker)
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
        self.session_received = 0  # frames of the current session (what END's total counts)
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
        # (old session, last id seen in it, new session, first id seen in it), newest last
        self.restarts: deque[tuple[int, int | None, int, int | None]] = deque(maxlen=16)

    # --- reporting to the broker (subscribers) ----------------------------------------
    name = ""
    policy = ""
    dropped = 0
    _reporter: threading.Thread | None = None

    def report(self) -> dict[str, Any]:
        """The counters the broker's status shows for this subscriber."""
        return {"client": self.name, "policy": self.policy, "received": self.received,
                "dropped": self.dropped, "gaps": self.gaps,
                "rejected": sum(self.rejected.values()), "sessions": self.sessions}

    def _start_reports(self, broker: str, every: float) -> None:
        self._reports_done = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="fb-report",
                                          args=(broker, every), daemon=True)
        self._reporter.start()

    def _report_loop(self, broker: str, every: float) -> None:
        """Own REQ socket in its own thread (zmq sockets are not thread-safe)."""
        ctl = Control(broker, timeout=min(every, 0.25), ctx=self.ctx,  # bounds close()
                      security=self.security)
        try:
            while True:
                stopping = self._reports_done.wait(every)
                try:
                    ctl.request("report", **self.report())
                except (BrokerUnavailable, RuntimeError, proto.ProtocolError):
                    pass  # no broker right now, or one too old to know "report"
                if stopping:
                    return
        finally:
            ctl.close()

    def _stop_reports(self) -> None:
        """Send the last report and stop; call once the counters are final."""
        if self._reporter is not None:
            self._reports_done.set()
            self._reporter.join()
            self._reporter = None

    def recv(self, timeout: float | None = None) -> Frame | None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        """Frames until end-of-stream (each ``recv`` may raise ReceiveTimeout)."""
        while (frame := self.recv()) is not None:
            yield frame

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
            if self.session is not None:  # the broker restarted: ids begin again at 0
                self.restarts.append((self.session, self.last_id, header.session, None))
                self.last_id = -1  # so the new session's ids before this one count as gaps
            else:
                self.last_id = None
            self.session = header.session
            self.sessions += 1
            self.session_received = 0
            self.ended = False
        if self.restarts and self.restarts[-1][3] is None and header.kind != proto.Kind.END:
            old, last, new, _ = self.restarts[-1]
            self.restarts[-1] = (old, last, new, header.frame_id)
        if header.kind == proto.Kind.END:
            self.ended, self.total, self.end_header = True, header.total, header
            return
        if self.first_id is None:
            self.first_id = header.frame_id
        if self.last_id is not None and header.frame_id > self.last_id + 1:
            self.gaps += header.frame_id - self.last_id - 1
        self.last_id = header.frame_id
        self.received += 1
        self.session_received += 1
        self.bytes += header.nbytes

    @property
    def missed(self) -> int | None:
        """Frames of the current session this receiver never got (known once END arrived)."""
        return None if self.total is None else self.total - self.session_received

    def stats(self) -> dict[str, Any]:
        return {"received": self.received, "bytes": self.bytes, "gaps": self.gaps,
                "rejected": dict(self.rejected), "ended": self.ended, "total": self.total,
                "missed": self.missed, "sessions": self.sessions, "last_error": self.last_error,
                "restarts": [{"old_session": proto.encode_id(o), "last_id": li,
                              "new_session": proto.encode_id(n), "first_id": fi}
                             for o, li, n, fi in self.restarts],
                "transport": self.transport, "overwritten": self.overwritten,
                "shm_fallback": self.shm_fallback}


def parse_policy(text: str) -> int:
    """``drop`` -> 0; ``latest:N`` -> N (keep only the newest N complete frames);
    ``block`` -> -1 (lossless: frames come through the work channel, see BlockingSubscriber)."""
    if text == "drop":
        return 0
    if text == "block":
        return -1
    kind, _, n = text.partition(":")
    if kind == "latest" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise ValueError(f"policy {text!r} must be 'drop', 'block' or 'latest:N' with N >= 1")


def default_name() -> str:
    """A name that tells a person which machine and process a subscriber is."""
    return f"sub-{socket.gethostname()[:32]}-{os.getpid()}-{next(_names)}"


_names = itertools.count()


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

    When the endpoint was asked from the broker, the subscriber reports its counters
    (received, dropped, gaps, rejected) to the broker's control socket every
    ``report_every`` seconds under ``name``, so ``framebroker status`` shows what each
    consumer lost; 0 turns reporting off. A broker that does not answer costs nothing
    but a skipped report.

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
                 name: str = "", report_every: float = 1.0, ctx: zmq.Context | None = None,
                 security: Security = PLAIN) -> None:
        super().__init__(max_bytes)
        self.keep = parse_policy(policy)
        if self.keep < 0:
            raise ValueError("policy 'block' takes frames from the work channel: use "
                             "subscribe() or BlockingSubscriber")
        self.name = name or default_name()
        self.policy = policy
        self.dropped = 0
        self.ctx = ctx or zmq.Context.instance()
        self.security = security
        self.endpoint, eps = resolve(broker, endpoint, "pub", connect_wait, self.ctx, security)
        self._map_ring(eps, shm)
        if self.ring is not None:
            self.endpoint = eps["shm"]["pub"]
        if topics is None:
            topics = (eps["stream"],) if eps else ("",)
        self.timeout = timeout
        self.sock = configure_socket(self.ctx.socket(zmq.SUB), "client", security,
                                     max_bytes + 4096)
        if self.ring is not None:
            self.sock.setsockopt(zmq.RCVBUF, SHM_SOCKET_BUFFER)
            rcvhwm = shm_queue(rcvhwm, self.ring.info.nslots)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
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
        if eps and report_every > 0:
            self._start_reports(broker, report_every)

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
        return {**super().stats(), "policy": self.policy, "dropped": self.dropped,
                "name": self.name}

    def close(self) -> None:
        self._closing = True
        if self._thread is not None:
            self._thread.join()
        self._stop_reports()  # after the receiving thread: the last report is final
        self.sock.close(linger=0)


class WorkConsumer(_Receiver):
    """DEALER member of a work group: frames arrive only while we have credit.

    With ``shm`` (default) and a broker that offers a ring on this host, frames are
    views of ring slots that the broker keeps until this frame is finished (DONE, or
    the sink's ACK), so they need no copy and are never overwritten under us.

    Call ``done(frame_id)`` when a frame is finished; that returns the credit (and,
    in an ``acks="self"`` group, acknowledges it so the broker can forget it).
    While idle it heartbeats and repeats READY, so a broker that declared it dead or
    restarted takes it back. ``shard`` (a ``protocol.Shard``) makes its group take only
    that shard's blocks of frame ids (a sharded recording's writer, broker/shards.py).
    """

    def __init__(self, endpoint: str | None = None, *, broker: str = DEFAULT_BROKER,
                 group: str = "fft", window: int = 4, acks: str = "self", name: str = "",
                 heartbeat: float = 0.25, max_bytes: int = proto.DEFAULT_MAX_BYTES,
                 connect_wait: float = 10.0, shm: bool = True, ctx: zmq.Context | None = None,
                 security: Security = PLAIN, shard: proto.Shard | None = None) -> None:
        super().__init__(max_bytes)
        self.ctx = ctx or zmq.Context.instance()
        self.security = security
        self.broker = broker
        self.endpoint, self.endpoints = resolve(broker, endpoint, "work", connect_wait, self.ctx,
                                                security)
        self._map_ring(self.endpoints, shm)
        self.ready = proto.Ready(group, window, acks, name or f"{group}-{os.getpid()}",
                                 "consumer", self.transport, shard)
        self.heartbeat = heartbeat
        self.sock = configure_socket(self.ctx.socket(zmq.DEALER), "client", security,
                                     max_bytes + 4096)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(self.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._watched: dict[int, Callable[[], None]] = {}
        self._last_sent = 0.0
        self._join()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Also wait on file descriptor ``fd`` in ``recv``: when it is readable, call
        ``callback`` (in the receiving thread, so it may call ``done``) and keep waiting.
        A recorder's writer thread wakes it this way, so credit goes back the moment a
        frame is safe rather than when the next frame arrives (which, with the whole
        window held, it never does)."""
        self._poller.register(fd, zmq.POLLIN)
        self._watched[fd] = callback

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
            events = dict(self._poller.poll(int(min(left, self.heartbeat) * 1000) + 1))
            for fd, callback in self._watched.items():
                if fd in events:
                    callback()
            if self.sock in events:
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
            _, eps = resolve(self.broker, None, "work", 2.0, self.ctx, self.security)
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


def block_group(name: str) -> str:
    """The work group of a blocking subscriber: its name, cut to what groups allow.
    Subscribers given the same name share one group, so they split the frames."""
    safe = "".join(c if c in proto.GROUP_CHARS else "-" for c in name.lower())
    return (proto.BLOCK_GROUP_PREFIX + safe)[:proto.MAX_GROUP_NAME]


class BlockingSubscriber(WorkConsumer):
    """The ``block`` policy: every frame, at the speed of this consumer.

    It is a member of a work group of its own (``block_group(name)``) that acknowledges
    a frame when the caller asks for the next one, so the broker holds each frame until
    then and, ``--max-pending`` frames on, makes the source wait: lossless, and the price
    is that a slow blocking subscriber slows the camera for everyone. If it dies, the
    broker waits ``--orphan-timeout`` for it to come back and then drops its group.
    """

    def __init__(self, *, broker: str = DEFAULT_BROKER, name: str = "", window: int = 4,
                 timeout: float = 5.0, max_bytes: int = proto.DEFAULT_MAX_BYTES,
                 connect_wait: float = 10.0, report_every: float = 1.0, shm: bool = True,
                 ctx: zmq.Context | None = None, security: Security = PLAIN) -> None:
        self.name = name or default_name()
        self.policy = "block"
        self.timeout = timeout
        super().__init__(broker=broker, group=block_group(self.name), window=window,
                         acks="self", name=self.name, max_bytes=max_bytes,
                         connect_wait=connect_wait, shm=shm, ctx=ctx, security=security)
        self._handed_out: int | None = None
        if report_every > 0:
            self._start_reports(broker, report_every)

    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame (acknowledging the one before), or None at end-of-stream."""
        self._settle()
        frame = super().recv(self.timeout if timeout is None else timeout)
        if frame is not None:
            self._handed_out = frame.frame_id
        return frame

    def _settle(self) -> None:
        if self._handed_out is not None:
            self.done(self._handed_out)
            self._handed_out = None

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "policy": self.policy, "dropped": 0, "name": self.name}

    def close(self) -> None:
        self._settle()
        self._stop_reports()
        super().close()


def subscribe(policy: str = "drop", **kw: Any) -> Subscriber | BlockingSubscriber:
    """A subscriber with ``policy`` (``drop``, ``latest:N`` or ``block``); the keyword
    arguments are those of Subscriber or BlockingSubscriber."""
    if parse_policy(policy) < 0:
        return BlockingSubscriber(**kw)
    return Subscriber(policy=policy, **kw)
