"""Who subscribes on one of the broker's XPUB sockets, counted by connection.

libzmq's XPUB tells the application about subscriptions (XPUB_VERBOSER: every one,
duplicates too) but not which connection sent them, and when a connection ends it
reports one unsubscription per distinct topic. Counting messages therefore lets one
socket that subscribes 100 times count as 100 subscribers for good. Here each
subscription is attributed to its connection by the file descriptor libzmq attaches
to the message (``SRCFD``), and a socket monitor reports connections that
ended (with the same descriptor): a subscriber is a connection holding at least one
subscription that matches our stream.

A connection's end is seen twice: out of band, at once (the monitor's DISCONNECTED),
and in band, after every message that connection had queued (libzmq then reports one
unsubscription, without a descriptor, per topic the connection held). Between the
two, messages carrying that descriptor are the dead connection's, until the monitor
reports a new connection on it (ACCEPTED: libzmq reuses descriptors at once); an
ended connection's topics are kept apart until its in-band unsubscriptions have come
(or ENDED_GRACE_S has passed).

Events and messages come on two sockets, so the events are read again after each
subscription is received and before it is attributed: the end of a descriptor's old
connection and the start of its new one are reported before the new one's first
subscription, so once that subscription is in hand, both can be read. Read only
beforehand, the old connection's end could come after the new one's subscriptions,
which were then taken for the dead connection's: not counted, so the peer was not a
subscriber and could pass the bounds below. What stays ambiguous (a dead connection's
late message read after its successor's ACCEPTED) is counted for the successor: a
subscriber too many for a while, never a subscription too few.

libzmq keeps every distinct subscription of every connection in memory (about 47
bytes per subscribed byte were measured), so the number and total size of distinct
subscriptions are bounded: MAXMSGSIZE caps one subscription at a stream name, and a
subscription beyond MAX_SUBSCRIPTIONS or MAX_SUBSCRIBED_BYTES is a counted reject
that makes the broker reset the socket (close and bind it again: libzmq frees what
it held; real subscribers reconnect and subscribe again by themselves).
"""
from __future__ import annotations

import struct
import time
from typing import Any

import zmq

from . import protocol as proto

#: the XPUB's MAXMSGSIZE: a subscription is a flag byte and a topic no longer than a
#: stream name (1 + MAX_NAME), but the limit also applies to the CURVE handshake's
#: commands (INITIATE carries a vouch and metadata: about 300 bytes)
MAX_SUBSCRIPTION_MESSAGE = 4096
MAX_SUBSCRIPTIONS = 1024  # distinct (connection, topic) pairs held on one XPUB
MAX_SUBSCRIBED_BYTES = 64 * 1024  # their topics' bytes
MAX_MESSAGES_PER_CALL = 4096  # a subscription flood cannot starve the frame loop
CONNECTION_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
ENDED_GRACE_S = 5.0  # an ended connection's in-band unsubscriptions come within ms


def parse_monitor_message(msg: list[bytes]) -> dict[str, Any]:
    """A socket monitor's event, as ``zmq.utils.monitor.parse_monitor_message`` gives
    it: that module imports zmq.asyncio (and asyncio), 35 ms or more of every broker's
    start-up, for these few lines. libzmq's format: a 16-bit event id and a 32-bit
    value, unpadded, then the endpoint."""
    if len(msg) != 2 or len(msg[0]) != 6:
        raise RuntimeError(f"invalid socket monitor message: {msg!r}")
    event_id, value = struct.unpack("=hi", msg[0])
    return {"event": zmq.Event(event_id), "value": zmq.Event(value), "endpoint": msg[1]}


