"""``framebroker tune``: measure the settings that matter for one frame shape on this
machine, within a time budget, and recommend ``framebroker run`` flags.

``run``'s defaults suit 640x480 frames on two cores, but the best settings move with
the frame and the machine: scipy beats pyfftw at some shapes, ipc beats tcp for
large frames, two FFT threads in one process stall where two processes scale, and
compression pays only when the disk is the limit. So ``tune`` measures, for the
user's shape and dtype, one dimension at a time in order of how much it matters:

* ``transport``: tcp vs ipc, framebroker PUB/SUB (bench/transport.py's ``run_cell``);
* ``fft``: pyfftw ESTIMATE vs MEASURE vs scipy, ``FFTProcessor.process`` in this process;
* ``workers``: FFT worker processes x FFTW threads, processed frames/s of a real
  ``framebroker run`` (with the best FFT backend and planner);
* ``recorder``: chunk frames x compression, ``RecordingWriter`` writing a fixed
  number of synthetic frames into a temporary file on the recording disk;
* ``hwm``: the PUB/SUB high-water mark, on the best transport;
* ``copy-threshold``: pyzmq's ``zmq.COPY_THRESHOLD`` (the default and the value that
  flips copy vs zero-copy for this frame), last, only if the budget allows.

Each dimension gets a share of what is left of the budget (by weight, so time a
dimension did not use goes to the ones after it); a trial is time-boxed to its share,
and a dimension whose share cannot hold two trials is skipped, and said so. Within a
dimension the settings are listed in order of preference (the simpler or cheaper
first), and a later one wins only if it is more than ``TIE`` faster: differences
inside the noise should not change flags.
"""
from __future__ import annotations

import os
import queue
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from .benchmark import BenchError, framebroker_run, load_bench
from .run import default_workers

TIE = 0.05
DEFAULT_COPY_THRESHOLD = zmq.COPY_THRESHOLD
RUN_HWM = 64                # framebroker run's --hwm default, for the transport trials
TRANSPORT_WARMUP_S = 0.2
RUN_STARTUP_S = 1.5        # of a run's --seconds: start-up and planning, before frames flow
RECORD_BYTES = 512 * 2**20  # the recorder trials' fixed amount of frames, clamped below
RECORD_FRAMES = (64, 4096)
POOL = 16                   # distinct synthetic frames cycled through
# Budget weights, in the order the dimensions run; workers runs whole pipelines.
WEIGHTS = {"transport": 2.0, "fft": 1.0, "workers": 4.0, "recorder": 1.5, "hwm": 1.5,
           "copy-threshold": 1.0}
DIMENSIONS = tuple(WEIGHTS)


class Unsupported(Exception):
    """This dimension cannot be measured for this frame (or install); the reason is shown."""


@dataclass(frozen=True)
class Setting:
    label: str
    value: Any
    flags: tuple[str, ...] = ()  # what choosing it adds to ``framebroker run``


@dataclass(frozen=True)
class Dimension:
    name: str
    unit: str
    overhead_s: float  # what one trial costs beyond its time box (processes, planning)
    min_box_s: float   # the shortest time box worth measuring
    max_box_s: float   # a longer box buys little: the rest of the budget goes on
    settings: tuple[Setting, ...]
    measure: Callable[[Any, float], tuple[float | None, str]]  # (value, box) -> figure, note


@dataclass
class Trial:
    dimension: str
    setting: str
    figure: float | None
    unit: str
    note: str
    flags: list[str]
    seconds: float
    chosen: bool = False


def timed(step: Callable[[int], object], count: int, box: float) -> tuple[int, float]:
    """Call ``step(0..count-1)`` until done or ``box`` seconds are up; (calls, seconds).
    At least one call is always made, so a slow step still yields a figure."""
    t0 = time.perf_counter()
    done = 0
    while done < count:
        step(done)
        done += 1
        if time.perf_counter() - t0 >= box:
            break
    return done, time.perf_counter() - t0


