"""HDF5 recording: frames in, crash-safe HDF5 files out, independent of networking.

File layout (one file, or one per rotation part)::

    /frames        (N, H, W[, C]) in the frame's own dtype, chunks (chunk_frames, H, W[, C])
    /frame_id      (N,) uint64       ids of the frames, in file order
    /timestamp_ns  (N,) uint64       the sender's timestamps
    /gaps          (M, 2) uint64     [first_missing_id, count] ranges of ids never written
    /valid_frames  () uint64         how many leading frames are complete (see below)

and root attributes ``stream, source, shape, dtype, start_time, start_time_ns,
frames_expected (-1 = unknown), compression, compression_level, chunk_frames, software,
writer_host, writer_pid, file_index`` set at creation (and a group ``/source`` whose
attributes are what the source reported about the frames: a Stream V2 series' start
fields, ``status.source_detail.series``), and ``frames_written,
frames_missed, first_frame_id, complete`` set when the file is closed (``complete`` = 1)
or recovered (``complete`` stays 0). A shard of a sharded recording (``shard=``, see
broker/shards.py) also has ``shard_index, shard_count, shard_block``; it holds only the
ids its shard owns, and its ``/gaps`` lists only missing ids of its own shard.

**How many frames are valid.** ``/valid_frames`` is the authority while the file is being
written and after a crash; in a closed file it equals ``len(/frame_id)`` and
``len(/frames)``. ``/frames`` grows in blocks of ``grow_frames`` (or is preallocated to
``frames_expected``) and ``/frame_id``, ``/timestamp_ns`` are resized at each flush, but
none of these extents is safe to trust after a crash: HDF5 can write a dataset's new
extent before the superblock's end-of-allocation, and a reader then fails on the newest
chunks ("addr overflow"; 3 of 32 test kills did that before this scheme). So each flush
first writes and flushes everything, and only then writes the count into the scalar
``/valid_frames``, whose storage was allocated at creation and is rewritten in place.
SWMR readers see it with ``refresh()``; root attributes cannot be refreshed, which is why
they are final-only.

**Crash safety.** With ``swmr=True`` (the default: a flush every 64 frames costs nothing
measurable) the file is created with the v110 file format (the oldest that supports SWMR,
so HDF5 1.10 tools such as Debian's h5dump can read it) and switched to SWMR mode; HDF5
then orders its metadata writes so that the file on disk is always consistent. After a
``kill -9`` the file opens with ``h5py.File(path, "r", swmr=True)`` and holds every frame
up to the last flush. A plain ``h5py.File(path, "r")`` refuses it ("file is already open
for write") until :func:`recover` clears the writer's mark and trims it, like
``h5clear -s``. With ``swmr=False`` the file uses HDF5's default format, which has no such
mark, but HDF5 may have written metadata half-way between flushes: it is not crash-safe.

**Rotation.** With ``max_frames_per_file`` or ``max_bytes_per_file`` set, the ``path``
given is never created: the parts are ``STEM_00001.h5``, ``STEM_00002.h5``, ... next to
it (same suffix), so they sort by name; frame ids run on across parts and each part's
``first_frame_id`` / ``file_index`` say where it belongs. ``max_bytes_per_file`` counts raw
frame bytes: the split points are predictable, and the stored size stays below it (plus
metadata, and a header per chunk for incompressible data: Blosc then stores the chunk
raw, Bitshuffle/Zstd/deflate grow it by well under 1%).

**Compression.** Every chunk goes to disk with ``write_direct_chunk``. lz4 (Blosc-LZ4 with
byte shuffle), bslz4 (Bitshuffle-LZ4) and zstd (plain Zstandard) are compressed by calling
the filter function of hdf5plugin's own HDF5 plugin library through ctypes, with the
``cd_values`` HDF5 computed for the dataset: the bytes are exactly what the filter pipeline
would store, and ctypes releases the GIL, so a small thread pool compresses chunks ahead of
the writes. gzip uses :func:`zlib.compress`, the zlib stream HDF5's deflate filter stores.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import os
import queue
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import h5py
import hdf5plugin
import numpy as np

from . import __version__
from . import protocol as proto
from .choices import COMPRESSIONS
from .hops import Hop

#: level used when ``level`` is None; gzip defaults to 1 because higher levels run at
#: single-digit frames/s on 1080p camera content here.
DEFAULT_LEVELS: dict[str, int | None] = {"none": None, "lz4": 5, "bslz4": None, "zstd": 3,
                                         "gzip": 1}
_ID_CHUNK = 4096  # elements per chunk of /frame_id and /timestamp_ns (32 KiB)
_PLUGIN_NAMES = {"lz4": "blosc", "bslz4": "bshuf", "zstd": "zstd"}


class RecorderError(RuntimeError):
    """A recording that cannot start or continue; the message names the file and the cause."""


# --- codecs -------------------------------------------------------------------------

class _H5ZClass2(ctypes.Structure):
    """HDF5's H5Z_class2_t, which every filter plugin returns from H5PLget_plugin_info."""

    _fields_ = [("version", ctypes.c_int), ("id", ctypes.c_int),
                ("encoder_present", ctypes.c_uint), ("decoder_present", ctypes.c_uint),
                ("name", ctypes.c_char_p), ("can_apply", ctypes.c_void_p),
                ("set_local", ctypes.c_void_p), ("filter", ctypes.c_void_p)]


#: size_t H5Z_func_t(unsigned flags, size_t cd_nelmts, const unsigned cd_values[],
#:                   size_t nbytes, size_t *buf_size, void **buf)
_FilterFunc = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_uint, ctypes.c_size_t,
                               ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                               ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p))

# The plugins free the input buffer and return one from malloc (they link libc's
# malloc/free, as HDF5's pipeline expects), so chunk buffers come from the same place.
_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.restype = None
_libc.free.argtypes = [ctypes.c_void_p]


