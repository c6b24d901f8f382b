"""DECTRIS SIMPLON Stream V2 in: a detector's CBOR start / image / end messages as one
broker stream (``--source stream2:tcp://HOST:PORT``).

The detector binds a ZeroMQ PUSH socket (port 31001 on a DCU) and sends one single-part
CBOR message per start, image and end; this source connects a PULL socket to it. Every
message is untrusted network input: the socket refuses messages over
``MAX_MESSAGE_BYTES`` (libzmq drops the connection; the source connects again), the decoder bounds
nesting, the pixels a declared array may have and the size a compressed byte string may
claim, and accepts only the CBOR tags Stream V2 uses. A message that fails any check is
counted under a specific reason (``status.source_detail.rejected``) and skipped; the
source keeps serving.

One serve process takes one series: the start message fixes the frame's shape and dtype
(and its scalar fields become ``status.source_detail.series``), each image becomes the
next FRAME, the end message ends the stream with END. Several channels (thresholds) go
in one frame as a channel axis, H x W x C in the start message's ``channels`` order, so
a recording keeps them together, frame for frame.

cbor2, bitshuffle and lz4 are the ``stream2`` extra, imported only when this source is
opened (:func:`require`), so building the CLI parser imports none of them.
"""
from __future__ import annotations

import datetime
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .sources import SourceError

MAX_MESSAGE_BYTES = 512 * 2**20  # ZMQ_MAXMSGSIZE: a 16M-pixel uint32 image, 2 channels, raw
MAX_PIXELS = 2**26  # per channel (an EIGER2 16M has 18 million)
MAX_CHANNELS = 4  # frames are H x W x C with C 1-4
MAX_DEPTH = 16  # CBOR nesting (the deepest Stream V2 field, goniometer, needs 3)
POLL_MS = 100  # how long one wait for a message blocks before checking again

#: RFC 8746 typed-array tags Stream V2 uses (the reference client's list, for the image
#: dtypes a frame can carry): tag -> numpy dtype
TYPED_ARRAY_TAGS = {64: "u1", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8", 72: "i1",
                    77: "<i2", 78: "<i4", 79: "<i8", 85: "<f4", 86: "<f8",
                    65: ">u2", 66: ">u4", 67: ">u8", 73: ">i2", 74: ">i4", 75: ">i8",
                    81: ">f4", 82: ">f8"}
MULTI_DIM_TAG = 40  # row-major multi-dimensional array: [dims, typed array]
COMPRESSION_TAG = 56500  # DECTRIS compressed byte string: [algorithm, elem size, bytes]
# tags cbor2 6 decodes itself, except 0 and 1 (date/time as text or number: start.arm_date,
# image.series_date) and 55799 (the self-described CBOR prefix every message starts
# with): bignums, decimals, shared and cyclic references, string references, sets,
# regexps, ...: none is part of Stream V2, and references can build cycles
REFUSED_BUILTIN_TAGS = (2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260,
                        261, 1004)
MAX_DECODED_BYTES = 2 * MAX_MESSAGE_BYTES  # all of one message's decompressed strings

INSTALL_HINT = "pip install 'framebroker[stream2]'"


class Reject(Exception):
    """A message that is not a usable Stream V2 message; ``reason`` is its counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def require() -> None:
    """Fail in one line, before any connection, when the ``stream2`` extra is missing."""
    # bitshuffle's OpenMP threads made its transposition 3-5x slower on these loaded
    # 2-core machines (1.7 vs 0.3 ms per MB); set before bitshuffle loads libgomp
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    missing = []
    for module in ("cbor2", "bitshuffle", "lz4.block"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise SourceError(f"--source stream2 needs {', '.join(missing)}: {INSTALL_HINT}")


# --- decoding ---------------------------------------------------------------------

def _frame_bound(nbytes: int) -> None:
    if nbytes > MAX_PIXELS * 8:
        raise Reject("too_large", f"a byte string claims {nbytes} bytes, over the bound "
                                  f"of {MAX_PIXELS * 8}")


def _lz4_blocks(payload: bytes, pos: int, sizes: list[int], what: str) -> tuple[bytes, int]:
    """Decompress consecutive (uint32 BE length, LZ4 block) records of the given
    uncompressed sizes, with python-lz4's bounds-checked decoder; (data, end position)."""
    import lz4.block

    blocks = []
    for want in sizes:
        if pos + 4 > len(payload):
            raise Reject("bad_compression", f"{what} data ends after {len(blocks)} blocks")
        (n,) = struct.unpack_from(">I", payload, pos)
        chunk = payload[pos + 4:pos + 4 + n]
        pos += 4 + n
        if len(chunk) != n:
            raise Reject("bad_compression", f"{what} block runs past the end of the data")
        try:
            block = chunk if n == want and what == "lz4" else \
                lz4.block.decompress(chunk, uncompressed_size=want)
        except lz4.block.LZ4BlockError as exc:
            raise Reject("bad_compression", f"{what} block does not decompress "
                                            f"({exc})") from None
        if len(block) != want:
            raise Reject("bad_compression", f"{what} block holds {len(block)} bytes, "
                                            f"not {want}")
        blocks.append(block)
    return b"".join(blocks), pos


