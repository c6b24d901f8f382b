"""FFT benchmark: the naive numpy way vs numpy/scipy/pyfftw on float32 vs FFTProcessor.

Frames per second for each frame size, every method in one run (interleaved across
methods, the median of ``--repeat`` runs reported), because absolute numbers drift
2-3x between runs on these shared machines and only same-run ratios mean anything:

* ``naive fft2``: ``np.fft.fft2(frame)`` on the raw uint8/uint16 frame, as users write
  it: complex128, full plane, per channel for colour frames.
* ``numpy rfft2``, ``scipy rfft2``, ``pyfftw execute``: the transform alone, one thread,
  on a float32 (P, H, W) buffer converted once beforehand. ``pyfftw execute`` is a
  MEASURE-planned ``FFTW.execute()`` on an aligned buffer: the limit for this library.
* ``process peak``: ``FFTProcessor(output="peak").process(frame)`` in this process:
  copy-in/convert + transform + peak reduction, pyfftw MEASURE (and with scipy).
* ``1 process`` / ``2 processes``: the same ``process`` loop in 1 or 2 spawned
  single-thread worker processes running at once for the same time; the rates are
  summed. This is the 1 vs 2 worker comparison (threads=2 in one process stalls here).
* ``worker e2e x1`` / ``x2``: the real pipeline, broker -> 1 or 2 ``framebroker
  worker`` processes (output peak) -> sink over loopback tcp, measured as the rate
  the sink acknowledges results. The broker and sink share the same 2 cores.

Colour frames (HxWx3) are transformed per channel everywhere (``color="channels"``).
Run ``python bench/fft.py`` (``--quick`` for a short run); prints a table and writes
``--out`` (default ``bench-TIMESTAMP/fft.json`` under the cwd). To add a column, append
a ``Method`` to ``METHODS``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyfftw
import scipy
import scipy.fft

from ..fft import FFTProcessor, WisdomStore
from .common import (FrameSpec, add_frame_args, add_out_args, frame_specs, out_path, run_broker,
                     write_json)
from .stats import compare, median_row

SHAPES: list[tuple[tuple[int, ...], str]] = [((480, 640), "uint8"), ((480, 640, 3), "uint8"),
                                              ((1080, 1920), "uint8"), ((2048, 2048), "uint16")]
QUICK_SHAPES = ("640x480x3 u8", "1920x1080 u8")  # labels of SHAPES that --quick measures
#: methods --quick leaves out: they spawn processes (bench's e2e part runs the pipeline)
QUICK_SKIPS = ("1 process", "2 processes", "worker e2e x1", "worker e2e x2")
FRAMES_PER_CASE = 4  # distinct frames cycled through, so no cache holds "the" frame


@dataclass
class Case:
    """One frame size: its pre-rendered read-only frames and a shared wisdom store."""

    shape: tuple[int, ...]
    dtype: str
    wisdom: WisdomStore
    source: str = "synthetic"  # a --source: its first frames instead of synthetic ones
    gray: bool = False  # colour frames to gray first, as run's workers do by default
    frames: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.frames = self.spec.frames(FRAMES_PER_CASE)
        for frame in self.frames:
            frame.flags.writeable = False  # as received from the network

    @property
    def spec(self) -> FrameSpec:
        return FrameSpec(self.source, tuple(self.shape), self.dtype)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def color(self) -> str:
        return "channels" if len(self.shape) == 3 and not self.gray else "gray"

    def planes_f32(self, out: np.ndarray | None = None) -> np.ndarray:
        """Frame 0 as (P, H, W) float32, the input the library transforms get."""
        frame = self.frames[0]
        planes = frame.transpose(2, 0, 1) if frame.ndim == 3 else frame[None]
        if out is None:
            return np.ascontiguousarray(planes, dtype=np.float32)
        np.copyto(out, planes)
        return out

    def processor(self, backend: str = "pyfftw", planner: str = "measure",
                  threads: int = 1) -> FFTProcessor:
        return FFTProcessor(self.shape, self.dtype, color=self.color, output="peak",
                            backend=backend, threads=threads, planner=planner,
                            wisdom=self.wisdom)

    def spawn_args(self) -> tuple:
        """What a spawned process needs to make the same case (not the frames)."""
        return (self.shape, self.dtype, str(self.wisdom.directory), self.source, self.gray)


@dataclass(frozen=True)
class Timing:
    seconds: float
    warmup: float


def rate(step: Callable[[np.ndarray], object], frames: Sequence[np.ndarray],
         timing: Timing) -> dict[str, Any]:
    """Frames/s of ``step`` over ``timing.seconds`` after a warm-up (plans, caches, pages).

    Time-budgeted rather than a fixed count, so a 10 fps and a 2000 fps method cost
    the same wall time; at least one call is always measured.
    """
    n = len(frames)
    t_end = time.perf_counter() + timing.warmup
    i = 0
    while time.perf_counter() < t_end:
        step(frames[i % n])
        i += 1
    count = 0
    t0 = time.perf_counter()
    while True:
        step(frames[count % n])
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= timing.seconds:
            return {"frames": count, "seconds": elapsed, "fps": count / elapsed}


# --- methods: each measures one case and returns at least {"fps": ...} -------------

@dataclass(frozen=True)
class Method:
    name: str
    measure: Callable[[Case, Timing], dict[str, Any]]


def in_process(name: str, setup: Callable[[Case], Callable[[np.ndarray], object]]) -> Method:
    """A method that is a per-frame callable in this process, built (planned) untimed."""
    return Method(name, lambda case, timing: rate(setup(case), case.frames, timing))


def setup_naive(case: Case) -> Callable[[np.ndarray], object]:
    return lambda frame: np.fft.fft2(frame, axes=(0, 1))


def setup_numpy(case: Case) -> Callable[[np.ndarray], object]:
    planes = case.planes_f32()
    return lambda _frame: np.fft.rfft2(planes, axes=(-2, -1))


def setup_scipy(case: Case) -> Callable[[np.ndarray], object]:
    planes = case.planes_f32()
    return lambda _frame: scipy.fft.rfft2(planes, axes=(-2, -1), workers=1)


def setup_pyfftw(case: Case) -> Callable[[np.ndarray], object]:
    p, h, w = case.planes_f32().shape
    planes = pyfftw.empty_aligned((p, h, w), dtype="float32")
    spec = pyfftw.empty_aligned((p, h, w // 2 + 1), dtype="complex64")
    fftw = pyfftw.FFTW(planes, spec, axes=(-2, -1), flags=("FFTW_MEASURE",), threads=1)
    case.planes_f32(out=planes)  # after planning: MEASURE scribbles on the input
    return lambda _frame: fftw.execute()


def setup_process(backend: str) -> Callable[[Case], Callable[[np.ndarray], object]]:
    return lambda case: case.processor(backend).process


def _worker(case_args: tuple, fft: tuple[str, str, int], timing: Timing, barrier,
            queue) -> None:
    """One spawned worker: plan (from the parent's wisdom), warm up, start together, run."""
    shape, dtype, wisdom_dir, source, gray = case_args
    case = Case(shape, dtype, WisdomStore(wisdom_dir), source, gray)
    proc = case.processor(*fft)
    rate(proc.process, case.frames, Timing(seconds=timing.warmup, warmup=0.0))
    barrier.wait(timeout=120)
    result = rate(proc.process, case.frames, Timing(seconds=timing.seconds, warmup=0.0))
    queue.put({**result, "planning_seconds": proc.plan_info["planning_seconds"],
               "wisdom_had_plan": proc.plan_info["wisdom_had_plan"]})


def processes(n: int, threads: int = 1, backend: str = "pyfftw",
              planner: str = "measure") -> Method:
    """``n`` FFTProcessor processes of ``threads`` FFT threads at once; their frame
    rates summed (``framebroker tune`` measures workers x threads with it)."""
    fft = (backend, planner, threads)

    def measure(case: Case, timing: Timing) -> dict[str, Any]:
        case.processor(*fft)  # the store holds this plan now, so workers skip MEASURE
        spawn = mp.get_context("spawn")
        barrier, queue = spawn.Barrier(n), spawn.Queue()
        workers = [spawn.Process(target=_worker, args=(case.spawn_args(), fft, timing,
                                                       barrier, queue))
                   for _ in range(n)]
        for w in workers:
            w.start()
        try:
            results = [queue.get(timeout=180) for _ in workers]
        finally:
            for w in workers:
                w.join(10)
                if w.is_alive():
                    w.kill()
        return {"fps": sum(r["fps"] for r in results),
                "frames": sum(r["frames"] for r in results),
                "seconds": max(r["seconds"] for r in results),
                "per_process_fps": [round(r["fps"], 1) for r in results],
                "worker_planning_seconds": [round(r["planning_seconds"], 4) for r in results],
                "worker_wisdom_had_plan": [r["wisdom_had_plan"] for r in results]}

    return Method(f"{n} process{'es' if n > 1 else ''}", measure)


def _serve(spec: FrameSpec, eps: dict[str, str], workers: int) -> None:
    from ..broker import BrokerConfig

    cfg = BrokerConfig(pub=eps["pub"], work=eps["work"], control=eps["control"],
                       results=eps["results"], wait_workers=workers, end_linger=0.0)
    run_broker(spec.open(), cfg)  # waits out the linger: see run_broker


def _work(control: str, color: str, wisdom_dir: str) -> None:
    from ..workers import Worker, WorkerConfig

    worker = Worker(WorkerConfig(broker=control, output="peak", color=color,
                                 planner="measure", wisdom=wisdom_dir), log=lambda m: None)
    try:
        worker.run()
    finally:
        worker.close()


def _collect(control: str) -> None:
    from ..sink import Sink, SinkConfig

    sink = Sink(SinkConfig(broker=control), log=lambda m: None)
    try:
        sink.run()
    finally:
        sink.close()


def pipeline(n: int) -> Method:
    """The real thing: broker -> ``n`` worker processes -> sink, all spawned on
    loopback tcp. Frames/s is the rate at which the sink acknowledges results,
    sampled from the broker's status after a warm-up: frame in over zmq, convert,
    transform, peak, result out over zmq, reordered at the sink."""

    def measure(case: Case, timing: Timing) -> dict[str, Any]:
        from ..client import Control

        case.processor()  # wisdom for this shape is in the store: workers plan in ms
        from ..broker import free_tcp_endpoints

        eps = dict(zip(("pub", "work", "control", "results"), free_tcp_endpoints(4)))
        spawn = mp.get_context("spawn")
        procs = [spawn.Process(target=_serve, args=(case.spec, eps, n)),
                 spawn.Process(target=_collect, args=(eps["control"],))]
        procs += [spawn.Process(target=_work, args=(eps["control"], case.color,
                                                    str(case.wisdom.directory)))
                  for _ in range(n)]
        for p in procs:
            p.start()
        ctl = Control(eps["control"], timeout=5)
        try:
            ctl.wait(60)
            acked = lambda: ctl.status()["work"]["groups"].get("fft", {}).get("acked", 0)
            while acked() == 0:
                time.sleep(0.02)
            time.sleep(timing.warmup)
            t0, a0 = time.perf_counter(), acked()
            time.sleep(timing.seconds)
            t1, a1 = time.perf_counter(), acked()
            ctl.stop()
        finally:
            ctl.close()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        return {"fps": (a1 - a0) / (t1 - t0), "frames": a1 - a0, "seconds": t1 - t0}

    return Method(f"worker e2e x{n}", measure)


# The columns, in table order. Add a method here (e.g. an end-to-end zmq worker):
# anything with a name and measure(case, timing) -> {"fps": ...} fits.
METHODS: list[Method] = [
    in_process("naive fft2", setup_naive),
    in_process("numpy rfft2", setup_numpy),
    in_process("scipy rfft2", setup_scipy),
    in_process("pyfftw execute", setup_pyfftw),
    in_process("process peak", setup_process("pyfftw")),
    in_process("process peak scipy", setup_process("scipy")),
    processes(1),
    processes(2),
    pipeline(1),
    pipeline(2),
]


def measure_cells(specs: Sequence[FrameSpec], quick: bool, *,
                  repeat: int | None = None, seconds: float | None = None,
                  methods: Sequence[Method] | None = None) -> list[dict[str, Any]]:
    """One dict per (frame, method): the median of ``repeat`` interleaved runs, with its
    min, max and ``noisy`` reasons (see :func:`mark_noise`).

    All cases share one temporary wisdom store, so MEASURE planning is paid once per
    shape and worker processes import it, as deployed workers would. ``--quick`` leaves
    out the methods that spawn processes (``QUICK_SKIPS``; ``framebroker bench``'s e2e
    part runs the whole pipeline).
    """
    repeat = repeat or 3
    methods = methods or [m for m in METHODS if not (quick and m.name in QUICK_SKIPS)]
    timing = Timing(seconds=seconds or (0.15 if quick else 1.0), warmup=0.05 if quick else 0.3)
    cells = []
    with tempfile.TemporaryDirectory(prefix="fb-fft-wisdom-") as wisdom_dir:
        store = WisdomStore(wisdom_dir)
        for spec in specs:
            case = Case(tuple(spec.shape), spec.dtype, store, spec.source)
            cold = case.processor()  # the first MEASURE plan of this shape, for the record
            plan = {"cold_planning_seconds": round(cold.plan_info["planning_seconds"], 4)}
            runs: dict[str, list[dict]] = {m.name: [] for m in methods}
            for _ in range(repeat):  # interleaved, so drift hits every method alike
                for method in methods:
                    runs[method.name].append(method.measure(case, timing))
            for name, results in runs.items():
                cells.append({"size": case.label, "shape": list(case.shape),
                              "dtype": spec.dtype, "method": name, **median_row(results),
                              **plan})
                print(f"  {case.label:>15} {name:>20}: {cells[-1]['fps']:9.1f} fps "
                      f"of {[round(r['fps'], 1) for r in results]}", file=sys.stderr,
                      flush=True)
    return mark_noise(cells)


#: (value, what it is compared with, "base" or "limit") per FFT cell
COMPARISONS = (("process peak", "naive fft2", "base"), ("process peak", "pyfftw execute", "limit"),
               ("worker e2e x1", "pyfftw execute", "limit"), ("2 processes", "1 process", "base"))


def mark_noise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``noisy`` on every cell: its own rounds, and for the compared methods the
    comparisons in ``COMPARISONS`` (a limit below its value, a spread wider than the gap)."""
    by = {(c["size"], c["method"]): c for c in cells}
    for c in cells:
        reasons = compare(c["fps_runs"], what=f"{c['size']} {c['method']}")
        for value, other, kind in COMPARISONS:
            o = by.get((c["size"], other))
            if c["method"] == value and o:
                reasons += [r for r in compare(c["fps_runs"], **{kind: o["fps_runs"]},
                                               what=f"{c['size']} {value}",
                                               **{f"{kind}_name": other})
                            if r not in reasons]
        c["noisy"] = reasons
    return cells


def print_table(cells: list[dict[str, Any]]) -> None:
    """Markdown table: sizes down, methods across, plus the two ratios that matter."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    by = {(c["size"], c["method"]): c["fps"] for c in cells}
    print("\n| frame | " + " | ".join(f"{m} fps" for m in methods)
          + " | 2 proc / 1 proc | process / execute | e2e x1 / execute | e2e x1 / naive |")
    print("|---" * (len(methods) + 5) + "|")
    for size in dict.fromkeys(c["size"] for c in cells):
        fps = [by.get((size, m)) for m in methods]
        scaling = _ratio(by.get((size, "2 processes")), by.get((size, "1 process")))
        overhead = _ratio(by.get((size, "process peak")), by.get((size, "pyfftw execute")))
        e2e = _ratio(by.get((size, "worker e2e x1")), by.get((size, "pyfftw execute")))
        naive = _ratio(by.get((size, "worker e2e x1")), by.get((size, "naive fft2")))
        print(f"| {size} | " + " | ".join("–" if f is None else f"{f:.1f}" for f in fps)
              + f" | {scaling} | {overhead} | {e2e} | {naive} |")


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def platform_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "pyfftw": pyfftw.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short cells, one run (smoke test)")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per cell")
    ap.add_argument("--repeat", type=int, default=None,
                    help="interleaved runs per cell, median reported (default 3)")
    add_frame_args(ap)
    add_out_args(ap, "fft")
    args = ap.parse_args(argv)
    out = out_path(args.out, "fft", args.overwrite)
    sizes = {FrameSpec("synthetic", shape, dtype).label: (shape, dtype) for shape, dtype in SHAPES}
    specs = frame_specs(args, sizes, QUICK_SHAPES if args.quick else None)
    cells = measure_cells(specs, args.quick, repeat=args.repeat, seconds=args.seconds)
    print_table(cells)
    write_json(out, {"machine": platform_info(), "quick": args.quick, "cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
