"""``framebroker tune``: measure the settings that matter for the user's frames on this
machine, within a time budget, and recommend ``framebroker run`` flags.

``run``'s defaults suit 640x480 frames on two cores, but the best settings move with
the frame and the machine: shared memory beats sockets for large frames on one host,
scipy beats pyfftw at some shapes, two FFT threads in one process stall where two
processes scale, and compression pays only when the disk is the limit. So ``tune``
measures, for the user's ``--source`` (or synthetic ``--shape``/``--dtype``) and
``--record-dir``, one dimension at a time in order of how much it matters:

* ``transport``: tcp, ipc and (same host) shm: framebroker PUB/SUB, broker process to a
  Subscriber process (``broker.bench.transport.run_cell``);
* ``fft``: FFT backend and planner, ``FFTProcessor.process`` (gray, peak) in this process;
* ``workers``: FFT worker processes x FFTW threads, with the best backend, as spawned
  processes running at once (``broker.bench.fft.processes``);
* ``recorder``: chunk frames x compression x compress threads, ``RecordingWriter``
  writing into a temporary file in the record dir;
* ``hwm``: the broker's PUB high-water mark and the subscriber's policy, on the best
  transport.

Every dimension's settings run in interleaved rounds (at least two, so the spread
between rounds is known), the first setting being ``run``'s default. A setting is
recommended only where its median beats the default's by more than the spread of
either across rounds; otherwise the default stays, and the output says so with the
figures. A dimension the budget cannot hold (two rounds of its settings) is skipped
and named as skipped, with no flags of its own: nothing not measured is mentioned.
The whole sweep keeps to the budget: every trial is time-boxed, and a trial whose cost
(measured on the first of its kind) no longer fits is not started.
"""
from __future__ import annotations

import os
import queue
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from .bench.common import FrameSpec
from .bench.stats import figure, spread
from .choices import TUNE_DIMENSIONS
from .run import default_workers

RUN_HWM = 64                # framebroker run's --hwm default
RUN_COMPRESS_THREADS = 2    # and --compress-threads
WARMUP_S = 0.1
RECORD_FRAMES = (8, 4096)   # the recorder trials' frame count bounds
POOL = 8                    # distinct frames cycled through
SHM_RING = "64slots"
# Budget weights, one per dimension (choices.TUNE_DIMENSIONS gives their order).
WEIGHTS = {"transport": 4.0, "fft": 1.0, "workers": 3.0, "recorder": 1.5, "hwm": 2.5}
DIMENSIONS = TUNE_DIMENSIONS
TRIAL_ERRORS = (OSError, RuntimeError, ValueError, queue.Empty)
MAX_ROUNDS = 3
PANEL_TEARDOWN_S = 1.0  # stopping a panel's brokers and joining their processes
OVERHEAD_MARGIN = 1.25
TEARDOWN_S = 0.5  # after the last trial: the report, temporary files, interpreter exit


class Unsupported(Exception):
    """This dimension cannot be measured for this frame (or install); the reason is shown."""


@dataclass(frozen=True)
class Setting:
    label: str
    value: Any
    flags: dict[str, Any] = field(default_factory=dict)  # run's flags (TOML keys) it sets


@dataclass(frozen=True)
class Dimension:
    name: str
    settings: tuple[Setting, ...]  # the first is run's default
    measure: Callable[[Any, float], tuple[float, str]] | None  # (value, box) -> fps, note
    overhead_s: float  # a first guess of one trial's cost beyond its box (processes)
    min_box_s: float
    max_box_s: float
    #: measures every setting at once in interleaved rounds (values, rounds, box,
    #: deadline, on_window, soft deadline) -> fps per setting per round;
    #: ``overhead_s`` is then its start-up
    panel: Callable[..., list[list[float]]] | None = None


@dataclass
class Outcome:
    """One dimension's rounds and what they decide."""

    dimension: str
    settings: list[str]
    runs: dict[str, list[float]]
    notes: dict[str, str]
    default: str
    best: str | None = None
    recommended: str | None = None   # best, when its gain beats the spread
    reason: str = ""
    flags: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


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


