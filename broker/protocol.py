"""The framebroker wire format: the only module that knows how bytes look on the wire.

Every message is a ZeroMQ multipart message. On PUB/SUB it is
``[topic, header, payload]``, everywhere else ``[header, payload]``. The header is a
fixed 72-byte little-endian struct followed by the UTF-8 stream name; the payload is
the raw C-order pixel buffer (empty for end-of-stream). ``docs/protocol.md`` is the
language-neutral description of the same layout and must change with this file.

Nothing here unpickles, evals or allocates from an unvalidated header: sizes are
checked against the payload that already arrived and against ``max_bytes`` before
any array is made, and the array is a read-only view of the received buffer.
"""
from __future__ import annotations

import enum
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

MAGIC = b"FBRK"
VERSION = 1
MAX_DIMS = 4
MAX_NAME = 255
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

#: magic, version, kind, dtype, ndim, frame_id, timestamp_ns, session,
#: shape[4], worker_id, output, name_len, flags, total, compute_ns
_FIXED = struct.Struct("<4sBBBBQQQ4IIBBHQQ")
HEADER_SIZE = _FIXED.size  # 72


class Kind(enum.IntEnum):
    """What a message is; the second byte after the magic."""

    FRAME = 1
    END = 2
    RESULT = 3
    SHM_FRAME = 4  # a FRAME whose pixels are in the shared-memory ring, not the payload


class Output(enum.IntEnum):
    """What a RESULT payload holds (see the FFT worker)."""

    NONE = 0
    SPECTRUM = 1
    MAGNITUDE = 2
    RADIAL = 3
    PEAK = 4


#: wire code -> numpy dtype; always little-endian on the wire.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    3: np.dtype("<u4"),
    4: np.dtype("<u8"),
    5: np.dtype("<i1"),
    6: np.dtype("<i2"),
    7: np.dtype("<i4"),
    8: np.dtype("<i8"),
    9: np.dtype("<f4"),
    10: np.dtype("<f8"),
    11: np.dtype("<c8"),
    12: np.dtype("<c16"),
}
_CODES: dict[np.dtype, int] = {dt: code for code, dt in DTYPES.items()}


class ProtocolError(ValueError):
    """A message that does not follow the wire format. Subclasses say which rule broke."""

    #: short stable name used as the key in reject counters
    reason = "protocol"


class BadPartCount(ProtocolError):
    reason = "part_count"


class TruncatedHeader(ProtocolError):
    reason = "truncated_header"


class BadMagic(ProtocolError):
    reason = "bad_magic"


class UnsupportedVersion(ProtocolError):
    reason = "unsupported_version"


class UnknownKind(ProtocolError):
    reason = "unknown_kind"


class UnknownDtype(ProtocolError):
    reason = "unknown_dtype"


class BadShape(ProtocolError):
    reason = "bad_shape"


class FrameTooLarge(ProtocolError):
    reason = "too_large"


class PayloadSizeMismatch(ProtocolError):
    reason = "payload_size"


class BadStreamName(ProtocolError):
    reason = "bad_stream_name"


class TopicMismatch(ProtocolError):
    reason = "topic_mismatch"


class BadControlMessage(ProtocolError):
    reason = "bad_control"


class BadSlot(ProtocolError):
    reason = "bad_slot"


class BadRing(ProtocolError):
    reason = "bad_ring"


def dtype_code(dtype: Any) -> int:
    """Wire code of a dtype; raises UnknownDtype for anything off the allow-list."""
    dt = np.dtype(dtype)
    code = _CODES.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
    if code is None:
        raise UnknownDtype(f"dtype {np.dtype(dtype)} is not supported on the wire; "
                           f"allowed: {', '.join(str(d) for d in DTYPES.values())}")
    return code


@dataclass(frozen=True, slots=True)
class Header:
    """Decoded header. ``shape``/``dtype`` describe the payload; END has shape ()."""

    kind: Kind
    stream: str
    frame_id: int
    timestamp_ns: int
    dtype: np.dtype = field(default_factory=lambda: np.dtype("u1"))
    shape: tuple[int, ...] = ()
    session: int = 0
    worker_id: int = 0
    output: Output = Output.NONE
    total: int = 0
    compute_ns: int = 0
    slot: int = 0  # SHM_FRAME: ring slot holding the pixels
    stamp: int = 0  # SHM_FRAME: the slot's sequence stamp while it holds this frame

    @property
    def nbytes(self) -> int:
        """Pixel bytes this header declares (in the payload, or in a ring slot)."""
        return math.prod(self.shape) * self.dtype.itemsize if self.shape else 0

    @property
    def payload_nbytes(self) -> int:
        """Bytes the payload part must have: none for END and SHM_FRAME."""
        return 0 if self.kind in (Kind.END, Kind.SHM_FRAME) else self.nbytes


