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

``--hostile`` is issue 11's soak: beside ``run`` (workers, sink) it starts a lossless
recorder with file rotation, a ``watch`` and a ``view``, and runs the hostile peer
(broker/bench/hostile.py) against the broker's control, work and PUB sockets and the
sink's results socket the whole time; the recorder's and sink's counts show whether
anything on the lossless paths was lost.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import psutil

from ..broker import free_tcp_endpoints
from ..client import Control
from ..sources import parse_shape
from . import hostile as hostile_peer
from .common import add_out_args, child_env, out_path, write_json


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "broker.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())


def _sample(procs: dict[str, psutil.Process], t: float,
            samples: dict[str, list[tuple[float, float, int]]]) -> None:
    for name, proc in procs.items():
        try:
            samples.setdefault(name, []).append((t, proc.memory_info().rss / 1e6,
                                                 proc.num_fds()))
        except psutil.Error:
            pass


def soak(seconds: float, fps: float, interval: float, warmup: float,
         shape: str = "480x640x3", hostile: bool = False,
         spoof_results: bool = False) -> dict[str, Any]:
    """Run the pipeline and sample its children; returns samples and per-part growth."""
    with tempfile.TemporaryDirectory(prefix="fb-soak-") as tmp:
        endpoints = free_tcp_endpoints(5)
        eps = [x for name, ep in zip(("pub", "work", "control", "results"), endpoints)
               for x in (f"--{name}", ep)]
        ctl = Control(endpoints[2], timeout=1.0)
        record = [] if hostile else ["--record", f"{tmp}/soak.h5"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "run", "--seconds", str(seconds), "--fps",
             str(fps), "--shape", shape, *record, "--json", *eps],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        extra: dict[str, subprocess.Popen] = {}
        attack: dict[str, Any] = {}
        if hostile:
            ctl.timeout = 10.0
            while proc.poll() is None:  # the parts join once the broker answers
                try:
                    ctl.endpoints()
                    break
                except (TimeoutError, RuntimeError):
                    time.sleep(0.2)
            extra = {
                "record": _cli("record", "--out", f"{tmp}/soak.h5", "--broker", endpoints[2], "--json",
                               "--max-frames-per-file", str(int(fps * 60) or 10000)),
                "watch": _cli("watch", "--broker", endpoints[2], "--json", "--progress", "0",
                              "--timeout", "60"),
                "view": _cli("view", "--broker", endpoints[2], "--http",
                             endpoints[4].replace("tcp://", "")),
            }
            thread = threading.Thread(target=lambda: attack.update(hostile_peer.run(
                endpoints[2], seconds - 5, endpoints[3] if spoof_results else None)),
                daemon=True)
            thread.start()
        samples: dict[str, list[tuple[float, float, int]]] = {}
        pool: list[tuple[float, int]] = []  # (t, the broker's buffers_allocated)
        t0 = time.monotonic()
        while proc.poll() is None:
            try:
                pool.append((time.monotonic() - t0, ctl.status()["buffers_allocated"]))
            except (TimeoutError, RuntimeError):
                pass  # not up yet, or gone
            procs = {}
            for child in psutil.Process(proc.pid).children():
                try:
                    procs[f"{child.cmdline()[3]}-{child.pid}"] = child
                except (psutil.Error, IndexError):
                    pass
            procs.update({f"{name}-{p.pid}": psutil.Process(p.pid) for name, p in extra.items()
                          if p.poll() is None})
            _sample(procs, time.monotonic() - t0, samples)
            time.sleep(interval)
        out, err = proc.communicate()
        ctl.close()
        parts = {}
        for name, p in extra.items():
            if name in ("watch", "view"):
                p.send_signal(2)
            try:
                p_out, p_err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p_out, p_err = p.communicate()
            lines = p_out.strip().splitlines()
            try:
                parts[name] = {"returncode": p.returncode,
                               **(json.loads(lines[-1]) if lines else {})}
            except json.JSONDecodeError:
                parts[name] = {"returncode": p.returncode, "out": lines[-1][:300]}
            parts[name]["stderr_tail"] = p_err.strip().splitlines()[-3:]
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
            "parts": parts, "hostile": attack, "stderr_tail": err.strip().splitlines()[-5:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="soak duration (default 600)")
    ap.add_argument("--fps", type=float, default=200.0, help="source rate (default 200)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the baseline")
    ap.add_argument("--shape", default="480x640x3",
                    help="synthetic frame (default %(default)s; a lossless recording of 10 "
                         "minutes at 200 fps of it is 110 GB: pick one the disk can hold)")
    add_out_args(ap, "soak")
    ap.add_argument("--hostile", action="store_true",
                    help="also a rotating lossless recorder, a watch, a viewer, and the "
                         "hostile peer against every socket")
    ap.add_argument("--spoof-results", action="store_true",
                    help="with --hostile, also spoofed RESULTs at the sink's results socket")
    args = ap.parse_args(argv)
    out = out_path(args.out, "soak", args.overwrite)
    res = soak(args.seconds, args.fps, args.interval, args.warmup, shape=args.shape,
               hostile=args.hostile,
               spoof_results=args.spoof_results)
    print("| process | RSS MB after warm-up | RSS MB at end | max growth MB | of it, broker "
          "pool MB | fd growth |")
    print("|---|---|---|---|---|---|")
    for name, g in res["growth"].items():
        print(f"| {name} | {g['rss_mb_first']} | {g['rss_mb_last']} | {g['rss_mb_growth']} | "
              f"{g.get('pool_mb_growth', '')} | {g['fds_growth']} |")
    stages = res["run"].get("stages", {})
    print("frames: " + ", ".join(f"{k} {v['frames']}" for k, v in stages.items()))
    for name, part in res["parts"].items():
        print(f"{name}: " + ", ".join(f"{k} {part[k]}" for k in (
            "returncode", "frames_written", "frames_missed", "dropped", "received", "gaps",
            "files") if k in part))
    if res["hostile"]:
        print(f"hostile peer: {res['hostile']['rounds']} rounds, sent {res['hostile']['sent']}, "
              f"{res['hostile']['error_count']} attacks failed")
    write_json(out, res, indent=1)
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
