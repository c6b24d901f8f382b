"""The master file of a sharded recording: one HDF5 virtual dataset (VDS) over N shards.

A sharded recording ``OUT.h5`` with N shards is N ordinary recordings ``OUT_shard0.h5``
... ``OUT_shard{N-1}.h5`` (the layout of broker/recorder.py, each holding only the ids
its shard owns: blocks of B ids, block b in shard b mod N) and ``OUT.h5`` itself, which
holds no pixels. Its ``/frames``, ``/frame_id`` and ``/timestamp_ns`` are virtual
datasets presenting every frame in frame-id order, so plain h5py (with ``import
hdf5plugin`` for compressed shards) and ``h5dump`` read it as one recording.

**Files.** Shard K's file is ``OUT_shardK.h5``; a writer restarted for the same shard
(by Ray) cannot append to it and writes ``OUT_shardK_r1.h5``, ``_r2`` ...: the finalised
master maps the runs of ids of every file of the shard. The live master maps only each
shard's first file (a restarted writer's first id is not known when it starts), so
until :func:`finalise` the frames of ``_rN`` files read as missing, never as others.

**Mappings.** Shard K's position p holds the p-th id it owns, so one regular hyperslab
maps all of it: virtual start ``K*B``, stride ``N*B``, block ``B`` against consecutive
blocks of the shard's datasets. While recording the count is ``H5S_UNLIMITED`` on both
sides, so the master grows with the shards (a master written at start is correct at
once and never waits for anyone). At the end :func:`finalise` rewrites it with finite
mappings, at most three per run of consecutive ids per shard (a lossless shard has one
run), never one per frame; the new file replaces the old one atomically.

**Missing frames.** A frame no shard holds reads as fill: zeros in ``/frames``,
``2**64-1`` in ``/frame_id`` (never a real id), 0 in ``/timestamp_ns``. While the
shards are written, open the master with ``swmr=True`` (HDF5 then opens the shard
files in SWMR mode too); its extent is then the shards' allocated length and frames not
flushed yet read as missing. ``/valid_frames`` is the extent once finalised (0 before);
``/gaps``
lists the missing ``[first_id, count]`` ranges (as in a single file) and the root
attributes say per shard how many frames it holds, whether it closed cleanly and how
many of its ids are missing: a shard killed mid-run keeps every frame up to its last
flush readable through the master (after :func:`finalise` recovered its file), and
the rest of its ids are the gap.

**Moving the set.** Source file names are stored relative (``OUT_shard0.h5``), and
HDF5 looks for a relative source next to the master first, so the master and its
shard files can be moved or copied together to any directory (or host) and read there.
Renaming any of them breaks the mapping (those frames read as fill).

**Concurrency.** Every writer of the set (the ``--shards N`` coordinator and each
``--shard K/N`` process) writes and finalises the master under an flock of the
directory, from what the shard files hold, so the last one to finish leaves the same
master whoever it is. A shard file whose writer died on this host is recovered first
(:func:`broker.recorder.recover`); one marked by a writer on another host is read as
it is (SWMR) and never touched: its writer may still be running, and no pid on another host
can be checked. Until that writer ends (and finalises), plain HDF5 cannot read the
master (it refuses a source file marked open for writing): open it with ``swmr=True``;
the summary names the host (``open_on``). If that writer is known to be gone,
``finalise(out, writers_gone=True)`` recovers its file too, on any host.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import hdf5plugin  # noqa: F401  (shards may be compressed)
import numpy as np

from . import __version__
from . import protocol as proto
from .recorder import RecorderError, recover

MISSING_ID = np.iinfo(np.uint64).max  # /frame_id of a frame no shard holds
_UNLIMITED = h5py.h5s.UNLIMITED
_DATASETS = ("frames", "frame_id", "timestamp_ns")


def shard_path(out: str | Path, index: int, incarnation: int = 0) -> Path:
    """Shard ``index`` of recording ``out``: OUT.h5 -> OUT_shard0.h5; a writer restarted
    for the same shard (``incarnation`` 1, 2, ...) writes OUT_shard0_r1.h5, ..."""
    out = Path(out)
    again = f"_r{incarnation}" if incarnation else ""
    return out.with_name(f"{out.stem}_shard{index}{again}{out.suffix}")


def shard_files(out: str | Path, index: int) -> list[Path]:
    """Every file shard ``index`` has: its first writer's, then its restarts', in order."""
    files = []
    while (path := shard_path(out, index, len(files))).is_file():
        files.append(path)
    return files


def next_incarnation(out: str | Path, index: int) -> int:
    """The incarnation a restarted writer of shard ``index`` takes: the first unused."""
    return max(1, len(shard_files(out, index)))


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise every writer of the master: an flock on its directory (no lock file
    is left behind, and the kernel drops it if the holder dies)."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class _Run:
    """Positions ``src .. src+length-1`` of a shard hold its ordinals ``ordinal ..``."""

    src: int
    ordinal: int
    length: int
    source: str = ""  # the file (name relative to the master) that holds it


@dataclass
class ShardState:
    """What one shard's files hold, read for the master."""

    index: int
    path: Path  # its first file
    files: list[str] = field(default_factory=list)
    exists: bool = False
    frames: int = 0
    complete: bool = True  # every file closed by its writer (and there is one)
    recovered: bool = False
    open_on: str | None = None  # host whose writer still marks a file of it open
    last_id: int = -1
    runs: list[_Run] = field(default_factory=list)
    gap_end: int = 0  # one past the last id its /gaps declares (its view of the total)
    attrs: dict[str, Any] = field(default_factory=dict)  # source, start_time


