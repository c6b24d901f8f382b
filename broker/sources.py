"""Frame sources: synthetic scenes, video files and cameras, all filling a caller's buffer.

A source never allocates a frame per read: the broker hands it a recycled buffer and
the source writes into it (``cv2.VideoCapture.read(image=buf)``, or the Cython
renderer). Fresh memory costs about 2.7 us per 4 KiB page on these machines, so a new
8 MB array per frame would cost more than sending it.
"""
from __future__ import annotations

import functools
import math
import os
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from . import _synth
from .protocol import DEFAULT_MAX_BYTES, BadShape, UnknownDtype, dtype_code

SYNTH_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                "float32", "float64")


class SourceError(RuntimeError):
    """A source that cannot start or stopped delivering; the message names the device."""


class Source(Protocol):
    """What the broker needs from a frame source.

    A source fed from the network has ``ready``, True once a frame is waiting: the
    broker calls ``read_into`` only then, so waiting for a sender never blocks control
    requests. With a ``socket`` (broker/izmq.py) the broker polls that socket with its
    own and calls ``ready()``; without one (broker/stream2.py, which replaces its socket
    when it reconnects) it calls ``ready(timeout_ms)``, which waits on its own sockets.
    """

    description: str
    shape: tuple[int, ...]
    dtype: np.dtype
    #: frames are made when asked for (a file, a renderer), not when a device delivers
    #: them: an unpaced broker may wait before reading without the frame going stale
    on_demand: bool
    fps: float  # its own rate, which the broker paces to by default (0 = none: as fast
    # as it delivers; a camera's read waits for its next frame by itself)

    def read_into(self, out: np.ndarray) -> bool:
        """Fill ``out`` (shape/dtype as declared) with the next frame; False at the end."""

    def close(self) -> None:
        """Release the device or file."""

    # Optional: ``ready`` as above, and ``detail() -> dict`` (what
    # ``status.source_detail`` shows; None without it).


# --- synthetic ------------------------------------------------------------------

def geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, cols, channels) view of a 1-4 dimensional frame shape."""
    if len(shape) == 1:
        return 1, shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    return shape[0] * shape[1], shape[2], shape[3]


def _value_range(dt: np.dtype) -> tuple[float, float, float]:
    """(gradient top, noise amplitude, disc brightness) that look like a real sensor."""
    if dt.kind == "f":
        return 1.0, 0.05, 1.5
    if dt.itemsize == 1:
        return (200.0, 24.0, 255.0) if dt.kind == "u" else (100.0, 12.0, 127.0)
    return 3500.0, 300.0, 4095.0  # 12-bit sensor in a wider integer


@functools.lru_cache(maxsize=8)
def _texture(shape: tuple[int, ...], dtype_str: str) -> tuple[np.ndarray, float]:
    """The scene: a gradient with fixed-seed noise. The same on every machine, so any
    receiver can verify a frame from its id alone."""
    dt = np.dtype(dtype_str)
    rows, cols, chans = geometry(shape)
    top, noise, bright = _value_range(dt)
    y = np.linspace(0.0, 0.4, rows)[:, None, None]
    x = np.linspace(0.0, 0.6, cols)[None, :, None]
    tint = np.linspace(1.0, 0.8, chans)[None, None, :]
    rng = np.random.default_rng(20261201)
    scene = top * (x + y) * tint + rng.random((rows, cols, chans)) * noise
    return np.ascontiguousarray(scene.astype(dt)).reshape(-1), bright


def check_synthetic_dtype(dtype: np.dtype) -> None:
    """Raise UnknownDtype unless the synthetic renderer supports ``dtype``."""
    if np.dtype(dtype).name not in SYNTH_DTYPES:
        raise UnknownDtype(f"the synthetic source renders {', '.join(SYNTH_DTYPES)}; "
                           f"got {np.dtype(dtype)}")


def render_synthetic(out: np.ndarray, frame_id: int, prev_id: int = -1) -> None:
    """Write synthetic frame ``frame_id`` into the C-contiguous array ``out``.

    ``prev_id`` >= 0 promises that ``out`` holds synthetic frame ``prev_id`` now, so
    only what differs is repainted.
    """
    check_synthetic_dtype(out.dtype)
    texture, bright = _texture(out.shape, out.dtype.str)
    rows, cols, chans = geometry(out.shape)
    _synth.render(out.reshape(-1), texture, frame_id, prev_id, rows, cols, chans,
                  out.dtype.type(bright))


def check_synthetic(frame: np.ndarray, frame_id: int) -> int:
    """-1 if ``frame`` is exactly synthetic frame ``frame_id``, else the first bad flat index."""
    check_synthetic_dtype(frame.dtype)
    if not frame.flags.c_contiguous:
        return 0
    texture, bright = _texture(frame.shape, frame.dtype.str)
    rows, cols, chans = geometry(frame.shape)
    return _synth.verify(frame.reshape(-1), texture, frame_id, rows, cols, chans,
                         frame.dtype.type(bright))


def synthetic_frame(shape: tuple[int, ...], dtype: str | np.dtype, frame_id: int) -> np.ndarray:
    """A new array holding synthetic frame ``frame_id`` (for tests and references)."""
    out = np.empty(shape, dtype=dtype)
    render_synthetic(out, frame_id)
    return out


def read_stamp(frame: np.ndarray) -> int:
    """Frame id stamped into the first 16 bytes of a synthetic frame, -1 if damaged."""
    return _synth.read_stamp(np.ascontiguousarray(frame).reshape(-1).view(np.uint8)[:16])


class SyntheticSource:
    """A camera-like scene rendered by a Cython kernel, far faster than any transport.

    It remembers which frame each recycled buffer holds (by a weak reference, so a
    new array at a reused address is never mistaken for an old one) and repaints only
    the moving disc and the stamp.
    """

    on_demand = True

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype = "uint8") -> None:
        self.dtype = np.dtype(dtype)
        check_synthetic_dtype(self.dtype)
        dtype_code(self.dtype)
        if not 1 <= len(shape) <= 4 or any(d < 1 for d in shape):
            raise BadShape(f"synthetic frames have 1-4 positive dimensions, got {shape}")
        self.shape = tuple(shape)
        self.fps = 0.0
        self.description = f"synthetic {format_shape(self.shape)} {self.dtype}"
        self._next = 0
        self._held: dict[int, tuple[weakref.ref, int]] = {}
        _texture(self.shape, self.dtype.str)  # build the scene now, not on the first frame

    def read_into(self, out: np.ndarray) -> bool:
        ref, prev = self._held.get(id(out), (None, -1))
        if ref is None or ref() is not out:
            prev = -1
            if len(self._held) > 4096:  # forget buffers that died
                self._held = {k: v for k, v in self._held.items() if v[0]() is not None}
        render_synthetic(out, self._next, prev)
        self._held[id(out)] = (weakref.ref(out), self._next)
        self._next += 1
        return True

    def close(self) -> None:
        pass


# --- OpenCV: video files and cameras --------------------------------------------

def _cv2():
    """Import OpenCV quietly: without a camera it prints V4L2 warnings we report ourselves."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")
    import cv2

    return cv2


class _CaptureSource:
    """Shared read loop for cv2.VideoCapture-backed sources."""

    def __init__(self, cap, label: str) -> None:
        self._cap = cap
        self.label = label
        ok, first = cap.read()
        if not ok or first is None:
            cap.release()
            raise SourceError(f"{label}: opened but delivered no frame")
        self.shape = tuple(first.shape)
        self.dtype = first.dtype
        self.fps = 0.0
        self._pending: np.ndarray | None = first

    def _grab(self, out: np.ndarray) -> bool:
        if self._pending is not None:
            np.copyto(out, self._pending)
            self._pending = None
            return True
        ok, img = self._cap.read(image=out)
        if not ok or img is None:
            return False
        if img.shape != out.shape or img.dtype != out.dtype:
            raise SourceError(f"{self.label}: frame size changed from {self.shape} "
                              f"{self.dtype} to {img.shape} {img.dtype}")
        if img is not out and img.ctypes.data != out.ctypes.data:
            np.copyto(out, img)
        return True

    def close(self) -> None:
        self._cap.release()


