"""Recorder scaling: aggregate lossless recording MB/s with 1, 2 and 4 shard writers.

Each run is real processes on loopback: ``framebroker serve`` (synthetic frames, as fast
as the recording allows) and ``framebroker record --out OUT --shards N`` (N writer processes,
one file each, behind a VDS master). The recording is lossless, so the source waits for
the slowest writer and the broker's own rate *is* the aggregate recording rate: that is
the figure (frames x frame bytes / the broker's first-to-last frame time). Beside it:
each writer's own MB/s and the CPU seconds of every writer and of the broker.

The shard counts run interleaved in rounds (1, 2, 4 / 2, 4, 1 / 4, 1, 2 ...) and each is
reported as the median round with min and max, because on a shared machine only figures
from one run compare. On a 2-core machine 4 writers and the broker share two cores: the
figure is what it is, and the CPU columns say where the time went. Files are written to
``--record-dir`` (default: a temporary directory in the current one, so the disk is the
one you record to, not tmpfs) and deleted after each run, with an untimed ``os.sync()``
between runs so one run's writeback does not land in the next.

``python bench/shards.py`` (``--quick``: smaller, fewer frames); prints a table, writes
JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import broker
from broker.broker import free_tcp_endpoints

SHARDS = (1, 2, 4)
FULL = {"shape": "1024x1024", "dtype": "uint16", "frames": 500, "rounds": 3}
QUICK = {"shape": "512x512", "dtype": "uint16", "frames": 600, "rounds": 2}


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "broker.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            cwd=Path(broker.__file__).resolve().parent.parent)


def _last_json(proc: subprocess.Popen, what: str, timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise RuntimeError(f"{what} exited {proc.returncode} without a summary:\n{tail}"
                           ) from None


def run_once(shards: int, shape: str, dtype: str, frames: int, compression: str,
             directory: Path, timeout: float = 600) -> dict[str, Any]:
    """One recording of ``frames`` frames with ``shards`` writers; its figures."""
    pub, work, control, results = free_tcp_endpoints(4)
    out = directory / f"bench{shards}.h5"
    rec = _cli("record", "--out", str(out), "--shards", str(shards), "--broker", control, "--json",
               "--compression", compression, "--expect-frames", str(frames), "--timeout", "60")
    srv = _cli("serve", "--pub", pub, "--work", work, "--control", control, "--results",
               results, "--frames", str(frames), "--wait-recorders", str(shards), "--shape",
               shape, "--dtype", dtype, "--progress", "0", "--json")
    try:
        status = _last_json(srv, "serve", timeout)
        summary = _last_json(rec, "record", timeout)
    finally:
        for p in (rec, srv):
            if p.poll() is None:
                p.kill()
                p.communicate()
        for f in directory.glob("bench*.h5"):
            f.unlink()
    if summary["frames_written"] != frames:
        raise RuntimeError(f"--shards {shards}: recorded {summary['frames_written']} of "
                           f"{frames} frames")
    return {"shards": shards, "mb_per_s": status["mb_per_s"], "fps": status["avg_fps"],
            "writer_mb_per_s": [s.get("mb_per_s") for s in summary["shards"]],
            "cpu_s_per_shard": summary["cpu_s_per_shard"], "broker_cpu_s": status["cpu_s"]}


def measure(shape: str, dtype: str, frames: int, rounds: int, compression: str,
            directory: Path) -> dict[str, Any]:
    """Every shard count in every round, the order rotated round by round."""
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in SHARDS}
    for r in range(rounds):
        order = SHARDS[r % len(SHARDS):] + SHARDS[:r % len(SHARDS)]
        for n in order:
            os.sync()  # untimed: the last run's writeback out of this one
            runs[n].append(run_once(n, shape, dtype, frames, compression, directory))
            print(f"  round {r + 1}: {n} shard(s): {runs[n][-1]['mb_per_s']:.0f} MB/s",
                  file=sys.stderr, flush=True)
    rows = []
    base = None
    for n in SHARDS:
        mbs = [x["mb_per_s"] for x in runs[n]]
        med = statistics.median(mbs)
        base = base or med
        rows.append({"shards": n, "mb_per_s": med, "min": min(mbs), "max": max(mbs),
                     "vs_1": round(med / base, 2) if base else None,
                     "writer_mb_per_s": float(np.median([w for x in runs[n]
                                                         for w in x["writer_mb_per_s"]])),
                     "cpu_s_per_shard": float(np.median([c for x in runs[n]
                                                         for c in x["cpu_s_per_shard"]])),
                     "broker_cpu_s": statistics.median(x["broker_cpu_s"] for x in runs[n])})
    return {"rows": rows, "runs": {str(n): v for n, v in runs.items()}}


def table(data: dict[str, Any]) -> str:
    m = data["meta"]
    lines = ["| shards | aggregate MB/s (median) | min .. max | vs 1 shard | per writer MB/s "
             "| CPU s per writer | broker CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['shards']} | {r['mb_per_s']:.0f} | {r['min']:.0f} .. {r['max']:.0f}"
                     f" | {r['vs_1']:.2f}x | {r['writer_mb_per_s']:.0f} | "
                     f"{r['cpu_s_per_shard']:.2f} | {r['broker_cpu_s']:.2f} |")
    return (f"{m['frames']} frames of {m['shape']} {m['dtype']} ({m['frame_mb']:.2f} MB), "
            f"compression {m['compression']}, {m['rounds']} interleaved rounds, "
            f"{m['cpus']} CPUs, load {m['load']}\n\n" + "\n".join(lines))


def section(data: dict[str, Any]) -> str:
    """The benchmark report's section (``framebroker bench``)."""
    return ("## Recorder scaling: lossless recording with 1, 2, 4 shard writers\n\n"
            "Aggregate MB/s is the broker's rate while every frame is recorded (the source "
            "waits for the slowest writer); CPU seconds are whole processes.\n\n"
            + table(data) + "\n\n![shards](shards.png)\n")


