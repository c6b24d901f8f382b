"""Does ``framebroker view`` slow the broker? Broker publish rate with and without a viewer.

One run, interleaved rounds of three setups, each a fresh synthetic broker
(``serve --frames N``, 480x640x3 by default, unpaced unless ``--fps``) on fresh endpoints:

* ``alone``: no subscriber at all (the broker's own ceiling);
* ``watch``: one plain ``watch --policy latest:1`` subscriber (what any subscriber costs);
* ``view``: ``framebroker view`` plus an HTTP client pulling ``/stream.mjpg`` and
  polling ``/stats``, as a browser does.

The broker's rate is its own ``avg_fps`` (first to last frame sent; the subscribed
setups hold the stream with ``--wait-subscribers 1`` until the subscriber is there).
Prints a table and writes ``--out`` (default ``bench-TIMESTAMP/view.json`` under the
cwd) with the median rates and the
ratios view/alone and view/watch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from ..broker import free_tcp_endpoints
from .common import add_out_args, cli, out_path, write_json

SETUPS = ("alone", "watch", "view")


def serve(eps: list[str], frames: int, shape: str, wait: bool, fps: float) -> subprocess.Popen:
    names = ("--pub", "--work", "--control", "--results")
    flags = [x for pair in zip(names, eps) for x in pair]
    return cli("serve", *flags, "--frames", str(frames), "--shape", shape, "--progress", "0", "--json",
               "--wait-subscribers", "1" if wait else "0", "--fps", str(fps))


def broker_fps(proc: subprocess.Popen) -> float:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"broker failed: {err.strip()}")
    return float(json.loads(out.strip().splitlines()[-1])["avg_fps"])


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class MjpegClient(threading.Thread):
    """Reads /stream.mjpg as fast as it comes and polls /stats twice a second."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.parts, self.bytes = base, 0, 0
        self.done = threading.Event()
        self.stream = urllib.request.urlopen(base + "/stream.mjpg", timeout=30)

    def run(self) -> None:
        poller = threading.Thread(target=self._poll, daemon=True)
        poller.start()
        while not self.done.is_set():
            try:
                chunk = self.stream.read1(1 << 16)
            except (OSError, ValueError):
                break
            if not chunk:
                break
            self.parts += chunk.count(b"Content-Type: image/jpeg")
            self.bytes += len(chunk)
        poller.join()

    def _poll(self) -> None:
        while not self.done.wait(0.5):
            get_json(self.base + "/stats")


def wait_http(base: str, proc: subprocess.Popen) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"viewer exited: {proc.communicate()[1].strip()}")
        try:
            get_json(base + "/stats")
            return
        except urllib.error.URLError:
            time.sleep(0.05)


def one(setup: str, frames: int, shape: str, fps: float) -> dict[str, Any]:
    """One broker run in ``setup``; returns its rate and what the consumer saw."""
    eps = free_tcp_endpoints(5)
    control, http = eps[2], eps[4].removeprefix("tcp://")
    if setup == "alone":
        return {"setup": setup,
                "broker_fps": broker_fps(serve(eps[:4], frames, shape, False, fps))}
    if setup == "watch":
        watch = cli("watch", "--broker", control, "--policy", "latest:1", "--progress", "0",
                    "--json", "--timeout", "30")
        rate = broker_fps(serve(eps[:4], frames, shape, True, fps))
        out, _ = watch.communicate(timeout=60)
        return {"setup": setup, "broker_fps": rate,
                "received": json.loads(out.strip().splitlines()[-1])["received"]}
    view = cli("view", "--broker", control, "--http", http)
    base = f"http://{http}"
    try:
        wait_http(base, view)
        client = MjpegClient(base)
        client.start()
        rate = broker_fps(serve(eps[:4], frames, shape, True, fps))
        stats = get_json(base + "/stats")
        client.done.set()
    finally:
        view.terminate()
        view.communicate(timeout=60)
    client.join(10)
    return {"setup": setup, "broker_fps": rate, "received": stats["received"],
            "shown": stats["shown"], "mjpeg_parts": client.parts,
            "mjpeg_mb": round(client.bytes / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5000, help="frames per broker run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three setups")
    ap.add_argument("--shape", default="480x640x3")
    ap.add_argument("--fps", type=float, default=0.0,
                    help="pace the source like a camera (0 = unpaced, the broker's ceiling)")
    add_out_args(ap, "view")
    args = ap.parse_args(argv)
    out = out_path(args.out, "view", args.overwrite)
    runs = []
    for r in range(args.rounds):
        order = SETUPS[r % 3:] + SETUPS[:r % 3]  # rotate, so no setup always goes first
        for setup in order:
            res = one(setup, args.frames, args.shape, args.fps)
            print(f"round {r + 1} {setup:>5}: broker {res['broker_fps']:.0f} fps "
                  + " ".join(f"{k} {v}" for k, v in res.items()
                             if k not in ("setup", "broker_fps")), flush=True)
            runs.append({"round": r + 1, **res})
    med = {s: statistics.median(x["broker_fps"] for x in runs if x["setup"] == s)
           for s in SETUPS}
    result = {"frames": args.frames, "shape": args.shape, "rounds": args.rounds,
              "fps": args.fps,
              "median_broker_fps": {s: round(v, 1) for s, v in med.items()},
              "ratio_view_vs_alone": round(med["view"] / med["alone"], 3),
              "ratio_view_vs_watch": round(med["view"] / med["watch"], 3),
              "ratio_watch_vs_alone": round(med["watch"] / med["alone"], 3), "runs": runs}
    print("\n| setup | broker fps (median) | vs alone |\n|---|---|---|")
    for s in SETUPS:
        print(f"| {s} | {med[s]:.0f} | {med[s] / med['alone']:.2f}x |")
    print(f"\nview / watch (a viewer vs a plain latest:1 subscriber): "
          f"{result['ratio_view_vs_watch']:.2f}x")
    write_json(out, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
