"""A same-host subscriber that reads pixels from the broker's shared-memory ring
(protocol section 5), in the standard library and pyzmq.

    python examples/shm_reader.py tcp://127.0.0.1:5557

The broker must run with ``serve --shm``. The ``shm`` object of the ``endpoints``
reply says where the ring is; the reader checks that it is this host's (boot id, inode,
device), maps it read-only, subscribes to the header-only PUB, and for every SHM_FRAME
copies the slot's pixels under the seqlock. A slot the broker reused before or while
it was copied is a drop (``overwritten``), never a frame. At END it prints one JSON
line: the ids read, END's total, rejected and overwritten counts.
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
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds without a message")
    args = ap.parse_args()
    eps = wire.wait_endpoints(args.control)
    ring = wire.Ring(eps["shm"])
    topic = eps["stream"].encode()
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(eps["shm"]["pub"])
    ids: list[int] = []
    rejected = overwritten = 0
    total = None
    while True:
        parts = sock.recv_multipart()
        try:
            h = wire.decode(parts, topic)
            if h["kind"] == wire.END:
                total = h["total"]
                break
            if h["kind"] != wire.SHM_FRAME:
                raise wire.WireError(f"kind {h['kind']} on the header PUB")
            pixels = ring.read(h, h["pixel_bytes"])  # the whole frame, as a reader would
            if pixels is None:
                overwritten += 1
                continue
            if wire.stamped_id(pixels) != h["frame_id"]:
                raise wire.WireError("the pixels are another frame's")
        except wire.WireError as exc:
            rejected += 1
            print(f"shm_reader: rejected: {exc}", file=sys.stderr)
            continue
        ids.append(h["frame_id"])
    sock.close()
    print(json.dumps({"ids": ids, "total": total, "rejected": rejected,
                      "overwritten": overwritten, "slots": ring.nslots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