class VideoSource(_CaptureSource):
    """A video file read through OpenCV; ``loop`` restarts it at the end."""

    on_demand = True

    def __init__(self, path: str | Path, loop: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"video file {path}: no such file")
        cv2 = _cv2()
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise SourceError(f"video file {path}: OpenCV cannot open it (unknown format "
                              f"or codec)")
        super().__init__(cap, f"video file {path}")
        self._loop = loop
        rate = cap.get(cv2.CAP_PROP_FPS)  # 0 or nonsense when the container has none
        self.fps = rate if math.isfinite(rate) and 0 < rate <= 1000 else 0.0
        self.description = (f"video {path}{' (loop)' if loop else ''}"
                            + (f" at {self.fps:g} fps" if self.fps else ""))

    def read_into(self, out: np.ndarray) -> bool:
        if self._grab(out):
            return True
        if not self._loop:
            return False
        self._cap.set(_cv2().CAP_PROP_POS_FRAMES, 0)
        if self._grab(out):
            return True
        raise SourceError(f"{self.label}: could not rewind to loop")


class CameraSource(_CaptureSource):
    """A camera through ``cv2.VideoCapture(index)``. Absent devices fail at open, clearly."""

    on_demand = False  # the device delivers at its rate; a frame read late is stale

    def __init__(self, index: int, width: int = 0, height: int = 0, fps: float = 0) -> None:
        cv2 = _cv2()
        label = f"camera {index}"
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{label}: cannot be opened (no such device, no permission, or "
                              f"in use by another program)")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, width),
                            (cv2.CAP_PROP_FRAME_HEIGHT, height), (cv2.CAP_PROP_FPS, fps)):
            if value:
                cap.set(prop, value)
        super().__init__(cap, label)
        self.description = f"camera {index} {format_shape(self.shape)}"

    def read_into(self, out: np.ndarray) -> bool:
        if not self._grab(out):
            raise SourceError(f"{self.label}: stopped delivering frames")
        return True


# --- HDF5 recordings --------------------------------------------------------------

class H5Source:
    """Replays a recording made by ``record`` (or any (N, ...) HDF5 dataset), frame for
    frame in file order, read straight into the broker's buffer (``read_direct``).

    By default it is paced by the recording's own ``/timestamp_ns`` (see
    :meth:`pacer`), so a problem seen live can be reproduced from its file at the rate it
    happened; ``serve --fps N`` paces it at N instead, and ``timed=False`` (benchmarks)
    replays as fast as it can. Only ``/valid_frames`` frames are replayed, so a recording
    cut short by a crash replays what it holds.
    """

    on_demand = True  # read from a file when asked for

    def __init__(self, path: str | Path, dataset: str = "frames", loop: bool = False,
                 timed: bool = True) -> None:
        import h5py
        import hdf5plugin  # noqa: F401  (registers the filters compressed recordings need)

        from .inspect import open_recording

        path = Path(path)
        label = f"recording {path}"
        if not path.is_file():
            raise SourceError(f"{label}: no such file")
        try:
            self._h5, _ = open_recording(path)
        except OSError as exc:
            raise SourceError(f"{label}: not a readable HDF5 file ({exc})") from None
        dset = self._h5.get(dataset)
        if not isinstance(dset, h5py.Dataset) or dset.ndim < 2:
            names = sorted(k for k, v in self._h5.items() if isinstance(v, h5py.Dataset))
            self._h5.close()
            raise SourceError(f"{label}: no frames dataset {dataset!r} of shape (N, H, ...) "
                              f"(datasets: {', '.join(names) or 'none'})")
        valid = self._h5.get("valid_frames")
        self.count = min(len(dset), int(valid[()])) if dataset == "frames" and valid else len(dset)
        if not self.count:
            self._h5.close()
            raise SourceError(f"{label}: {dataset!r} holds no frames")
        self._dset, self._loop, self._next = dset, loop, 0
        self.shape, self.dtype = tuple(dset.shape[1:]), dset.dtype
        dtype_code(self.dtype)  # a dtype the wire cannot carry fails here, clearly
        ts = self._h5.get("timestamp_ns")
        self._timestamps = (np.asarray(ts[:self.count], dtype=np.int64)
                            if timed and ts is not None and len(ts) >= self.count else None)
        self.description = (f"recording {path}:{dataset} {format_shape(self.shape)} "
                            f"{self.dtype}, {self.count} frames{' (loop)' if loop else ''}")
        self.fps = 0.0  # no fixed rate: it keeps its recorded times (pacer) instead

    def pacer(self) -> "RecordedPacer | None":
        """The recording's own schedule, for a broker with no ``--fps`` of its own."""
        return None if self._timestamps is None else RecordedPacer(self._timestamps)

    def read_into(self, out: np.ndarray) -> bool:
        if self._next >= self.count:
            if not self._loop:
                return False
            self._next = 0
        self._dset.read_direct(out, np.s_[self._next])
        self._next += 1
        return True

    def close(self) -> None:
        self._h5.close()