class Subscriptions:
    """The subscriptions and subscribers of XPUB ``sock`` for stream ``topic``.

    ``extra_events`` are further monitor events (CURVE refusals) handed to
    ``on_event(event)``: a socket has one monitor, so this class reads it for both.
    """

    def __init__(self, sock: zmq.Socket, topic: bytes, extra_events: int = 0,
                 on_event=None) -> None:
        self.sock, self.topic = sock, topic
        self.monitor = sock.get_monitor_socket(CONNECTION_EVENTS | extra_events)
        self._on_event = on_event
        self.by_fd: dict[int, set[bytes]] = {}  # live connections' topics
        self.open: set[int] = set()  # descriptors ACCEPTED and not DISCONNECTED since
        self.dead: dict[int, tuple[float, int]] = {}  # fd -> (when, its ended connection)
        self.ended: dict[int, tuple[float, set[bytes]]] = {}  # connection -> (when, due)
        self._ends = 0  # numbers the ended connections
        self.inproc: dict[bytes, int] = {}  # topic -> subscriptions of inproc peers
        self.held = 0  # distinct (connection, topic) pairs
        self.held_bytes = 0
        self.rejected: dict[str, int] = {}
        self.over_limit = False  # the broker should reset the socket

    def close(self) -> None:
        """Stop monitoring (safe to call more than once, before or after the socket closes)."""
        if not self.sock.closed:
            self.sock.disable_monitor()
        self.monitor.close(linger=0)

    def subscribers(self) -> int:
        """Connections holding a subscription that matches our stream."""
        return sum(1 for topics in self.by_fd.values()
                   if any(self.topic.startswith(t) for t in topics)) + sum(
            n for t, n in self.inproc.items() if self.topic.startswith(t))

    def update(self) -> bool:
        """Read connection events, then subscriptions, each after the events that came
        before it (see the module's docstring); True if anything changed."""
        changed = self._events()
        now = time.monotonic()
        for fd in [fd for fd, (t, _) in self.dead.items() if now - t > ENDED_GRACE_S]:
            del self.dead[fd]
        for key in [key for key, (t, _) in self.ended.items() if now - t > ENDED_GRACE_S]:
            del self.ended[key]
        for _ in range(MAX_MESSAGES_PER_CALL):
            try:
                msg = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            changed |= self._events()
            changed |= self._message(msg)
        return changed

    def _events(self) -> bool:
        """Read the monitor dry; True if a connection ended."""
        changed = False
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return changed
            if event["event"] == zmq.EVENT_ACCEPTED:
                changed |= self._accepted(int(event["value"]))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._ended(int(event["value"]))
                changed = True
            elif self._on_event is not None:
                self._on_event(event)

    def _accepted(self, fd: int) -> bool:
        """A new connection on ``fd``: from now on its messages are this one's. True if
        that ends a connection whose end the monitor did not report (its queue was full)."""
        ended = fd in self.open
        if ended:
            self._ended(fd)
        self.open.add(fd)
        self.dead.pop(fd, None)
        return ended

    def _ended(self, fd: int) -> None:
        """A connection ended: it stops counting now; its topics wait for their in-band
        unsubscriptions, and messages with its descriptor are its own until the
        descriptor's next connection is reported."""
        self.open.discard(fd)
        topics = self.by_fd.pop(fd, set())
        self.held -= len(topics)
        self.held_bytes -= sum(len(t) for t in topics)
        self._ends += 1
        now = time.monotonic()
        self.dead[fd] = (now, self._ends)
        if topics:
            self.ended[self._ends] = (now, topics)

    def _inproc(self, subscribe: bool, topic: bytes) -> bool:
        """A message without a descriptor. A subscription is an inproc peer's (same
        process, trusted: counted by message, as libzmq reports them). An
        unsubscription ticks off an ended connection's topic, else an inproc one."""
        if subscribe:
            self.inproc[topic] = self.inproc.get(topic, 0) + 1
            return True
        for key, (_, due) in self.ended.items():
            if topic in due:
                due.discard(topic)
                if not due:
                    del self.ended[key]
                return False
        if self.inproc.get(topic, 0) > 0:
            self.inproc[topic] -= 1
            return True
        return False

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _message(self, msg: zmq.Frame) -> bool:
        data = msg.bytes
        if not data or data[0] not in (0, 1):
            self._reject("not_subscription")
            return False
        topic = data[1:]
        try:
            fd = int(msg.get(zmq.SRCFD))
        except zmq.ZMQError:  # no descriptor: an inproc peer (in this process), or
            return self._inproc(data[0] == 1, topic)  # libzmq's for an ended connection
        if fd in self.dead:  # queued by a connection that has ended: its in-band
            when, key = self.dead[fd]  # unsubscriptions will name this topic too
            if data[0] == 1:
                self.ended.setdefault(key, (when, set()))[1].add(topic)
            elif key in self.ended:
                self.ended[key][1].discard(topic)
            return False
        topics = self.by_fd.setdefault(fd, set())
        if data[0] == 0:
            if topic in topics:
                topics.discard(topic)
                self.held -= 1
                self.held_bytes -= len(topic)
                return True
            return False
        if topic in topics:
            return False
        if len(topic) > proto.MAX_NAME:
            self._reject("subscription_too_long")  # libzmq holds it all the same
        if self.held >= MAX_SUBSCRIPTIONS or self.held_bytes + len(topic) > MAX_SUBSCRIBED_BYTES:
            self._reject("subscription_limit")
            self.over_limit = True
            return False
        topics.add(topic)
        self.held += 1
        self.held_bytes += len(topic)
        return True

    def status(self) -> dict[str, int | dict[str, int]]:
        return {"connections": len(self.by_fd), "held": self.held,
                "held_bytes": self.held_bytes, "rejected": dict(self.rejected)}