class Tuner:
    def __init__(self, shape: tuple[int, ...], dtype: str, budget: float, disk_dir: Path,
                 only: tuple[str, ...] = DIMENSIONS,
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype).name
        self.frame_bytes = int(np.prod(self.shape)) * np.dtype(dtype).itemsize
        self.budget, self.disk_dir, self.log = budget, disk_dir, log
        self.only = tuple(d for d in DIMENSIONS if d in only)
        self.trials: list[Trial] = []
        self.skipped: list[dict[str, str]] = []
        self.best: dict[str, Setting] = {}
        self.wisdom_dir: Path | None = None  # this session's FFTW wisdom, while it runs
        self._pool: list[np.ndarray] = []

    # --- the sweep --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = t0 + self.budget
        with tempfile.TemporaryDirectory(prefix="framebroker-tune-") as tmp:
            self.wisdom_dir = Path(tmp)
            for i, name in enumerate(self.only):
                share = (deadline - time.monotonic()) * WEIGHTS[name] / sum(
                    WEIGHTS[n] for n in self.only[i:])
                try:
                    dim = getattr(self, "dim_" + name.replace("-", "_"))()
                except Unsupported as exc:
                    self._skip(name, "all", str(exc))
                    continue
                self._sweep(dim, share)
        return self.result(time.monotonic() - t0)

    def _sweep(self, dim: Dimension, share: float) -> None:
        cost = dim.overhead_s + dim.min_box_s
        fit = min(len(dim.settings), int(share // cost))
        if fit < 2:
            self._skip(dim.name, ", ".join(s.label for s in dim.settings),
                       f"two trials need {2 * cost:.1f} s, {max(share, 0):.1f} s of the budget "
                       f"is left for it")
            return
        box = min(dim.max_box_s, share / fit - dim.overhead_s)
        trials = [self._trial(dim, s, box) for s in dim.settings[:fit]]
        if fit < len(dim.settings):
            self._skip(dim.name, ", ".join(s.label for s in dim.settings[fit:]),
                       f"{share:.1f} s of the budget held {fit} trials")
        chosen = choose(trials)
        if chosen is not None:
            chosen.chosen = True
            self.best[dim.name] = dim.settings[trials.index(chosen)]

    def _trial(self, dim: Dimension, setting: Setting, box: float) -> Trial:
        t0 = time.monotonic()
        try:
            figure, note = dim.measure(setting.value, box)
        except (OSError, RuntimeError, ValueError, queue.Empty) as exc:  # BenchError too
            figure, note = None, f"failed: {exc}"
        trial = Trial(dim.name, setting.label, figure, dim.unit, note, list(setting.flags),
                      round(time.monotonic() - t0, 2))
        self.trials.append(trial)
        self.log(f"tune: {dim.name} {setting.label}: "
                 f"{'-' if figure is None else f'{figure:.1f}'} {dim.unit} {note} "
                 f"({trial.seconds} s)")
        return trial

    def _skip(self, dimension: str, settings: str, reason: str) -> None:
        self.skipped.append({"dimension": dimension, "settings": settings, "reason": reason})
        self.log(f"tune: skipped {dimension} ({settings}): {reason}")

    # --- dimensions ---------------------------------------------------------------------
    def _transport_bench(self):
        try:
            return load_bench("transport")
        except BenchError as exc:
            raise Unsupported(str(exc)) from None

    def _pubsub(self, transport: str, hwm: int, copy_threshold: int,
                box: float) -> tuple[float, str]:
        cell = self._transport_bench().run_cell("framebroker", transport, self.shape,
                                                self.dtype, box, TRANSPORT_WARMUP_S, hwm=hwm,
                                                copy_threshold=copy_threshold)
        return cell["fps"], f"{cell['mb_per_s']:.0f} MB/s"

    def _best_transport(self) -> str:
        setting = self.best.get("transport")
        return setting.value if setting else "tcp"

    def dim_transport(self) -> Dimension:
        self._transport_bench()
        ipc = tuple(f for name in ("pub", "work", "control", "results")
                    for f in (f"--{name}", f"ipc://{tempfile.gettempdir()}/framebroker-{name}"))
        return Dimension("transport", "fps", 0.8, 0.3, 3.0,
                         (Setting("tcp", "tcp"), Setting("ipc", "ipc", ipc)),
                         lambda t, box: self._pubsub(t, RUN_HWM, DEFAULT_COPY_THRESHOLD, box))

    def dim_hwm(self) -> Dimension:
        self._transport_bench()
        transport = self._best_transport()
        return Dimension("hwm", "fps", 0.8, 0.3, 3.0,
                         tuple(Setting(f"{h} ({transport})", h, ("--hwm", str(h)))
                               for h in (4, 16, 64)),
                         lambda h, box: self._pubsub(transport, h, DEFAULT_COPY_THRESHOLD, box))

    def dim_copy_threshold(self) -> Dimension:
        """The default, and the value that flips this frame between copied and zero-copy:
        parts below the threshold are copied even when sent with ``copy=False``."""
        self._transport_bench()
        transport = self._best_transport()
        if self.frame_bytes >= DEFAULT_COPY_THRESHOLD:
            other, what = self.frame_bytes + 1, "copy every frame"
        else:
            other, what = 0, "zero-copy every frame"
        return Dimension("copy-threshold", "fps", 0.8, 0.3, 3.0,
                         (Setting(f"{DEFAULT_COPY_THRESHOLD} (default, {transport})",
                                  DEFAULT_COPY_THRESHOLD),
                          Setting(f"{other} ({what}, {transport})", other)),
                         lambda v, box: self._pubsub(transport, RUN_HWM, v, box))

    def _processor(self, backend: str, planner: str, threads: int = 1):
        """The FFT a ``run`` worker would plan for this frame (gray, peak), with the
        session's wisdom store, which the worker trials then import."""
        from .fft import FFTProcessor, WisdomStore

        return FFTProcessor(self.shape, self.dtype, color="gray", output="peak",
                            backend=backend, threads=threads, planner=planner,
                            wisdom=WisdomStore(self.wisdom_dir))

    def _check_fft(self) -> None:
        try:
            self._processor("pyfftw", "estimate")
        except ValueError as exc:
            raise Unsupported(f"no FFT for this frame: {exc}") from None

    def _fft_rate(self, value: tuple[str, str], box: float) -> tuple[float, str]:
        backend, planner = value
        proc = self._processor(backend, planner)
        frames = self.pool()
        timed(lambda i: proc.process(frames[i % POOL]), sys.maxsize, 0.1)  # caches, pages
        n, seconds = timed(lambda i: proc.process(frames[i % POOL]), sys.maxsize, box)
        return n / seconds, f"planned in {proc.plan_info['planning_seconds'] * 1e3:.0f} ms"

    def dim_fft(self) -> Dimension:
        self._check_fft()
        return Dimension("fft", "fps", 0.3, 0.2, 3.0, (
            Setting("pyfftw estimate", ("pyfftw", "estimate"),
                    ("--backend", "pyfftw", "--planner", "estimate")),
            Setting("pyfftw measure", ("pyfftw", "measure"),
                    ("--backend", "pyfftw", "--planner", "measure")),
            Setting("scipy", ("scipy", "estimate"), ("--backend", "scipy"))), self._fft_rate)

    def _workers_rate(self, value: tuple[int, int], box: float) -> tuple[float | None, str]:
        workers, threads = value
        fft = self.best.get("fft")
        flags = ["--workers", str(workers), "--threads", str(threads),
                 *(fft.flags if fft else ()), "--shape", "x".join(map(str, self.shape)),
                 "--dtype", self.dtype, "--frames", "0", "--seconds",
                 f"{box + RUN_STARTUP_S:.2f}", "--wisdom", str(self.wisdom_dir)]
        rep = framebroker_run(flags, timeout=box + 60)
        processed = rep["stages"]["processed"]
        if processed["frames"] < 2:
            return None, "no results within the time box"
        return processed["fps"], (f"{processed['frames']} frames, latency p50 "
                                  f"{processed['latency_ms_p50']} ms")

    def dim_workers(self) -> Dimension:
        self._check_fft()
        cores = default_workers()
        combos = list(dict.fromkeys([(1, 1), (cores, 1), (1, 2)]))
        return Dimension("workers", "fps", 3.0, 1.0, 10.0,
                         tuple(Setting(f"{w} x {t} thread{'s' if t > 1 else ''}", (w, t),
                                       ("--workers", str(w), "--threads", str(t)))
                               for w, t in combos), self._workers_rate)

    def record_frames(self) -> int:
        """A fixed amount of data per recorder trial, a multiple of the largest chunk."""
        lo, hi = RECORD_FRAMES
        return max(lo, min(hi, RECORD_BYTES // self.frame_bytes)) // 4 * 4

    def _record_rate(self, value: tuple[int, str], box: float) -> tuple[float, str]:
        from .recorder import RecordingWriter

        chunk, compression = value
        frames, n = self.pool(), self.record_frames()
        with tempfile.TemporaryDirectory(prefix=".framebroker-tune-", dir=self.disk_dir) as tmp:
            os.sync()  # the previous trial's writeback is not this one's cost
            t0 = time.perf_counter()
            writer = RecordingWriter(path=Path(tmp) / "tune.h5", shape=self.shape,
                                     dtype=self.dtype, stream="tune", source="synthetic",
                                     frames_expected=n, chunk_frames=chunk,
                                     compression=compression)
            with writer:
                done, _ = timed(lambda i: writer.write(i, i, frames[i % POOL]), n, box)
            seconds = time.perf_counter() - t0  # open to close: the last flush counts
        fps = done / seconds
        return fps, (f"{done} frames, {fps * self.frame_bytes / 1e6:.0f} MB/s, "
                     f"{writer.bytes_written / max(writer.bytes_stored, 1):.2f}x smaller")

    def dim_recorder(self) -> Dimension:
        combos = [(c, z) for c in (1, 4) for z in ("none", "lz4", "bslz4")]
        return Dimension("recorder", "fps", 0.2, 0.3, 5.0,
                         tuple(Setting(f"chunk {c}, {z}", (c, z),
                                       ("--chunk-frames", str(c), "--compression", z))
                               for c, z in combos), self._record_rate)

    def pool(self) -> list[np.ndarray]:
        """Distinct read-only synthetic frames (as received), so no cache holds "the" frame."""
        from .sources import synthetic_frame

        if not self._pool:
            for i in range(POOL):
                frame = synthetic_frame(self.shape, self.dtype, i)
                frame.flags.writeable = False
                self._pool.append(frame)
        return self._pool

    # --- the result -------------------------------------------------------------------
    def recommendation(self) -> list[str]:
        """The chosen settings' flags, transport endpoints last (they are long)."""
        order = ("workers", "fft", "hwm", "recorder", "transport")
        return [f for name in order if name in self.best for f in self.best[name].flags]

    def result(self, elapsed: float) -> dict[str, Any]:
        notes = []
        threshold = self.best.get("copy-threshold")
        if threshold is not None and threshold.value != DEFAULT_COPY_THRESHOLD:
            runs = {t.setting: t.figure for t in self.trials if t.dimension == "copy-threshold"}
            default, best = runs.values()
            gain = f"{best / default - 1:.0%} faster" if default else "the only one that ran"
            notes.append(f"zmq.COPY_THRESHOLD = {threshold.value} was {gain} in this run, but "
                         f"framebroker run has no flag for it: set it in code before creating "
                         f"sockets")
        untuned = [d for d in self.only if d not in self.best and d != "copy-threshold"]
        if untuned:
            notes.append(f"not tuned, so run's defaults stay: {', '.join(untuned)}")
        if "recorder" in self.best:
            notes.append("--chunk-frames and --compression matter only with --record")
        flags = self.recommendation()
        return {"shape": list(self.shape), "dtype": self.dtype, "budget_s": self.budget,
                "elapsed_s": round(elapsed, 1), "recording_dir": str(self.disk_dir),
                "trials": [asdict(t) for t in self.trials], "skipped": self.skipped,
                "best": {name: s.label for name, s in self.best.items()},
                "recommendation": shlex.join(flags),
                "command": shlex.join(["framebroker", "run", *flags]), "notes": notes}


def choose(trials: list[Trial]) -> Trial | None:
    """The first trial within ``TIE`` of the fastest: settings come in order of
    preference, and noise should not change a flag."""
    measured = [t for t in trials if t.figure]
    if not measured:
        return None
    top = max(t.figure for t in measured)
    return next(t for t in measured if t.figure >= top * (1 - TIE))


def format_result(res: dict[str, Any]) -> str:
    shape = "x".join(map(str, res["shape"]))
    lines = [f"framebroker tune: {shape} {res['dtype']}, {res['elapsed_s']} s of a "
             f"{res['budget_s']:g} s budget (* = chosen)",
             f"  {'dimension':<15} {'setting':<36} {'result':>10}  note"]
    for t in res["trials"]:
        figure = "failed" if t["figure"] is None else f"{t['figure']:.1f} {t['unit']}"
        lines.append(f"  {t['dimension']:<15} {('* ' if t['chosen'] else '  ') + t['setting']:<36}"
                     f" {figure:>10}  {t['note']}")
    for s in res["skipped"]:
        lines.append(f"  skipped {s['dimension']} ({s['settings']}): {s['reason']}")
    lines += [f"  note: {n}" for n in res["notes"]]
    lines.append(f"recommended: {res['command']}")
    return "\n".join(lines)