# --- parsing and pacing -----------------------------------------------------------

def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


SHAPE_FORMS = "HxW or HxWxC with C 1-4, e.g. 480x640 or 480x640x3"


def parse_shape(text: str) -> tuple[int, ...]:
    """'480x640x3' -> (480, 640, 3); raises ValueError naming the accepted forms.

    A frame is an image: rows x columns, optionally x channels (gray+alpha, BGR,
    BGRA); anything else (a 1-D line, a 4-D stack) is refused rather than streamed.
    """
    if not re.fullmatch(r"\d+x\d+(x\d+)?", text.strip()):
        raise ValueError(f"shape {text!r} must be {SHAPE_FORMS}")
    shape = tuple(int(p) for p in text.strip().split("x"))
    if any(d < 1 for d in shape):
        raise ValueError(f"shape {text!r} has a zero dimension; it must be {SHAPE_FORMS}")
    if len(shape) == 3 and not 1 <= shape[2] <= 4:
        raise ValueError(f"shape {text!r} has {shape[2]} channels; it must be {SHAPE_FORMS}")
    return shape


#: sources whose TARGET is the tcp://HOST:PORT of senders on the network
NETWORK_SOURCES = ("imagezmq", "imagezmq-sub", "stream2")


@dataclass(frozen=True)
class SourceSpec:
    """What ``--source`` names: synthetic, video:PATH, camera:INDEX, h5:FILE[:DATASET],
    imagezmq:tcp://HOST:PORT, imagezmq-sub:tcp://HOST:PORT or stream2:tcp://HOST:PORT
    (a DECTRIS detector's Stream V2, see broker/stream2.py)."""

    kind: str
    target: str = ""
    dataset: str = "frames"  # h5 only

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        kind, _, target = text.partition(":")
        if kind == "synthetic" and not target:
            return cls("synthetic")
        if kind == "video" and target:
            return cls("video", target)
        if kind == "camera" and target.isdigit():
            return cls("camera", target)
        if kind == "h5" and target:
            path, _, dataset = target.partition(":")
            if path:
                return cls("h5", path, dataset or "frames")
        if kind in NETWORK_SOURCES and re.fullmatch(r"tcp://[^\s:/]+:\d+", target):
            return cls(kind, target)
        raise ValueError(f"source {text!r} must be 'synthetic', 'video:PATH', 'camera:INDEX', "
                         f"'h5:FILE[:DATASET]', 'imagezmq:tcp://HOST:PORT' (bind, for REQ "
                         f"ImageSenders), 'imagezmq-sub:tcp://HOST:PORT' (a PUB ImageSender) "
                         f"or 'stream2:tcp://HOST:PORT' (a DECTRIS detector's Stream V2)")

    def __str__(self) -> str:
        """The ``--source`` text that names this source again."""
        if self.kind == "synthetic":
            return "synthetic"
        extra = f":{self.dataset}" if self.kind == "h5" and self.dataset != "frames" else ""
        return f"{self.kind}:{self.target}{extra}"