def encode_header(h: Header) -> bytes:
    """Pack a header. Raises ProtocolError for values the format cannot carry."""
    name = h.stream.encode("utf-8")
    if not 1 <= len(name) <= MAX_NAME:
        raise BadStreamName(f"stream name must be 1-{MAX_NAME} UTF-8 bytes, got {len(name)}")
    if h.kind == Kind.END:
        code, dims = 0, ()
    else:
        code, dims = dtype_code(h.dtype), tuple(int(d) for d in h.shape)
        _check_dims(dims)
    shape4 = dims + (0,) * (MAX_DIMS - len(dims))
    shm = h.kind == Kind.SHM_FRAME
    return _FIXED.pack(MAGIC, VERSION, int(h.kind), code, len(dims), h.frame_id,
                       h.timestamp_ns, h.session, *shape4, h.slot if shm else h.worker_id,
                       int(h.output), len(name), 0, h.stamp if shm else h.total,
                       h.compute_ns) + name


def _check_dims(dims: tuple[int, ...]) -> None:
    if not 1 <= len(dims) <= MAX_DIMS:
        raise BadShape(f"frames have 1-{MAX_DIMS} dimensions, got {len(dims)}")
    if any(d < 1 or d >= 2**32 for d in dims):
        raise BadShape(f"every dimension must be 1..2^32-1, got {dims}")


