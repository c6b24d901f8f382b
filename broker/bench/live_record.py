"""Live recording benchmark: ``framebroker record`` from a live broker against its limits.

Per frame size, every round runs each method once, in a seeded shuffled order, and the
table shows the median round with min and max, so the ratios compare like with like on
a noisy machine:

* ``plain write``: ``f.write(frame)`` of every frame into a new file: the disk's limit.
* ``writer alone``: :class:`broker.recorder.RecordingWriter` with its defaults, fed from
  memory in this process: what the HDF5 layer allows, timed from the first frame to the
  file closed, as ``record`` times itself.
* ``tcp bound``: the same bytes from this process to a receiving process over tcp
  loopback with raw pyzmq (PUSH/PULL, zero-copy sends, the receiver discards them),
  timed by the receiver from its first message to its last: what any tcp recording on
  this machine can reach before it writes a byte.
* ``record tcp`` / ``record shm``: a real ``framebroker serve`` (synthetic source,
  ``--wait-recorders 1``, plus ``--shm RING`` for shm) and a real ``framebroker record``
  (lossless, preallocated) on free loopback ports. The rate is the recorder's own
  summary: frames written over the time from its first frame to its file closed.

Every method writes a new file on the same disk (a temporary directory, deleted after
each run), and an untimed ``os.sync()`` before each run keeps one run's writeback out of
the next. ``--record-args`` passes extra flags to ``record`` (e.g. ``--window 16``);
``--baseline TREE`` adds ``record tcp/shm @TREE`` rows: the same runs with ``serve`` and
``record`` from another checkout (e.g. the commit before a change), in the same rounds.

``python bench/live_record.py`` (``--quick`` for fewer frames) prints the table and
writes ``--out`` (default ``live_record.json`` in the current directory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

import broker
from broker.broker import free_tcp_endpoints
from broker.recorder import RecordingWriter
from broker.sources import synthetic_frame

# label: (shape, frames, quick frames)
SIZES = {"640x480x3": ((480, 640, 3), 3000, 600),
         "1920x1080x3": ((1080, 1920, 3), 500, 120)}
POOL = 16  # distinct frames cycled through by the in-process methods
_TREE = str(Path(broker.__file__).resolve().parent.parent)  # this checkout, for children
Method = Callable[[Path, tuple[int, ...], int], float]  # -> frames per second


def plain_write(path: Path, shape: tuple[int, ...], n: int) -> float:
    pool = _pool(shape)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(n):
            f.write(pool[i % POOL].data)
    return n / (time.perf_counter() - t0)


def writer_alone(path: Path, shape: tuple[int, ...], n: int) -> float:
    """Timed as ``record`` times itself: from the first frame to the file closed (the
    file is created before, as ``record`` creates it before it joins)."""
    pool = _pool(shape)
    with RecordingWriter(path=path, shape=shape, dtype=np.uint8, stream="bench",
                         source="synthetic", frames_expected=n) as writer:
        t0 = time.perf_counter()
        for i in range(n):
            writer.write(i, i, pool[i % POOL])
    return n / (time.perf_counter() - t0)


def tcp_bound(path: Path, shape: tuple[int, ...], n: int) -> float:
    """Raw pyzmq over tcp loopback: frames per second the receiver got (``path`` unused)."""
    import zmq

    (endpoint,) = free_tcp_endpoints(1)
    sink = subprocess.Popen([sys.executable, "-c", f"from broker.bench.live_record import "
                             f"_sink; _sink({endpoint!r}, {n})"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": _TREE})
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tcp sink did not start: {sink.stderr.read()[-2000:]}")
        push.connect(endpoint)
        pool = _pool(shape)
        for i in range(n):
            push.send(pool[i % POOL], copy=False)
        out, err = sink.communicate(timeout=600)
    finally:
        push.close(linger=-1)
        ctx.term()
    if sink.returncode != 0:
        raise RuntimeError(f"tcp sink exited {sink.returncode}: {err[-2000:]}")
    return float(out)


def _sink(endpoint: str, n: int) -> None:
    """The receiving side of ``tcp_bound``: take ``n`` messages, print their rate."""
    import zmq

    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(endpoint)
    print("ready", flush=True)
    pull.recv(copy=False)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        pull.recv(copy=False)
    print((n - 1) / (time.perf_counter() - t0), flush=True)
    pull.close(linger=0)


def record(shm: str | None, extra: list[str], tree: Path | None = None) -> Method:
    """``serve`` + ``record`` as real processes (from checkout ``tree`` if given); the
    recorder's own fps."""
    def run(path: Path, shape: tuple[int, ...], n: int) -> float:
        pub, work, control, results = free_tcp_endpoints(4)
        serve = ["serve", "--pub", pub, "--work", work, "--control", control,
                 "--results", results, "--source", "synthetic",
                 "--shape", "x".join(map(str, shape)), "--frames", str(n),
                 "--wait-recorders", "1", "--progress", "0", "--json"] + (["--shm", shm] if shm else [])
        rec = ["record", "--out", str(path), "--broker", control, "--frames", str(n), "--json", *extra]
        procs = [_cli(serve, tree), _cli(rec, tree)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs):
            if p.returncode != 0:
                raise RuntimeError(f"{p.args[3]} exited {p.returncode}: {err[-2000:]}")
        summary = json.loads(outs[1][0].strip().splitlines()[-1])
        if summary["frames_written"] != n or summary["transport"] != ("shm" if shm else "tcp"):
            raise RuntimeError(f"record wrote {summary['frames_written']} of {n} frames over "
                               f"{summary['transport']}")
        return float(summary["fps"])
    return run