@functools.cache
def _plugin_filter(plugin: str) -> tuple[Callable[..., int], int]:
    """The compress function and filter id of hdf5plugin's plugin ``plugin`` (e.g. 'bshuf')."""
    lib_path = hdf5plugin.get_config().registered_filters.get(plugin)
    if lib_path is None:
        raise RecorderError(f"this hdf5plugin build has no {plugin!r} filter")
    lib = ctypes.CDLL(lib_path)  # already loaded by hdf5plugin: same handle, same globals
    lib.H5PLget_plugin_info.restype = ctypes.POINTER(_H5ZClass2)
    info = lib.H5PLget_plugin_info().contents
    if info.version != 1 or not info.encoder_present or not info.filter:
        raise RecorderError(f"hdf5plugin's {plugin!r} plugin ({lib_path}) has no usable "
                            f"encoder (H5Z_class_t version {info.version})")
    return _FilterFunc(info.filter), info.id


class _Chunk:
    """One chunk's bytes in a malloc'd buffer, so that a filter plugin may take it over."""

    __slots__ = ("ptr", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.ptr = _libc.malloc(nbytes)
        if not self.ptr:
            raise MemoryError(f"cannot allocate a {nbytes}-byte chunk buffer")
        self.nbytes = nbytes

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array over the buffer (valid until the buffer is freed)."""
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def copy(self) -> "_Chunk":
        other = _Chunk(self.nbytes)
        ctypes.memmove(other.ptr, self.ptr, self.nbytes)
        return other

    def free(self) -> None:
        if self.ptr:
            _libc.free(self.ptr)
            self.ptr = None


class _Encoded:
    """A chunk ready for ``write_direct_chunk``: its bytes, filter mask and owner."""

    __slots__ = ("data", "nbytes", "filter_mask", "_ptr")

    def __init__(self, data: Any, nbytes: int, filter_mask: int, ptr: int | None) -> None:
        self.data, self.nbytes, self.filter_mask, self._ptr = data, nbytes, filter_mask, ptr

    @classmethod
    def from_malloc(cls, ptr: int, nbytes: int, filter_mask: int) -> "_Encoded":
        return cls((ctypes.c_uint8 * nbytes).from_address(ptr), nbytes, filter_mask, ptr)

    def release(self) -> None:
        if self._ptr:
            _libc.free(self._ptr)
            self._ptr = None
        self.data = None


class _Codec:
    """How one ``compression`` choice is declared on the dataset and applied to a chunk."""

    name = "none"

    def dataset_kwargs(self) -> dict[str, Any]:
        return {}

    def bind(self, dset: h5py.Dataset) -> None:
        """Learn the dataset's filter parameters (after HDF5's set_local ran)."""

    def encode(self, chunk: _Chunk) -> _Encoded:
        """Compress ``chunk``, taking ownership of it; runs in a worker thread."""
        raise NotImplementedError


class _PluginCodec(_Codec):
    """An hdf5plugin filter called directly: the exact bytes the HDF5 pipeline would store."""

    def __init__(self, name: str, plugin: str, filter_args: Any) -> None:
        self.name = name
        self._filter, self._id = _plugin_filter(plugin)
        self._args = filter_args
        self._cd: ctypes.Array | None = None

    def dataset_kwargs(self) -> dict[str, Any]:
        return dict(self._args)

    def bind(self, dset: h5py.Dataset) -> None:
        plist = dset.id.get_create_plist()
        code, _flags, cd_values, _name = plist.get_filter(0)
        if code != self._id:
            raise RecorderError(f"expected filter {self._id} on {dset.name}, found {code}")
        self._cd = (ctypes.c_uint * len(cd_values))(*cd_values)

    def encode(self, chunk: _Chunk) -> _Encoded:
        buf = ctypes.c_void_p(chunk.ptr)
        size = ctypes.c_size_t(chunk.nbytes)
        out = self._filter(0, len(self._cd), self._cd, chunk.nbytes, ctypes.byref(size),
                           ctypes.byref(buf))
        if out == 0:
            # The filter declined (output would not be smaller) and left the input alone;
            # HDF5 then stores the chunk raw with the filter's bit set in the chunk's mask,
            # because hdf5plugin filters are optional. Do the same.
            ptr, chunk.ptr = chunk.ptr, None
            return _Encoded.from_malloc(ptr, chunk.nbytes, 1)
        chunk.ptr = None  # freed by the filter
        return _Encoded.from_malloc(buf.value, out, 0)


class _DeflateCodec(_Codec):
    """HDF5's built-in deflate filter (id 1) stores a zlib stream, as zlib.compress makes."""

    name = "gzip"

    def __init__(self, level: int) -> None:
        self._level = level

    def dataset_kwargs(self) -> dict[str, Any]:
        return {"compression": "gzip", "compression_opts": self._level}

    def encode(self, chunk: _Chunk) -> _Encoded:
        try:
            raw = (ctypes.c_uint8 * chunk.nbytes).from_address(chunk.ptr)
            data = zlib.compress(raw, self._level)
        finally:
            chunk.free()
        return _Encoded(data, len(data), 0, None)


def _use_blosc_threads(threads: int) -> None:
    """c-blosc 1 compresses under one global lock, so pool threads would only take turns:
    let blosc split each chunk across ``threads`` threads instead. This is a process-wide
    setting of hdf5plugin's blosc library (reading Blosc datasets gets faster too)."""
    lib = ctypes.CDLL(hdf5plugin.get_config().registered_filters["blosc"])
    if lib.blosc_get_nthreads() < threads:
        lib.blosc_set_nthreads(threads)


