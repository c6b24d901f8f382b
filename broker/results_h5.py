"""The sink's ``--out *.h5`` writer, apart from broker/sink.py so that a sink without
an HDF5 results file (``run``'s, and .npy) never imports h5py.

It is crash-safe like a recording and shares the recorder's HDF5 helpers; their
RecorderError becomes the sink's SinkError here, so the sink sees one error type.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Collection

import h5py
import numpy as np

from . import __version__
from .recorder import RecorderError, _abandon, _extend, _h5_call, _publish
from .sink import ResultMismatch, SinkError


def _call(what: str, path: Path, fn: Callable[..., Any], *args: Any) -> Any:
    """The recorder's checked h5py call, failing as a SinkError."""
    try:
        return _h5_call(what, path, fn, *args)
    except RecorderError as exc:
        raise SinkError(str(exc)) from exc


class H5Results:
    """Results in a SWMR HDF5 file, crash-safe like a recording (see recorder.py):
    ``/result`` (N, ...) grows in blocks, one chunk per result written with
    ``write_direct_chunk``; ``/frame_id``; ``/missing_ids``; and ``/valid_results``, the
    count published only after everything before it is flushed. After a kill the file
    opens with ``h5py.File(path, "r", swmr=True)`` and ``/valid_results`` says how many
    leading rows are complete; a closed file is trimmed to them."""

    GROW = 1024

    def __init__(self, path: Path, overwrite: bool) -> None:
        self.path = path
        self.written = 0
        self.flushed = 0
        self._ids: list[int] = []
        self._missing_written = 0
        self.result: h5py.Dataset | None = None
        try:
            self.h5 = h5py.File(path, "w" if overwrite else "w-", libver=("v110", "v110"))
        except FileExistsError:
            raise SinkError(f"{path}: file exists (pass --overwrite to replace it)") from None
        except OSError as exc:
            raise SinkError(f"{path}: cannot create the results file: {exc}") from None
        _call("creating the file", path, self._create)

    def _create(self) -> None:
        """Every object but /result now (SWMR allows no new objects later)."""
        h5 = self.h5
        for name in ("frame_id", "missing_ids"):
            h5.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(4096,), dtype="u8")
        h5.create_dataset("valid_results", data=np.uint64(0))
        h5.attrs["frames"] = np.int64(0)
        h5.attrs["complete"] = np.int64(0)
        h5.attrs["software"] = f"framebroker {__version__}"
        h5.flush()

    def _start(self, array: np.ndarray) -> None:
        self.result = self.h5.create_dataset(
            "result", shape=(self.GROW, *array.shape), maxshape=(None, *array.shape),
            chunks=(1, *array.shape), dtype=array.dtype)
        self.h5.swmr_mode = True

    def append(self, frame_id: int, array: np.ndarray) -> None:
        if self.result is None:
            _call("creating /result", self.path, self._start, array)
        ds = self.result
        if array.shape != ds.shape[1:] or array.dtype != ds.dtype:
            raise ResultMismatch(f"result {frame_id} is {array.shape} {array.dtype}, the file "
                                 f"holds {ds.shape[1:]} {ds.dtype}")
        n = self.written
        if n >= ds.shape[0]:
            _call("growing /result", self.path, ds.resize, n + self.GROW, 0)
        _call(f"writing result {frame_id}", self.path, ds.id.write_direct_chunk,
                 (n,) + (0,) * array.ndim, np.ascontiguousarray(array))
        self._ids.append(frame_id)
        self.written = n + 1

    def flush(self, missing: Collection[int]) -> None:
        """Everything to disk, and only then the new count into /valid_results."""
        if self.written == self.flushed and len(missing) == self._missing_written:
            return
        _call("flushing", self.path, self._flush, missing)

    def _flush(self, missing: Collection[int]) -> None:
        h5 = self.h5
        if self.result is not None:
            self.result.flush()
        if self._ids:
            _extend(h5["frame_id"], self.flushed, np.asarray(self._ids, dtype=np.uint64))
            self._ids.clear()
        if len(missing) != self._missing_written:
            ds = h5["missing_ids"]
            ds.resize((len(missing),))
            ds[:] = np.array(sorted(missing), dtype=np.uint64)
            self._missing_written = len(missing)
        h5.flush()
        _publish(h5["valid_results"], self.written)
        self.flushed = self.written

    def close(self, missing: Collection[int]) -> None:
        """Flush, trim /result to the results written, mark the file complete."""
        try:
            self.flush(missing)
            _call("closing", self.path, self._finish)
        except SinkError:
            self.abandon()
            raise

    def _finish(self) -> None:
        if self.result is not None:
            self.result.resize(self.written, 0)
        self.h5.attrs["frames"] = np.int64(self.written)
        self.h5.attrs["complete"] = np.int64(1)
        self.h5.close()
        self.h5 = None

    def abandon(self) -> None:
        """After a failed write: leave the file as of its last flush (see _abandon)."""
        if self.h5 is not None:
            _abandon(self)
