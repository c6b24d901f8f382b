"""FFT of camera frames: plan once, then convert + transform + reduce into reused buffers.

``FFTProcessor`` is the compute half of an FFT worker. It plans in ``__init__``
(FFTW MEASURE takes 0.4-1.5 s cold here, under a millisecond with imported wisdom)
and ``process`` then does no per-frame allocation with the pyfftw backend: the frame
is converted by a Cython kernel into an aligned float32 buffer, FFTW transforms it
into an aligned complex64 buffer, and the reductions write into preallocated outputs.

Reductions (radial profile, peak) exist because the spectrum is large: a complex64
half-spectrum is 4x a uint8 frame, and shipping it to another process costs more
than the FFT. Send reductions where you can.

The backend is a flag because no library wins everywhere on these machines (scipy
has beaten FFTW at 1080p, see bench/fft.py). Use ``threads=1`` and one process per core:
``threads=2`` in one process showed 16 ms stalls here, two processes scale ~2x.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from . import _fftkern
from .choices import BACKENDS, COLORS, OUTPUTS, PLANNERS


def _import_pyfftw() -> Any:
    """pyfftw without its scipy and dask interfaces, which this module never uses.

    pyfftw's package ``__init__`` imports ``pyfftw.interfaces``, and that imports
    scipy.fftpack and scipy.fft (and dask) whenever they are installed: 0.25 s of a
    worker's start-up on an idle core here, 0.6-0.9 s under load, on the path to the
    first frame. A ``None`` in ``sys.modules`` makes those imports fail, so pyfftw
    skips them; the entries are removed afterwards, so ``import scipy.fftpack`` (or
    ``pyfftw.interfaces.scipy_fft``) still works as usual later on."""
    hidden = [name for name in ("scipy.fftpack", "dask.array.fft") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import pyfftw as module
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return module


pyfftw = _import_pyfftw()

#: what ``backend="auto"`` measures (numpy never wins: it has no float32 transform)
AUTO_CANDIDATES = ("pyfftw", "scipy")
AUTO_SECONDS = 0.1  # per candidate and round; 3 interleaved rounds, best round kept
FRAME_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def _touched_zeros(shape: tuple[int, ...] | int, dtype: type) -> np.ndarray:
    """Zeroed array whose pages are already faulted in: np.zeros maps lazily (calloc),
    which would move the first-touch cost (~2.7 us per 4 KiB page) onto the first frame."""
    out = np.empty(shape, dtype=dtype)
    out.fill(0)
    return out


class WisdomError(RuntimeError):
    """A wisdom file that exists but cannot be used (corrupt, truncated, or rejected)."""


def wisdom_key(shape: tuple[int, ...], dtype: str | np.dtype, color: str, threads: int,
               planner: str) -> str:
    """File-name-safe key for one plan, e.g. ``480x640x3-uint8-channels-t1-measure``."""
    dims = "x".join(str(int(d)) for d in shape)
    return f"{dims}-{np.dtype(dtype).name}-{color}-t{int(threads)}-{planner}"


class WisdomStore:
    """FFTW wisdom on disk, one file per plan key, so MEASURE planning is paid once.

    FFTW's wisdom is process-global, so a file holds the whole ``pyfftw.export_wisdom()``
    (double, single, long double) at save time; importing extra entries is harmless.
    Format, never pickle: ``MAGIC``, then for each of the 3 blobs a little-endian u32
    length, the bytes and their u32 CRC-32, so truncation and bit rot are caught here
    rather than left to FFTW's parser. Wisdom describes this CPU: do not share the
    directory between different machines.
    """

    MAGIC = b"FBWISDOM1\n"
    SUFFIX = ".wisdom"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.directory = (Path(path) if path is not None
                          else Path(platformdirs.user_cache_dir("framebroker")) / "wisdom")

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}{self.SUFFIX}"

    def load(self, key: str) -> bool:
        """Import the wisdom saved under ``key``; False when there is none.

        Raises WisdomError when the file is unreadable, damaged, or FFTW refuses it
        (``pyfftw.import_wisdom`` reports that only through its returned booleans).
        """
        path = self.path_for(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise WisdomError(f"wisdom file {path}: cannot read it ({exc})") from exc
        blobs = self._decode(raw, path)
        accepted = pyfftw.import_wisdom(blobs)
        if not all(accepted):
            kinds = ", ".join(f"{name}={ok}" for name, ok
                              in zip(("double", "single", "long double"), accepted))
            raise WisdomError(f"wisdom file {path}: FFTW rejected it ({kinds})")
        return True

    def load_choice(self, key: str) -> dict[str, object] | None:
        """The backend measured fastest for ``key`` (JSON next to the wisdom), or None
        when there is none or it is unusable (then it is measured again)."""
        try:
            choice = json.loads(self.choice_path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(choice, dict) or choice.get("backend") not in AUTO_CANDIDATES:
            return None
        return choice

    def save_choice(self, key: str, choice: dict[str, object]) -> None:
        """Keep a measured choice for the next process (atomically, like the wisdom)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.choice_path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(choice, f)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def choice_path(self, key: str) -> Path:
        return self.directory / f"{key}.backend.json"

    def save(self, key: str) -> Path:
        """Write FFTW's current wisdom under ``key`` atomically (temp file + os.replace),
        so a concurrent reader or a crash never leaves a half-written file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = self._encode(pyfftw.export_wisdom())
        final = self.path_for(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final

    @classmethod
    def _encode(cls, blobs: tuple[bytes, bytes, bytes]) -> bytes:
        parts = [cls.MAGIC]
        for blob in blobs:
            parts.append(struct.pack("<I", len(blob)))
            parts.append(blob)
            parts.append(struct.pack("<I", zlib.crc32(blob)))
        return b"".join(parts)

    @classmethod
    def _decode(cls, raw: bytes, path: Path) -> tuple[bytes, bytes, bytes]:
        if not raw.startswith(cls.MAGIC):
            raise WisdomError(f"wisdom file {path}: not a framebroker wisdom file")
        blobs = []
        pos = len(cls.MAGIC)
        for _ in range(3):
            if pos + 4 > len(raw):
                raise WisdomError(f"wisdom file {path}: truncated at byte {pos}")
            (n,) = struct.unpack_from("<I", raw, pos)
            end = pos + 4 + n
            if end + 4 > len(raw):
                raise WisdomError(f"wisdom file {path}: truncated (blob of {n} bytes at {pos})")
            blob = raw[pos + 4:end]
            (crc,) = struct.unpack_from("<I", raw, end)
            if zlib.crc32(blob) != crc:
                raise WisdomError(f"wisdom file {path}: checksum mismatch (corrupt)")
            blobs.append(blob)
            pos = end + 4
        if pos != len(raw):
            raise WisdomError(f"wisdom file {path}: {len(raw) - pos} unexpected trailing bytes")
        return blobs[0], blobs[1], blobs[2]


class FFTProcessor:
    """Per-frame FFT of frames of one fixed shape and dtype.

    ``shape`` is the frame's: (H, W) gray, or (H, W, C) as OpenCV delivers (BGR).
    ``color="gray"`` transforms one plane (a 3-channel frame is converted with
    0.114 B + 0.587 G + 0.299 R); ``color="channels"`` transforms each channel of an
    (H, W, C) frame. ``output`` picks what ``process`` returns, P = 1 for gray
    (leading axis dropped) and P = C for channels, Wh = W//2 + 1:

    - ``spectrum``: complex64 (P, H, Wh), the rfft2 over the last two axes, rows in
      standard FFT order (row i is ky = i for i < (H+1)//2, else i - H).
    - ``magnitude``: float32 (P, H, Wh), log1p(|X|).
    - ``radial``: float32 (P, bins), mean |X|^2 at each integer radius
      floor(sqrt(ky^2 + kx^2)), bins = floor(sqrt((H//2)^2 + (W//2)^2)) + 1. Columns
      with a mirrored twin count twice, so this equals the mean over the *full* FFT
      plane, and bin 0 is DC alone.
    - ``peak``: float32 (P, 3) = [ky, kx, |X|] of the largest non-DC bin, ky signed,
      kx in 0..W//2; on the self-mirrored columns kx = 0 and (even W) kx = W/2 the
      conjugate pair is reported with ky >= 0 (or the even-height Nyquist ky = -H/2).

    ``spectrum`` and ``magnitude`` return internal buffers, valid only until the next
    ``process`` call; copy them to keep them. ``radial`` and ``peak`` also reuse one
    buffer each. ``planner`` and ``wisdom`` only affect the pyfftw backend.

    ``plan_info`` says how planning went: backend, planner (None unless pyfftw),
    threads, planning_seconds, wisdom_imported (a store file was loaded and FFTW
    accepted it), wisdom_had_plan (FFTW's wisdom, imported or left by an earlier plan
    in this process, already held this plan, so nothing was measured), wisdom_saved,
    and wisdom_error (None, or why a file was unusable or could not be written;
    planning goes on regardless). ``last_compute_ns`` times the latest ``process``.
    """

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype, *, color: str = "gray",
                 output: str = "spectrum", backend: str = "pyfftw", threads: int = 1,
                 planner: str = "estimate", wisdom: WisdomStore | None = None) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.color, self.output, self.backend = color, output, backend
        self.threads = threads
        self._check_options(planner)
        auto = None
        if backend == "auto":
            auto = pick_backend(self.shape, self.dtype, color=color, output=output,
                                threads=threads, planner=planner, wisdom=wisdom)
            self.backend = backend = str(auto["backend"])
        height, width = self.shape[0], self.shape[1]
        planes = self.shape[2] if color == "channels" else 1
        self._width = width
        self._spec_shape = (planes, height, width // 2 + 1)
        # Zero-filled now so every page is touched at startup, not on the first frame.
        self._in = pyfftw.zeros_aligned((planes, height, width), dtype="float32")
        self._spec = (pyfftw.zeros_aligned(self._spec_shape, dtype="complex64")
                      if backend != "scipy" else None)  # scipy returns its own array
        self._fill = self._make_fill()
        self.plan_info: dict[str, object] = {
            "backend": backend, "planner": planner if backend == "pyfftw" else None,
            "threads": threads, "planning_seconds": 0.0, "wisdom_imported": False,
            "wisdom_had_plan": False, "wisdom_saved": False, "wisdom_error": None,
            "auto": auto}
        self._transform = self._plan(planner, wisdom)
        self._reduce = self._make_reduce()
        self.last_compute_ns = 0

    # --- setup -------------------------------------------------------------------

    def _check_options(self, planner: str) -> None:
        """Reject bad combinations now, with the allowed values, not on the first frame."""
        for name, value, allowed in (("color", self.color, COLORS),
                                     ("output", self.output, OUTPUTS),
                                     ("backend", self.backend, BACKENDS),
                                     ("planner", planner, tuple(PLANNERS))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.dtype not in FRAME_DTYPES:
            raise ValueError(f"frames must be uint8, uint16 or float32; got {self.dtype}")
        if len(self.shape) not in (2, 3) or any(d < 1 for d in self.shape):
            raise ValueError(f"frame shape must be (H, W) or (H, W, C); got {self.shape}")
        if self.shape[0] < 2 or self.shape[1] < 2:
            raise ValueError(f"frames must be at least 2x2; got {self.shape}")
        if self.color == "gray" and len(self.shape) == 3 and self.shape[2] != 3:
            raise ValueError(f"color='gray' converts BGR, so a 3-D frame needs 3 channels; "
                             f"got {self.shape}")
        if self.color == "channels" and len(self.shape) != 3:
            raise ValueError(f"color='channels' needs an (H, W, C) frame; got {self.shape}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer; got {self.threads!r}")
        if self.backend == "numpy" and self.threads != 1:
            raise ValueError("the numpy backend is single-threaded; use threads=1")

    def _make_fill(self) -> Callable[[np.ndarray], None]:
        """The conversion kernel for this frame layout, bound to the input buffer."""
        if self.color == "channels":
            planes = self._in
            return lambda frame: _fftkern.split_channels(frame, planes)
        plane = self._in[0]
        if len(self.shape) == 3:
            return lambda frame: _fftkern.bgr_to_gray(frame, plane)
        return lambda frame: _fftkern.to_float(frame, plane)

    def _plan(self, planner: str, wisdom: WisdomStore | None) -> Callable[[], np.ndarray]:
        """Build the transform once; returns a callable giving the (P, H, Wh) spectrum.

        ``planning_seconds`` covers loading wisdom and planning, not saving (an fsync).
        """
        t0 = time.perf_counter()
        if self.backend != "pyfftw":
            transform = self._plan_library()
            transform()  # first call builds the library's own plan cache
            self.plan_info["planning_seconds"] = time.perf_counter() - t0
            return transform
        key = wisdom_key(self.shape, self.dtype, self.color, self.threads, planner)
        transform = self._plan_fftw(PLANNERS[planner], wisdom, key)
        self.plan_info["planning_seconds"] = time.perf_counter() - t0
        if wisdom is not None and not (self.plan_info["wisdom_imported"]
                                       and self.plan_info["wisdom_had_plan"]):
            try:
                wisdom.save(key)
                self.plan_info["wisdom_saved"] = True
            except OSError as exc:
                errors = [self.plan_info["wisdom_error"], f"cannot save wisdom for {key}: {exc}"]
                self.plan_info["wisdom_error"] = "; ".join(e for e in errors if e)
        return transform

    def _plan_fftw(self, flag: str, wisdom: WisdomStore | None,
                   key: str) -> Callable[[], np.ndarray]:
        """Plan from wisdom if it covers this problem (FFTW_WISDOM_ONLY), else for real."""
        if wisdom is not None:
            try:
                self.plan_info["wisdom_imported"] = wisdom.load(key)
            except WisdomError as exc:
                self.plan_info["wisdom_error"] = str(exc)
        try:
            fftw = self._fftw((flag, "FFTW_WISDOM_ONLY"))
            self.plan_info["wisdom_had_plan"] = True
        except RuntimeError:  # pyfftw's "No FFTW wisdom is known for this plan."
            fftw = self._fftw((flag,))
        spec = self._spec

        def transform() -> np.ndarray:
            fftw.execute()
            return spec

        return transform

    def _fftw(self, flags: tuple[str, ...]) -> pyfftw.FFTW:
        # MEASURE/PATIENT overwrite the input while timing; process() refills it anyway.
        return pyfftw.FFTW(self._in, self._spec, axes=(-2, -1), direction="FFTW_FORWARD",
                           flags=flags, threads=self.threads)

    def _plan_library(self) -> Callable[[], np.ndarray]:
        """scipy/numpy transform of the float32 buffer. scipy returns complex64 for
        float32 input, used as is; numpy <2 returns complex128 and has no ``out=``,
        so its result is copied (cast) into the complex64 buffer on every version."""
        planes, threads, spec = self._in, self.threads, self._spec
        if self.backend == "scipy":
            import scipy.fft  # 0.25 s or more to import: only for this backend

            return lambda: scipy.fft.rfft2(planes, axes=(-2, -1), workers=threads)

        def numpy_transform() -> np.ndarray:
            np.copyto(spec, np.fft.rfft2(planes, axes=(-2, -1)), casting="same_kind")
            return spec

        return numpy_transform

    def _make_reduce(self) -> Callable[[np.ndarray], np.ndarray]:
        """The output kernel, bound to its preallocated buffer; returns the user view."""
        squeeze = self.color == "gray"
        width = self._width
        if self.output == "spectrum":
            return (lambda spec: spec[0]) if squeeze else (lambda spec: spec)
        if self.output == "magnitude":
            mag = _touched_zeros(self._spec_shape, dtype=np.float32)
            view = mag[0] if squeeze else mag

            def magnitude(spec: np.ndarray) -> np.ndarray:
                _fftkern.log_magnitude(spec, mag)
                return view

            return magnitude
        if self.output == "radial":
            bins = _fftkern.radial_bins(self.shape[0], width)
            counts = _touched_zeros(bins, dtype=np.float64)
            _fftkern.radial_counts(self.shape[0], width, counts)
            acc = _touched_zeros(bins, dtype=np.float64)
            prof = _touched_zeros((self._spec_shape[0], bins), dtype=np.float32)
            view = prof[0] if squeeze else prof

            def radial(spec: np.ndarray) -> np.ndarray:
                _fftkern.radial_profile(spec, width, counts, acc, prof)
                return view

            return radial
        pk = _touched_zeros((self._spec_shape[0], 3), dtype=np.float32)
        view = pk[0] if squeeze else pk

        def peak(spec: np.ndarray) -> np.ndarray:
            _fftkern.peak(spec, width, pk)
            return view

        return peak

    # --- per frame ---------------------------------------------------------------

    def process(self, frame: np.ndarray) -> np.ndarray:
        """Transform one frame and return the chosen output (see the class docstring).

        Read-only frames (as received from the network) are fine; they must be
        C-contiguous, as received and OpenCV frames are. ``last_compute_ns`` is the wall
        time of this call: validation, conversion, transform and reduction.
        """
        t0 = time.perf_counter_ns()
        if frame.shape != self.shape or frame.dtype != self.dtype:
            raise ValueError(f"frame is {frame.shape} {frame.dtype}, but this processor was "
                             f"planned for {self.shape} {self.dtype}")
        if not frame.flags.c_contiguous:
            raise ValueError("frame is not C-contiguous; pass np.ascontiguousarray(frame)")
        self._fill(frame)
        result = self._reduce(self._transform())
        self.last_compute_ns = time.perf_counter_ns() - t0
        return result


def pick_backend(shape: tuple[int, ...], dtype: np.dtype, *, color: str, output: str,
                 threads: int, planner: str, wisdom: WisdomStore | None) -> dict[str, object]:
    """The fastest of AUTO_CANDIDATES for this frame geometry and output, measured.

    No library wins at every shape here (scipy has beaten FFTW at 1080p), so it is
    measured rather than assumed: each candidate's whole ``process`` (conversion,
    transform, reduction) runs for AUTO_SECONDS in each of 3 interleaved rounds and
    the best round counts. The choice is kept next to the wisdom, under the plan's key
    plus the output, so later workers on this machine reuse it (``cached``: True)
    instead of measuring again; without a store it is measured every time.
    """
    key = f"{wisdom_key(shape, dtype, color, threads, planner)}-{output}"
    if wisdom is not None and (choice := wisdom.load_choice(key)) is not None:
        return {**choice, "cached": True}
    procs = {name: FFTProcessor(shape, dtype, color=color, output=output, backend=name,
                                threads=threads, planner=planner, wisdom=wisdom)
             for name in AUTO_CANDIDATES}
    frame = np.zeros(shape, dtype)  # transform time does not depend on the pixels
    fps = {name: 0.0 for name in procs}
    for _ in range(3):
        for name, proc in procs.items():
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < AUTO_SECONDS:
                proc.process(frame)
                n += 1
            fps[name] = max(fps[name], n / elapsed)
    choice: dict[str, object] = {"backend": max(fps, key=fps.__getitem__),
                                 "fps": {k: round(v, 1) for k, v in fps.items()}}
    if wisdom is not None:
        try:
            wisdom.save_choice(key, choice)
        except OSError:
            pass  # measured again next time; planning goes on regardless
    return {**choice, "cached": False}