def _make_codec(compression: str, level: int | None, threads: int) -> _Codec | None:
    """The codec for ``compression`` (None for uncompressed); RecorderError if invalid."""
    if compression not in COMPRESSIONS:
        raise RecorderError(f"compression {compression!r} must be one of "
                            f"{', '.join(COMPRESSIONS)}")
    if compression in ("none", "bslz4"):
        if level is not None:
            raise RecorderError(f"compression {compression!r} takes no level")
        if compression == "none":
            return None
    level = DEFAULT_LEVELS[compression] if level is None else int(level)
    try:
        if compression == "lz4":
            args = hdf5plugin.Blosc(cname="lz4", clevel=level, shuffle=hdf5plugin.Blosc.SHUFFLE)
        elif compression == "bslz4":
            args = hdf5plugin.Bitshuffle(cname="lz4")
        elif compression == "zstd":
            args = hdf5plugin.Zstd(clevel=level)
        else:
            if not 0 <= level <= 9:
                raise ValueError("gzip level must be in the range [0, 9]")
            return _DeflateCodec(level)
    except ValueError as exc:
        raise RecorderError(f"compression {compression!r}: {exc}") from None
    codec = _PluginCodec(compression, _PLUGIN_NAMES[compression], args)
    if compression == "lz4":
        _use_blosc_threads(threads)
    return codec


# --- the writer ---------------------------------------------------------------------

def part_path(path: Path, index: int) -> Path:
    """Rotation part ``index`` (1-based) of recording ``path``: OUT.h5 -> OUT_00001.h5."""
    return path.with_name(f"{path.stem}_{index:05d}{path.suffix}")


def _h5_call(what: str, path: Path, fn: Callable[..., Any], *args: Any) -> Any:
    """Run an h5py call, turning its OSError/RuntimeError (disk full, ...) into RecorderError."""
    try:
        return fn(*args)
    except (OSError, RuntimeError, ValueError) as exc:
        message = " ".join(str(exc).split())  # HDF5 messages carry newlines
        raise RecorderError(f"{path}: {what} failed: {message}") from exc


class _PartFile:
    """One open HDF5 file of a recording and what has been written to it."""

    def __init__(self, path: Path, index: int, first_id: int | None) -> None:
        self.path = path
        self.index = index
        self.h5: h5py.File | None = None
        self.frames: h5py.Dataset | None = None
        self.ids_ds: h5py.Dataset | None = None
        self.valid_ds: h5py.Dataset | None = None
        self.ts_ds: h5py.Dataset | None = None
        self.gaps_ds: h5py.Dataset | None = None
        self.capacity = 0
        self.count = 0           # frames appended (some may still be buffered)
        self.flushed = 0         # frames durable in the file
        self.raw_bytes = 0
        self.ids: list[int] = []  # ids/timestamps not yet flushed
        self.ts: list[int] = []
        self.gaps: list[list[int]] = []
        self.gaps_dirty = False
        self.missed = 0
        self.first_id = first_id


