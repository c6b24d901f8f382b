"""A work-group member that acknowledges every frame it takes (protocol section 3),
in the standard library and pyzmq.

    python examples/work_member.py tcp://127.0.0.1:5557 GROUP [--window N] [--shm]

Joins GROUP at the broker's ``work`` endpoint with READY (``acks: "self"``, so its DONE
acknowledges), repeats READY every 0.25 s while idle (the heartbeat), checks each
frame's content stamp, and sends DONE with the frame's id, which returns the credit
and lets the broker forget the frame. With ``--shm`` it asks for SHM_FRAME headers and
reads the pixels from the ring; the broker keeps a slot for a group until its frame
is acknowledged, so nothing is overwritten under a member. At END it sends BYE and
prints one JSON line: the ids done, END's total and how many messages were rejected.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

import zmq

import wire

HEARTBEAT_S = 0.25  # well inside the broker's --worker-timeout (2 s by default)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("control", help="the broker's control endpoint")
    ap.add_argument("group", help="work group: 1-32 characters of [a-z0-9_-]")
    ap.add_argument("--window", type=int, default=4, help="frames held at once (1-1024)")
    ap.add_argument("--shm", action="store_true", help="read pixels from the broker's ring")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds without a frame")
    args = ap.parse_args()
    eps = wire.wait_endpoints(args.control)
    ring = wire.Ring(eps["shm"]) if args.shm else None
    ready = json.dumps({"group": args.group, "window": args.window, "acks": "self",
                        "name": f"example-{os.getpid()}",
                        "transport": "shm" if ring else "tcp"}).encode()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(eps["work"])
    ids: list[int] = []
    rejected, total = 0, None
    last_sent = idle_since = 0.0
    while True:
        now = time.monotonic()
        if now - last_sent >= HEARTBEAT_S:
            sock.send_multipart([b"READY", ready])  # join, and stay joined while idle
            last_sent = now
        if not sock.poll(int(HEARTBEAT_S * 1000)):
            idle_since = idle_since or now
            if now - idle_since > args.timeout:
                raise TimeoutError(f"no work from {eps['work']} in {args.timeout} s")
            continue
        idle_since = 0.0
        parts = sock.recv_multipart()  # the broker sends only frames and END here
        try:
            h = wire.decode(parts)
            if h["kind"] == wire.END:
                total = h["total"]
                break
            if h["kind"] == wire.SHM_FRAME and ring is not None:
                pixels = ring.read(h, h["pixel_bytes"])
                if pixels is None:
                    raise wire.WireError("a held slot was reused")
            elif h["kind"] == wire.FRAME:
                pixels = parts[1]
            else:
                raise wire.WireError(f"kind {h['kind']} on the work channel")
            if wire.stamped_id(pixels) != h["frame_id"]:
                raise wire.WireError("the pixels are another frame's")
        except wire.WireError as exc:
            rejected += 1
            print(f"work_member: rejected: {exc}", file=sys.stderr)
            continue
        ids.append(h["frame_id"])
        sock.send_multipart([b"DONE", struct.pack("<Q", h["frame_id"])])
        last_sent = time.monotonic()
    sock.send_multipart([b"BYE"])
    sock.close()
    print(json.dumps({"ids": ids, "total": total, "rejected": rejected,
                      "transport": "shm" if ring else "tcp"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