def _bslz4(payload: bytes, elem_size: int) -> np.ndarray:
    """Bitshuffle-LZ4 in the HDF5 filter's framing: uint64 BE uncompressed size, uint32
    BE block size in bytes, then per block a uint32 BE length and the LZ4 block of the
    bit-shuffled elements; a last partial block holds a multiple of 8 elements and the
    few elements after it are stored raw. Returns the bytes as a uint8 array.

    Not ``bitshuffle.decompress_lz4``: bitshuffle 0.5.2 trusts the LZ4 data and crashed
    the process (SIGSEGV) on corrupted messages here. The LZ4 blocks go through
    python-lz4's bounds-checked decoder; bitshuffle only transposes the bits back."""
    import bitshuffle

    if elem_size not in (1, 2, 4, 8):
        raise Reject("bad_compression", f"bslz4 element size {elem_size} is not 1, 2, 4 or 8")
    if len(payload) < 12:
        raise Reject("bad_compression", "bslz4 data shorter than its 12-byte header")
    size, block = struct.unpack_from(">QI", payload)
    _frame_bound(size)
    block_elems = block // elem_size
    if size % elem_size or block % elem_size or not block_elems or block_elems % 8:
        raise Reject("bad_compression", f"bslz4 header: {size} bytes in blocks of {block} "
                                        f"do not fit elements of {elem_size} bytes")
    full, rest = divmod(size // elem_size, block_elems)
    last, raw = rest - rest % 8, rest % 8
    sizes = [block] * full + ([last * elem_size] if last else [])
    shuffled, pos = _lz4_blocks(payload, 12, sizes, "bslz4")
    if len(payload) - pos != raw * elem_size:
        raise Reject("bad_compression", f"bslz4 data has {len(payload) - pos} bytes after "
                                        f"its blocks, the header implies {raw * elem_size}")
    arr = np.frombuffer(shuffled, np.dtype(f"u{elem_size}"))
    if not last and not raw:  # whole blocks: one transposition, no copy after it
        return bitshuffle.bitunshuffle(arr, block_elems).view(np.uint8)
    out = np.empty(size // elem_size, arr.dtype)
    cut = full * block_elems
    if full:
        out[:cut] = bitshuffle.bitunshuffle(arr[:cut], block_elems)
    if last:
        out[cut:cut + last] = bitshuffle.bitunshuffle(arr[cut:], last)
    out[cut + last:] = np.frombuffer(payload, arr.dtype, raw, pos)
    return out.view(np.uint8)


def _lz4(payload: bytes) -> bytes:
    """LZ4 in the HDF5 LZ4 filter's framing: uint64 BE size, uint32 BE block size, then
    each block as uint32 BE compressed size + data (stored raw when it did not shrink)."""
    if len(payload) < 12:
        raise Reject("bad_compression", "lz4 data shorter than its 12-byte header")
    size, block = struct.unpack_from(">QI", payload)
    _frame_bound(size)
    if not block and size:
        raise Reject("bad_compression", "lz4 header has a block size of 0")
    full, rest = divmod(size, block) if block else (0, 0)
    out, pos = _lz4_blocks(payload, 12, [block] * full + ([rest] if rest else []), "lz4")
    if pos != len(payload):
        raise Reject("bad_compression", f"lz4 data has {len(payload) - pos} bytes after "
                                        f"its {size}")
    return out


def _claimed_size(value: Any) -> int:
    """The uncompressed size a tag-56500 item's header claims (both framings start with
    it as a uint64 BE); checks the item's shape."""
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str)
            and isinstance(value[1], int) and isinstance(value[2], bytes)):
        raise Reject("bad_tag", "tag 56500 must hold [algorithm, element size, bytes]")
    if len(value[2]) < 12:
        raise Reject("bad_compression", f"{value[0]} data shorter than its 12-byte header")
    size = struct.unpack_from(">Q", value[2])[0]
    _frame_bound(size)
    return size


