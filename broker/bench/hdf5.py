"""HDF5 recording benchmark: the naive way vs h5py slices vs RecordingWriter vs a plain file.

For each frame size, one run holds every method, interleaved in rounds and reported as
the median round (the best round is in the JSON and the summary), so the ratios compare
like with like on a noisy machine:

* ``naive``: what users write first: a time-last ``(H, W, C, N)`` dataset with h5py's
  guessed chunks, ``resize`` by one, write the frame, ``flush`` the file, every frame.
  Stopped after ``--naive-seconds`` and reported at the rate it reached.
* ``h5py slices``: a preallocated frame-major ``(N, H, W, C)`` dataset with one frame per
  chunk, ``dset[i] = frame``.
* ``recorder <codec>``: :class:`broker.recorder.RecordingWriter` with its defaults
  (SWMR on, a flush every 64 frames, ``frames_expected`` known); ``none swmr=off`` shows
  what SWMR costs.
* ``plain write``: ``f.write(frame)`` of every frame buffer into a new file: the limit.

Every method writes a new file from open to close; none of them fsyncs, and an untimed
``os.sync()`` before each run keeps one run's writeback out of the next. Files of a few
GB exceed the kernel's dirty-page limits, so the larger sizes measure partly the disk's
writeback, which is why the best round is reported next to the median. Files go to a
temporary directory in ``--record-dir`` (default: the current directory; the disk you
will record to, not tmpfs) and are deleted after each run. Frames are 16 distinct
synthetic camera frames cycled,
so the compression ratios are those of camera-like content.

Run ``python bench/hdf5.py`` (``--quick`` for fewer frames); prints a table and writes
``--out`` (default ``bench-TIMESTAMP/hdf5.json`` under the cwd).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import hdf5plugin
import numpy as np

import broker
from ..recorder import RecordingWriter
from .common import FrameSpec, add_frame_args, add_out_args, frame_specs, out_path, write_json
from .stats import compare, figure

SIZES = {"640x480x3 u8": ((480, 640, 3), "uint8", 2000, 200),
         "1920x1080x3 u8": ((1080, 1920, 3), "uint8", 500, 40),
         "2048x2048 u16": ((2048, 2048), "uint16", 500, 30)}
QUICK_SIZES = ("640x480x3 u8", "1920x1080x3 u8")
QUICK_SKIPS = ("h5py slices", "recorder none swmr=off")
#: frames per run for a --source/--shape frame: this many bytes (full, --quick)
USER_BYTES = (1500e6, 120e6)
POOL = 16  # distinct frames cycled through


class Result:
    """What one timed run produced."""

    def __init__(self, frames: int, seconds: float, ratio: float | None = None) -> None:
        self.frames, self.seconds, self.ratio = frames, seconds, ratio

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


Method = Callable[[Path, list[np.ndarray], int], Result]


def naive(path: Path, pool: list[np.ndarray], n: int, cap_s: float) -> Result:
    """Time-last layout, resize by one, write, flush: per frame, as tutorials do it."""
    shape = pool[0].shape + (0,)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("frames", shape=shape, maxshape=pool[0].shape + (None,),
                                dtype=pool[0].dtype)
        done = 0
        while done < n and time.perf_counter() - t0 < cap_s:
            dset.resize(done + 1, axis=dset.ndim - 1)
            dset[..., done] = pool[done % POOL]
            f.flush()
            done += 1
    return Result(done, time.perf_counter() - t0)


def h5py_slices(path: Path, pool: list[np.ndarray], n: int) -> Result:
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("frames", shape=(n,) + pool[0].shape,
                                chunks=(1,) + pool[0].shape, dtype=pool[0].dtype)
        for i in range(n):
            dset[i] = pool[i % POOL]
    return Result(n, time.perf_counter() - t0)


def recorder(compression: str, swmr: bool = True) -> Method:
    def run(path: Path, pool: list[np.ndarray], n: int) -> Result:
        t0 = time.perf_counter()
        writer = RecordingWriter(path=path, shape=pool[0].shape, dtype=pool[0].dtype,
                                 stream="bench", source="synthetic", frames_expected=n,
                                 compression=compression, swmr=swmr)
        with writer:
            for i in range(n):
                writer.write(i, i, pool[i % POOL])
        return Result(n, time.perf_counter() - t0, writer.bytes_written / writer.bytes_stored)
    return run


def plain_write(path: Path, pool: list[np.ndarray], n: int) -> Result:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(n):
            f.write(pool[i % POOL].data)
        f.flush()
    return Result(n, time.perf_counter() - t0)


def methods(naive_seconds: float, quick: bool = False) -> dict[str, Method]:
    """Every method by name; ``quick`` leaves out the two that only explain the others."""
    table = {
        "naive": lambda p, pool, n: naive(p, pool, n, naive_seconds),
        "h5py slices": h5py_slices,
        "recorder none": recorder("none"),
        "recorder none swmr=off": recorder("none", swmr=False),
        "recorder lz4": recorder("lz4"),
        "recorder bslz4": recorder("bslz4"),
        "plain write": plain_write,
    }
    for name in (QUICK_SKIPS if quick else ()):
        del table[name]
    return table


def bench_size(spec: FrameSpec, n: int, rounds: int, tmp: Path,
               table: dict[str, Method]) -> dict[str, dict]:
    """Every method once per round, in a different seeded order each round: what ran just
    before (a deleted file, freed buffers) decides whether a run finds fresh, slow pages,
    and a rotated order would keep the same predecessor. Median and best per method."""
    pool = spec.frames(POOL)
    names = list(table)
    runs: dict[str, list[Result]] = {name: [] for name in names}
    for k in range(rounds):
        order = names[:]
        random.Random(k).shuffle(order)
        for name in order:
            path = tmp / "bench.h5"
            os.sync()  # untimed: no run pays for the previous run's dirty-page writeback
            try:
                runs[name].append(table[name](path, pool, n))
            finally:
                path.unlink(missing_ok=True)
    frame_mb = pool[0].nbytes / 1e6
    out = {}
    for name, results in runs.items():
        fps = figure([r.fps for r in results])
        ratios = [r.ratio for r in results if r.ratio is not None]
        out[name] = {"fps": fps["median"], "mb_s": fps["median"] * frame_mb,
                     "fps_min": fps["min"], "fps_max": fps["max"],
                     "best_fps": fps["max"], "runs_fps": fps["runs"],
                     "frames": [r.frames for r in results],
                     "ratio": statistics.median(ratios) if ratios else None}
    return mark_noise(out)


def mark_noise(methods: dict[str, dict]) -> dict[str, dict]:
    """``noisy`` per method: its own rounds; the recorder against the naive way (base)
    and the plain write of the same bytes (the limit)."""
    runs = {name: m["runs_fps"] for name, m in methods.items()}
    for name, m in methods.items():
        if name == "recorder none":
            m["noisy"] = compare(runs[name], base=runs.get("naive"),
                                 limit=runs.get("plain write"), what=name,
                                 limit_name="plain write")
        else:
            m["noisy"] = compare(runs[name], what=name)
    return methods


def print_table(results: dict[str, dict[str, dict]]) -> None:
    """Median runs with compression ratios, then best runs: slow episodes here only ever
    slow a run down, so the best run is the better estimate of what a method can do."""
    sizes = list(results)
    for key, title in (("fps", "median of rounds"), ("best_fps", "best round")):
        print(f"{title:<24}" + "".join(f"{s:>30}" for s in sizes))
        for name in next(iter(results.values())):
            cells = []
            for s in sizes:
                r = results[s][name]
                fps = r[key]
                ratio = f"{r['ratio']:5.2f}x" if r["ratio"] else " " * 6
                mb_s = fps * r["mb_s"] / r["fps"]
                cells.append(f"{fps:7.0f} fps {mb_s:6.0f} MB/s {ratio}")
            print(f"{name:<24}" + "".join(f"{c:>30}" for c in cells))
        print()
    for s in sizes:
        for key in ("fps", "best_fps"):
            r = {name: v[key] for name, v in results[s].items()}
            rec = r["recorder none"]
            vs = [f"{rec / r[name]:.2f}x {name}" for name in ("plain write", "naive",
                                                                "h5py slices",
                                                                "recorder none swmr=off")
                  if name in r]
            print(f"{s} ({'median' if key == 'fps' else 'best'} runs): recorder none = "
                  + ", ".join(vs))
    for s in sizes:
        for name, m in results[s].items():
            for reason in m["noisy"]:
                print(f"  noisy: {s} {reason}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and sizes")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 3)")
    ap.add_argument("--naive-seconds", type=float, default=3.0,
                    help="stop the naive writer after this long (default 3)")
    ap.add_argument("--record-dir", type=Path, default=Path("."),
                    help="the disk to measure: temporary files go there (default: the "
                         "current directory)")
    add_frame_args(ap)
    add_out_args(ap, "hdf5")
    args = ap.parse_args(argv)
    out = out_path(args.out, "hdf5", args.overwrite)
    rounds = args.rounds or (3 if args.quick else 5)
    table = methods(args.naive_seconds, args.quick)
    specs = frame_specs(args, {k: v[:2] for k, v in SIZES.items()},
                        QUICK_SIZES if args.quick else None)
    frames = {}
    for spec in specs:
        if spec.label in SIZES:
            frames[spec.label] = SIZES[spec.label][3 if args.quick else 2]
        else:
            frame_bytes = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
            frames[spec.label] = max(8, int(USER_BYTES[args.quick] // frame_bytes))
    tmp = Path(tempfile.mkdtemp(prefix=".hdf5-bench-", dir=args.record_dir))
    results: dict[str, dict[str, dict]] = {}
    try:
        for spec in specs:
            n = frames[spec.label]
            print(f"{spec.label}: {n} frames x {len(table)} methods x {rounds} rounds ...",
                  flush=True)
            results[spec.label] = bench_size(spec, n, rounds, tmp, table)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_table(results)
    meta = {"quick": args.quick, "rounds": rounds, "naive_seconds": args.naive_seconds,
            "python": platform.python_version(), "machine": platform.machine(),
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "hdf5plugin": hdf5plugin.version, "framebroker": broker.__version__,
            "record_dir": str(args.record_dir.resolve()), "frames": frames}
    write_json(out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