def decode_header(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Header:
    """Unpack and validate a header (everything except the payload length)."""
    n = len(buf)
    if n < HEADER_SIZE:
        raise TruncatedHeader(f"header is {n} bytes, the fixed part alone is {HEADER_SIZE}")
    (magic, version, kind, code, ndim, frame_id, ts, session, s0, s1, s2, s3, worker,
     output, name_len, _flags, total, compute_ns) = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise BadMagic(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported (this is {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise UnknownKind(f"unknown message kind {kind}") from None
    if n != HEADER_SIZE + name_len or name_len == 0:
        raise TruncatedHeader(f"header is {n} bytes but declares a {name_len}-byte stream "
                              f"name (expected {HEADER_SIZE + name_len}, name at least 1 byte)")
    try:
        stream = bytes(buf[HEADER_SIZE:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadStreamName(f"stream name is not UTF-8: {exc}") from None
    try:
        output = Output(output)
    except ValueError:
        raise UnknownKind(f"unknown result output code {output}") from None
    shape4 = (s0, s1, s2, s3)
    if kind == Kind.END:
        if ndim != 0:
            raise BadShape(f"end-of-stream must declare 0 dimensions, got {ndim}")
        return Header(kind, stream, frame_id, ts, session=session, total=total)
    dtype = DTYPES.get(code)
    if dtype is None:
        raise UnknownDtype(f"unknown dtype code {code}; known codes 1-{len(DTYPES)}")
    if not 1 <= ndim <= MAX_DIMS:
        raise BadShape(f"frames have 1-{MAX_DIMS} dimensions, got {ndim}")
    dims = shape4[:ndim]
    if any(d == 0 for d in dims) or any(shape4[ndim:]):
        raise BadShape(f"shape {shape4} does not fit ndim={ndim} (dims must be >= 1, unused 0)")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > max_bytes:
        raise FrameTooLarge(f"declared frame of {nbytes} bytes ({dims} {dtype}) exceeds the "
                            f"limit of {max_bytes} bytes")
    if kind == Kind.SHM_FRAME:
        if total == 0:
            raise BadSlot("SHM_FRAME stamp must be >= 1 (0 marks a never-written slot)")
        return Header(kind, stream, frame_id, ts, dtype, dims, session, slot=worker,
                      stamp=total)
    return Header(kind, stream, frame_id, ts, dtype, dims, session, worker, output, total,
                  compute_ns)


def _nbytes(part: Any) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def _buffer(part: Any) -> Any:
    """The bytes of a received part without copying (zmq.Frame, bytes or memoryview)."""
    return getattr(part, "buffer", part)


def decode(parts: Sequence[Any], *, topic: bool = False,
           max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Header, np.ndarray | None]:
    """Validate a received multipart message and view its payload as a read-only array.

    ``parts`` are ``zmq.Frame`` objects (from ``recv_multipart(copy=False)``) or bytes.
    Returns ``(header, array)``; the array is None for end-of-stream and for SHM_FRAME
    (whose pixels the caller reads from its mapped ring, see ``broker.shm``). The array shares
    memory with the received message and is read-only: copy it to keep or modify it.
    """
    expected = 3 if topic else 2
    if len(parts) != expected:
        raise BadPartCount(f"expected {expected} parts "
                           f"({'[topic, header, payload]' if topic else '[header, payload]'}), "
                           f"got {len(parts)}")
    if topic:
        parts = parts[1:]
    hbuf = _buffer(parts[0])
    if _nbytes(hbuf) > HEADER_SIZE + MAX_NAME:
        raise TruncatedHeader(f"header is {_nbytes(hbuf)} bytes, at most "
                              f"{HEADER_SIZE + MAX_NAME} are allowed")
    header = decode_header(bytes(hbuf), max_bytes)
    payload = _buffer(parts[1])
    size = _nbytes(payload)
    if size != header.payload_nbytes:
        raise PayloadSizeMismatch(f"payload is {size} bytes, header declares "
                                  f"{header.payload_nbytes} ({header.kind.name} "
                                  f"{header.shape} {header.dtype})")
    if header.kind in (Kind.END, Kind.SHM_FRAME):
        return header, None
    array = np.frombuffer(payload, dtype=header.dtype).reshape(header.shape)
    if array.flags.writeable:
        array.flags.writeable = False
    return header, array


def decode_topic(parts: Sequence[Any], max_bytes: int = DEFAULT_MAX_BYTES
                 ) -> tuple[Header, np.ndarray | None]:
    """``decode`` for PUB/SUB messages; also checks that the topic is the stream name."""
    header, array = decode(parts, topic=True, max_bytes=max_bytes)
    if bytes(_buffer(parts[0])) != header.stream.encode("utf-8"):
        raise TopicMismatch(f"topic {bytes(_buffer(parts[0]))!r} is not the stream name "
                            f"{header.stream!r}")
    return header, array


def frame_header(stream: str, frame_id: int, timestamp_ns: int, array: np.ndarray,
                 session: int = 0) -> bytes:
    """Encoded FRAME header for ``array`` (which must be C-contiguous)."""
    return encode_header(Header(Kind.FRAME, stream, frame_id, timestamp_ns, array.dtype,
                                array.shape, session))


def shm_frame_header(stream: str, frame_id: int, timestamp_ns: int, array: np.ndarray,
                     session: int, slot: int, stamp: int) -> bytes:
    """Encoded SHM_FRAME header: frame ``frame_id`` is in ring slot ``slot`` under ``stamp``."""
    return encode_header(Header(Kind.SHM_FRAME, stream, frame_id, timestamp_ns, array.dtype,
                                array.shape, session, slot=slot, stamp=stamp))


def end_header(stream: str, total: int, timestamp_ns: int, session: int = 0) -> bytes:
    """Encoded END header: ``total`` frames were sent in this session (ids 0..total-1)."""
    return encode_header(Header(Kind.END, stream, total, timestamp_ns, session=session,
                                total=total))


def result_header(stream: str, frame_id: int, timestamp_ns: int, array: np.ndarray,
                  output: Output, worker_id: int, compute_ns: int, session: int = 0) -> bytes:
    """Encoded RESULT header: ``array`` was computed from frame ``frame_id``."""
    return encode_header(Header(Kind.RESULT, stream, frame_id, timestamp_ns, array.dtype,
                                array.shape, session, worker_id, output, 0, compute_ns))


# --- control channel (REQ/REP, JSON) ---------------------------------------------

MAX_CONTROL_BYTES = 64 * 1024  # what the broker parses; larger requests get an error reply
#: what the control socket's MAXMSGSIZE lets through, so that a request above
#: MAX_CONTROL_BYTES can still be answered with an error (larger ones cost the
#: sender its connection: libzmq drops it on the size prefix, nothing is allocated)
MAX_CONTROL_WIRE_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 8  # nesting of arrays/objects; no message of ours needs more than 2
JSON_INT_MIN, JSON_INT_MAX = -2**63, 2**64 - 1  # every JSON integer must fit 64 bits
_MAX_INT_DIGITS = 20  # len(str(2**64 - 1)); longer digit strings are refused unparsed
#: a JSON string (escapes included) or a bracket outside strings
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class RequestTooLarge(BadControlMessage):
    reason = "too_large"


class JsonTooDeep(BadControlMessage):
    reason = "json_depth"


class JsonNumberRange(BadControlMessage):
    reason = "json_number"


def encode_request(cmd: str, **args: Any) -> bytes:
    """A control request: ``{"cmd": ..., **args}`` as UTF-8 JSON."""
    return json.dumps({"cmd": cmd, **args}).encode()


def _check_depth(data: bytes) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before json sees it: the stdlib parser
    recurses per level and raises RecursionError (not a JSONDecodeError) on ``[`` * 60000.
    Brackets inside strings do not count; a scan that stops early is cheap."""
    depth = 0
    for m in _JSON_TOKEN.finditer(data):
        c = m.group()[0]
        if c in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise JsonTooDeep(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif c in b"]}":
            depth -= 1


def _bounded_int(text: str) -> int:
    """parse_int hook: a 64-bit integer or a JsonNumberRange (the stdlib would convert
    any length, and raise ValueError past 4300 digits)."""
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise JsonNumberRange(f"JSON integer of {len(text)} characters is outside "
                              f"{JSON_INT_MIN}..{JSON_INT_MAX}")
    value = int(text)
    if not JSON_INT_MIN <= value <= JSON_INT_MAX:
        raise JsonNumberRange(f"JSON integer {value} is outside {JSON_INT_MIN}..{JSON_INT_MAX}")
    return value


def _finite_float(text: str) -> float:
    """parse_float hook: 1e999 would become inf, which no peer of ours sends."""
    value = float(text)
    if not math.isfinite(value):
        raise JsonNumberRange(f"JSON number {text[:40]} is not a finite double")
    return value


def _no_constant(name: str) -> Any:
    """parse_constant hook: NaN and Infinity are not JSON (RFC 8259)."""
    raise JsonNumberRange(f"{name} is not a JSON number")


def loads_bounded(data: bytes, what: str, limit: int = MAX_CONTROL_BYTES) -> Any:
    """The one JSON decoder for bytes from a peer: at most ``limit`` bytes, nesting at
    most MAX_JSON_DEPTH, 64-bit integers, finite numbers. Any other failure (bad UTF-8,
    bad syntax, or anything the stdlib raises) is a BadControlMessage too, so no
    exception from peer input can leave a handler."""
    if len(data) > limit:
        raise RequestTooLarge(f"request too large: {len(data)} bytes (limit {limit})")
    _check_depth(data)
    try:
        return json.loads(data, parse_int=_bounded_int, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except BadControlMessage:
        raise
    except (ValueError, RecursionError, TypeError) as exc:  # JSONDecodeError, UnicodeError
        raise BadControlMessage(f"{what} is not JSON: {str(exc)[:200]}") from None


def _json_object(data: bytes, what: str, limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """Parse a bounded JSON object; raises BadControlMessage naming ``what`` was wrong."""
    obj = loads_bounded(data, what, limit)
    if not isinstance(obj, dict):
        raise BadControlMessage(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def decode_request(data: bytes) -> dict[str, Any]:
    """Parse a control request; raises BadControlMessage with what was wrong."""
    req = _json_object(data, "control request")
    if not isinstance(req.get("cmd"), str):
        raise BadControlMessage('control request must have a string "cmd"')
    return req


REPORT_COUNTERS = ("received", "dropped", "gaps", "rejected", "sessions")
MAX_CLIENT_NAME = 64


def validate_report(req: dict[str, Any]) -> dict[str, Any]:
    """Check a ``report`` request (a subscriber's own counters, sent so that the broker's
    status shows what each consumer lost); returns the report without ``cmd``.

    Every field is required and typed: a peer cannot make the broker keep anything but a
    short name, a short policy and five non-negative integers.
    """
    expected = {"cmd", "client", "policy", *REPORT_COUNTERS}
    if set(req) != expected:
        raise BadControlMessage(f"report takes exactly {sorted(expected - {'cmd'})}, got "
                                f"{sorted(set(req) - {'cmd'})}")
    client, policy = req["client"], req["policy"]
    if not isinstance(client, str) or not 1 <= len(client) <= MAX_CLIENT_NAME \
            or not client.isprintable():
        raise BadControlMessage(f"report client must be 1-{MAX_CLIENT_NAME} printable chars")
    if not isinstance(policy, str) or not 1 <= len(policy) <= 32 or not policy.isprintable():
        raise BadControlMessage("report policy must be 1-32 printable chars")
    for key in REPORT_COUNTERS:
        value = req[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise BadControlMessage(f"report {key} must be a non-negative integer")
    return {k: req[k] for k in expected - {"cmd"}}


HEX_ID_DIGITS = 16
_HEX = frozenset("0123456789abcdef")


def encode_id(value: int) -> str:
    """A 64-bit identifier (session, inode, device) as JSON carries it: 16 lowercase hex
    digits. As a JSON number it would be rounded above 2^53 by every float-based parser
    (JavaScript's among them), silently, and an identifier must survive every bit."""
    return f"{value:0{HEX_ID_DIGITS}x}"


def decode_id(value: Any, what: str = "identifier") -> int:
    """Inverse of ``encode_id``; BadControlMessage for anything else (a JSON integer
    included: a peer that sends one speaks a draft of the protocol, see the document)."""
    if not isinstance(value, str) or len(value) != HEX_ID_DIGITS or set(value) - _HEX:
        raise BadControlMessage(f"{what} must be {HEX_ID_DIGITS} lowercase hex digits, got "
                                f"{str(value)[:40]!r}")
    return int(value, 16)


def encode_reply(ok: bool, **fields: Any) -> bytes:
    """A control reply: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``."""
    return json.dumps({"ok": ok, **fields}).encode()


def decode_reply(data: bytes) -> dict[str, Any]:
    """Parse a control reply; raises BadControlMessage if it is not a JSON object with "ok"."""
    rep = _json_object(data, "control reply", MAX_CONTROL_WIRE_BYTES)  # status can be long
    if "ok" not in rep:
        raise BadControlMessage('control reply must have "ok"')
    return rep


# --- work channel (DEALER consumers -> broker ROUTER) -----------------------------
#
# Consumers (FFT workers, lossless recorders, result sinks) send one of these as a
# multipart message; the broker's replies are ordinary ``[header, payload]`` frames
# and END messages. Ids are packed little-endian u64.

class WorkCmd(bytes, enum.Enum):
    """First part of a consumer -> broker message on the work channel."""

    READY = b"READY"  # [READY, json {group, window, acks, name}] join a group
    DONE = b"DONE"    # [DONE, ids] finished these frames: the credit comes back
    ACK = b"ACK"      # [ACK, ids] results safely received (the group's acker)
    HB = b"HB"        # [HB] still alive
    BYE = b"BYE"      # [BYE] leaving cleanly


MAX_IDS_PER_MESSAGE = 65536
BLOCK_GROUP_PREFIX = "sub-"  # groups of blocking subscribers (counted as subscribers)
MAX_WINDOW = 1024
GROUP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_GROUP_NAME = 32


def encode_ids(ids: Sequence[int]) -> bytes:
    """Pack frame ids for DONE/ACK."""
    return struct.pack(f"<{len(ids)}Q", *ids)


def decode_ids(buf: bytes) -> tuple[int, ...]:
    """Unpack frame ids; raises BadControlMessage unless a whole number of u64s."""
    if len(buf) % 8 or not 0 < len(buf) <= 8 * MAX_IDS_PER_MESSAGE:
        raise BadControlMessage(f"id list of {len(buf)} bytes is not 1-{MAX_IDS_PER_MESSAGE} "
                                f"little-endian u64s")
    return struct.unpack(f"<{len(buf) // 8}Q", buf)


MAX_SHARDS = 1024
MAX_SHARD_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class Shard:
    """Which frames a group takes: ids in blocks of ``block``, block b to shard
    ``b % count``. Shard ``index`` owns every ``count``-th block from block ``index``."""

    index: int
    count: int
    block: int

    def owns(self, frame_id: int) -> bool:
        return (frame_id // self.block) % self.count == self.index

    def ordinal(self, frame_id: int) -> int:
        """Position of an owned ``frame_id`` among the shard's ids (0 for its first)."""
        return (frame_id // self.block // self.count) * self.block + frame_id % self.block

    def frame_id(self, ordinal: int) -> int:
        """The id at position ``ordinal`` of the shard (inverse of ``ordinal``)."""
        return ((ordinal // self.block) * self.count + self.index) * self.block \
            + ordinal % self.block

    def owned_before(self, end: int) -> int:
        """How many of ids 0..end-1 the shard owns."""
        full, rest = divmod(end, self.block * self.count)
        return full * self.block + min(max(rest - self.index * self.block, 0), self.block)

    def ranges(self, first: int, count: int) -> list[tuple[int, int]]:
        """The owned ids of ``first .. first+count-1`` as (first, count) ranges."""
        out: list[tuple[int, int]] = []
        fid, end = first, first + count
        while fid < end:
            block_end = (fid // self.block + 1) * self.block
            if self.owns(fid):
                n = min(block_end, end) - fid
                if out and out[-1][0] + out[-1][1] == fid:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((fid, n))
                fid = block_end
            else:  # jump to the start of the next block this shard owns
                b = fid // self.block
                fid = max(block_end, (b + (self.index - b) % self.count) * self.block)
        return out

    def to_json(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count, "block": self.block}


def parse_shard(text: str, block: int = 1) -> Shard:
    """A Shard from ``"K/N"`` text (the CLI's ``--shard``) and the block size;
    BadControlMessage (a ValueError) naming what is wrong."""
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit()):
        raise BadControlMessage(f"shard {text!r} must look like K/N, e.g. 0/2")
    return shard_from_json({"index": int(k), "count": int(n), "block": block})


def shard_from_json(obj: Any) -> Shard:
    """A Shard from READY's ``shard`` object, every field checked."""
    if not isinstance(obj, dict) or set(obj) != {"index", "count", "block"}:
        raise BadControlMessage('shard must be {"index": K, "count": N, "block": B}')
    k, n, b = obj["index"], obj["count"], obj["block"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, n, b)) \
            or not 1 <= n <= MAX_SHARDS or not 0 <= k < n or not 1 <= b <= MAX_SHARD_BLOCK:
        raise BadControlMessage(f"shard needs 0 <= index < count <= {MAX_SHARDS} and "
                                f"1 <= block <= {MAX_SHARD_BLOCK}, got {obj}")
    return Shard(k, n, b)


@dataclass(frozen=True, slots=True)
class Ready:
    """A consumer's join request: which group, how many frames it may hold, who acks."""

    group: str
    window: int
    acks: str  # "self": DONE also acknowledges; "sink": a separate acker sends ACK
    name: str
    role: str  # "consumer" takes frames; "acker" only sends ACKs for the group
    transport: str = "tcp"  # "shm": send SHM_FRAME headers, this consumer maps the ring
    shard: Shard | None = None  # the group takes only this shard's frames


TRANSPORTS = ("tcp", "shm")


def encode_ready(r: Ready) -> bytes:
    body = {"group": r.group, "window": r.window, "acks": r.acks, "name": r.name,
            "role": r.role, "transport": r.transport}
    if r.shard is not None:
        body["shard"] = r.shard.to_json()
    return json.dumps(body).encode()


def decode_ready(buf: bytes) -> Ready:
    """Validate a READY body; every field is checked before the broker trusts it."""
    req = _json_object(buf, "READY body")
    group, window = req.get("group"), req.get("window", 1)
    acks, name, role = req.get("acks", "self"), req.get("name", ""), req.get("role", "consumer")
    transport = req.get("transport", "tcp")
    if not isinstance(group, str) or not 1 <= len(group) <= MAX_GROUP_NAME \
            or set(group) - GROUP_CHARS:
        raise BadControlMessage(f"READY group must be 1-{MAX_GROUP_NAME} chars of [a-z0-9_-]")
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= MAX_WINDOW:
        raise BadControlMessage(f"READY window must be an integer 1-{MAX_WINDOW}")
    if acks not in ("self", "sink") or role not in ("consumer", "acker"):
        raise BadControlMessage('READY acks must be "self"|"sink", role "consumer"|"acker"')
    if not isinstance(name, str) or len(name) > 128:
        raise BadControlMessage("READY name must be a string of at most 128 chars")
    if transport not in TRANSPORTS:
        raise BadControlMessage(f'READY transport must be one of {", ".join(TRANSPORTS)}')
    shard = req.get("shard")
    return Ready(group, window, acks, name, role, transport,
                 None if shard is None else shard_from_json(shard))


# --- shared-memory ring (same-host transport; see broker/shm.py for the mapping) -----
#
# A file in /dev/shm: a 4096-byte ring header, then ``nslots`` slots of
# ``slot_stride`` bytes (a multiple of 4096). Each slot starts with a 64-byte slot
# header (begin stamp, end stamp, frame id, timestamp, all u64) followed by the
# pixels. The writer stores ``begin = stamp`` before the pixels and ``end = stamp``
# after them; a reader trusts the pixels only if ``end == begin == stamp`` before
# and ``begin == stamp`` after it read them (a seqlock with two stamps).

RING_MAGIC = b"FBSHRING"
RING_VERSION = 1
RING_HEADER_BYTES = 4096
SLOT_HEADER_BYTES = 64
SLOT_ALIGN = 4096
BOOT_ID_BYTES = 36
#: magic, version, nslots, slot_stride, data_offset, session, owner_pid, dtype, ndim,
#: shape[4], boot_id
_RING = struct.Struct("<8sIIQQQIBB2x4I36s")
#: begin stamp, end stamp, frame_id, timestamp_ns
SLOT_HEADER = struct.Struct("<QQQQ")
MAX_RING_SLOTS = 1 << 20


@dataclass(frozen=True, slots=True)
class RingInfo:
    """The decoded ring header: the geometry every slot has and who owns the ring."""

    nslots: int
    slot_stride: int
    session: int
    owner_pid: int
    dtype: np.dtype
    shape: tuple[int, ...]
    boot_id: str
    data_offset: int = RING_HEADER_BYTES

    @property
    def frame_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def file_size(self) -> int:
        return self.data_offset + self.nslots * self.slot_stride


def ring_slot_stride(frame_bytes: int) -> int:
    """Bytes per slot: slot header + pixels, rounded up to whole pages."""
    return -(-(SLOT_HEADER_BYTES + frame_bytes) // SLOT_ALIGN) * SLOT_ALIGN


def encode_ring_header(r: RingInfo) -> bytes:
    dims = tuple(int(d) for d in r.shape)
    _check_dims(dims)
    boot = r.boot_id.encode("ascii")
    if len(boot) != BOOT_ID_BYTES:
        raise BadRing(f"boot id must be {BOOT_ID_BYTES} ASCII characters, got {r.boot_id!r}")
    return _RING.pack(RING_MAGIC, RING_VERSION, r.nslots, r.slot_stride, r.data_offset,
                      r.session, r.owner_pid, dtype_code(r.dtype), len(dims),
                      *(dims + (0,) * (MAX_DIMS - len(dims))), boot)


def decode_ring_header(buf: bytes | memoryview, file_size: int) -> RingInfo:
    """Validate a ring header against the size of the file it came from; BadRing says
    which rule broke (a reader maps nothing it has not checked)."""
    if len(buf) < _RING.size:
        raise BadRing(f"ring header is {len(buf)} bytes, at least {_RING.size} expected")
    (magic, version, nslots, stride, offset, session, pid, code, ndim, s0, s1, s2, s3,
     boot) = _RING.unpack_from(buf)
    if magic != RING_MAGIC:
        raise BadRing(f"bad ring magic {bytes(magic)!r}, expected {RING_MAGIC!r}")
    if version != RING_VERSION:
        raise BadRing(f"ring version {version} is not supported (this is {RING_VERSION})")
    dtype = DTYPES.get(code)
    if dtype is None or not 1 <= ndim <= MAX_DIMS:
        raise BadRing(f"ring declares dtype code {code} and {ndim} dimensions")
    dims = (s0, s1, s2, s3)[:ndim]
    if any(d == 0 for d in dims) or not 1 <= nslots <= MAX_RING_SLOTS:
        raise BadRing(f"ring declares shape {dims} and {nslots} slots")
    info = RingInfo(nslots, stride, session, pid, dtype, dims,
                    boot.decode("ascii", "replace"), offset)
    if offset != RING_HEADER_BYTES or stride != ring_slot_stride(info.frame_bytes):
        raise BadRing(f"ring declares data offset {offset} and slot stride {stride}; "
                      f"expected {RING_HEADER_BYTES} and {ring_slot_stride(info.frame_bytes)}")
    if file_size != info.file_size:
        raise BadRing(f"ring file is {file_size} bytes, its header declares {info.file_size} "
                      f"({nslots} slots of {stride} bytes + {offset})")
    return info