def _decompress(value: Any) -> bytes | np.ndarray:
    algorithm, elem_size, payload = value
    if algorithm == "bslz4":
        return _bslz4(payload, elem_size)
    if algorithm == "lz4":
        return _lz4(payload)
    raise Reject("bad_compression", f"compression {algorithm!r} is not bslz4 or lz4")


def _typed_array(tag: int, value: Any) -> np.ndarray:
    """The elements of a byte string (or of a decompressed one, a uint8 array)."""
    if not isinstance(value, bytes) and not (isinstance(value, np.ndarray)
                                             and value.dtype == np.uint8):
        raise Reject("bad_tag", f"typed array tag {tag} must hold a byte string")
    dtype = np.dtype(TYPED_ARRAY_TAGS[tag])
    if len(value) % dtype.itemsize:
        raise Reject("bad_array", f"{len(value)} bytes are not whole {dtype} elements")
    return np.frombuffer(value, dtype)


def _multi_dim(value: Any) -> np.ndarray:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (list, tuple)) and isinstance(value[1], np.ndarray)):
        raise Reject("bad_tag", "tag 40 must hold [dimensions, typed array]")
    dims, flat = value
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and 0 < d <= MAX_PIXELS
                                          for d in dims):
        raise Reject("bad_array", f"dimensions {list(dims)} are not 1-3 positive sizes")
    pixels = int(np.prod(dims, dtype=object))
    if pixels > MAX_PIXELS:
        raise Reject("too_large", f"dimensions {list(dims)} exceed {MAX_PIXELS} pixels")
    if pixels != flat.size:
        raise Reject("bad_array", f"dimensions {list(dims)} need {pixels} elements, "
                                  f"the data holds {flat.size}")
    return flat.reshape(tuple(dims))


class _TagHook:
    """Stream V2's tags for one message, decoded as they are read (inner first: 56500,
    then the typed array around it, then tag 40); any other tag is refused. Each
    compressed string may claim at most 2^29 bytes, and all of a message's together at
    most ``MAX_DECODED_BYTES``: LZ4 expands up to 255-fold, so a small message could
    otherwise ask for far more memory than any image needs."""

    def __init__(self) -> None:
        self.budget = MAX_DECODED_BYTES

    def __call__(self, tag: Any, _immutable: bool = False) -> Any:
        if tag.tag == COMPRESSION_TAG:
            claimed = _claimed_size(tag.value)
            if claimed > self.budget:
                raise Reject("too_large", f"compressed strings of one message claim over "
                                          f"{MAX_DECODED_BYTES} bytes")
            self.budget -= claimed
            return _decompress(tag.value)
        if tag.tag in TYPED_ARRAY_TAGS:
            return _typed_array(tag.tag, tag.value)
        if tag.tag == MULTI_DIM_TAG:
            return _multi_dim(tag.value)
        raise Reject("unknown_tag", f"CBOR tag {tag.tag} is not used by Stream V2")


def _refuse(tag: int) -> Callable[..., Any]:
    def decoder(*_args: Any) -> Any:
        raise Reject("unknown_tag", f"CBOR tag {tag} is not used by Stream V2")
    return decoder


_SEMANTIC = {tag: _refuse(tag) for tag in REFUSED_BUILTIN_TAGS}


def decode(data: bytes) -> Mapping[str, Any]:
    """One message as a map with a ``type``; raises :class:`Reject` naming the reason."""
    import cbor2

    try:
        message = cbor2.loads(data, tag_hook=_TagHook(), semantic_decoders=_SEMANTIC,
                              max_depth=MAX_DEPTH)
    except Reject:
        raise
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__
        if isinstance(cause, Reject):
            raise cause from None
        if "depth" in str(exc):
            raise Reject("too_deep", f"CBOR nested deeper than {MAX_DEPTH}") from None
        raise Reject("not_cbor", f"not a CBOR message ({exc})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise Reject("not_cbor", f"not a CBOR message ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, Mapping):
        raise Reject("not_a_map", f"a Stream V2 message is a CBOR map, got "
                                  f"{type(message).__name__}")
    kind = message.get("type")
    if kind not in ("start", "image", "end"):
        raise Reject("unknown_type", f"message type {kind!r} is not start, image or end")
    return message


