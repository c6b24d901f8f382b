"""framebroker protocol v1, written from docs/protocol.md alone: the standard library
and pyzmq, nothing from the ``broker`` package. The examples in this directory use it;
it is meant to be read next to the document and ported to other languages."""
from __future__ import annotations

import json
import mmap
import os
import struct

import zmq

HEADER = struct.Struct("<4sBBBBQQQ4IIBBHQQ")  # section 1: 72 fixed bytes, then the name
FRAME, END, RESULT, SHM_FRAME = 1, 2, 3, 4
ITEMSIZE = {1: 1, 2: 2, 3: 4, 4: 8, 5: 1, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 8, 12: 16}
STAMP_KEY = 0x9E3779B97F4A7C15  # section 8: the synthetic source's content stamp
RING = struct.Struct("<8sIIQQQIBB2x4I36s")  # section 5: the ring header
SLOT = struct.Struct("<QQQQ")  # begin stamp, end stamp, frame id, timestamp


class WireError(ValueError):
    """A message that breaks a rule of the document."""


def parse_header(buf: bytes) -> dict:
    """The header's fields, after the document's validation rules 2-6."""
    if not HEADER.size <= len(buf) <= HEADER.size + 255:
        raise WireError(f"header of {len(buf)} bytes")
    (magic, version, kind, dtype, ndim, frame_id, ts, session, *dims, worker_or_slot, output,
     name_len, _flags, total_or_stamp, compute_ns) = HEADER.unpack_from(buf)
    if magic != b"FBRK" or version != 1 or kind not in (FRAME, END, RESULT, SHM_FRAME):
        raise WireError(f"magic {magic!r}, version {version}, kind {kind}")
    if name_len == 0 or len(buf) != HEADER.size + name_len:
        raise WireError("header length does not match the stream name length")
    shape = tuple(dims[:ndim])
    if kind == END:
        if ndim != 0:
            raise WireError("END with dimensions")
    elif dtype not in ITEMSIZE or not 1 <= ndim <= 4 or 0 in shape or any(dims[ndim:]):
        raise WireError(f"dtype {dtype}, shape {dims} with ndim {ndim}")
    nbytes = ITEMSIZE.get(dtype, 0)
    for d in shape:
        nbytes *= d
    return {"kind": kind, "dtype": dtype, "shape": shape, "frame_id": frame_id,
            "timestamp_ns": ts, "session": session, "slot": worker_or_slot,
            "stamp": total_or_stamp, "total": total_or_stamp, "output": output,
            "compute_ns": compute_ns, "stream": buf[HEADER.size:].decode("utf-8"),
            "pixel_bytes": nbytes, "payload_bytes": nbytes if kind in (FRAME, RESULT) else 0}


def decode(parts: list[bytes], topic: bytes | None = None) -> dict:
    """A whole message: ``[topic, header, payload]`` on SUB (``topic`` given: the stream
    name), ``[header, payload]`` elsewhere; rules 1-9 of section 1."""
    if len(parts) != (2 if topic is None else 3):
        raise WireError(f"{len(parts)} parts")
    h = parse_header(parts[-2])
    if topic is not None and (parts[0] != topic or h["stream"].encode() != topic):
        raise WireError("another stream")  # subscriptions are prefix matches
    if len(parts[-1]) != h["payload_bytes"]:
        raise WireError(f"payload of {len(parts[-1])} bytes, header says {h['payload_bytes']}")
    return h


def request(endpoint: str, cmd: str, timeout: float = 10.0) -> dict:
    """One control request on a fresh REQ socket (section 2): the JSON reply, or raise."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"cmd": cmd}).encode())
        reply = json.loads(sock.recv_multipart()[0])
    finally:
        sock.close()
    if not reply["ok"]:
        raise WireError(f"{cmd}: {reply['error']}")
    return reply


def wait_endpoints(endpoint: str, seconds: float = 20.0) -> dict:
    """``endpoints``, asked until the broker answers (it may start after us)."""
    for _ in range(int(seconds)):
        try:
            return request(endpoint, "endpoints", timeout=1.0)
        except zmq.Again:
            continue
    raise TimeoutError(f"no broker at {endpoint}")


def stamped_id(pixels: bytes) -> int:
    """The frame id in a synthetic frame's first 16 bytes; raises if they are damaged."""
    frame_id, check = struct.unpack_from("<QQ", pixels)
    if check != frame_id ^ STAMP_KEY:
        raise WireError("content stamp damaged")
    return frame_id


class Ring:
    """A read-only mapping of the broker's shared-memory ring (section 5)."""

    def __init__(self, advert: dict) -> None:
        with open("/proc/sys/kernel/random/boot_id") as f:
            if f.read().strip() != advert["boot_id"]:
                raise WireError("the ring is on another host")
        fd = os.open(advert["path"], os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (f"{st.st_ino:016x}", f"{st.st_dev:016x}") != (advert["inode"], advert["device"]):
                raise WireError("not the advertised ring file")
            self.mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        (magic, version, self.nslots, self.stride, self.offset, session, _pid, self.dtype,
         ndim, *dims, _boot) = RING.unpack_from(self.mm)
        self.shape = tuple(dims[:ndim])
        if magic != b"FBSHRING" or version != 1 or f"{session:016x}" != advert["session"] \
                or st.st_size != self.offset + self.nslots * self.stride:
            raise WireError("bad ring header")
        self.session = session

    def read(self, h: dict, nbytes: int) -> bytes | None:
        """The first ``nbytes`` pixel bytes of SHM_FRAME ``h`` under the seqlock, or None
        if the broker reused the slot first (a drop)."""
        if not 0 <= h["slot"] < self.nslots or h["session"] != self.session \
                or (h["shape"], h["dtype"]) != (self.shape, self.dtype):
            raise WireError(f"SHM_FRAME does not fit the ring: {h}")
        base = self.offset + h["slot"] * self.stride
        begin, end, _fid, _ts = SLOT.unpack_from(self.mm, base)
        if begin != h["stamp"] or end != h["stamp"]:
            return None
        data = self.mm[base + 64:base + 64 + nbytes]
        return data if SLOT.unpack_from(self.mm, base)[0] == h["stamp"] else None
