"""A live subscriber (protocol sections 1 and 2) in the standard library and pyzmq.

    python examples/subscribe.py tcp://127.0.0.1:5557 [--frames N]

Asks the broker's control endpoint for ``endpoints``, subscribes to the stream at
``pub`` (tcp or ipc), validates every message, checks each frame's content stamp (the
synthetic source's) against its header's id, and at END prints one JSON line: the ids
received, END's total and how many messages were rejected.
"""
from __future__ import annotations

import argparse
import json
import sys

import zmq

import wire


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("control", help="the broker's control endpoint")
    ap.add_argument("--frames", type=int, default=0, help="stop after N frames (0: at END)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds without a message")
    args = ap.parse_args()
    eps = wire.wait_endpoints(args.control)
    topic = eps["stream"].encode()
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(eps["pub"])
    ids: list[int] = []
    rejected, total = 0, None
    while not args.frames or len(ids) < args.frames:
        parts = sock.recv_multipart()
        try:
            h = wire.decode(parts, topic)
            if h["kind"] == wire.END:
                total = h["total"]
                break
            if h["kind"] != wire.FRAME:
                raise wire.WireError(f"kind {h['kind']} on a frame stream")
            if wire.stamped_id(parts[2]) != h["frame_id"]:
                raise wire.WireError("the pixels are another frame's")
        except wire.WireError as exc:
            rejected += 1
            print(f"subscribe: rejected: {exc}", file=sys.stderr)
            continue
        ids.append(h["frame_id"])
    sock.close()
    print(json.dumps({"ids": ids, "total": total, "rejected": rejected,
                      "session": eps["session"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