def decide(outcome: Outcome) -> None:
    """The best median wins only if it beats the default's by more than the spread of
    either across rounds; the reason is said in figures either way."""
    med = {s: float(np.median(r)) for s, r in outcome.runs.items() if len(r) >= 2}
    if outcome.default not in med or len(med) < 2:
        done = min(len(r) for r in outcome.runs.values())
        outcome.reason = (f"not tuned: the budget held {done} of the 2 rounds every setting "
                          f"needs for a spread; run's default stays")
        return
    best = max(med, key=med.get)
    outcome.best = best
    d = outcome.default
    if best == d:
        outcome.reason = f"run's default ({d}) measured best"
        return
    gain = med[best] - med[d]
    noise = max(spread(outcome.runs[best]), spread(outcome.runs[d]))
    if gain > noise:
        outcome.recommended = best
        outcome.reason = (f"{best} is {med[best] / med[d]:.2f}x the default ({d}); the gain "
                          f"({gain:.4g} fps) beats the spread between rounds ({noise:.4g} fps)")
    else:
        outcome.reason = (f"{best} measured {med[best] / med[d]:.2f}x the default ({d}), but "
                          f"the gain ({gain:.4g} fps) is within the spread between rounds "
                          f"({noise:.4g} fps): the default stays")


class Tuner:
    def __init__(self, spec: FrameSpec, budget: float, record_dir: Path,
                 only: tuple[str, ...] = DIMENSIONS,
                 log: Callable[[str], None] = lambda m: None) -> None:
        self.spec = spec.resolved()
        self.frame_bytes = int(np.prod(self.spec.shape)) * np.dtype(self.spec.dtype).itemsize
        self.budget, self.record_dir, self.log = budget, record_dir, log
        self.only = tuple(d for d in DIMENSIONS if d in only)
        self.outcomes: list[Outcome] = []
        self.skipped: list[dict[str, str]] = []
        self.wisdom_dir: Path | None = None  # this session's FFTW wisdom, while it runs
        self._pool: list[np.ndarray] = []
        self._fft_case = None
        self._cost: dict[str, float] = {}  # measured overhead per trial, by dimension
        self._deadline = 0.0

    # --- the sweep --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        # the budget counts from the command's start (interpreter, imports) to its exit
        started = time.time() - psutil.Process().create_time()
        self._deadline = t0 + self.budget - started - TEARDOWN_S
        with tempfile.TemporaryDirectory(prefix="framebroker-tune-") as tmp:
            self.wisdom_dir = Path(tmp)
            for i, name in enumerate(self.only):
                left = self._deadline - time.monotonic()
                share = left * WEIGHTS[name] / sum(WEIGHTS[n] for n in self.only[i:])
                try:
                    dim = getattr(self, "dim_" + name)()
                except Unsupported as exc:
                    self._skip(name, str(exc))
                    continue
                self._sweep(dim, share)
        return self.result(time.monotonic() - t0)

    def _left(self) -> float:
        return self._deadline - time.monotonic()

    def _sweep(self, dim: Dimension, share: float) -> None:
        """Two rounds of every setting (three if its share holds them), each trial
        time-boxed so the rounds fit the dimension's share of what is left; it may run
        past its share to finish two rounds, never past the budget."""
        n = len(dim.settings)
        need = (dim.overhead_s + 2 * n * (dim.min_box_s + WARMUP_S) if dim.panel else
                2 * n * (self._overhead(dim) + dim.min_box_s))
        if need > self._left():
            self._skip(dim.name, f"two rounds of its {n} settings need about {need:.1f} s; "
                                 f"{max(self._left(), 0):.1f} s of the budget is left")
            return
        now = time.monotonic()
        stop_at = min(self._deadline, now + max(share, need))
        outcome = Outcome(dim.name, [s.label for s in dim.settings],
                          {s.label: [] for s in dim.settings}, {}, dim.settings[0].label)
        if dim.panel is not None:
            self._panel(dim, outcome, stop_at)
            return self._decide(dim, outcome, now)
        for r in range(MAX_ROUNDS):
            target = max(2, r + 1)  # rounds to plan the boxes for
            for i, setting in enumerate(dim.settings):
                left = stop_at - time.monotonic()
                box = min(dim.max_box_s, max(dim.min_box_s, left / (n * (target - r) - i)
                                             - self._overhead(dim)))
                if r >= 2 and i == 0 and n * (self._overhead(dim) + box) > left:
                    break  # a third round only whole, and only within the share
                if self._overhead(dim) + box > self._deadline - time.monotonic():
                    break
                self._trial(dim, setting, box, outcome, r)
            else:
                continue
            break
        self._decide(dim, outcome, now)

    def _panel(self, dim: Dimension, outcome: Outcome, stop_at: float) -> None:
        """All settings at once (one start-up), rounds of windows until ``stop_at``."""
        n = len(dim.settings)
        box = min(dim.max_box_s, max(dim.min_box_s, (stop_at - time.monotonic()
                                                     - dim.overhead_s) / (n * MAX_ROUNDS)
                                      - WARMUP_S))

        def window(r: int, i: int, fps: float) -> None:
            self.log(f"tune: {dim.name} {dim.settings[i].label} round {r + 1}: {fps:.1f} fps")

        t0 = time.monotonic()
        try:
            runs = dim.panel([s.value for s in dim.settings], MAX_ROUNDS, box,
                             self._deadline - PANEL_TEARDOWN_S, window,
                             stop_at - PANEL_TEARDOWN_S)
        except TRIAL_ERRORS as exc:
            runs = [[] for _ in dim.settings]
            for s in dim.settings:
                outcome.notes[s.label] = f"failed: {exc}"
        for s, r in zip(dim.settings, runs):
            outcome.runs[s.label] = r
            outcome.notes.setdefault(s.label, f"{len(r)} windows of {box:.2f} s")
        self._cost[dim.name] = time.monotonic() - t0 - len(runs[0]) * n * (box + WARMUP_S)

    def _decide(self, dim: Dimension, outcome: Outcome, started: float) -> None:
        outcome.seconds = round(time.monotonic() - started, 2)
        decide(outcome)
        if outcome.recommended:
            outcome.flags = next(s.flags for s in dim.settings
                                 if s.label == outcome.recommended)
        self.outcomes.append(outcome)
        self.log(f"tune: {dim.name}: {outcome.reason}")

    def _overhead(self, dim: Dimension) -> float:
        """One trial's cost beyond its box: measured on the first trials of the
        dimension (with a margin: a loaded machine varies), else the first guess."""
        return self._cost[dim.name] * OVERHEAD_MARGIN if dim.name in self._cost \
            else dim.overhead_s

    def _trial(self, dim: Dimension, setting: Setting, box: float, outcome: Outcome,
               round_: int) -> None:
        t0 = time.monotonic()
        try:
            fps, note = dim.measure(setting.value, box)
        except TRIAL_ERRORS as exc:
            fps, note = None, f"failed: {exc}"
        took = time.monotonic() - t0
        if round_ == 0:  # the cost beyond the box: the worst of the first round
            self._cost[dim.name] = max(self._cost.get(dim.name, 0.0), took - box)
        if fps is not None:
            outcome.runs[setting.label].append(fps)
        outcome.notes[setting.label] = note
        self.log(f"tune: {dim.name} {setting.label} round {round_ + 1}: "
                 f"{'failed' if fps is None else f'{fps:.1f} fps'} {note} ({took:.2f} s)")

    def _skip(self, dimension: str, reason: str) -> None:
        self.skipped.append({"dimension": dimension, "reason": reason})
        self.log(f"tune: skipped {dimension}: {reason}")

    def _outcome(self, name: str) -> Outcome | None:
        return next((o for o in self.outcomes if o.dimension == name), None)

    def _winner(self, name: str, default: Any, settings: tuple[Setting, ...]) -> Any:
        """The value of a measured dimension's recommended setting, else ``default``."""
        o = self._outcome(name)
        if o is None or not o.recommended:
            return default
        return next(s.value for s in settings if s.label == o.recommended)

    # --- dimensions ---------------------------------------------------------------------
    def _transports(self) -> tuple[Setting, ...]:
        ipc = {name: f"ipc://{tempfile.gettempdir()}/framebroker-{name}"
               for name in ("pub", "work", "control", "results")}
        settings = [Setting("tcp", ("tcp", RUN_HWM, "drop")),
                    Setting("ipc", ("ipc", RUN_HWM, "drop"), ipc)]
        if Path("/dev/shm").is_dir():
            settings.append(Setting(f"shm {SHM_RING}", ("shm", RUN_HWM, "drop"),
                                    {"shm": SHM_RING}))
        return tuple(settings)

    def _pubsub_panel(self, values: list[tuple[str, int, str]], rounds: int, box: float,
                      deadline: float, on_window, soft_deadline: float) -> list[list[float]]:
        from .bench.transport import interleaved_pubsub

        return interleaved_pubsub(self.spec, values, rounds, box, WARMUP_S, deadline,
                                  on_window, soft_deadline)

    def dim_transport(self) -> Dimension:
        return Dimension("transport", self._transports(), None, 4.0, 0.2, 1.5,
                         self._pubsub_panel)

    def dim_hwm(self) -> Dimension:
        transports = self._transports()
        transport = self._winner("transport", ("tcp", RUN_HWM, "drop"), transports)[0]
        settings = [Setting(f"hwm {RUN_HWM}, drop ({transport})", (transport, RUN_HWM, "drop"))]
        settings += [Setting(f"hwm {h}, drop ({transport})", (transport, h, "drop"),
                             {"hwm": h}) for h in (16, 4)]
        settings.append(Setting(f"hwm {RUN_HWM}, latest:1 ({transport})",
                                (transport, RUN_HWM, "latest:1"),
                                {"policy": "latest:1"}))  # a subscriber's flag, not run's
        return Dimension("hwm", tuple(settings), None, 4.0, 0.2, 1.5, self._pubsub_panel)

    def _case(self):
        """The FFT case (frames rendered once) with this session's wisdom store."""
        from .bench.fft import Case
        from .fft import WisdomStore

        if self._fft_case is None:
            self._fft_case = Case(self.spec.shape, self.spec.dtype,
                                  WisdomStore(self.wisdom_dir), self.spec.source, gray=True)
        return self._fft_case

    def _fft_settings(self) -> tuple[Setting, ...]:
        return (Setting("pyfftw measure", ("pyfftw", "measure")),
                Setting("pyfftw estimate", ("pyfftw", "estimate"), {"planner": "estimate"}),
                Setting("scipy", ("scipy", "estimate"), {"backend": "scipy"}))

    def _fft_rate(self, value: tuple[str, str], box: float) -> tuple[float, str]:
        case = self._case()
        proc = case.processor(*value)
        frames = case.frames
        timed(lambda i: proc.process(frames[i % len(frames)]), sys.maxsize, WARMUP_S)
        n, seconds = timed(lambda i: proc.process(frames[i % len(frames)]), sys.maxsize, box)
        return n / seconds, f"planned in {proc.plan_info['planning_seconds'] * 1e3:.0f} ms"

    def dim_fft(self) -> Dimension:
        try:  # the MEASURE plan once, into the session's wisdom: trials then plan in ms
            self._case().processor("pyfftw", "measure")
        except ValueError as exc:
            raise Unsupported(f"no FFT for this frame: {exc}") from None
        return Dimension("fft", self._fft_settings(), self._fft_rate, 0.3, 0.15, 1.5)

    def _workers_rate(self, value: tuple[int, int], box: float) -> tuple[float, str]:
        from .bench.fft import Timing, processes

        workers, threads = value
        backend, planner = self._winner("fft", ("pyfftw", "measure"), self._fft_settings())
        res = processes(workers, threads, backend, planner).measure(
            self._case(), Timing(seconds=box, warmup=WARMUP_S))
        return res["fps"], (f"{backend} {planner}, per process "
                            f"{', '.join(f'{x:.0f}' for x in res['per_process_fps'])} fps")

    def dim_workers(self) -> Dimension:
        self.dim_fft()  # the same frames must be transformable
        cores = default_workers()
        combos = list(dict.fromkeys([(cores, 1), (1, 1), (1, 2)]))
        return Dimension("workers", tuple(
            Setting(f"{w} x {t} thread{'s' if t > 1 else ''}", (w, t),
                    {"workers": w, "threads": t}) for w, t in combos),
            self._workers_rate, 1.5, 0.25, 2.0)

    def record_frames(self, box: float) -> int:
        """A cap on frames per recorder trial: about a box at 2 GB/s."""
        lo, hi = RECORD_FRAMES
        return max(lo, min(hi, int(2e9 * box // self.frame_bytes)))

    def _record_rate(self, value: tuple[int, str, int], box: float) -> tuple[float, str]:
        from .recorder import RecordingWriter

        chunk, compression, threads = value
        frames, n = self.pool(), self.record_frames(box)
        n -= n % chunk
        with tempfile.TemporaryDirectory(prefix=".framebroker-tune-",
                                         dir=self.record_dir) as tmp:
            t0 = time.perf_counter()
            writer = RecordingWriter(path=Path(tmp) / "tune.h5", shape=self.spec.shape,
                                     dtype=self.spec.dtype, stream="tune", source="tune",
                                     frames_expected=n, chunk_frames=chunk,
                                     compression=compression, compress_threads=threads)
            with writer:
                done, _ = timed(lambda i: writer.write(i, i, frames[i % POOL]), n, box)
            seconds = time.perf_counter() - t0  # open to close: the last flush counts
        fps = done / seconds
        return fps, (f"{fps * self.frame_bytes / 1e6:.0f} MB/s, "
                     f"{writer.bytes_written / max(writer.bytes_stored, 1):.2f}x smaller")

    def dim_recorder(self) -> Dimension:
        if not os.access(self.record_dir, os.W_OK):
            raise Unsupported(f"cannot write to the record dir {self.record_dir}")
        combos = [(1, "none", RUN_COMPRESS_THREADS), (4, "none", RUN_COMPRESS_THREADS)]
        combos += [(c, z, t) for z in ("lz4", "bslz4") for c in (1, 4)
                   for t in (RUN_COMPRESS_THREADS, 1) if c == 4 or t == RUN_COMPRESS_THREADS]
        return Dimension("recorder", tuple(
            Setting(f"chunk {c}, {z}" + (f", {t} threads" if z != "none" else ""), (c, z, t),
                    {k: v for k, v, d in (("chunk-frames", c, 1), ("compression", z, "none"),
                                          ("compress-threads", t, RUN_COMPRESS_THREADS))
                     if v != d})
            for c, z, t in combos), self._record_rate, 0.15, 0.15, 1.0)

    def pool(self) -> list[np.ndarray]:
        """Distinct read-only frames (as received), so no cache holds "the" frame."""
        if not self._pool:
            for frame in self.spec.frames(POOL):
                frame.flags.writeable = False
                self._pool.append(frame)
        return self._pool

    # --- the result -------------------------------------------------------------------
    def run_flags(self) -> dict[str, Any]:
        """What ``framebroker run`` gets: the frames, then every recommended flag that
        run has (the subscriber policy is not one of them)."""
        flags: dict[str, Any] = {"source": self.spec.source}
        if self.spec.synthetic:
            flags.update(shape="x".join(map(str, self.spec.shape)), dtype=self.spec.dtype)
        for o in self.outcomes:
            flags.update({k: v for k, v in o.flags.items() if k != "policy"})
        return flags

    def predicted(self) -> dict[str, Any] | None:
        """The slowest measured stage with the chosen settings: what ``run`` can keep up
        with, as its median and the min-max of its rounds."""
        stages = {}
        fft = "workers" if self._outcome("workers") else "fft"  # else: one process's FFT
        for name, stage in (("transport", "transport"),
                            (fft, "FFT workers" if fft == "workers" else
                             "FFT in one process (workers not measured)"),
                            ("recorder", "recorder")):
            o = self._outcome(name)
            chosen = o and (o.recommended or (o.default if len(o.runs[o.default]) >= 2
                                              else None))
            if chosen:
                stages[stage] = {"setting": chosen, **figure(o.runs[chosen])}
        if not stages:
            return None
        slowest = min(stages, key=lambda k: stages[k]["median"])
        return {"stage": slowest, **stages[slowest], "stages": stages}

    def result(self, elapsed: float) -> dict[str, Any]:
        flags = self.run_flags()
        argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
        policy = next((o.flags["policy"] for o in self.outcomes if "policy" in o.flags), None)
        return {"source": self.spec.source, "shape": list(self.spec.shape),
                "dtype": self.spec.dtype, "budget_s": self.budget,
                "elapsed_s": round(elapsed, 1), "record_dir": str(self.record_dir),
                "outcomes": [asdict(o) for o in self.outcomes], "skipped": self.skipped,
                "flags": flags, "subscriber_policy": policy,
                "predicted": self.predicted(),
                "command": shlex.join(["framebroker", "run", *argv])}


def _fig(runs: list[float]) -> str:
    if not runs:
        return "failed"
    f = figure(runs)
    return f"{f['median']:.0f} ({f['min']:.0f}-{f['max']:.0f})"


def format_result(res: dict[str, Any]) -> str:
    """Every setting measured with its rounds, what was decided and why, the predicted
    rate and the command; nothing about a setting that was not measured."""
    shape = "x".join(map(str, res["shape"]))
    frames = f"{shape} {res['dtype']}" + ("" if res["source"] == "synthetic"
                                           else f" from {res['source']}")
    lines = [f"framebroker tune: {frames}, {res['elapsed_s']} s of a {res['budget_s']:g} s "
             f"budget; fps as median (min-max) of the rounds; * = recommended, "
             f"d = run's default"]
    for o in res["outcomes"]:
        lines.append(f"  {o['dimension']}:")
        for label in o["settings"]:
            if label not in o["notes"]:
                continue  # never started: the budget ran out
            mark = "*" if label == o["recommended"] else "d" if label == o["default"] else " "
            lines.append(f"    {mark} {label:<34} {_fig(o['runs'][label]):>22}  "
                         f"{o['notes'].get(label, '')}")
        lines.append(f"    -> {o['reason']}")
    for s in res["skipped"]:
        lines.append(f"  skipped {s['dimension']}: {s['reason']}")
    p = res["predicted"]
    if p:
        lines.append(f"predicted: {p['median']:.0f} fps ({p['min']:.0f}-{p['max']:.0f} "
                     f"between rounds), limited by the {p['stage']} ({p['setting']})")
    if res["subscriber_policy"]:
        lines.append(f"your own subscribers: --policy {res['subscriber_policy']} "
                     f"(framebroker watch/view, subscribe())")
    lines.append(f"recommended: {res['command']}")
    return "\n".join(lines)


def toml_text(res: dict[str, Any]) -> str:
    """The recommended flags as flat TOML that ``run --config FILE`` reads as is."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    head = [f"# framebroker tune, {time.strftime('%Y-%m-%d %H:%M')}: "
            f"{'x'.join(map(str, res['shape']))} {res['dtype']}, {res['elapsed_s']} s",
            "# framebroker run --config THIS_FILE (flags on the command line override)"]
    p = res["predicted"]
    if p:
        head.append(f"# predicted {p['median']:.0f} fps ({p['min']:.0f}-{p['max']:.0f}), "
                    f"limited by the {p['stage']}")
    return "\n".join(head + [f"{k} = {value(v)}" for k, v in res["flags"].items()]) + "\n"