def _plist(dtype: np.dtype, fill: Any) -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_fill_value(np.array(fill, dtype=dtype))
    return dcpl


def _space(n: int | None, tail: tuple[int, ...]) -> h5py.h5s.SpaceID:
    """A dataspace of ``n`` frames (None: 0 now, unlimited later) of shape ``tail``."""
    if n is None:
        return h5py.h5s.create_simple((0,) + tail, (_UNLIMITED,) + tail)
    return h5py.h5s.create_simple((n,) + tail, (n,) + tail)


def _select(space: h5py.h5s.SpaceID, start: int, count: int, stride: int, block: int,
            tail: tuple[int, ...]) -> h5py.h5s.SpaceID:
    zeros, ones = (0,) * len(tail), (1,) * len(tail)
    space.select_hyperslab((start,) + zeros, (count,) + ones, (stride,) + ones,
                           (block,) + tail)
    return space


def _pieces(shard: proto.Shard, run: _Run) -> Iterator[tuple[int, int, int, int, int]]:
    """A run as (virtual start, count, stride, block, source start) hyperslabs: a
    partial first block, every whole block in one strided selection, a partial last."""
    b, o, src, left = shard.block, run.ordinal, run.src, run.length
    stride = shard.count * b
    head = min(left, (-o) % b)
    if head:
        yield shard.frame_id(o), 1, 1, head, src
        o, src, left = o + head, src + head, left - head
    whole = left // b
    if whole:
        yield shard.frame_id(o), whole, stride, b, src
        o, src, left = o + whole * b, src + whole * b, left - whole * b
    if left:
        yield shard.frame_id(o), 1, 1, left, src