class RecordingWriter:
    """Writes frames of one stream into HDF5 files (see the module docstring for the layout).

    Frames must arrive with increasing ids; a jump records the missing ids in ``/gaps``.
    ``write`` flushes by itself every ``flush_frames`` frames or ``flush_seconds`` seconds;
    ``close`` trims the datasets to the frames written and is idempotent. The writer is not
    thread-safe: use one thread, or :class:`ThreadedRecorder` to decouple a receive loop.

    Counters: ``frames_written``, ``frames_flushed``, ``frames_missed``, ``bytes_written``
    (raw), ``bytes_stored`` (after compression, chunk padding included), ``files``.
    """

    def __init__(self, *, path: str | Path, shape: tuple[int, ...], dtype: str | np.dtype,
                 stream: str = "", source: str = "", frames_expected: int | None = None,
                 chunk_frames: int = 1, grow_frames: int = 1024, compression: str = "none",
                 level: int | None = None, swmr: bool = True, flush_frames: int = 64,
                 flush_seconds: float = 1.0, max_frames_per_file: int = 0,
                 max_bytes_per_file: int = 0, overwrite: bool = False,
                 compress_threads: int = 2, shard: proto.Shard | None = None,
                 source_attrs: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        _check_config(self.shape, frames_expected, chunk_frames, grow_frames, flush_frames,
                      flush_seconds, max_frames_per_file, max_bytes_per_file, compress_threads)
        self.stream, self.source = stream, source
        self.frames_expected = frames_expected
        self.chunk_frames, self.grow_frames = chunk_frames, grow_frames
        self.compression = compression
        self._codec = _make_codec(compression, level, compress_threads)
        self.level = None if self._codec is None else (
            DEFAULT_LEVELS[compression] if level is None else level)
        self.swmr = swmr
        self.flush_frames, self.flush_seconds = flush_frames, flush_seconds
        self.max_frames_per_file, self.max_bytes_per_file = max_frames_per_file, max_bytes_per_file
        self.overwrite = overwrite
        self.shard = shard
        self.source_attrs = dict(source_attrs or {})
        self.frame_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._chunk_shape = (chunk_frames,) + self.shape

        self.frames_written = 0
        self.frames_flushed = 0
        self.frames_missed = 0
        self.bytes_written = 0
        self.bytes_stored = 0
        self.files: list[Path] = []

        self._next_id: int | None = None   # the id the next frame should have
        self._closed = False
        self._failed: RecorderError | None = None
        self._last_flush = time.monotonic()
        self._fill = 0                      # frames in the current, unwritten chunk
        self._plain_chunk: np.ndarray | None = None   # uncompressed chunk_frames > 1
        self._chunk: _Chunk | None = None             # compressed: malloc'd chunk buffer
        self._pending: deque[tuple[int, Future, bool]] = deque()
        self._partial_stored: tuple[int, int] | None = None  # (chunk index, bytes) rewritable
        self._pool = (ThreadPoolExecutor(compress_threads, thread_name_prefix="fb-compress")
                      if self._codec is not None else None)
        self._max_inflight = 2 * compress_threads

        self._check_targets()
        self._part: _PartFile = self._open_part(1, None)

    # --- public API ---------------------------------------------------------------

    def write(self, frame_id: int, timestamp_ns: int, frame: np.ndarray) -> None:
        """Append one frame. The frame is copied or written before this returns."""
        self._check_usable()
        frame = self._checked_frame(frame)
        frame_id = int(frame_id)
        if self._rotation_due():
            self._guarded(self._rotate)
        self._account_id(frame_id)
        part = self._part
        self._guarded(self._append, frame)
        part.ids.append(frame_id)
        part.ts.append(int(timestamp_ns))
        part.count += 1
        part.raw_bytes += self.frame_bytes
        self.frames_written += 1
        self.bytes_written += self.frame_bytes
        self.maybe_flush()

    def add_gap(self, first: int, count: int) -> None:
        """Declare ids ``first .. first+count-1`` missing (e.g. frames dropped before the
        writer saw them). Ids between the last one seen and ``first`` are missing too."""
        self._check_usable()
        first, count = int(first), int(count)
        if count < 1:
            raise RecorderError(f"gap count must be >= 1, got {count}")
        if self._next_id is not None and first < self._next_id:
            raise RecorderError(f"gap starting at id {first} overlaps ids already accounted "
                                f"for (next expected id is {self._next_id})")
        self._account_id(first)
        self._record_gap(first, count)
        self._next_id = first + count

    def maybe_flush(self) -> bool:
        """Flush if ``flush_frames`` frames or ``flush_seconds`` passed since the last flush.
        ``write`` calls it; call it when idle so a slow stream still reaches the disk."""
        self._check_usable()
        part = self._part
        pending = part.count > part.flushed or part.gaps_dirty
        due = (part.count - part.flushed >= self.flush_frames
               or (pending and time.monotonic() - self._last_flush >= self.flush_seconds))
        if due:
            self.flush()
        return due

    def flush(self) -> None:
        """Make every frame written so far durable and visible to readers (len(/frame_id))."""
        self._check_usable()
        self._guarded(self._flush_part, self._part)

    def close(self) -> None:
        """Finish the current file: flush, trim to the frames written, final attributes.
        Idempotent. After a failed write the file is left as of its last flush, as after a
        crash (see :func:`_abandon`); the error itself was raised by the failing call."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failed is None:
                self._guarded(self._finish_part, self._part)
        finally:
            self._release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- validation -----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RecorderError(f"recording stopped after an earlier error: {self._failed}")
        if self._closed:
            raise RecorderError(f"{self.path}: recording is closed")

    def _checked_frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.shape != self.shape or frame.dtype != self.dtype:
            raise RecorderError(f"{self.path}: frame is {frame.shape} {frame.dtype}, the "
                                f"recording is {self.shape} {self.dtype}")
        return np.ascontiguousarray(frame)

    def _account_id(self, frame_id: int) -> None:
        """Record the ids skipped before ``frame_id``; reject ids that go backwards."""
        part = self._part
        if self._next_id is None:
            self._next_id = frame_id
        if frame_id < self._next_id:
            raise RecorderError(f"{part.path}: frame id {frame_id} does not increase (next "
                                f"expected id is {self._next_id})")
        if frame_id > self._next_id:
            self._record_gap(self._next_id, frame_id - self._next_id)
        if part.first_id is None:
            part.first_id = self._next_id
        self._next_id = frame_id + 1

    def _record_gap(self, first: int, count: int) -> None:
        """Declare ids missing; a shard counts only the ids it owns."""
        if self.shard is None:
            self._record_range(first, count)
            return
        for a, n in self.shard.ranges(first, count):
            self._record_range(a, n)

    def _record_range(self, first: int, count: int) -> None:
        part = self._part
        if part.first_id is None:
            part.first_id = first
        if part.gaps and part.gaps[-1][0] + part.gaps[-1][1] == first:
            part.gaps[-1][1] += count
        else:
            part.gaps.append([first, count])
        part.gaps_dirty = True
        part.missed += count
        self.frames_missed += count

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn``; on failure remember it so the writer refuses further work."""
        try:
            fn(*args)
        except RecorderError as exc:
            self._failed = exc
            raise
        except MemoryError as exc:
            self._failed = RecorderError(f"{self._part.path}: out of memory: {exc}")
            raise self._failed from exc

    # --- files --------------------------------------------------------------------

    def _rotating(self) -> bool:
        return bool(self.max_frames_per_file or self.max_bytes_per_file)

    def _check_targets(self) -> None:
        """Fail before touching anything: missing directory, or files that would be replaced."""
        parent = self.path.parent
        if not parent.exists():
            raise RecorderError(f"{self.path}: directory {parent} does not exist")
        if not parent.is_dir():
            raise RecorderError(f"{self.path}: {parent} is not a directory")
        if self.path.is_dir():
            raise RecorderError(f"{self.path}: is a directory")
        if self.overwrite:
            return
        existing = (sorted(parent.glob(f"{self.path.stem}_[0-9][0-9][0-9][0-9][0-9]"
                                       f"{self.path.suffix}"))
                    if self._rotating() else [self.path] if self.path.exists() else [])
        if existing:
            raise RecorderError(f"{existing[0]}: file exists (pass overwrite=True to "
                                f"replace the recording)")

    def _open_part(self, index: int, first_id: int | None) -> _PartFile:
        path = part_path(self.path, index) if self._rotating() else self.path
        part = _PartFile(path, index, first_id)
        mode = "w" if self.overwrite else "w-"
        libver = ("v110", "v110") if self.swmr else None
        try:
            part.h5 = h5py.File(path, mode, libver=libver)
        except FileExistsError:
            raise RecorderError(f"{path}: file exists (pass overwrite=True to replace "
                                f"it)") from None
        except OSError as exc:
            raise RecorderError(f"{path}: cannot create the file: {exc}") from exc
        try:
            self._create_layout(part)
        except (OSError, RuntimeError, ValueError) as exc:
            part.h5.close()
            raise RecorderError(f"{path}: cannot create the datasets: {exc}") from exc
        self.files.append(path)
        return part

    def _create_layout(self, part: _PartFile) -> None:
        """Datasets and every attribute first: SWMR mode allows no new objects later."""
        h5 = part.h5
        part.capacity = self.frames_expected or self.grow_frames
        kwargs = self._codec.dataset_kwargs() if self._codec else {}
        part.frames = h5.create_dataset(
            "frames", shape=(part.capacity,) + self.shape, maxshape=(None,) + self.shape,
            chunks=self._chunk_shape, dtype=self.dtype, **kwargs)
        if self._codec is not None:
            self._codec.bind(part.frames)
        for name in ("timestamp_ns", "frame_id"):
            ds = h5.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(_ID_CHUNK,),
                                   dtype="u8")
            setattr(part, "ts_ds" if name == "timestamp_ns" else "ids_ds", ds)
        part.gaps_ds = h5.create_dataset("gaps", shape=(0, 2), maxshape=(None, 2),
                                         chunks=(256, 2), dtype="u8")
        part.valid_ds = h5.create_dataset("valid_frames", data=np.uint64(0))  # allocated now
        now = _dt.datetime.now(_dt.timezone.utc)
        attrs = h5.attrs
        attrs["stream"] = self.stream
        attrs["source"] = self.source
        attrs["shape"] = np.array(self.shape, dtype=np.int64)
        attrs["dtype"] = self.dtype.name
        attrs["start_time"] = now.isoformat()
        attrs["start_time_ns"] = np.int64(time.time_ns())
        attrs["frames_expected"] = np.int64(-1 if self.frames_expected is None
                                            else self.frames_expected)
        attrs["compression"] = self.compression
        attrs["compression_level"] = np.int64(-1 if self.level is None else self.level)
        attrs["chunk_frames"] = np.int64(self.chunk_frames)
        attrs["software"] = f"framebroker {__version__}"
        attrs["writer_host"] = socket.gethostname()
        attrs["writer_pid"] = np.int64(os.getpid())
        attrs["file_index"] = np.int64(part.index)
        if self.shard is not None:
            attrs["shard_index"] = np.int64(self.shard.index)
            attrs["shard_count"] = np.int64(self.shard.count)
            attrs["shard_block"] = np.int64(self.shard.block)
        for name in ("frames_written", "frames_missed", "complete"):
            attrs[name] = np.int64(0)
        attrs["first_frame_id"] = np.int64(-1)
        if self.source_attrs:  # what the source said about the frames (a detector series)
            source = h5.create_group("source")
            for key, value in self.source_attrs.items():
                source.attrs[key] = value
        if self.swmr:
            h5.swmr_mode = True

    def _rotation_due(self) -> bool:
        part = self._part
        if part.count == 0:
            return False
        if self.max_frames_per_file and part.count >= self.max_frames_per_file:
            return True
        return bool(self.max_bytes_per_file
                    and part.raw_bytes + self.frame_bytes > self.max_bytes_per_file)

    def _rotate(self) -> None:
        old = self._part
        self._finish_part(old)
        self._part = self._open_part(old.index + 1, self._next_id)

    def _finish_part(self, part: _PartFile) -> None:
        self._flush_part(part)
        self._fill = 0  # the next part starts a new chunk; stale slots get overwritten
        self._partial_stored = None
        if part.frames.shape[0] != part.count:
            _h5_call("trimming /frames", part.path, part.frames.resize, part.count, 0)
        _h5_call("writing the final attributes", part.path, _final_attrs, part.h5.attrs,
                 part.count, part.missed, part.first_id, True)
        _h5_call("closing", part.path, part.h5.close)
        part.h5 = None

    def _release(self) -> None:
        """Free buffers, stop the pool and close the file without further writes."""
        for _idx, fut, _partial in self._pending:
            fut.add_done_callback(lambda f: f.exception() or f.result().release())
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._chunk is not None:
            self._chunk.free()
            self._chunk = None
        if self._part.h5 is not None:
            _abandon(self._part)

    # --- chunks -------------------------------------------------------------------

    def _append(self, frame: np.ndarray) -> None:
        """Put ``frame`` into the current chunk and hand the chunk on when it is full."""
        part = self._part
        pos = part.count
        self._ensure_capacity(part, pos + 1)
        slot = pos % self.chunk_frames
        chunk_index = pos // self.chunk_frames
        if self._codec is None and self.chunk_frames == 1:
            self._write_plain(part, chunk_index, frame)
        elif self._codec is None:
            if self._plain_chunk is None:
                self._plain_chunk = np.empty(self._chunk_shape, self.dtype)
            self._plain_chunk[slot] = frame
            if slot == self.chunk_frames - 1:
                self._write_plain(part, chunk_index, self._plain_chunk)
        else:
            if self._chunk is None:
                self._chunk = _Chunk(self.frame_bytes * self.chunk_frames)
            self._chunk.view(self.dtype, self._chunk_shape)[slot] = frame
            if slot == self.chunk_frames - 1:
                chunk, self._chunk = self._chunk, None
                self._submit(part, chunk_index, chunk, partial=False)
        self._fill = (slot + 1) % self.chunk_frames

    def _write_partial_chunk(self, part: _PartFile) -> None:
        """Write the unfinished chunk, zero-padded; it is written again once full."""
        chunk_index = part.count // self.chunk_frames
        if self._codec is None:
            self._plain_chunk[self._fill:] = 0
            self._write_plain(part, chunk_index, self._plain_chunk, partial=True)
            return
        self._chunk.view(self.dtype, self._chunk_shape)[self._fill:] = 0
        self._submit(part, chunk_index, self._chunk.copy(), partial=True)

    def _ensure_capacity(self, part: _PartFile, needed: int) -> None:
        """Grow /frames in blocks, never per frame (write_direct_chunk needs the extent)."""
        if needed <= part.capacity:
            return
        part.capacity = max(needed, part.capacity + self.grow_frames)
        _h5_call("growing /frames", part.path, part.frames.resize, part.capacity, 0)

    def _submit(self, part: _PartFile, chunk_index: int, chunk: _Chunk, partial: bool) -> None:
        """Compress in the pool; write finished chunks in order, keeping a few in flight."""
        self._pending.append((chunk_index, self._pool.submit(self._codec.encode, chunk),
                              partial))
        self._drain(part, self._max_inflight)

    def _drain(self, part: _PartFile, limit: int) -> None:
        while len(self._pending) > limit:
            chunk_index, fut, partial = self._pending.popleft()
            try:
                encoded = fut.result()
            except Exception as exc:
                raise RecorderError(f"{part.path}: compressing chunk {chunk_index} failed: "
                                    f"{exc}") from exc
            try:
                self._store(part, chunk_index, encoded.data, encoded.nbytes,
                            encoded.filter_mask, partial)
            finally:
                encoded.release()

    def _write_plain(self, part: _PartFile, chunk_index: int, data: np.ndarray,
                     partial: bool = False) -> None:
        self._store(part, chunk_index, data, data.nbytes, 0, partial)

    def _store(self, part: _PartFile, chunk_index: int, data: Any, nbytes: int,
               filter_mask: int, partial: bool) -> None:
        offset = (chunk_index * self.chunk_frames,) + (0,) * len(self.shape)
        _h5_call(f"writing chunk {chunk_index}", part.path,
                 part.frames.id.write_direct_chunk, offset, data, filter_mask)
        if self._partial_stored is not None and self._partial_stored[0] == chunk_index:
            self.bytes_stored -= self._partial_stored[1]  # replaced in the file
        self._partial_stored = (chunk_index, nbytes) if partial else None
        self.bytes_stored += nbytes

    # --- flushing -----------------------------------------------------------------

    def _flush_part(self, part: _PartFile) -> None:
        """Everything to disk (H5Fflush, which also records the new end of allocation),
        and only then the new count into /valid_frames."""
        if self._fill:
            self._write_partial_chunk(part)
        self._drain(part, 0)
        h5 = part.h5
        _h5_call("flushing /frames", part.path, part.frames.flush)
        n = part.count
        if n > part.flushed:
            for ds, values in ((part.ts_ds, part.ts), (part.ids_ds, part.ids)):
                _h5_call(f"writing {ds.name}", part.path, _extend, ds, part.flushed,
                         np.asarray(values, dtype=np.uint64))
            part.ids.clear()
            part.ts.clear()
        if part.gaps_dirty:
            _h5_call("writing /gaps", part.path, self._rewrite_gaps, part)
        _h5_call("flushing", part.path, h5.flush)
        _h5_call("publishing /valid_frames", part.path, _publish, part.valid_ds, n)
        self.frames_flushed += n - part.flushed
        part.flushed = n
        self._last_flush = time.monotonic()

    @staticmethod
    def _rewrite_gaps(part: _PartFile) -> None:
        rows = np.asarray(part.gaps, dtype=np.uint64).reshape(-1, 2)
        part.gaps_ds.resize(rows.shape)
        part.gaps_ds[...] = rows
        part.gaps_dirty = False


