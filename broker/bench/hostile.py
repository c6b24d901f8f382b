"""A hostile peer: every attack of issue 11 against every socket of a running pipeline.

Each attack is a function that sends what a broken or malicious peer could send,
bounded in count and size, and returns how many messages it sent. ``run`` repeats
all of them against the broker's control, work, PUB and shm-header PUB sockets and a
sink's results socket until ``seconds`` have passed, and returns a JSON-able summary.
Nothing here waits on the victim for long: every receive has a short timeout, every
socket is closed with linger 0.

The attacks (numbers are the issue's):
* control: deep JSON, 5000-digit integers, NaN, bad UTF-8, multipart, requests above
  the parse limit (error reply) and above the socket limit (connection dropped), fake
  ``report`` names (1, 9);
* work: READY with a 5000-digit window, deep JSON, unknown commands, bad id lists,
  DONE/ACK from strangers (1);
* control and work: a flood of empty messages, an over-size one and a reset
  connection every ``every`` messages: libzmq 4.3.5's ``!_io_error`` abort (2);
* PUB and shm PUB: a 20 MiB subscription, thousands of distinct subscriptions, 100
  duplicate subscriptions then close (4);
* sink results: RESULTs of another session and frame ids 2^40 and far ahead (3).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import struct
import time
from typing import Any, Callable, Iterable

import numpy as np
import zmq

from .. import protocol as proto
from ..client import Control

DEEP = b"[" * 60000
HUGE_INT = b"1" * 5000
CONTROL_CASES: tuple[bytes, ...] = (
    DEEP, b'{"cmd": "status", "x": ' + HUGE_INT + b"}", b'{"cmd": ' + HUGE_INT + b"}",
    b'{"cmd": "status", "x": NaN}', b'{"cmd": "status", "x": 1e999}', b"\xff\xfe{",
    b'{"cmd": [[[[[[[[[[[[[[[[[[[["status"]]]]]]]]]]]]]]]]]]]]}', b"", b"null",
    b'{"cmd": "report", "client": "x", "policy": "p", "received": ' + HUGE_INT + b"}",
    b'{"cmd": "status"' + b" " * (proto.MAX_CONTROL_BYTES + 1) + b"}",  # error reply
)
WORK_CASES: tuple[list[bytes], ...] = (
    [b"READY", b'{"group":"fft","window":' + HUGE_INT + b"}"],
    [b"READY", DEEP], [b"READY", b'{"group":"fft","window":1e999}'], [b"READY", b"\xff"],
    [b"READY", b'{"group":"' + b"x" * 100 + b'"}'], [b"DONE", b"\x00" * 7],
    [b"DONE", b"\x00" * 8], [b"ACK", b"\x01" * 16], [b"NOPE"], [b"READY"], [],
    [b"HB", b"extra"],
)


def _socket(ctx: zmq.Context, kind: int, endpoint: str, **opts: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


def control_junk(ctx: zmq.Context, control: str, timeout: float = 5.0) -> int:
    """Every bad control request of the issue; each must be answered with an error.
    Raises AssertionError if one is not answered, or answered ok."""
    for case in CONTROL_CASES:
        req = _socket(ctx, zmq.REQ, control, RCVTIMEO=int(timeout * 1000))
        try:
            req.send(case)
            reply = proto.decode_reply(req.recv())
            assert reply["ok"] is False and reply["error"], (case[:40], reply)
        finally:
            req.close()
    req = _socket(ctx, zmq.REQ, control, RCVTIMEO=int(timeout * 1000))
    try:  # multipart: REP delivers it whole; an error reply too
        req.send_multipart([b'{"cmd": "status"}', b"x"])
        assert proto.decode_reply(req.recv())["ok"] is False
    finally:
        req.close()
    return len(CONTROL_CASES) + 1


def control_oversize(ctx: zmq.Context, control: str) -> int:
    """A request above the control socket's MAXMSGSIZE: libzmq drops the connection
    on the size prefix (no reply is possible: nothing of it is read)."""
    req = _socket(ctx, zmq.REQ, control)
    req.send(b"x" * (proto.MAX_CONTROL_WIRE_BYTES + 1))
    time.sleep(0.05)
    req.close()
    return 1


def fake_reports(ctx: zmq.Context, control: str, n: int = 300, prefix: str = "fake") -> int:
    """``n`` invented subscriber names: they must not push real ones out of status."""
    ctl = Control(control, timeout=10.0, ctx=ctx)
    try:
        for i in range(n):
            ctl.request("report", client=f"{prefix}-{i}", policy="all", received=1,
                        dropped=0, gaps=0, rejected=0, sessions=1)
    finally:
        ctl.close()
    return n


def work_junk(ctx: zmq.Context, work: str) -> int:
    """Every bad work-channel message, from a fresh DEALER (counted rejects)."""
    dealer = _socket(ctx, zmq.DEALER, work)
    try:
        for parts in WORK_CASES:
            dealer.send_multipart(parts or [b""])
        time.sleep(0.05)
    finally:
        dealer.close()
    return len(WORK_CASES)


def flood(ctx: zmq.Context, endpoint: str, kind: str, messages: int, every: int = 10000,
          oversize: int = 0, join: str = "", alive: Callable[[], bool] = lambda: True) -> int:
    """``messages`` empty messages to a REP (``kind="control"``: ``[b"", b""]`` from a
    DEALER) or ROUTER (``"work"``), an ``oversize``-byte one (0 = none) and a reset of
    the connection (close with unread replies) every ``every``: the pattern that
    aborts libzmq 4.3.5 when the server socket runs ZMTP heartbeats (its receive queue
    fills, then the peer resets the connection). On the work channel, ``join`` names a
    group to join first, so the broker sends frames that are never read (the reset);
    that group holds the source up until the broker declares the member dead.
    Stops early when ``alive()`` turns False; returns the messages sent."""
    body = [b"", b""] if kind == "control" else [b""]
    big = np.zeros(oversize, np.uint8) if oversize else None
    sent = 0
    while sent < messages and alive():
        dealer = _socket(ctx, zmq.DEALER, endpoint, SNDHWM=0)
        if join:
            dealer.send_multipart([b"READY", proto.encode_ready(proto.Ready(
                join, proto.MAX_WINDOW, "self", "hostile", "consumer"))])
        for _ in range(min(every, messages - sent)):
            dealer.send_multipart(body)
            sent += 1
        if big is not None:
            dealer.send_multipart([*body[:-1], big], copy=False)
        time.sleep(0.001)
        dealer.close()
    return sent


def _zmtp_frame(body: bytes, command: bool = False) -> bytes:
    """One ZMTP 3.0 frame (flags, size, body)."""
    flags = 4 if command else 0
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection during the handshake")
        data += chunk
    return bytes(data)


def _recv_command(sock: socket.socket) -> bytes:
    """One ZMTP 3.0 command frame's body."""
    flags = _recv_exactly(sock, 1)[0]
    size_bytes = 8 if flags & 2 else 1
    size = int.from_bytes(_recv_exactly(sock, size_bytes), "big")
    if not flags & 4:
        raise ConnectionError(f"expected a command during the handshake, got flags {flags:#x}")
    return _recv_exactly(sock, size)