def _write(out: Path, shards: list[proto.Shard], shape: tuple[int, ...], dtype: np.dtype,
           extent: int | None, runs: list[list[_Run]] | None, attrs: dict[str, Any],
           gaps: np.ndarray) -> None:
    """Write the master to a temporary file, then put it in place atomically.

    ``runs`` None: the live master (unlimited regular mappings); else finite mappings."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as h5:
            for name in _DATASETS:
                tail = shape if name == "frames" else ()
                dt = dtype if name == "frames" else np.dtype("u8")
                dcpl = _plist(dt, MISSING_ID if name == "frame_id" else 0)
                for k, shard in enumerate(shards):
                    if runs is None:
                        b = shard.block
                        source = shard_path(out, k).name.encode()  # relative: the set moves
                        vs = _select(_space(None, tail), k * b, _UNLIMITED, len(shards) * b,
                                     b, tail)
                        ss = _select(_space(None, tail), 0, _UNLIMITED, b, b, tail)
                        dcpl.set_virtual(vs, source, name.encode(), ss)
                        continue
                    for r in runs[k]:
                        src_n = max(x.src + x.length for x in runs[k] if x.source == r.source)
                        for start, count, stride, block, src in _pieces(shard, r):
                            vs = _select(_space(extent, tail), start, count, stride, block,
                                         tail)
                            ss = _select(_space(src_n, tail), src, 1, 1, count * block, tail)
                            dcpl.set_virtual(vs, r.source.encode(), name.encode(), ss)
                h5py.h5d.create(h5.id, name.encode(), h5py.h5t.py_create(dt),
                                _space(extent, tail), dcpl=dcpl)
            h5.create_dataset("gaps", data=gaps.reshape(-1, 2).astype(np.uint64),
                              maxshape=(None, 2))
            h5.create_dataset("valid_frames", data=np.uint64(extent or 0))
            for key, value in attrs.items():
                h5.attrs[key] = value
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _base_attrs(count: int, block: int, shape: tuple[int, ...], dtype: np.dtype,
                stream: str, session: int, compression: str) -> dict[str, Any]:
    """Attributes every master has; only data, no clock or pid, so that whoever writes
    the master from the same shard files writes the same master."""
    return {"framebroker_master": np.int64(1), "software": f"framebroker {__version__}",
            "stream": stream, "session": f"{session:016x}", "shape": np.array(shape, np.int64),
            "dtype": np.dtype(dtype).name, "compression": compression,
            "shard_count": np.int64(count), "shard_block": np.int64(block),
            "shard_files": [shard_path(Path("x.h5"), k).name for k in range(count)]}


def start_master(out: str | Path, *, count: int, block: int, shape: tuple[int, ...],
                 dtype: np.dtype, stream: str, session: int, compression: str,
                 overwrite: bool) -> bool:
    """Write the live master unless one of the same recording (same broker session and
    sharding) is already there; returns True if it wrote it. Another recording's master
    is replaced only with ``overwrite``, else RecorderError."""
    out = Path(out)
    attrs = _base_attrs(count, block, shape, dtype, stream, session, compression)
    attrs["shard_files"] = [shard_path(out, k).name for k in range(count)]
    with _locked(out):
        if out.exists():
            try:
                with h5py.File(out, "r") as h5:
                    same = (h5.attrs.get("session") == attrs["session"]
                            and int(h5.attrs.get("shard_count", -1)) == count
                            and int(h5.attrs.get("shard_block", -1)) == block)
            except OSError:
                same = False
            if same:
                return False
            if not overwrite:
                raise RecorderError(f"{out}: file exists (pass --overwrite to replace the "
                                    f"recording)")
        shards = [proto.Shard(k, count, block) for k in range(count)]
        _write(out, shards, tuple(shape), np.dtype(dtype), None, None,
               {**attrs, "complete": np.int64(0)}, np.zeros((0, 2), np.uint64))
    return True


def _read_shard(out: Path, shard: proto.Shard, writers_gone: bool) -> ShardState:
    """Every file of a shard, its runs of ids; a file whose writer died on this host (or
    on any host, with ``writers_gone``) is recovered first."""
    st = ShardState(shard.index, shard_path(out, shard.index))
    for path in shard_files(out, shard.index):
        _read_file(path, shard, st, writers_gone)
    st.exists = bool(st.files)
    st.complete = st.complete and st.exists
    return st


def _read_file(path: Path, shard: proto.Shard, st: ShardState, writers_gone: bool) -> None:
    try:
        h5 = h5py.File(path, "r")
        recovered = False
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        h5, recovered = _recovered_or_swmr(path, writers_gone)
    with h5:
        if h5.swmr_mode:
            st.open_on = str(h5.attrs.get("writer_host", "an unknown host"))
        n = int(h5["valid_frames"][()])
        ids = h5["frame_id"][:n].astype(np.int64)
        gaps = h5["gaps"][:].astype(np.int64).reshape(-1, 2)
        closed = bool(h5.attrs.get("complete", 0)) and not recovered and not h5.swmr_mode
        st.attrs = st.attrs or {k: h5.attrs[k] for k in ("source", "start_time")
                                if k in h5.attrs}
    if n and not all(shard.owns(int(i)) for i in ids[:: max(1, n // 64)]):
        raise RecorderError(f"{path}: holds ids of another shard (not shard "
                            f"{shard.index}/{shard.count} in blocks of {shard.block})")
    st.files.append(path.name)
    st.frames += n
    st.complete = st.complete and closed
    st.recovered = st.recovered or recovered
    st.last_id = max(st.last_id, int(ids[-1]) if n else -1)
    st.gap_end = max(st.gap_end, int((gaps[:, 0] + gaps[:, 1]).max()) if len(gaps) else 0)
    ordinals = (ids // shard.block // shard.count) * shard.block + ids % shard.block
    breaks = np.flatnonzero(np.diff(ordinals) != 1) + 1
    for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), n]):
        if b > a:
            st.runs.append(_Run(a, int(ordinals[a]), b - a, path.name))


def _recovered_or_swmr(path: Path, writers_gone: bool) -> tuple[h5py.File, bool]:
    """Recover a shard file whose writer died on this host (any host: ``writers_gone``);
    read a live one, or one of another host, as it is. Returns the open file and whether
    it was recovered."""
    with h5py.File(path, "r", swmr=True) as h5:
        host = h5.attrs.get("writer_host")
    if writers_gone or host == socket.gethostname():
        try:
            recover(path)
            return h5py.File(path, "r"), True
        except RecorderError:
            pass  # its writer is still running: read what it has flushed
    return h5py.File(path, "r", swmr=True), False


def _missing(shard: proto.Shard, runs: list[_Run], end: int) -> list[tuple[int, int]]:
    """Ids of ``0 .. end-1`` this shard owns and does not hold, as id ranges."""
    owned = shard.owned_before(end)
    out: list[tuple[int, int]] = []
    pos = 0
    for r in sorted(runs, key=lambda r: r.ordinal) + [_Run(0, owned, 0)]:
        if r.ordinal > pos:
            first, last = shard.frame_id(pos), shard.frame_id(min(r.ordinal, owned) - 1)
            out += shard.ranges(first, last - first + 1)
        pos = max(pos, r.ordinal + r.length)
    return out


def _coalesce(ranges: list[tuple[int, int]]) -> np.ndarray:
    rows: list[list[int]] = []
    for a, n in sorted(ranges):
        if rows and rows[-1][0] + rows[-1][1] == a:
            rows[-1][1] += n
        else:
            rows.append([a, n])
    return np.asarray(rows, dtype=np.uint64).reshape(-1, 2)


def finalise(out: str | Path, total: int | None = None,
             writers_gone: bool = False) -> dict[str, Any]:
    """Rewrite the master from what the shard files hold (finite mappings, /gaps, the
    per-shard attributes); returns the summary it wrote as attributes. ``total``: the
    stream's frame count if known (else the end of what the shards hold or declare).
    ``writers_gone``: the caller knows every writer of the set has ended, so a file one
    left marked open, on whatever host, is recovered (else only this host's are)."""
    out = Path(out)
    with _locked(out):
        with h5py.File(out, "r") as h5:
            base = {k: h5.attrs[k] for k in ("framebroker_master", "software", "stream",
                                             "session", "shape", "dtype", "compression",
                                             "shard_count", "shard_block", "shard_files")}
        count, block = int(base["shard_count"]), int(base["shard_block"])
        shards = [proto.Shard(k, count, block) for k in range(count)]
        states = [_read_shard(out, s, writers_gone) for s in shards]
        end = max([total or 0] + [s.last_id + 1 for s in states] + [s.gap_end for s in states])
        missing = [_missing(s, st.runs, end) for s, st in zip(shards, states)]
        gaps = _coalesce([r for m in missing for r in m])
        n_missing = int(gaps[:, 1].sum()) if len(gaps) else 0
        summary = {"frames": end - n_missing, "extent": end, "frames_missing": n_missing,
                   "complete": all(st.complete for st in states) and n_missing == 0,
                   "shards": [{"index": st.index, "file": st.path.name, "files": st.files,
                               "exists": st.exists, "frames": st.frames,
                               "complete": st.complete,
                               "recovered": st.recovered, "open_on": st.open_on,
                               "missing": sum(c for _, c in m)}
                              for st, m in zip(states, missing)]}
        first = next((st.attrs for st in states if st.attrs), {})
        attrs = {**base, **first, "complete": np.int64(summary["complete"]),
                 "frames_written": np.int64(summary["frames"]),
                 "frames_missed": np.int64(n_missing), "total": np.int64(end),
                 "shard_frames": np.array([st.frames for st in states], np.int64),
                 "shard_complete": np.array([st.complete for st in states], np.int64),
                 "shard_recovered": np.array([st.recovered for st in states], np.int64),
                 "shard_restarts": np.array([max(0, len(st.files) - 1) for st in states],
                                            np.int64),
                 "shard_missing": np.array([s["missing"] for s in summary["shards"]],
                                           np.int64)}
        _write(out, shards, tuple(int(d) for d in base["shape"]), np.dtype(str(base["dtype"])),
               end, [st.runs for st in states], attrs, gaps)
    return summary


def is_master(h5: h5py.File) -> bool:
    return int(h5.attrs.get("framebroker_master", 0)) == 1


def master_details(out: str | Path, h5: h5py.File) -> dict[str, Any]:
    """What ``inspect`` adds for a master: its shards and their stored size."""
    count = int(h5.attrs["shard_count"])
    shards, stored = [], 0
    frames = h5.attrs.get("shard_frames", np.full(count, -1))
    complete = h5.attrs.get("shard_complete", np.zeros(count))
    missing = h5.attrs.get("shard_missing", np.full(count, -1))
    for k in range(count):
        path = shard_path(out, k)
        size = sum(f.stat().st_size for f in shard_files(out, k))
        stored += size
        shards.append({"file": path.name, "exists": path.is_file(), "bytes": size,
                       "files": [f.name for f in shard_files(out, k)],
                       "frames": int(frames[k]), "complete": bool(complete[k]),
                       "missing": int(missing[k])})
    return {"shards": shards, "shard_block": int(h5.attrs["shard_block"]),
            "bytes_stored": stored, "complete": bool(h5.attrs.get("complete", 0)),
            "finalised": "total" in h5.attrs}