def plot(data: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=110, layout="constrained")
    ax = fig.subplots()
    rows = data["rows"]
    med = [r["mb_per_s"] for r in rows]
    err = [[m - r["min"] for m, r in zip(med, rows)], [r["max"] - m for m, r in zip(med, rows)]]
    bars = ax.bar([str(r["shards"]) for r in rows], med, yerr=err, capsize=4)
    ax.bar_label(bars, fmt="%.0f")
    ax.set(title=f"lossless recording, {data['meta']['shape']} {data['meta']['dtype']}: "
                 f"aggregate MB/s by shard writers", xlabel="shard writers", ylabel="MB/s")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller frames, fewer of them")
    ap.add_argument("--shape", default=None, help="frame shape (default 1024x1024)")
    ap.add_argument("--dtype", default=None, help="frame dtype (default uint16)")
    ap.add_argument("--frames", type=int, default=None, help="frames per run")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 2)")
    ap.add_argument("--compression", default="none", help="shard codec (default none)")
    ap.add_argument("--record-dir", type=Path, default=None,
                    help="where the files go (default: a temporary directory here)")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = ap.parse_args(argv)
    d = QUICK if args.quick else FULL
    shape, dtype = args.shape or d["shape"], args.dtype or d["dtype"]
    frames, rounds = args.frames or d["frames"], args.repeat or d["rounds"]
    directory = Path(tempfile.mkdtemp(prefix="shards-bench-", dir=args.record_dir or Path.cwd()))
    load_before = os.getloadavg()[0]
    try:
        data = measure(shape, dtype, frames, rounds, args.compression, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    dims = [int(x) for x in shape.split("x")]
    data["meta"] = {"shape": shape, "dtype": dtype, "frames": frames, "rounds": rounds,
                    "compression": args.compression, "cpus": os.cpu_count(),
                    "frame_mb": float(np.prod(dims)) * np.dtype(dtype).itemsize / 1e6,
                    "load": f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
                    "python": platform.python_version(), "framebroker": broker.__version__}
    print(table(data))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
