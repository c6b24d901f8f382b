"""How long from typing the command to the first frame? Start-up of ``run`` and of
``serve`` + ``watch``.

* ``run``: a default ``framebroker run --frames N --json`` (synthetic 480x640x3, one
  FFT worker per core, the sink) on fresh endpoints. From its report: invocation to
  the parts being started, to the broker's first frame, and to the first result at
  the sink (the figure that counts: a frame went all the way through).
* ``serve+watch``: ``serve --wait-subscribers 1`` and ``watch`` started together;
  invocation to the first frame at ``watch`` (its ``first_frame_unix``).

"Invocation" is this script's wall clock just before it starts the command, so the
interpreter's own start-up, the imports and the argument parsing are all counted.
Rounds alternate the setups; the table gives medians (default 5 rounds) and the
machine's load average, because on a shared machine these figures move with it.
``--baseline TREE`` adds both setups run from another checkout (``PYTHONPATH=TREE``,
e.g. the commit before a change) in the same rounds: the comparison to trust. TREE
must report the fields this module reads (the sink's ``first_result_unix``, run's
``spawned_unix``, watch's ``first_frame_unix``).
Prints a table and writes ``--out`` (default ``bench-TIMESTAMP/startup.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..broker import free_tcp_endpoints
from .common import add_out_args, cli, out_path, write_json

SETUPS = ("run", "serve+watch")
NAMES = ("--pub", "--work", "--control", "--results")


def _part(args: list[str], tree: Path | None) -> subprocess.Popen:
    """``python -m broker.cli ARGS``, from checkout ``tree`` if given (run in it too:
    ``-m`` puts the working directory first on the path)."""
    if tree is None:
        return cli(*args)
    return subprocess.Popen([sys.executable, "-m", "broker.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)


def _last_json(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {err.strip()[-500:]}")
    return json.loads(out.strip().splitlines()[-1])


def one_run(frames: int, tree: Path | None = None) -> dict[str, Any]:
    """A default ``run``: invocation to spawn, to the first frame, to the first result."""
    flags = [x for pair in zip(NAMES, free_tcp_endpoints(4)) for x in pair]
    t0 = time.time()
    rep = _last_json(_part(["run", *flags, "--frames", str(frames), "--progress", "0", "--json"],
                           tree), "run")
    if not rep["ok"] or rep.get("first_result_s") is None:
        raise RuntimeError(f"run did not go through: {rep['failed']}")
    spawn = rep["spawned_unix"] - t0
    return {"to_spawn_s": round(spawn, 3), "to_first_frame_s": round(spawn + rep["startup_s"], 3),
            "to_first_result_s": round(spawn + rep["first_result_s"], 3),
            "cpu_s": rep["cpu_s"]}


def one_serve_watch(frames: int, tree: Path | None = None) -> dict[str, Any]:
    """``serve`` and ``watch`` started at once: invocation to the first frame watched."""
    eps = free_tcp_endpoints(4)
    flags = [x for pair in zip(NAMES, eps) for x in pair]
    t0 = time.time()
    broker = _part(["serve", *flags, "--frames", str(frames), "--wait-subscribers", "1",
                    "--progress", "0", "--json"], tree)
    watcher = _part(["watch", "--broker", eps[2], "--frames", str(frames), "--progress", "0",
                     "--json"], tree)
    seen = _last_json(watcher, "watch")
    status = _last_json(broker, "serve")
    if seen["received"] != frames or seen.get("first_frame_unix") is None:
        raise RuntimeError(f"watch saw {seen['received']} of {frames} frames")
    return {"to_first_frame_at_broker_s": round(status["first_frame_unix"] - t0, 3),
            "to_first_frame_s": round(seen["first_frame_unix"] - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of both setups (median)")
    ap.add_argument("--frames", type=int, default=100, help="frames per run (start-up only)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="TREE",
                    help="also run both setups from this checkout, in the same rounds")
    add_out_args(ap, "startup")
    args = ap.parse_args(argv)
    out = out_path(args.out, "startup", args.overwrite)
    trees: dict[str, Path | None] = {"": None}
    if args.baseline is not None:
        trees[f"@{args.baseline.name}"] = args.baseline.resolve()
    setups = [(name + tag, name, tree) for tag, tree in trees.items() for name in SETUPS]
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = setups if r % 2 == 0 else setups[::-1]  # none always goes first
        for label, name, tree in order:
            load = os.getloadavg()[0]
            res = (one_run(args.frames, tree) if name == "run"
                   else one_serve_watch(args.frames, tree))
            runs.append({"round": r + 1, "setup": label, "load": round(load, 2), **res})
            print(f"round {r + 1} {label:>11} (load {load:.1f}): "
                  + ", ".join(f"{k} {v}" for k, v in res.items() if k != "cpu_s"), flush=True)
    result: dict[str, Any] = {
        "rounds": args.rounds, "frames": args.frames,
        "baseline": str(args.baseline) if args.baseline else None,
        "load_median": round(statistics.median(x["load"] for x in runs), 2),
        "medians": {label: _medians([x for x in runs if x["setup"] == label])
                    for label, _, _ in setups},
        "runs": runs,
    }
    print(f"\nmedians of {args.rounds} rounds (load average {result['load_median']}):\n"
          "| setup | invocation -> | seconds |\n|---|---|---|")
    for label, figures in result["medians"].items():
        for key, value in figures.items():
            print(f"| {label} | {key.removeprefix('to_').removesuffix('_s').replace('_', ' ')} "
                  f"| {value:.2f} |")
    write_json(out, result, indent=1)
    return 0


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median of every ``to_...`` figure of one setup's rounds."""
    keys = [k for k in runs[0] if k.startswith("to_")]
    return {k: round(statistics.median(x[k] for x in runs), 3) for k in keys}


if __name__ == "__main__":
    sys.exit(main())
