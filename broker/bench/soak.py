"""Soak: the full pipeline for a long time, sampling each process's memory and fds.

Runs ``framebroker run`` (FFT workers, sink, lossless recorder) for ``--seconds`` at
``--fps``, samples RSS and open file descriptors of every child every ``--interval``
seconds, and reports per process the growth after the warm-up: memory must stay
flat (a leak shows as steady growth, not as the first seconds' allocations).

The broker's pool of frame buffers may grow after the warm-up by design: a consumer
that stalls for a moment lets up to ``--max-pending`` frames pile up, and the pool
keeps those buffers for reuse. So the broker's ``buffers_allocated`` is sampled too,
and its growth is reported apart (``pool_mb_growth``) from the rest (``rss_mb_beyond_pool``).
Prints a table and writes ``--out`` (default ``bench-TIMESTAMP/soak.json`` under the cwd).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import psutil

from ..broker import free_tcp_endpoints
from ..client import Control
from ..sources import parse_shape
from .common import add_out_args, child_env, out_path, write_json


def soak(seconds: float, fps: float, interval: float, warmup: float,
         shape: str = "480x640x3") -> dict[str, Any]:
    """Run the pipeline and sample its children; returns samples and per-part growth."""
    with tempfile.TemporaryDirectory(prefix="fb-soak-") as tmp:
        endpoints = free_tcp_endpoints(4)
        eps = [x for name, ep in zip(("pub", "work", "control", "results"), endpoints)
               for x in (f"--{name}", ep)]
        ctl = Control(endpoints[2], timeout=1.0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "run", "--seconds", str(seconds), "--fps",
             str(fps), "--shape", shape, "--record", f"{tmp}/soak.h5", "--json", *eps],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        samples: dict[str, list[tuple[float, float, int]]] = {}
        pool: list[tuple[float, int]] = []  # (t, the broker's buffers_allocated)
        t0 = time.monotonic()
        while proc.poll() is None:
            try:
                pool.append((time.monotonic() - t0, ctl.status()["buffers_allocated"]))
            except (TimeoutError, RuntimeError):
                pass  # not up yet, or gone
            for child in psutil.Process(proc.pid).children():
                try:
                    name = f"{child.cmdline()[3]}-{child.pid}"
                    samples.setdefault(name, []).append(
                        (time.monotonic() - t0, child.memory_info().rss / 1e6, child.num_fds()))
                except (psutil.Error, IndexError):
                    pass
            time.sleep(interval)
        out, err = proc.communicate()
        ctl.close()
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    growth = {}
    for name, rows in samples.items():
        steady = [r for r in rows if warmup <= r[0] <= seconds - interval]
        if len(steady) >= 2:
            growth[name] = {"rss_mb_first": round(steady[0][1], 1),
                            "rss_mb_last": round(steady[-1][1], 1),
                            "rss_mb_growth": round(max(r[1] for r in steady) - steady[0][1], 1),
                            "fds_growth": max(r[2] for r in steady) - steady[0][2]}
    frame_mb = np.prod(parse_shape(shape)) / 1e6  # uint8
    steady_pool = [n for t, n in pool if warmup <= t <= seconds - interval]
    for name, g in growth.items():
        if name.startswith("serve") and steady_pool:
            g["pool_mb_growth"] = round((max(steady_pool) - steady_pool[0]) * frame_mb, 1)
            g["rss_mb_beyond_pool"] = round(g["rss_mb_growth"] - g["pool_mb_growth"], 1)
    return {"seconds": seconds, "fps": fps, "warmup": warmup, "returncode": proc.returncode,
            "run": report, "growth": growth, "samples": samples, "pool": pool,
            "stderr_tail": err.strip().splitlines()[-5:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="soak duration (default 600)")
    ap.add_argument("--fps", type=float, default=200.0, help="source rate (default 200)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the baseline")
    add_out_args(ap, "soak")
    args = ap.parse_args(argv)
    out = out_path(args.out, "soak", args.overwrite)
    res = soak(args.seconds, args.fps, args.interval, args.warmup)
    print("| process | RSS MB after warm-up | RSS MB at end | max growth MB | of it, broker "
          "pool MB | fd growth |")
    print("|---|---|---|---|---|---|")
    for name, g in res["growth"].items():
        print(f"| {name} | {g['rss_mb_first']} | {g['rss_mb_last']} | {g['rss_mb_growth']} | "
              f"{g.get('pool_mb_growth', '')} | {g['fds_growth']} |")
    stages = res["run"].get("stages", {})
    print("frames: " + ", ".join(f"{k} {v['frames']}" for k, v in stages.items()))
    write_json(out, res, indent=1)
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
