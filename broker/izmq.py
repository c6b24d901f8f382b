"""imagezmq's wire format, both ways: a broker source that takes frames from
``imagezmq.ImageSender`` processes, and the encoder ``bridge imagezmq`` sends with.

The wire (imagezmq 1.x, ``SerializingSocket``) is two parts per image:

* ``send_image``: ``[json {"msg": TEXT, "dtype": NAME, "shape": [..]}, raw C-order buffer]``
* ``send_jpg``: ``[json {"msg": TEXT}, JPEG bytes]``

over REQ/REP (the sender connects a REQ, the hub binds a REP and answers every
message, ``b"OK"``) or PUB/SUB (the sender binds a PUB, the hub connects a SUB).

The metadata comes from the network, so it is parsed here with the protocol's bounded
JSON decoder, not imagezmq's ``recv_json`` and ``np.frombuffer(dtype=md["dtype"])``,
which would accept any numpy dtype string (``object`` included) and any shape. Every
malformed message is a counted reject with a reason; a REQ sender still gets a reply
(``rejected: REASON: ...``) so it is never left waiting. The source needs nothing but
pyzmq: simplejpeg (the ``imagezmq`` extra) decodes JPEG faster, OpenCV otherwise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq

from . import protocol as proto
from .rejects import RejectLog
from .sources import SourceError, format_shape

MAX_METADATA_BYTES = 4096  # imagezmq's metadata is about 60 bytes; nothing needs more
MAX_SENDERS = 256  # distinct sender texts counted in status; more are summed as "(other)"
RECV_BATCH = 64  # messages handled per ready() call: a flood cannot starve the broker
SUB_RCVHWM = 4  # a PUB sender queues up to its HWM (imagezmq: 1000) at this end otherwise
FIRST_FRAME_LOG_S = 5.0
#: the dtypes the broker's wire carries (protocol.DTYPES), by imagezmq's
#: ``str(array.dtype)``: anything else (object, strings, big-endian ``>u2``) is refused
#: before numpy sees it
DTYPES = frozenset(dt.name for dt in proto.DTYPES.values())
ENDPOINT_FORM = "tcp://HOST:PORT"


class ImagezmqReject(proto.ProtocolError):
    """A message that is not imagezmq's, or not one the stream can take; ``reason``
    names which rule it broke (the key in ``status.source_rejected``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One validated imagezmq message: raw pixels (``jpeg`` False, dtype and shape
    from the metadata) or a JPEG whose geometry the decoder gives."""

    sender: str
    jpeg: bool
    payload: memoryview
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()


def parse_message(parts: list[Any], max_bytes: int = proto.DEFAULT_MAX_BYTES) -> Message:
    """Validate an imagezmq message ``[metadata, buffer]`` (zmq Frames or bytes); raises
    ImagezmqReject with the reason. Nothing is allocated from unchecked sizes."""
    if len(parts) != 2:
        raise ImagezmqReject("part_count", f"imagezmq messages have 2 parts, got {len(parts)}")
    meta, payload = (memoryview(p.buffer if isinstance(p, zmq.Frame) else p) for p in parts)
    try:
        md = proto.loads_bounded(meta.tobytes(), "imagezmq metadata", MAX_METADATA_BYTES)
    except proto.ProtocolError as exc:
        raise ImagezmqReject("bad_metadata", str(exc)) from None
    if not isinstance(md, dict):
        raise ImagezmqReject("bad_metadata", f"imagezmq metadata must be a JSON object, got "
                                      f"{type(md).__name__}")
    sender = md.get("msg")
    if not isinstance(sender, str) or not 1 <= len(sender.encode()) <= proto.MAX_NAME:
        raise ImagezmqReject("bad_sender", f'imagezmq metadata needs a "msg" text of 1-'
                                    f"{proto.MAX_NAME} bytes, got {str(sender)[:40]!r}")
    if "dtype" not in md and "shape" not in md:
        if not len(payload):
            raise ImagezmqReject("bad_jpeg", "empty JPEG buffer")
        return Message(sender, True, payload)
    dtype, shape = md.get("dtype"), md.get("shape")
    if dtype not in DTYPES:
        raise ImagezmqReject("unknown_dtype", f"imagezmq dtype {str(dtype)[:40]!r} is not one of "
                                       f"{', '.join(sorted(DTYPES))}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= proto.MAX_DIMS
            or not all(type(d) is int and d >= 1 for d in shape)):
        raise ImagezmqReject("bad_shape", f"imagezmq shape must be 1-{proto.MAX_DIMS} positive "
                                   f"integers, got {str(shape)[:60]}")
    dt = np.dtype(dtype)
    nbytes = dt.itemsize
    for d in shape:
        nbytes *= d
        if nbytes > max_bytes:
            raise ImagezmqReject("too_large", f"imagezmq frame {str(shape)[:60]} {dtype} is over "
                                       f"the {max_bytes} byte limit")
    if len(payload) != nbytes:
        raise ImagezmqReject("payload_size", f"imagezmq frame {format_shape(tuple(shape))} {dtype} "
                                      f"needs {nbytes} bytes, got {len(payload)}")
    return Message(sender, False, payload, dt, tuple(shape))


def imagezmq_installed() -> bool:
    """Whether the imagezmq package can be imported (bridge imagezmq and the benchmarks
    that measure imagezmq itself need it; the source does not)."""
    try:
        import imagezmq  # noqa: F401  (only whether it is there)
    except ImportError:
        return False
    return True


# --- JPEG ----------------------------------------------------------------------------

def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def jpeg_shape(data: memoryview, max_bytes: int) -> tuple[int, ...] | None:
    """(H, W) or (H, W, 3) from a JPEG header (simplejpeg), before any pixel is decoded,
    so a small file claiming a huge image is refused; None without simplejpeg."""
    sj = _simplejpeg()
    if sj is None:
        return None
    try:
        height, width, colorspace, _ = sj.decode_jpeg_header(data)
    except ValueError as exc:
        raise ImagezmqReject("bad_jpeg", f"not a JPEG: {exc}") from None
    shape = (height, width) if colorspace == "Gray" else (height, width, 3)
    if int(np.prod(shape)) > max_bytes:
        raise ImagezmqReject("too_large", f"JPEG of {format_shape(shape)} is over the {max_bytes} "
                                   f"byte limit")
    return shape


def decode_jpeg(data: memoryview, shape: tuple[int, ...] | None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Pixels of a JPEG as OpenCV gives them (BGR, or 2-D gray): simplejpeg into ``out``
    when ``shape`` came from :func:`jpeg_shape`, else ``cv2.imdecode``."""
    try:
        if shape is not None:
            sj = _simplejpeg()
            color = "GRAY" if len(shape) == 2 else "BGR"
            buf = None if out is None else out.reshape(shape[0], shape[1], -1)
            img = sj.decode_jpeg(data, colorspace=color, buffer=buf)
            return img.reshape(shape)
        from .sources import _cv2

        cv2 = _cv2()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except (ValueError, TypeError) as exc:
        raise ImagezmqReject("bad_jpeg", f"JPEG does not decode: {exc}") from None
    if img is None:
        raise ImagezmqReject("bad_jpeg", "JPEG does not decode (OpenCV)")
    return img


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """A BGR or gray uint8 frame as JPEG bytes (simplejpeg if present, else OpenCV)."""
    sj = _simplejpeg()
    if sj is not None:
        img = frame.reshape(frame.shape[0], frame.shape[1], -1)
        color = "GRAY" if img.shape[2] == 1 else "BGR"
        return sj.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace=color,
                              colorsubsampling="Gray" if color == "GRAY" else "420")
    from .sources import _cv2

    cv2 = _cv2()
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"OpenCV cannot encode a {format_shape(frame.shape)} frame as JPEG")
    return buf.tobytes()