def _extend(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Write ``values`` at ``start`` of a 1-D dataset, growing it, and flush it."""
    ds.resize((start + len(values),))
    ds[start:] = values
    ds.flush()


def _publish(valid_ds: h5py.Dataset, n: int) -> None:
    """The new valid count, written in place (its storage was allocated at creation)."""
    valid_ds[()] = n
    valid_ds.flush()


def _abandon(part: _PartFile) -> None:
    """Release a file after a failed write without letting HDF5 write any more to it.

    Closing normally would flush metadata that points at space the failed writes never
    filled (after ENOSPC the superblock then claims a longer file than exists, and HDF5
    refuses it as truncated). Swapping a read-only descriptor under HDF5's file
    descriptor makes those last writes fail instead, so the file stays as of the last
    flush, exactly as after a crash: readable in SWMR mode, and by :func:`recover`.
    """
    try:
        fd = part.h5.id.get_vfd_handle()
        readonly = os.open(part.path, os.O_RDONLY)
        try:
            os.dup2(readonly, fd)
        finally:
            os.close(readonly)
    except (OSError, RuntimeError, ValueError):
        pass  # the handle is already gone: nothing more can be written through it
    try:
        part.h5.close()
    except (OSError, RuntimeError):
        pass  # expected: the flush at close fails; the original error was raised already
    part.h5 = None


def _final_attrs(attrs: h5py.AttributeManager, frames: int, missed: int,
                 first_id: int | None, complete: bool) -> None:
    attrs["frames_written"] = np.int64(frames)
    attrs["frames_missed"] = np.int64(missed)
    attrs["first_frame_id"] = np.int64(-1 if first_id is None else first_id)
    attrs["complete"] = np.int64(complete)


def _check_config(shape: tuple[int, ...], frames_expected: int | None, chunk_frames: int,
                  grow_frames: int, flush_frames: int, flush_seconds: float,
                  max_frames_per_file: int, max_bytes_per_file: int,
                  compress_threads: int) -> None:
    """RecorderError naming the first argument that makes no sense."""
    rules = [
        (1 <= len(shape) <= 4 and all(d >= 1 for d in shape),
         f"shape must have 1-4 positive dimensions, got {shape}"),
        (frames_expected is None or frames_expected >= 1,
         f"frames_expected must be None (unknown) or >= 1, got {frames_expected}"),
        (chunk_frames >= 1, f"chunk_frames must be >= 1, got {chunk_frames}"),
        (grow_frames >= 1, f"grow_frames must be >= 1, got {grow_frames}"),
        (flush_frames >= 1, f"flush_frames must be >= 1, got {flush_frames}"),
        (flush_seconds > 0, f"flush_seconds must be > 0, got {flush_seconds}"),
        (max_frames_per_file >= 0, f"max_frames_per_file must be >= 0, got "
                                   f"{max_frames_per_file}"),
        (max_bytes_per_file >= 0, f"max_bytes_per_file must be >= 0, got {max_bytes_per_file}"),
        (compress_threads >= 1, f"compress_threads must be >= 1, got {compress_threads}"),
    ]
    for ok, message in rules:
        if not ok:
            raise RecorderError(message)


# --- after a crash --------------------------------------------------------------------

def recover(path: str | Path) -> int:
    """Make a file whose writer died readable by plain ``h5py.File(path)``; return its
    valid frame count.

    Clears the "open for writing" mark in the superblock (what ``h5clear -s -i`` does, through
    HDF5's own ``clear_status_flags`` file-access property), trims /frames, /timestamp_ns
    and /frame_id to ``/valid_frames`` and sets the final attributes; ``complete`` stays 0
    so the file still says it was not closed by its writer. /gaps is kept as found: after
    a crash it may also hold ranges recorded after the last valid frame. Refuses a file whose
    writing process is still alive on this host: a SWMR writer holds no file lock, and
    clearing its mark under it would corrupt the file.

    It never leaves a file less readable than it found it: a recovery that fails half-way
    (the disk full) would leave one that neither SWMR nor plain HDF5 opens, so it first
    checks that the file can grow by ``_RECOVER_ROOM`` bytes (it needs about 1 KiB) and
    refuses otherwise, and if it fails anyway it puts the superblock and the size back.
    """
    path = Path(path)
    if not path.is_file():
        raise RecorderError(f"{path}: no such file")
    _check_writer_gone(path)
    _check_room(path, _RECOVER_ROOM)
    backup = _Backup(path)
    try:
        _clear_status_flags(path)
        n = _trim(path)
    except RecorderError:
        backup.restore()
        raise
    return n


def _trim(path: Path) -> int:
    """Trim to /valid_frames and set the final attributes (after the flags are cleared)."""
    try:
        with h5py.File(path, "r+") as h5:
            n = int(h5["valid_frames"][()])
            for name in ("frame_id", "timestamp_ns", "frames"):
                if h5[name].shape[0] > n:
                    h5[name].resize(n, axis=0)
            gaps = h5["gaps"][:].astype(np.int64)
            starts = ([int(h5["frame_id"][0])] if n else []) + [int(a) for a in gaps[:1, 0]]
            _final_attrs(h5.attrs, n, int(gaps[:, 1].sum()), min(starts, default=None),
                         complete=False)
    except (OSError, KeyError, RuntimeError) as exc:
        raise RecorderError(f"{path}: not a recoverable recording: {exc}") from exc
    return n


#: bytes a file must be able to grow by before recover() touches it (it used about 1 KiB)
_RECOVER_ROOM = 1 << 20
_SUPERBLOCK_BYTES = 4096  # the superblock (48 bytes for these files) and then some


def _check_room(path: Path, nbytes: int) -> None:
    """Write ``nbytes`` of zeros past the end and cut them off again: a full disk, a quota
    or a file size limit fails here, before anything in the file has changed."""
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        try:
            if os.pwrite(fd, bytes(nbytes), size) != nbytes:
                raise OSError(28, "short write")
        except OSError as exc:
            raise RecorderError(f"{path}: not enough room to recover it safely ({exc.strerror}; "
                                f"it may need up to {nbytes} bytes past its end): the file "
                                f"was not changed; free some space and try again") from None
        finally:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


class _Backup:
    """The superblock and size of a file, to put back if recovering it fails."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            self.head = f.read(_SUPERBLOCK_BYTES)

    def restore(self) -> None:
        with open(self.path, "r+b") as f:
            f.write(self.head)
            f.truncate(self.size)


def _check_writer_gone(path: Path) -> None:
    try:
        h5 = h5py.File(path, "r", swmr=True)
    except OSError:
        return  # not marked as being written by a SWMR writer: nothing running to protect
    with h5:
        host, pid = h5.attrs.get("writer_host"), int(h5.attrs.get("writer_pid", -1))
    if host != socket.gethostname() or pid < 0 or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, owned by someone else
    raise RecorderError(f"{path}: its writer (pid {pid}) is still running; stop it first")


def _clear_status_flags(path: Path) -> None:
    libhdf5 = ctypes.CDLL(h5py.h5z.__file__)  # resolves symbols of the HDF5 h5py uses
    libhdf5.H5Pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
    libhdf5.H5Pset.restype = ctypes.c_int
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    clear = ctypes.c_bool(True)
    if libhdf5.H5Pset(fapl.id, b"clear_status_flags", ctypes.byref(clear)) < 0:
        raise RecorderError(f"{path}: this HDF5 cannot clear status flags")
    libhdf5.H5Fincrement_filesize.argtypes = [ctypes.c_int64, ctypes.c_uint64]
    libhdf5.H5Fincrement_filesize.restype = ctypes.c_int
    try:
        fid = h5py.h5f.open(str(path).encode(), h5py.h5f.ACC_RDWR, fapl=fapl)
    except OSError as exc:
        raise RecorderError(f"{path}: cannot open for recovery (still being written?): "
                            f"{exc}") from exc
    try:
        # A writer killed between flushes can leave metadata past the superblock's
        # end-of-allocation (evicted from its cache before the superblock was rewritten);
        # moving the EOA up to the real end of file, as ``h5clear -i`` does, lets HDF5
        # reallocate that metadata instead of failing with "addr overflow".
        if libhdf5.H5Fincrement_filesize(fid.id, 0) < 0:
            raise RecorderError(f"{path}: cannot extend its end-of-allocation to the file size")
    finally:
        fid.close()


# --- decoupling the receive loop from the disk -----------------------------------------

_STOP = object()


class _Gap(tuple):
    """Queue item: (first, count) ids dropped after the last queued frame."""


class ThreadedRecorder:
    """A bounded queue in front of a :class:`RecordingWriter`, drained by one thread.

    ``put(..., block=True)`` is lossless: it waits while the queue is full (back-pressure
    to the sender). ``block=False`` is live mode: a full queue drops the frame, counts it in
    ``dropped`` and the frame's id ends up in the file's ``/gaps`` (the writer sees the id
    jump; drops after the last queued frame are declared at close). The queue holds
    references, not copies: received frames are read-only views of zmq buffers, and the
    caller must not modify a frame it has put. An exception in the writer thread is raised
    as RecorderError by the next ``put`` or by ``close``. ``throttle_s`` sleeps after each
    frame, to simulate a slow disk in tests.

    ``on_written`` is called in the writer thread after each queued item is done with
    (written, gap recorded, or failed), so a receive loop waiting on its socket can be
    woken the moment a frame is safe instead of finding out on its next frame.
    """

    def __init__(self, writer: RecordingWriter, *, queue_frames: int = 64,
                 throttle_s: float = 0.0, on_written: Callable[[], None] | None = None,
                 hop: Hop | None = None) -> None:
        if queue_frames < 1:
            raise RecorderError(f"queue_frames must be >= 1, got {queue_frames}")
        self.writer = writer
        self.throttle_s = throttle_s
        self._on_written = on_written or (lambda: None)
        self.dropped = 0
        self.queued = 0
        self.busy_s = 0.0  # time spent writing frames: the writer's rate alone is
        # frames_written / busy_s, whatever kept it waiting in between
        self._queue: queue.Queue = queue.Queue(maxsize=queue_frames)
        self._hop = hop  # receive_to_disk, observed here after each write
        self._received: deque[float] = deque()  # perf_counter at receive, in queue order
        self._error: BaseException | None = None
        self._closed = False
        self._trailing_drops: tuple[int, int] | None = None  # (first, last) after last queued
        self._thread = threading.Thread(target=self._run, name="fb-recorder", daemon=True)
        self._thread.start()

    def put(self, frame_id: int, timestamp_ns: int, frame: np.ndarray, block: bool = True,
            received: float | None = None) -> bool:
        """Queue a frame; False if live mode dropped it. Raises the writer's error.
        ``received`` (``time.perf_counter()`` when the frame arrived) times the hop to
        the disk, when the recorder has one."""
        if self._closed:
            raise RecorderError(f"{self.writer.path}: recorder is closed")
        self.raise_error()
        item = (frame_id, timestamp_ns, frame)
        if self._hop is not None:  # before the item: the writer may take it at once
            self._received.append(time.perf_counter() if received is None else received)
        if block:
            self._put_blocking(item)
        else:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                if self._hop is not None:
                    self._received.pop()
                self.dropped += 1
                first = frame_id if self._trailing_drops is None else self._trailing_drops[0]
                self._trailing_drops = (first, frame_id)
                return False
        self.queued += 1
        self._trailing_drops = None
        return True

    def close(self) -> None:
        """Write what is queued, declare trailing drops, close the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._trailing_drops is not None and self._error is None:
                first, last = self._trailing_drops
                self._put_blocking(_Gap((first, last - first + 1)), raise_errors=False)
            self._put_blocking(_STOP, raise_errors=False)
        finally:
            self._thread.join()
            self.writer.close()
        self.raise_error()

    def add_gap(self, first: int, count: int) -> None:
        """Declare ids ``first .. first+count-1`` missing, in order with the queued
        frames (e.g. frames the broker sent after the last one this recorder got)."""
        self.raise_error()
        self._put_blocking(_Gap((int(first), int(count))))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def __enter__(self) -> "ThreadedRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put_blocking(self, item: object, raise_errors: bool = True) -> None:
        """Wait for room; the writer thread keeps emptying the queue even after an error."""
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if raise_errors:
                    self.raise_error()
                if not self._thread.is_alive():
                    raise RecorderError(f"{self.writer.path}: writer thread is gone") from None

    def raise_error(self) -> None:
        """Raise the writer thread's error as RecorderError, if it had one."""
        if self._error is not None:
            raise RecorderError(f"{self.writer.path}: writer thread failed: "
                                f"{self._error}") from self._error

    def _run(self) -> None:
        """Write until _STOP; after an error keep emptying the queue so put() never hangs."""
        idle = min(self.writer.flush_seconds, 0.5)
        while True:
            try:
                item = self._queue.get(timeout=idle)
            except queue.Empty:
                if self._error is None:
                    self._guard(self.writer.maybe_flush)
                continue
            if item is _STOP:
                return
            if self._error is not None:
                continue
            if isinstance(item, _Gap):
                self._guard(self.writer.add_gap, *item)
            else:
                t0 = time.perf_counter()
                self._guard(self.writer.write, *item)
                if self.throttle_s:
                    time.sleep(self.throttle_s)
                t1 = time.perf_counter()
                self.busy_s += t1 - t0
                if self._hop is not None:
                    self._hop.observe(t1 - self._received.popleft())
            del item  # drop our reference (a zmq buffer, a ring slot view) before telling
            self._on_written()

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # surfaced to the caller by put/close
            self._error = exc
