"""Credit-based, at-least-once work dispatch over a ROUTER socket.

Consumers (FFT workers, lossless recorders) join a *group* with a credit window and
are sent a frame only while they hold fewer than ``window`` unfinished frames, so a
slow consumer gets fewer frames and nothing piles up in a dead consumer's queue.
Every group gets every frame once. The broker keeps each frame until it is
acknowledged: by the consumer itself (``acks="self"``, e.g. the recorder) or by the
group's acker (``acks="sink"``: the FFT sink acknowledges results it holds). A
consumer that stays silent past the timeout, or that ROUTER can no longer reach, is
declared dead and its unacknowledged frames are dispatched again; the sink removes
the duplicates this can cause.

A *sharded* group (READY with ``shard``) takes only the frames of its shard (ids in
blocks, block b to shard b mod N: protocol.Shard); the others are never queued or held
for it, which is the same as settling them at once. So N lossless recorder groups, one
per shard, each get a disjoint part of the stream and the source waits for the slowest.

A group left with no members and no ackers is dissolved: at once when the last one
said BYE, or after ``orphan_timeout`` when the last one died, so a lossless recorder
that dies and is not restarted holds the source up for that long, not forever. Its
unacknowledged frames are released and counted in ``abandoned``; a consumer joining
later starts a new group with new frames.

The span of unacknowledged frame ids per group is bounded: no frame is dispatched
while it is ``max_pending`` or more ids ahead of the group's oldest unacknowledged
frame, and the source waits instead. That bounds memory, and it bounds how far out
of order results can arrive: a sink whose reorder window is at least ``max_pending``
always emits in order, even when a dead worker's frames are dispatched again.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from . import protocol as proto
from .rejects import RejectLog


@dataclass(eq=False)
class Pending:
    """A frame a group has not acknowledged yet."""

    frame_id: int
    header: bytes
    slot: Any  # the broker's buffer slot; held until acknowledged
    shm_header: bytes = b""  # SHM_FRAME header naming the slot, if it is a ring slot
    consumer: bytes | None = None  # identity it was last sent to
    done: bool = False  # the consumer finished it; waiting for the acker


@dataclass(eq=False)
class Consumer:
    ident: bytes
    name: str
    window: int
    last_seen: float
    inflight: set[int] = field(default_factory=set)
    dispatched: int = 0
    transport: str = "tcp"  # "shm": it maps the ring and gets SHM_FRAME headers
    served: int = 0  # when it was last sent a frame (the dispatcher's send count)


@dataclass(eq=False)
class Group:
    name: str
    acks: str
    members: dict[bytes, Consumer] = field(default_factory=dict)
    ackers: dict[bytes, float] = field(default_factory=dict)  # ident -> last seen
    queue: deque[int] = field(default_factory=deque)  # ids waiting for a consumer
    pending: dict[int, Pending] = field(default_factory=dict)
    dispatched: int = 0
    acked: int = 0
    redispatched: int = 0
    dead: int = 0
    duplicate_acks: int = 0
    orphaned_at: float | None = None  # when its last member or acker went away
    shard: proto.Shard | None = None  # only this shard's frames (None: every frame)

    def empty(self) -> bool:
        return not self.members and not self.ackers

    def status(self) -> dict[str, Any]:
        return {"members": {c.name or c.ident.hex(): {"inflight": len(c.inflight),
                                                      "window": c.window,
                                                      "dispatched": c.dispatched,
                                                      "transport": c.transport}
                            for c in self.members.values()},
                "ackers": len(self.ackers), "acks": self.acks, "pending": len(self.pending),
                "oldest_pending": next(iter(self.pending), None),
                "queued": len(self.queue), "dispatched": self.dispatched,
                "acked": self.acked, "redispatched": self.redispatched,
                "dead_consumers": self.dead, "duplicate_acks": self.duplicate_acks,
                "shard": self.shard.to_json() if self.shard else None}


class Dispatcher:
    """Owns the work ROUTER socket's bookkeeping; the broker calls it from its loop.

    ``send(ident, header, slot, shm)`` is the broker's function that puts a frame on
    the wire (zero-copy and tracked, or the SHM_FRAME header alone when ``shm``);
    ``release`` gives a slot hold back.
    """

    def __init__(self, sock: zmq.Socket, *, max_pending: int, timeout: float,
                 orphan_timeout: float, send: Callable[[bytes, bytes, Any, bool], None],
                 release: Callable[[Any], None], log: Callable[[str], None]) -> None:
        self.sock = sock
        self.max_pending = max_pending
        self.timeout = timeout
        self.orphan_timeout = orphan_timeout
        self._send = send
        self._release = release
        self._log = log
        self.groups: dict[str, Group] = {}
        self._member_group: dict[bytes, Group] = {}
        self._acker_group: dict[bytes, Group] = {}
        self.rejected: dict[str, int] = {}
        self.reject_log = RejectLog(log, "work")
        self._sends = 0
        self.dissolved: dict[str, int] = {}  # group name -> frames abandoned, summed

    # --- frames in ---------------------------------------------------------------
    def has_room(self, next_id: int) -> bool:
        """True while frame ``next_id`` is within ``max_pending`` ids of every group's
        oldest unacknowledged frame (``pending`` is in id order: dicts keep insertion)."""
        return all(not g.pending or next_id - next(iter(g.pending)) < self.max_pending
                   for g in self.groups.values())

    def blocker(self, next_id: int) -> tuple[str, str | None] | None:
        """What frame ``next_id`` waits for: (group, member holding the group's oldest
        unacknowledged frame, or None when nobody holds it: queued, or done and waiting
        for the acker); None if it need not wait."""
        for g in self.groups.values():
            if g.pending:
                oldest = next(iter(g.pending.values()))
                if next_id - oldest.frame_id >= self.max_pending:
                    c = self._consumer(oldest.consumer or b"") if not oldest.done else None
                    return g.name, (c.name or c.ident.hex()) if c is not None else None
        return None

    def members(self, group: str) -> int:
        g = self.groups.get(group)
        return len(g.members) if g else 0

    def members_prefixed(self, prefix: str) -> int:
        """Members of every group whose name starts with ``prefix``."""
        return sum(len(g.members) for n, g in self.groups.items() if n.startswith(prefix))

    def submit(self, frame_id: int, header: bytes, slot: Any, hold: Callable[[Any], None],
               shm_header: bytes = b"") -> None:
        """Queue a new frame for every group; ``hold`` pins the slot once per group.
        ``shm_header`` (ring slots only) is what ring-reading members are sent."""
        for g in self.groups.values():
            if g.shard is not None and not g.shard.owns(frame_id):
                continue  # another shard's frame: settled for this group at once
            hold(slot)
            g.pending[frame_id] = Pending(frame_id, header, slot, shm_header)
            g.queue.append(frame_id)
        self.pump()

    def idle(self) -> bool:
        """Nothing left unacknowledged in any group (used to finish draining)."""
        return not any(g.pending for g in self.groups.values())

    # --- the socket -------------------------------------------------------------
    def handle(self, parts: list[bytes]) -> None:
        """One message from a consumer: ``[ident, cmd, body?]``."""
        ident, now = parts[0], time.monotonic()
        try:
            self._handle(ident, parts[1:], now)
        except proto.ProtocolError as exc:
            self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            self.reject_log(ident.hex(), exc.reason, str(exc)[:200])

    def _handle(self, ident: bytes, parts: list[bytes], now: float) -> None:
        if not parts:
            raise proto.BadPartCount("work message has no command part")
        try:
            cmd = proto.WorkCmd(parts[0])
        except ValueError:
            raise proto.BadControlMessage(f"unknown work command {parts[0][:16]!r}") from None
        if cmd in (proto.WorkCmd.HB, proto.WorkCmd.BYE) and len(parts) != 1:
            raise proto.BadPartCount(f"work command {cmd.value!r} takes no body, got "
                                     f"{len(parts) - 1} parts")
        self._touch(ident, now)
        if cmd is proto.WorkCmd.READY:
            self._join(ident, proto.decode_ready(_body(parts)), now)
        elif cmd is proto.WorkCmd.DONE:
            self._done(ident, proto.decode_ids(_body(parts)))
        elif cmd is proto.WorkCmd.ACK:
            self._ack(ident, proto.decode_ids(_body(parts)))
        elif cmd is proto.WorkCmd.BYE:
            self._drop(ident, "left")
        self.pump()

    def _touch(self, ident: bytes, now: float) -> None:
        c = self._consumer(ident)
        if c is not None:
            c.last_seen = now
        g = self._acker_group.get(ident)
        if g is not None:
            g.ackers[ident] = now

    def _consumer(self, ident: bytes) -> Consumer | None:
        g = self._member_group.get(ident)
        return g.members.get(ident) if g else None

    def _join(self, ident: bytes, r: proto.Ready, now: float) -> None:
        """Join, or re-join: consumers repeat READY while idle, so that a broker that
        lost them (declared dead, or restarted) takes them back without a handshake."""
        known = self._member_group.get(ident) or self._acker_group.get(ident)
        if known is not None:
            if known.name != r.group:
                raise proto.BadControlMessage(f"READY for {r.group!r} from a peer already in "
                                              f"{known.name!r}")
            c = known.members.get(ident)
            if c is not None:
                c.window = r.window
            return
        g = self.groups.get(r.group)
        if g is None:
            g = self.groups[r.group] = Group(r.group, r.acks, shard=r.shard)
        elif g.acks != r.acks:
            raise proto.BadControlMessage(f"group {r.group!r} acknowledges with {g.acks!r}, "
                                          f"READY said {r.acks!r}")
        elif g.shard != r.shard:
            raise proto.BadControlMessage(f"group {r.group!r} takes shard {g.shard}, READY "
                                          f"said {r.shard}")
        g.orphaned_at = None
        if r.role == "acker":
            g.ackers[ident] = now
            self._acker_group[ident] = g
            self._redispatch(g, [p for p in g.pending.values() if p.done], "new acker")
        else:
            g.members[ident] = Consumer(ident, r.name, r.window, now, transport=r.transport)
            self._member_group[ident] = g
        self._log(f"work: {r.role} {r.name or ident.hex()} joined group {r.group!r}")

    def _done(self, ident: bytes, ids: tuple[int, ...]) -> None:
        g = self._member_group.get(ident)
        if g is None:
            raise proto.BadControlMessage("DONE from a peer that is not a group member")
        c = g.members[ident]
        for fid in ids:
            c.inflight.discard(fid)
            p = g.pending.get(fid)
            if p is None or p.consumer != ident:
                continue
            if g.acks == "self":
                self._settle(g, fid)
            else:
                p.done = True

    def _ack(self, ident: bytes, ids: tuple[int, ...]) -> None:
        g = self._acker_group.get(ident)
        if g is None:
            raise proto.BadControlMessage("ACK from a peer that is not a group acker")
        for fid in ids:
            if fid in g.pending:
                c = self._consumer(g.pending[fid].consumer or b"")
                if c is not None:
                    c.inflight.discard(fid)
                self._settle(g, fid)
            else:
                g.duplicate_acks += 1

    def _settle(self, g: Group, fid: int) -> None:
        p = g.pending.pop(fid)
        g.acked += 1
        self._release(p.slot)

    # --- sending ------------------------------------------------------------------
    def pump(self) -> None:
        """Send queued frames to members with free credit, the least recently served
        first: equal consumers get equal shares (picking the least loaded instead sent
        nearly every frame to the first member whenever both were idle)."""
        for g in self.groups.values():
            while g.queue and g.members:
                free = [m for m in g.members.values() if len(m.inflight) < m.window]
                if not free:
                    break
                c = min(free, key=lambda m: m.served)
                fid = g.queue.popleft()
                p = g.pending.get(fid)
                if p is None:  # acknowledged while queued for re-dispatch
                    continue
                shm = c.transport == "shm" and bool(p.shm_header)
                try:
                    self._send(c.ident, p.shm_header if shm else p.header, p.slot, shm)
                except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer is gone
                    g.queue.appendleft(fid)
                    self._drop(c.ident, f"unreachable ({exc})")
                    continue
                p.consumer, p.done = c.ident, False
                c.inflight.add(fid)
                c.dispatched += 1
                self._sends += 1
                c.served = self._sends
                g.dispatched += 1

    def end_of_stream(self, header: bytes) -> None:
        """Tell every member and acker that the stream ended (``header`` is an END)."""
        for g in self.groups.values():
            for ident in [*g.members, *g.ackers]:
                try:
                    self.sock.send_multipart([ident, header, b""], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    # --- liveness -------------------------------------------------------------------
    def reap(self) -> None:
        """Declare silent members and ackers dead; re-dispatch what they held."""
        limit = time.monotonic() - self.timeout
        for g in list(self.groups.values()):
            for c in [c for c in g.members.values() if c.last_seen < limit]:
                self._drop(c.ident, f"silent for more than {self.timeout:g} s")
            for ident in [i for i, seen in g.ackers.items() if seen < limit]:
                del g.ackers[ident]
                del self._acker_group[ident]
                self._log(f"work: acker {ident.hex()} of {g.name!r} declared dead")
                self._orphaned(g)
            if g.orphaned_at is not None and \
                    time.monotonic() - g.orphaned_at >= self.orphan_timeout:
                self._dissolve(g, f"no member or acker for {self.orphan_timeout:g} s")

    def _orphaned(self, g: Group) -> None:
        if g.empty() and g.orphaned_at is None:
            g.orphaned_at = time.monotonic()

    def _dissolve(self, g: Group, why: str) -> None:
        """Forget a group nobody serves: release what it held so the source runs on."""
        for p in g.pending.values():
            self._release(p.slot)
        lost = len(g.pending)
        del self.groups[g.name]
        self.dissolved[g.name] = self.dissolved.get(g.name, 0) + lost
        self._log(f"work: group {g.name!r} dissolved ({why}); {lost} unacknowledged frames "
                  f"abandoned")

    def _drop(self, ident: bytes, why: str) -> None:
        g = self._member_group.pop(ident, None)
        if g is None:
            g = self._acker_group.pop(ident, None)
            if g is not None:
                g.ackers.pop(ident, None)
                self._left(g, why)
            return
        c = g.members.pop(ident)
        if why != "left":
            g.dead += 1
        held = [p for p in g.pending.values() if p.consumer == ident]
        if not self._left(g, why):
            self._redispatch(g, held, f"{c.name or ident.hex()} {why}")

    def _left(self, g: Group, why: str) -> bool:
        """After a member or acker went: True if that dissolved the group."""
        if not g.empty():
            return False
        if why == "left":
            self._dissolve(g, "its last member or acker left")
            return True
        self._orphaned(g)
        return False

    def _redispatch(self, g: Group, held: list[Pending], why: str) -> None:
        if not held:
            return
        for p in sorted(held, key=lambda p: p.frame_id, reverse=True):
            p.consumer, p.done = None, False
            g.queue.appendleft(p.frame_id)
        g.redispatched += len(held)
        self._log(f"work: group {g.name!r}: {why}; re-dispatching {len(held)} frames")
        self.pump()

    def transports(self) -> dict[str, int]:
        """Members of all groups by transport."""
        counts = {t: 0 for t in proto.TRANSPORTS}
        for g in self.groups.values():
            for c in g.members.values():
                counts[c.transport] += 1
        return counts

    def status(self) -> dict[str, Any]:
        return {"groups": {name: g.status() for name, g in self.groups.items()},
                "rejected": dict(self.rejected), "max_pending": self.max_pending,
                "dissolved": dict(self.dissolved)}


def _body(parts: list[bytes]) -> bytes:
    if len(parts) != 2:
        raise proto.BadPartCount(f"work command {parts[0]!r} takes 1 body part, got "
                                 f"{len(parts) - 1}")
    return parts[1]