def jpeg_encodable(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """JPEG carries 8-bit gray or 3-channel colour only."""
    return np.dtype(dtype) == np.uint8 and (len(shape) == 2 or shape[2:] in ((1,), (3,)))


# --- the source -----------------------------------------------------------------------

class ImagezmqSource:
    """Frames from imagezmq senders: ``subscribe`` False binds a REP (the ImageHub side,
    every message answered), True connects a SUB to a PUB ImageSender.

    All senders feed the one broker stream, in arrival order; ``sender`` keeps only the
    frames whose imagezmq text equals it (the rest are rejected as ``other_sender``).
    The first valid frame fixes the stream's shape and dtype (the broker's buffers and
    ring slots are that size); a later frame of another shape is rejected as
    ``shape_changed``. Frames are counted per sender text in ``senders``.
    """

    on_demand = False  # senders deliver at their own rate
    fps = 0.0

    def __init__(self, endpoint: str, *, subscribe: bool = False, sender: str = "",
                 max_bytes: int = proto.DEFAULT_MAX_BYTES,
                 log: Callable[[str], None] | None = None, ctx: zmq.Context | None = None,
                 first_timeout: float | None = None) -> None:
        self.endpoint, self.sender, self.max_bytes = endpoint, sender, max_bytes
        self.log = log or (lambda m: None)
        self.reject_log = RejectLog(self.log, "imagezmq")
        self.rejected: dict[str, int] = {}
        self.senders: dict[str, int] = {}
        self._reply = not subscribe
        self._pending: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self.shape: tuple[int, ...] = ()
        self.dtype = np.dtype("uint8")
        self.socket = (zmq.Context.instance() if ctx is None else ctx).socket(
            zmq.SUB if subscribe else zmq.REP)
        # a metadata part and a frame; a larger part costs the peer its connection
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_bytes + MAX_METADATA_BYTES)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            if subscribe:
                self.socket.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
                self.socket.setsockopt(zmq.SUBSCRIBE, b"")
                self.socket.connect(endpoint)
            else:
                self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise SourceError(f"imagezmq {endpoint}: cannot {'connect' if subscribe else 'bind'}"
                              f": {exc.strerror}") from None
        mode = "SUB from a PUB ImageSender" if subscribe else "REP for REQ ImageSenders"
        self.description = f"imagezmq {endpoint} ({mode}"
        self._wait_first(first_timeout)
        self.description += (f"{', sender ' + repr(sender) if sender else ''}) "
                             f"{format_shape(self.shape)} {self.dtype}")

    def _wait_first(self, timeout: float | None) -> None:
        """Block until the first valid frame: it gives the stream its shape and dtype."""
        t0 = next_say = time.monotonic()
        while not self.ready():
            now = time.monotonic()
            if timeout is not None and now - t0 > timeout:
                self.close()
                raise SourceError(f"imagezmq {self.endpoint}: no valid frame in {timeout:g} s "
                                  f"(rejected: {self.rejected or 'none'})")
            if now >= next_say:
                self.log(f"imagezmq: waiting for the first frame on {self.endpoint}")
                next_say = now + FIRST_FRAME_LOG_S
            self.socket.poll(200)
        self.shape, self.dtype = tuple(self._pending.shape), self._pending.dtype

    def ready(self) -> bool:
        """True when a valid frame is waiting for :meth:`read_into`; receives (without
        blocking) and answers what has arrived, rejecting what is invalid."""
        for _ in range(RECV_BATCH):
            if self._pending is not None:
                return True
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            reply = b"OK"
            try:
                self._pending = self._accept(parts)
            except ImagezmqReject as exc:
                self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
                self.reject_log(_peer(parts[0]), exc.reason, str(exc)[:200])
                reply = f"rejected: {exc.reason}: {str(exc)[:200]}".encode()
            if self._reply:
                self.socket.send(reply)
        self.reject_log.flush()
        return self._pending is not None

    def _accept(self, parts: list[zmq.Frame]) -> np.ndarray:
        """The pixels of a valid message (a view of the message, or the decoded JPEG)."""
        msg = parse_message(parts, self.max_bytes)
        if self.sender and msg.sender != self.sender:
            raise ImagezmqReject("other_sender", f"sender {msg.sender[:40]!r} is not --sender "
                                          f"{self.sender!r}")
        if msg.jpeg:
            shape = jpeg_shape(msg.payload, self.max_bytes)
            if self.shape and shape is not None and shape != self.shape:
                raise self._changed(shape, np.dtype("uint8"))
            if self._scratch is None and self.shape == shape and shape is not None:
                self._scratch = np.empty(shape, np.uint8)
            pixels = decode_jpeg(msg.payload, shape, self._scratch if shape else None)
            if pixels.nbytes > self.max_bytes:  # OpenCV decoded it without a header check
                raise ImagezmqReject("too_large", f"JPEG of {format_shape(pixels.shape)} is "
                                                  f"over the {self.max_bytes} byte limit")
        else:
            pixels = np.frombuffer(msg.payload, msg.dtype).reshape(msg.shape)
        if self.shape and (pixels.shape != self.shape or pixels.dtype != self.dtype):
            raise self._changed(pixels.shape, pixels.dtype)
        key = msg.sender if msg.sender in self.senders or len(self.senders) < MAX_SENDERS \
            else "(other)"
        self.senders[key] = self.senders.get(key, 0) + 1
        return pixels

    def _changed(self, shape: tuple[int, ...], dtype: np.dtype) -> ImagezmqReject:
        return ImagezmqReject("shape_changed", f"frame {format_shape(shape)} {dtype} differs from "
                                        f"the stream's {format_shape(self.shape)} {self.dtype}")

    def read_into(self, out: np.ndarray) -> bool:
        while not self.ready():  # the broker asks after ready(); a direct caller waits
            self.socket.poll(100)
        np.copyto(out, self._pending)
        self._pending = None
        return True

    def close(self) -> None:
        if not self.socket.closed:
            self.socket.close(linger=0)


def _peer(frame: Any) -> str:
    try:
        return frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return "?"


def check_exposure(endpoint: str, insecure: bool, warn: Callable[[str], None]) -> None:
    """imagezmq has no encryption or authentication, so CURVE cannot cover its socket:
    binding it beyond loopback needs ``--insecure`` whatever else is configured."""
    from .security import check_unauthenticated

    check_unauthenticated(
        endpoint, insecure, warn,
        f"refusing to bind {endpoint} for imagezmq senders: imagezmq has no encryption or "
        f"authentication, so anyone who can reach it could inject frames. Bind 127.0.0.1, "
        f"or pass --insecure to accept that risk",
        f"warning: --insecure: imagezmq senders are accepted on {endpoint} without "
        f"encryption or authentication")
