"""How long does each long-running subcommand take to exit after SIGTERM?

The target is 1 s for every one of them (issue 12). For each subcommand and each load
level, ``--repeat`` rounds: a fresh paced synthetic broker (``serve --fps 50 --shape
48x64``, unbounded) on fresh endpoints, the subcommand started against it and awaited
until it is streaming (the broker's status shows it: a subscriber, a work-group member,
acknowledged frames), then SIGTERM and the time until the process has exited. ``serve``
and ``run`` are their own broker: they are streaming once frames are sent (``run``: once
its sink has acknowledged some). ``--load N`` runs N busy-loop processes
(``python3 -c "while 1: pass"``) through the rounds of that level, as a loaded host.

Prints a table (median and max seconds, exit statuses seen) and writes ``--out``
(default ``bench-TIMESTAMP/shutdown.json`` under the cwd).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..broker import free_tcp_endpoints
from ..client import BrokerUnavailable, Control
from .common import add_out_args, cli, out_path, write_json

SHAPE = "48x64"
FPS = "50"


def _flags(eps: list[str]) -> list[str]:
    return [x for pair in zip(("--pub", "--work", "--control", "--results"), eps)
            for x in pair]


def _group(status: dict[str, Any], name: str) -> dict[str, Any]:
    return status["work"]["groups"].get(name, {})


def _recorded(status: dict[str, Any]) -> bool:
    """Every recorder group (one per shard) has acknowledged frames."""
    groups = [g for n, g in status["work"]["groups"].items() if n.startswith("record")]
    return bool(groups) and all(g["acked"] > 0 for g in groups)


class StartError(RuntimeError):
    """A round's processes did not get to streaming (nothing was measured)."""


Ready = Callable[[dict[str, Any]], bool]
#: subcommand -> (its arguments after the broker's control endpoint, extra parts it needs
#: running beside it, when the broker's status shows it streaming)
CLIENTS: dict[str, tuple[list[str], list[list[str]], Ready]] = {
    "watch": (["watch", "--progress", "0"], [], lambda s: s["subscribers"] >= 1),
    "view": (["view", "--nice", "0", "--http", "HTTP"], [], lambda s: s["subscribers"] >= 1),
    "worker": (["worker", "--planner", "estimate", "--no-sink"], [],
               lambda s: _group(s, "fft").get("acked", 0) > 0),
    "workers": (["workers", "--count", "2", "--planner", "estimate", "--no-sink"], [],
                lambda s: len(_group(s, "fft").get("members", {})) >= 2
                and _group(s, "fft").get("acked", 0) > 0),
    "sink": (["sink", "--out", "OUT.h5"], [["worker", "--planner", "estimate"]],
             lambda s: _group(s, "fft").get("acked", 0) > 0),
    "record": (["record", "--out", "OUT.h5", "--no-space-check"], [],
               _recorded),
    "record-shards": (["record", "--out", "OUT.h5", "--shards", "2", "--no-space-check"], [],
                      _recorded),
}
SUBCOMMANDS = ("serve", *CLIENTS, "run")


