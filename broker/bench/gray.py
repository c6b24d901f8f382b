"""The FFT worker's colour conversion against OpenCV's, in one process, interleaved.

A worker with ``--color gray`` turns each BGR uint8 frame into a float32 luma plane
(0.114 B + 0.587 G + 0.299 R) before the transform. The reference is what a user
would write with OpenCV: ``cv2.cvtColor(frame, COLOR_BGR2GRAY, dst=u8)`` then
``np.copyto(plane, u8)`` (OpenCV's uint8 result is rounded to integers, ours is not),
with OpenCV on one thread (a worker process is one core's worth) and on its default.
Each method runs ``--number`` calls per timing, best of ``--repeat`` timings per round,
rounds interleaved; the median round is reported.
``python bench/gray.py --out DIR/gray.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .. import _fftkern
from ..sources import synthetic_frame

SHAPES = {"640x480x3 u8": (480, 640, 3), "1920x1080x3 u8": (1080, 1920, 3)}


def methods(frame: np.ndarray) -> dict[str, Callable[[], object]]:
    plane = np.zeros(frame.shape[:2], np.float32)
    u8 = np.zeros(frame.shape[:2], np.uint8)

    def opencv() -> None:
        cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY, dst=u8)
        np.copyto(plane, u8)

    return {"bgr_to_gray": lambda: _fftkern.bgr_to_gray(frame, plane), "opencv": opencv}


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number * 1e6)
    return min(runs)


def measure(rounds: int, number: int, repeat: int) -> list[dict]:
    rows = []
    default_threads = cv2.getNumThreads()
    for size, shape in SHAPES.items():
        frame = synthetic_frame(shape, "uint8", 1)
        frame.flags.writeable = False
        fns = methods(frame)
        samples: dict[str, list[float]] = {"bgr_to_gray": [], "opencv 1 thread": [],
                                           f"opencv {default_threads} threads": []}
        for _ in range(rounds):
            samples["bgr_to_gray"].append(best_us(fns["bgr_to_gray"], number, repeat))
            for threads in (1, default_threads):
                cv2.setNumThreads(threads)
                samples[f"opencv {threads} thread{'s' if threads > 1 else ''}"].append(
                    best_us(fns["opencv"], number, repeat))
        cv2.setNumThreads(default_threads)
        for name, us in samples.items():
            rows.append({"size": size, "method": name, "us": sorted(us)[len(us) // 2],
                         "us_rounds": [round(u, 1) for u in us]})
    return rows


def print_table(rows: list[dict]) -> None:
    methods_ = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["size"], r["method"]): r["us"] for r in rows}
    print("\n| frame | " + " | ".join(f"{m} µs" for m in methods_)
          + " | opencv 1 thread / bgr_to_gray |")
    print("|---" * (len(methods_) + 2) + "|")
    for size in SHAPES:
        us = [by[(size, m)] for m in methods_]
        print(f"| {size} | " + " | ".join(f"{u:.0f}" for u in us)
              + f" | {by[(size, 'opencv 1 thread')] / by[(size, 'bgr_to_gray')]:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--number", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    rows = measure(args.rounds, args.number, args.repeat)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_before": load, "load_after": os.getloadavg(),
                                    "opencv": cv2.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