def methods(shm: str, extra: list[str], baseline: Path | None = None) -> dict[str, Method]:
    table = {"plain write": plain_write, "writer alone": writer_alone, "tcp bound": tcp_bound,
             "record tcp": record(None, extra), "record shm": record(shm, extra)}
    if baseline is not None:
        table[f"record tcp @{baseline.name}"] = record(None, [], baseline)
        table[f"record shm @{baseline.name}"] = record(shm, [], baseline)
    return table


def bench_size(shape: tuple[int, ...], n: int, rounds: int, tmp: Path,
               table: dict[str, Method]) -> dict[str, dict]:
    names = list(table)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        order = names[:]
        random.Random(k).shuffle(order)
        for name in order:
            path = tmp / "bench.h5"
            os.sync()
            try:
                runs[name].append(table[name](path, shape, n))
            finally:
                path.unlink(missing_ok=True)
            print(f"  round {k + 1} {name}: {runs[name][-1]:.0f} fps", flush=True)
    mb = int(np.prod(shape)) / 1e6
    return {name: {"fps": statistics.median(v), "min_fps": min(v), "max_fps": max(v),
                   "mb_s": statistics.median(v) * mb, "runs_fps": v}
            for name, v in runs.items()}


def ratios(res: dict[str, dict]) -> dict[str, float]:
    """The issue's criteria, from medians of the same run."""
    f = {k: v["fps"] for k, v in res.items()}
    return {"tcp / writer": f["record tcp"] / f["writer alone"],
            "shm / writer": f["record shm"] / f["writer alone"],
            "shm / tcp": f["record shm"] / f["record tcp"],
            "tcp / bound": f["record tcp"] / f["tcp bound"],
            "bound / writer": f["tcp bound"] / f["writer alone"],
            "writer / plain": f["writer alone"] / f["plain write"]}


def print_table(results: dict[str, dict[str, dict]]) -> None:
    sizes = list(results)
    print(f"{'fps: median (min-max)':<16}" + "".join(f"{s:>28}" for s in sizes))
    for name in next(iter(results.values())):
        cells = [f"{r['fps']:6.0f} ({r['min_fps']:.0f}-{r['max_fps']:.0f})"
                 for r in (results[s][name] for s in sizes)]
        print(f"{name:<16}" + "".join(f"{c:>28}" for c in cells))
    for key in ratios(next(iter(results.values()))):
        print(f"{key:<16}" + "".join(f"{ratios(results[s])[key]:>27.2f}x" for s in sizes))


def _pool(shape: tuple[int, ...]) -> list[np.ndarray]:
    return [synthetic_frame(shape, "uint8", i) for i in range(POOL)]


def _cli(args: list[str], tree: Path | None = None) -> subprocess.Popen:
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, "-m", "broker.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tree)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--shm", default="512MiB", help="the broker's ring for record shm")
    ap.add_argument("--record-args", default="", help="extra flags for record, one string")
    ap.add_argument("--baseline", type=Path, default=None, metavar="TREE",
                    help="also run serve + record from this checkout, in the same rounds")
    ap.add_argument("--out", type=Path, default=Path("live_record.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists: pass --overwrite or another --out")
    table = methods(args.shm, args.record_args.split(),
                    args.baseline.resolve() if args.baseline else None)
    tmp = Path(tempfile.mkdtemp(prefix="live-record-bench-"))
    load = os.getloadavg()
    results: dict[str, dict[str, dict]] = {}
    try:
        for label in args.sizes:
            shape, n_full, n_quick = SIZES[label]
            n = n_quick if args.quick else n_full
            print(f"{label}: {n} frames x {len(table)} methods x {args.rounds} rounds",
                  flush=True)
            results[label] = bench_size(shape, n, args.rounds, tmp, table)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_table(results)
    meta = {"rounds": args.rounds, "quick": args.quick, "shm": args.shm,
            "baseline": str(args.baseline) if args.baseline else None,
            "record_args": args.record_args, "load_before": load, "load_after": os.getloadavg(),
            "python": platform.python_version(), "framebroker": broker.__version__,
            "frames": {s: SIZES[s][2] if args.quick else SIZES[s][1] for s in args.sizes}}
    out = {"meta": meta, "results": results,
           "ratios": {s: ratios(r) for s, r in results.items()}}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"load {load[0]:.2f} before, {meta['load_after'][0]:.2f} after; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