def _wait(control: str, ready: Ready, procs: list[subprocess.Popen],
          timeout: float = 120) -> None:
    """Until the broker's status satisfies ``ready``; fails if a process exits first."""
    ctl = Control(control, timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise StartError(f"{p.args[3:5]} exited first: {p.communicate()[1]}")
            try:
                if ready(ctl.status()):
                    return
            except (BrokerUnavailable, TimeoutError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise StartError("never streaming")
            time.sleep(0.05)
    finally:
        ctl.close()


def _sigterm(proc: subprocess.Popen) -> tuple[float, int | str]:
    """Seconds from SIGTERM to exit, and the exit status ("N+orphans" if children it
    started outlived it: they still hold its output pipes)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    elapsed = time.monotonic() - t0
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return elapsed, f"{proc.returncode}+orphans"
    return elapsed, proc.returncode


def _serve(eps: list[str], wait: list[str]) -> subprocess.Popen:
    return cli("serve", *_flags(eps), "--fps", FPS, "--shape", SHAPE, "--frames", "0",
               "--progress", "0", *wait)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def one_round(name: str, workdir: Path) -> tuple[float, int]:
    """Start ``name`` streaming, SIGTERM it, return (seconds to exit, exit status)."""
    eps = free_tcp_endpoints(4)
    control = eps[2]
    if name == "run":
        proc = cli("run", *_flags(eps), "--seconds", "0", "--frames", "0", "--fps", FPS,
                   "--shape", SHAPE, "--workers", "1", "--planner", "estimate",
                   "--progress", "0")
        try:
            _wait(control, lambda s: _group(s, "fft").get("acked", 0) > 0, [proc])
            return _sigterm(proc)
        finally:
            _stop([proc])
    if name == "serve":
        proc = _serve(eps, [])
        try:
            _wait(control, lambda s: s["frames_sent"] > 0, [proc])
            return _sigterm(proc)
        finally:
            _stop([proc])
    argv, extras, ready = CLIENTS[name]
    out = workdir / f"{name}-{time.monotonic_ns()}.h5"
    http = f"127.0.0.1:{free_tcp_endpoints(1)[0].rpartition(':')[2]}"
    argv = [{"OUT.h5": str(out), "HTTP": http}.get(a, a) for a in argv]
    wait = (["--wait-recorders", "2" if name == "record-shards" else "1"]
            if name.startswith("record") else
            ["--wait-workers", "1"] if name == "sink" else [])  # the sink before results
    broker = _serve(eps, wait)
    others = [cli(*x, "--broker", control) for x in extras]
    proc = cli(*argv, "--broker", control, start_new_session=True)
    try:
        _wait(control, ready, [broker, proc, *others])
        return _sigterm(proc)
    finally:
        _stop([*others, proc, broker])


def _round(name: str, workdir: Path, tries: int = 3) -> tuple[float, int | str]:
    """One round, started again (on fresh ports) if it failed before the SIGTERM: on a
    shared host a free port can be taken before the broker binds it."""
    for attempt in range(tries):
        try:
            return one_round(name, workdir)
        except StartError as exc:
            print(f"{name}: start {attempt + 1} failed ({exc}); again", file=sys.stderr)
    raise StartError(f"{name} did not start in {tries} tries")


@contextlib.contextmanager
def burners(n: int) -> Iterator[None]:
    """``n`` busy-loop processes, for the length of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def measure(names: list[str], loads: list[int], repeat: int) -> dict[str, Any]:
    """Every subcommand, ``repeat`` rounds per load level, rounds interleaved."""
    cells: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fb-shutdown-") as tmp:
        for load in loads:
            with burners(load):
                runs: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
                for _ in range(repeat):
                    for name in names:
                        runs[name].append(_round(name, Path(tmp)))
                        print(f"{name} at load {load}: {runs[name][-1][0]:.3f} s, exit "
                              f"{runs[name][-1][1]}", file=sys.stderr, flush=True)
                        for f in Path(tmp).iterdir():
                            f.unlink()
            for name, rs in runs.items():
                secs = [round(s, 3) for s, _ in rs]
                cells[f"{name}@load{load}"] = {
                    "subcommand": name, "load": load, "seconds": secs,
                    "median_s": statistics.median(secs), "max_s": max(secs),
                    "exit_statuses": sorted({str(rc) for _, rc in rs})}
    return {"shape": SHAPE, "fps": float(FPS), "repeat": repeat, "loads": loads,
            "cells": cells}


def table(result: dict[str, Any]) -> str:
    loads = result["loads"]
    head = f"{'subcommand':<14}" + "".join(f" {'load ' + str(n) + ' median/max s':>24}"
                                           for n in loads) + "  exit"
    lines = [head]
    names = dict.fromkeys(c["subcommand"] for c in result["cells"].values())
    for name in names:
        row, statuses = f"{name:<14}", set()
        for n in loads:
            c = result["cells"][f"{name}@load{n}"]
            row += f" {c['median_s']:>11.3f} / {c['max_s']:<10.3f}"
            statuses.update(c["exit_statuses"])
        lines.append(row + "  " + ",".join(map(str, sorted(statuses))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=SUBCOMMANDS, default=list(SUBCOMMANDS),
                    help="subcommands to measure (default: all)")
    ap.add_argument("--load", type=int, nargs="+", default=[0, 2],
                    help="busy-loop processes beside the rounds, one level each "
                         "(default: 0 2)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per cell (default 5)")
    add_out_args(ap, "shutdown")
    args = ap.parse_args(argv)
    path = out_path(args.out, "shutdown", args.overwrite)
    result = measure(args.only, args.load, args.repeat)
    print(table(result))
    write_json(path, result)
    return 0