def zmtp_subscriber(endpoint: str) -> socket.socket:
    """A raw socket that speaks just enough ZMTP 3.0 (NULL mechanism) to be an XSUB.
    Why not a libzmq XSUB: it keeps every subscription it sent in a trie to resend on
    reconnect, and freeing a multi-MiB one when it closes overflows the stack of
    libzmq's reaper thread: the attacker would crash itself.

    Why it waits for the server's greeting and READY before returning: libzmq's NULL
    mechanism stays "handshaking" until it has sent its own READY, and a message it
    decodes before then (our READY and subscriptions sent in one go) is an unexpected
    command: it drops the connection (HANDSHAKE_FAILED_PROTOCOL) and the attack never
    lands. Whether it got there first depended on scheduling: the test waiting for
    the reset that attack causes failed about one run in three under load."""
    scheme, _, addr = endpoint.partition("://")
    if scheme == "tcp":
        host, _, port = addr.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
    elif scheme == "ipc":
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect("\0" + addr[1:] if addr.startswith("@") else addr)
    else:
        raise ValueError(f"no raw ZMTP over {scheme}")
    try:
        sock.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32))
        greeting = _recv_exactly(sock, 64)
        if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
            raise ConnectionError(f"not a ZMTP 3 server: greeting {greeting[:12]!r}")
        sock.sendall(_zmtp_frame(b"\x05READY\x0bSocket-Type" + struct.pack(">I", 4) + b"XSUB",
                                 command=True))
        reply = _recv_command(sock)
        if not reply.startswith(b"\x05READY"):
            raise ConnectionError(f"the server refused the handshake: {reply[:40]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def _send_subscriptions(endpoint: str, topics: Iterable[bytes], hold: float = 1.0) -> int:
    """Subscribe to every topic over one raw connection, keep it ``hold`` seconds (what
    libzmq has not read when a connection ends is dropped, never held), then close it;
    returns the count sent (a connection the broker drops, e.g. on MAXMSGSIZE, ends
    it early)."""
    sent = 0
    sock = zmtp_subscriber(endpoint)
    try:
        batch = bytearray()
        for topic in topics:
            batch += _zmtp_frame(b"\x01" + topic)
            sent += 1
            if len(batch) >= 1 << 16:
                sock.sendall(batch)
                batch.clear()
        sock.sendall(batch)
        time.sleep(hold)
    except OSError:
        pass  # dropped by the broker
    finally:
        sock.close()
    return sent


def subscription_attacks(pub: str, distinct: int = 20000, size: int = 1024,
                         huge: int = 20 * 2**20) -> int:
    """One ``huge``-byte subscription and ``distinct`` distinct ``size``-byte ones."""
    sent = _send_subscriptions(pub, [b"h" * huge], hold=0.1)
    pad = b"s" * max(0, size - 12)
    return sent + _send_subscriptions(pub, (pad + b"%011d" % i for i in range(distinct)))


def duplicate_subscriptions(ctx: zmq.Context, pub: str, topic: bytes, n: int = 100) -> int:
    """``n`` subscriptions to the stream from one libzmq socket, then close: one
    subscriber while it is there, none after."""
    xsub = _socket(ctx, zmq.XSUB, pub, RCVHWM=1)
    for _ in range(n):
        xsub.send(b"\x01" + topic)
    time.sleep(0.2)
    xsub.close()
    return n


def spoofed_results(ctx: zmq.Context, results: str, stream: str = "cam",
                    n_future: int = 1025) -> int:
    """RESULTs the sink must refuse: another session, frame id 2^40, far-future ids."""
    push = _socket(ctx, zmq.PUSH, results, SNDTIMEO=1000)
    arr = np.zeros((4,), np.float32)
    sent = 0
    try:
        ids = [2**40, *range(10**7, 10**7 + n_future)]
        for i, fid in enumerate(ids):
            session = 12345 if i == 0 else 0
            push.send_multipart([proto.result_header(stream, fid, 0, arr, proto.Output.PEAK,
                                                     1, 1, session), arr.tobytes()])
            sent += 1
    except zmq.Again:
        pass  # no sink there (or it applies back-pressure): the attack is what was sent
    finally:
        push.close()
    return sent


def run(control: str, seconds: float, results: str | None = None,
        flood_messages: int = 20000, distinct: int = 2000,
        log: Callable[[str], None] = lambda _msg: None, rounds: int = 0) -> dict[str, Any]:
    """Every attack against every socket, round after round, for ``seconds`` (or until
    ``rounds`` whole rounds are done, if not 0: a test wants each attack exactly once)."""
    ctx = zmq.Context()
    ctl = Control(control, timeout=5.0, ctx=ctx)
    eps = ctl.endpoints()
    ctl.close()
    stream = eps["stream"].encode()
    pubs = [eps["pub"]] + ([eps["shm"]["pub"]] if isinstance(eps.get("shm"), dict)
                           and "pub" in eps["shm"] else [])
    sent: dict[str, int] = {}
    attacks: list[tuple[str, Callable[[], int]]] = [
        ("control_junk", lambda: control_junk(ctx, control)),
        ("control_oversize", lambda: control_oversize(ctx, control)),
        ("fake_reports", lambda: fake_reports(ctx, control)),
        ("work_junk", lambda: work_junk(ctx, eps["work"])),
        ("control_flood", lambda: flood(ctx, control, "control", flood_messages,
                                        oversize=proto.MAX_CONTROL_WIRE_BYTES + 1)),
        ("work_flood", lambda: flood(ctx, eps["work"], "work", flood_messages)),
        *((f"subscriptions_{i}", (lambda p=p: subscription_attacks(p, distinct=distinct)))
          for i, p in enumerate(pubs)),
        *((f"duplicates_{i}", (lambda p=p: duplicate_subscriptions(ctx, p, stream)))
          for i, p in enumerate(pubs)),
        *((("spoofed_results", lambda: spoofed_results(ctx, results, eps["stream"])),)
          if results else ()),
    ]
    rounds_done = 0
    t_end = time.monotonic() + seconds
    errors: list[str] = []
    while time.monotonic() < t_end and not (rounds and rounds_done >= rounds):
        for name, attack in attacks:
            if time.monotonic() >= t_end:
                break
            try:
                sent[name] = sent.get(name, 0) + attack()
            except (AssertionError, zmq.ZMQError, OSError, RuntimeError) as exc:
                errors.append(f"{name}: {exc!r}"[:300])
                log(f"hostile: {name} failed: {exc!r}")
        rounds_done += 1
    ctx.destroy(linger=0)
    return {"seconds": seconds, "rounds": rounds_done, "sent": sent, "errors": errors[:20],
            "error_count": len(errors)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run every hostile-peer attack against a "
                                             "broker (and a sink) for a while.")
    ap.add_argument("--broker", required=True, help="the broker's control endpoint")
    ap.add_argument("--results", default=None, help="a sink's results endpoint to spoof")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--flood-messages", type=int, default=20000,
                    help="messages per flood round (control and work)")
    ap.add_argument("--distinct", type=int, default=2000,
                    help="distinct subscriptions per round")
    args = ap.parse_args(argv)
    res = run(args.broker, args.seconds, args.results, args.flood_messages, args.distinct,
              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(res))
    return 0