def _field(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = message.get(name)
    if value is None:
        raise Reject("missing_field", f"{message['type']} message has no {name!r}")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise Reject("bad_field", f"{message['type']} message field {name!r} is "
                                  f"{type(value).__name__}")
    return value


def scalar_fields(start: Mapping[str, Any]) -> dict[str, Any]:
    """The start message's scalar fields (and its channel list) as JSON values: what a
    client needs to interpret the frames, without flatfields, masks or lookup tables."""
    out: dict[str, Any] = {}
    for key, value in start.items():
        if key == "type" or not isinstance(key, str):
            continue
        if isinstance(value, datetime.datetime):
            out[key] = value.isoformat()
        elif isinstance(value, bool) or isinstance(value, str) \
                or isinstance(value, float) and np.isfinite(value):
            out[key] = value
        elif isinstance(value, int) and abs(value) < 2**53:  # exact in every JSON parser
            out[key] = value
        elif key == "channels" and isinstance(value, (list, tuple)):
            out[key] = [str(v) for v in value]
    return out


# --- the source -------------------------------------------------------------------

@dataclass
class Series:
    """What the start message fixed for the images that follow."""

    series_id: int
    unique_id: str
    channels: tuple[str, ...]
    rows: int
    cols: int
    fields: dict[str, Any] = field(default_factory=dict)


def parse_start(message: Mapping[str, Any]) -> Series:
    """The series a start message announces; raises :class:`Reject`."""
    channels = _field(message, "channels", (list, tuple))
    if not 1 <= len(channels) <= MAX_CHANNELS or not all(isinstance(c, str) for c in channels) \
            or len(set(channels)) != len(channels):
        raise Reject("bad_field", f"channels {list(channels)!r} must be 1-{MAX_CHANNELS} "
                                  f"distinct names")
    rows, cols = _field(message, "image_size_y", int), _field(message, "image_size_x", int)
    if not (0 < rows and 0 < cols and rows * cols <= MAX_PIXELS):
        raise Reject("too_large", f"image size {cols} x {rows} is not 1-{MAX_PIXELS} pixels")
    return Series(_field(message, "series_id", int), _field(message, "series_unique_id", str),
                  tuple(channels), rows, cols, scalar_fields(message))


class Stream2Source:
    """Frames from a Stream V2 detector: connects, waits for a start message, then
    delivers each image of that series as a frame until the end message."""

    on_demand = False  # the detector sends at its rate, however fast the broker reads
    fps = 0.0  # a read waits for the detector's next image by itself

    def __init__(self, endpoint: str, ctx: Any = None,
                 log: Callable[[str], None] | None = None) -> None:
        require()
        import zmq

        self.endpoint = endpoint
        self._log = log or (lambda msg: None)
        self.rejected: dict[str, int] = {}
        self.messages = 0
        self.image_id_gaps = 0
        self._next_id = 0
        self._pending: dict[str, np.ndarray] | None = None
        self._ended = False
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise SourceError(f"stream2 {endpoint}: cannot connect ({exc})") from None
        # libzmq 4.3.5 never reconnects a connecting socket that dropped a connection for
        # an over-size message: the source would wait forever. Watch for the drop.
        self.reconnects = 0
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._log(f"stream2: waiting for a start message from {endpoint}")
        self.series = self._wait_start()
        self.dtype: np.dtype | None = None  # the first image's, which every other must match
        first = self._wait_image()
        if first is None:
            self.close()
            raise SourceError(f"stream2 {endpoint}: series {self.series.series_id} ended "
                              f"with no image")
        self.dtype = first.dtype.newbyteorder("=")
        c = len(self.series.channels)
        rows, cols = self.series.rows, self.series.cols
        self.shape = (rows, cols) if c == 1 else (rows, cols, c)
        self.description = (f"stream2 {endpoint} series {self.series.series_id} "
                            f"{cols}x{rows} {self.dtype} {'+'.join(self.series.channels)}")

    # --- receiving --------------------------------------------------------------
    def _poll(self, timeout_ms: float) -> bool:
        """True when a message is queued (waiting up to ``timeout_ms``). A dropped
        connection is connected again once the messages it delivered are read: a
        disconnect discards what is still queued."""
        events = dict(self._poller.poll(timeout_ms))
        if self._sock in events:
            return True
        if self._monitor in events:
            self._reconnect()
        return False

    def _reconnect(self) -> None:
        import zmq

        while self._monitor.poll(0):
            self._monitor.recv_multipart()
        try:
            self._sock.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # libzmq forgot the endpoint already
        self._sock.connect(self.endpoint)
        self.reconnects += 1
        if self.reconnects == 1:
            self._log(f"stream2: the connection to {self.endpoint} dropped (a message over "
                      f"{MAX_MESSAGE_BYTES} bytes, or the detector went away); connecting "
                      f"again (status counts reconnects)")

    def _recv(self, block: bool) -> bytes | None:
        while True:
            if self._poll(POLL_MS if block else 0):
                self.messages += 1
                return self._sock.recv(copy=True)
            if not block:
                return None

    def _reject(self, reason: str, message: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self.rejected[reason] == 1:  # the first of each reason; status counts the rest
            self._log(f"stream2: rejected a message from {self.endpoint}: {message}")

    def _wait_start(self) -> Series:
        while True:
            data = self._recv(block=True)
            try:
                message = decode(data)
                if message["type"] != "start":
                    raise Reject(f"{message['type']}_before_start",
                                 f"{message['type']} message before any start message")
                return parse_start(message)
            except Reject as exc:
                self._reject(exc.reason, str(exc))

    def _image(self, message: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The channel planes of an image of this series; raises :class:`Reject`."""
        series = self.series
        if _field(message, "series_id", int) != series.series_id or \
                _field(message, "series_unique_id", str) != series.unique_id:
            raise Reject("wrong_series", f"image of series {message.get('series_id')!r} "
                                         f"during series {series.series_id}")
        image_id = _field(message, "image_id", int)
        data = _field(message, "data", Mapping)
        if set(data) != set(series.channels):
            raise Reject("wrong_channels", f"image channels {sorted(map(str, data))} are not "
                                           f"the series' {list(series.channels)}")
        planes = {name: data[name] for name in series.channels}
        dtypes = {p.dtype.newbyteorder("=") if isinstance(p, np.ndarray) else None
                  for p in planes.values()}
        for name, plane in planes.items():
            if not isinstance(plane, np.ndarray):
                raise Reject("bad_field", f"channel {name!r} is not a multi-dimensional array")
            if plane.shape != (series.rows, series.cols):
                raise Reject("wrong_shape", f"channel {name!r} is {plane.shape}, the series "
                                            f"is {(series.rows, series.cols)}")
        if len(dtypes) != 1 or self.dtype not in (None, *dtypes):
            raise Reject("wrong_dtype", f"channel dtypes {sorted(map(str, dtypes))} differ "
                                        f"from the series' {self.dtype}")
        if image_id != self._next_id:
            self.image_id_gaps += 1
        self._next_id = image_id + 1
        return planes

    def _take(self, data: bytes) -> dict[str, np.ndarray] | None:
        """Handle one message during the series: the planes of an image, None otherwise."""
        try:
            message = decode(data)
            kind = message["type"]
            if kind == "image":
                return self._image(message)
            if _field(message, "series_id", int) != self.series.series_id or \
                    _field(message, "series_unique_id", str) != self.series.unique_id:
                raise Reject("wrong_series", f"{kind} message of series "
                                             f"{message.get('series_id')!r}")
            if kind == "start":
                raise Reject("start_during_series", "a second start message for the series")
            self._ended = True
        except Reject as exc:
            self._reject(exc.reason, str(exc))
        return None

    def _wait_image(self, block: bool = True) -> dict[str, np.ndarray] | None:
        """Read until an image (kept as pending) or the end; None at the end, or with
        ``block=False`` when nothing is queued."""
        while self._pending is None and not self._ended:
            data = self._recv(block)
            if data is None:
                return None
            self._pending = self._take(data)
        first = self._pending
        return None if first is None else next(iter(first.values()))

    def ready(self, timeout_ms: float = 0) -> bool:
        """True when :meth:`read_into` will not wait: an image or the end is queued
        (waiting up to ``timeout_ms`` for one). The broker serves its own sockets in
        between instead of blocking while the detector is idle."""
        self._wait_image(block=False)
        if self._pending is None and not self._ended and self._poll(timeout_ms):
            self._wait_image(block=False)
        return self._pending is not None or self._ended

    def read_into(self, out: np.ndarray) -> bool:
        self._wait_image(block=True)
        if self._pending is None:
            return False
        planes, self._pending = self._pending, None
        for c, name in enumerate(self.series.channels):  # "equiv": swaps big-endian data
            np.copyto(out if out.ndim == 2 else out[:, :, c], planes[name], casting="equiv")
        return True

    def detail(self) -> dict[str, Any]:
        """For ``status.source_detail``: the series' start fields and the counters."""
        return {"kind": "stream2", "endpoint": self.endpoint, "messages": self.messages,
                "rejected": dict(self.rejected), "image_id_gaps": self.image_id_gaps,
                "reconnects": self.reconnects,
                "ended": self._ended, "series": self.series.fields}

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
