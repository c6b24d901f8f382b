"""A recording process for tests that must kill or starve a real writer.

    python recorder_child.py forever PATH COMPRESSION
        writes synthetic frames until killed, printing the flushed frame count after
        every flush (flush_frames=10), so the parent knows what must survive a SIGKILL.
    python recorder_child.py fsize PATH LIMIT_BYTES
        the same under RLIMIT_FSIZE (the disk is "full" at LIMIT_BYTES); prints
        "error <message>" when the writer gives up, then exits 0.
    python recorder_child.py shard PATH HOST
        writes shard 1 of 2 (block 1: the odd ids) of a sharded recording until killed,
        as a writer on host HOST would: the file's writer mark names HOST.
"""
from __future__ import annotations

import resource
import signal
import socket
import sys

from broker import protocol as proto
from broker.recorder import RecorderError, RecordingWriter
from broker.sources import synthetic_frame

SHAPE = (64, 80, 3)
SHARD_SHAPE = (24, 32)


def record(path: str, compression: str, shape: tuple[int, ...] = SHAPE,
           shard: proto.Shard | None = None) -> None:
    writer = RecordingWriter(path=path, shape=shape, dtype="uint8", stream="child",
                             source="synthetic", compression=compression, flush_frames=10,
                             grow_frames=32, flush_seconds=3600, shard=shard)
    reported = 0
    ordinal = 0
    with writer:
        while True:
            frame_id = shard.frame_id(ordinal) if shard else ordinal
            writer.write(frame_id, frame_id * 1000, synthetic_frame(shape, "uint8", frame_id))
            ordinal += 1
            if writer.frames_flushed != reported:
                reported = writer.frames_flushed
                print(reported, flush=True)


def main() -> None:
    mode, path, arg = sys.argv[1:4]
    if mode == "forever":
        record(path, arg)
    elif mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), int(arg)))
        try:
            record(path, "none")
        except RecorderError as exc:
            print(f"error {exc}", flush=True)
    elif mode == "shard":
        socket.gethostname = lambda: arg  # the one thing that differs on another host
        record(path, "none", SHARD_SHAPE, proto.Shard(1, 2, 1))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