def open_source(spec: SourceSpec, *, shape: tuple[int, ...] = (480, 640, 3),
                dtype: str = "uint8", loop: bool = False, width: int = 0, height: int = 0,
                camera_fps: float = 0, timed: bool = True, sender: str = "",
                max_bytes: int = DEFAULT_MAX_BYTES,
                log: Callable[[str], None] | None = None) -> Source:
    """Open the source ``spec`` names; raises SourceError or ProtocolError with a clear message.
    An imagezmq source waits here for its first frame (``log`` says so)."""
    if spec.kind == "synthetic":
        return SyntheticSource(shape, dtype)
    if spec.kind == "video":
        return VideoSource(spec.target, loop=loop)
    if spec.kind == "h5":
        return H5Source(spec.target, spec.dataset, loop=loop, timed=timed)
    if spec.kind in ("imagezmq", "imagezmq-sub"):
        from .izmq import ImagezmqSource

        return ImagezmqSource(spec.target, subscribe=spec.kind == "imagezmq-sub", sender=sender,
                              max_bytes=max_bytes, log=log)
    if spec.kind == "stream2":
        from .stream2 import Stream2Source  # cbor2 and the codecs only when asked for

        return Stream2Source(spec.target, log=log)
    return CameraSource(int(spec.target), width, height, camera_fps)


def pace_rate(source: Source, requested: float | None) -> float:
    """The rate to pace at: ``requested`` if given (0 = as fast as possible), else the
    source's own (a video file plays at its frame rate, like the camera it recorded)."""
    return source.fps if requested is None else requested


class Pacer:
    """Drift-free frame schedule: frame k is due at t0 + k/fps, not 1/fps after frame k-1.

    A source that falls more than one second behind restarts the schedule instead of
    bursting to catch up, and counts it in ``resyncs``.
    """

    def __init__(self, fps: float) -> None:
        if fps < 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be >= 0 (0 = as fast as possible), got {fps}")
        self.period = 1.0 / fps if fps else 0.0
        self.resyncs = 0
        self.reset()

    def reset(self) -> None:
        """Start a new schedule now (on start and after a pause)."""
        self._t0 = time.perf_counter()
        self._k = 0

    def wait_time(self) -> float:
        """Seconds until the next frame is due (0 when due or unpaced)."""
        if not self.period:
            return 0.0
        late = time.perf_counter() - (self._t0 + self._k * self.period)
        if late > 1.0:
            self.resyncs += 1
            self.reset()
            return 0.0
        return max(0.0, -late)

    def tick(self) -> None:
        """A frame was produced."""
        self._k += 1


class RecordedPacer(Pacer):
    """A recording's own schedule: frame k is due at t0 + (ts[k] - ts[0]), every lap of a
    looped replay the same. Like :class:`Pacer`, it restarts the schedule (counted in
    ``resyncs``) rather than burst when the broker falls more than a second behind."""

    def __init__(self, timestamps_ns: np.ndarray) -> None:
        offsets = (timestamps_ns - timestamps_ns[0]) / 1e9
        # a lap ends one median interval after its last frame
        step = float(np.median(np.diff(offsets))) if len(offsets) > 1 else 0.0
        self._offsets, self._lap = np.maximum.accumulate(offsets), offsets[-1] + max(step, 0.0)
        super().__init__(0.0)
        self.period = 1.0  # "paced" for wait_time; the offsets give the times

    def reset(self) -> None:
        k = getattr(self, "_k", 0)
        self._t0 = time.perf_counter() - self._due(k)  # after a pause: on from frame k
        self._k = k

    def _due(self, k: int) -> float:
        laps, i = divmod(k, len(self._offsets))
        return laps * self._lap + float(self._offsets[i])

    def wait_time(self) -> float:
        late = time.perf_counter() - (self._t0 + self._due(self._k))
        if late > 1.0:
            self.resyncs += 1
            self._t0 += late  # the schedule goes on from now, without a burst
            return 0.0
        return max(0.0, -late)
