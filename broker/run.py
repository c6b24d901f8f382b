"""``framebroker run``: the whole pipeline in one command.

Starts the broker, the FFT workers, the sink and (with ``--record``) the recorder as
child processes on loopback, each the same ``framebroker`` subcommand a user could
start by hand. Nothing sleeps to wait for readiness: the broker holds the stream
until the workers and the recorder have joined (``--wait-workers``,
``--wait-recorders``), and the sink can join late because the broker keeps every
frame until the sink acknowledges it. Children run in their own session, so Ctrl-C
reaches only this process, which then stops the broker and lets every part finish
in order (the broker's END is what ends each of them). SIGTERM asks for an end within
a second instead: every part gets SIGTERM at once, each closes what it holds, and
they are awaited together.

At the end it prints one table: frames per stage, rates, losses, latencies and CPU
per process, and exits non-zero if a lossless path lost a frame or a part failed.
What was recorded is read back from the recording itself (its valid frames), not
taken from the recorder's word, so a recorder or broker that died without a summary
still gets an honest count; and the part that failed first is named, with why.
Next to it, two figures of this run: the start-up (from starting the parts to the
broker's first frame, and to the sink's first result) and the pipeline efficiency:
the end-to-end rate (the slowest of the processed and recorded rates) over the
slowest stage alone, where a stage alone is what its own work allows, timed inside
the part: the FFT workers' compute (the median ``execute`` time, summed over workers)
and the recorder's writer (frames over the time spent writing them). 1.0 means the
pipeline costs nothing around its slowest stage.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import signals
from .client import BrokerUnavailable, Control
from .hops import by_hop, format_hops
from .security import PLAIN, Security

EXIT_OK, EXIT_FAILED, EXIT_LOST = 0, 1, 3
STOP_GRACE_S = 5.0  # after SIGTERM: how long a part may take to close its files


@dataclass
class Part:
    """One child process and where its output goes (files, so no pipe can fill up)."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    out: Any = None
    err: Any = None
    summary: dict[str, Any] = field(default_factory=dict)

    def start(self, workdir: Path) -> None:
        self.out = open(workdir / f"{self.name}.out", "w+")
        self.err = open(workdir / f"{self.name}.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "broker.cli", *self.argv],
                                     stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def tail(self, n: int = 5) -> str:
        self.err.seek(0)
        lines = [ln for ln in self.err.read().splitlines() if ln.strip()]
        return "\n".join(f"    {ln}" for ln in lines[-n:])

    def collect(self) -> None:
        self.out.seek(0)
        lines = self.out.read().strip().splitlines()
        try:
            self.summary = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            self.summary = {}

    def terminate(self) -> None:
        """SIGTERM, if it still runs: it finishes what it holds and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        """Wait for it until ``deadline`` (monotonic); then SIGKILL."""
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self, grace: float) -> None:
        self.terminate()
        self.reap(time.monotonic() + grace)


def stop_all(parts: list[Part], grace: float) -> None:
    """SIGTERM to every part at once, then wait for them together: the slowest sets the
    time, not the sum (a part still running after ``grace`` is killed)."""
    for part in parts:
        part.terminate()
    deadline = time.monotonic() + grace
    for part in parts:
        part.reap(deadline)


@dataclass
class RunPlan:
    """Argument lists for every part (built by the CLI from its flags)."""

    control: str
    serve: list[str]
    sink: list[str]
    workers: list[list[str]]
    record: list[str] | None
    seconds: float
    frames: int
    lossless_record: bool
    security: Security = PLAIN  # for this process's own control requests
    record_path: str | None = None  # the recording, read back for the summary


class RunError(RuntimeError):
    """``run`` cannot start (a broker already answers on its endpoints)."""


def plan_from_args(args: argparse.Namespace, server: Security, client_sec: Security,
                   frames: int) -> RunPlan:
    """Every part's argument list from ``run``'s flags: the same subcommands a user could
    start by hand, on run's endpoints, with the server or client keys."""
    eps = ["--pub", args.pub, "--work", args.work, "--control", args.control,
           "--results", args.results]
    lossless = bool(args.record) and args.mode == "lossless"
    serve = ["serve", *eps, "--source", str(args.source), "--shape", "x".join(map(str, args.shape)),
             "--dtype", args.dtype, "--frames", str(frames),
             "--stream", args.stream, "--hwm", str(args.hwm),
             "--max-pending", str(args.max_pending), "--wait-workers", str(args.workers),
             "--wait-recorders", str(max(1, args.shards)) if lossless else "0", "--progress",
             "0", "--json",
             *server.argv()]
    serve += ["--fps", str(args.fps)] if args.fps is not None else []
    serve += ["--shm", args.shm] if args.shm else []
    if args.loop:
        serve.append("--loop")
    client = ["--broker", args.control, "--json", *client_sec.argv()]
    sink = (["sink", "--broker", args.control, "--json", *server.argv(), "--reorder",
             str(args.reorder)] if args.workers else None)
    worker = ["worker", *client, "--fft-output", args.output, "--backend", args.backend,
              "--color", args.color, "--threads", str(args.threads), "--planner", args.planner,
              "--window", str(args.window)] + (["--wisdom", args.wisdom] if args.wisdom else [])
    record = None
    if args.record:
        record = ["record", "--out", str(args.record), *client, "--mode", args.mode,
                  "--compression", args.compression, "--chunk-frames", str(args.chunk_frames),
                  "--compress-threads", str(args.compress_threads), "--no-space-check"]
        record += (["--expect-frames", str(frames)] if frames else []) + (
            ["--level", str(args.level)] if args.level is not None else []) + (
            ["--overwrite"] if args.overwrite else []) + (
            ["--shards", str(args.shards)] if args.shards else [])
    plan = RunPlan(control=args.control, serve=serve, sink=sink or [],
                   workers=[worker] * args.workers, record=record, seconds=args.seconds,
                   frames=frames, lossless_record=lossless, security=client_sec,
                   record_path=str(args.record) if args.record else None)
    return plan


def refuse_running_broker(control: str, security: Security) -> None:
    """``run`` starts its own broker: if one already answers at ``control``, our parts
    would join that one instead, so say so and stop. Nothing listening on a tcp or ipc
    address is known at once, so only a listener costs the 0.3 s wait for an answer."""
    if not _listening(control):
        return
    ctl = Control(control, timeout=0.3, security=security)
    try:
        ctl.endpoints()
    except BrokerUnavailable:
        return
    finally:
        ctl.close()
    raise RunError(f"a broker is already running at {control}; stop it (framebroker stop "
                   f"--broker {control}) or give run other endpoints (--pub, --work, "
                   f"--control, --results)")


def _listening(endpoint: str) -> bool:
    """Whether anything accepts connections at a tcp or ipc ``endpoint`` (True when
    that cannot be told without asking, as for inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address: Any = (host.strip("[]"), int(port))
    elif scheme == "ipc" and not rest.startswith("@"):
        family, address = socket.AF_UNIX, rest
    else:
        return True
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.3)
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def progress_display(args: argparse.Namespace, frames: int):
    """Live progress: a rich bar on a terminal, plain lines otherwise, nothing if quiet."""
    if not args.progress or args.json:
        return (lambda status: None), (lambda rep: None)

    def counts(status: dict[str, Any]) -> tuple[int, int, int]:
        groups = status["work"]["groups"]
        return (status["frames_sent"], groups.get("fft", {}).get("acked", 0),
                groups.get("record", {}).get("acked", 0))

    if sys.stdout.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[rate]}"),
                       TimeElapsedColumn(), transient=False)
        stages = ["published"] + ["processed"] * bool(args.workers) + ["recorded"] * bool(
            args.record)
        tasks = {name: bar.add_task(name, total=frames or None, rate="") for name in stages}
        bar.start()

        def show(status: dict[str, Any]) -> None:
            for name, n in zip(("published", "processed", "recorded"), counts(status)):
                if name in tasks:
                    bar.update(tasks[name], completed=n,
                               rate=f"{status['rate_fps']:.0f} fps" if name == "published"
                               else "")

        def finish(rep: dict[str, Any]) -> None:
            """The final counts (parts finish after the broker's last status)."""
            for name, st in rep.get("stages", {}).items():
                if name in tasks:
                    bar.update(tasks[name], completed=st["frames"], rate=f"{st['fps']:.0f} fps")
            bar.stop()

        return show, finish
    last = [0.0]

    def line(status: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] >= args.progress:
            last[0] = now
            sent, done, rec = counts(status)
            print(f"run: published {sent}{'/' + str(frames) if frames else ''} "
                  f"({status['rate_fps']:.0f} fps), processed {done}, recorded {rec}",
                  file=sys.stderr, flush=True)

    return line, (lambda rep: None)


class Runner:
    def __init__(self, plan: RunPlan, progress: Callable[[dict[str, Any]], None],
                 log: Callable[[str], None]) -> None:
        self.plan, self.progress, self.log = plan, progress, log
        self.parts = [Part("broker", plan.serve), Part("sink", plan.sink)]
        self.parts += [Part(f"worker{i + 1}", argv) for i, argv in enumerate(plan.workers)]
        if plan.record is not None:
            self.parts.append(Part("recorder", plan.record))
        self.failed: list[tuple[str, int, str]] = []  # in the order they were seen
        self.last_status: dict[str, Any] = {}  # the broker's, if it leaves no summary
        self.interrupted = False
        self.hurry = False  # SIGTERM: end within a second rather than drain in full
        self.t_start = 0.0
        self.t_end = 0.0
        self.t_spawn_unix = 0.0

    @property
    def broker(self) -> Part:
        return self.parts[0]

    def run(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="framebroker-run-"))
        # SIGTERM as Ctrl-C: stop the parts rather than orphan them; the monitor's waits
        # watch the signals' wakeup socket, so a signal cuts them short
        signals.wakeup_fd()
        previous = {sig: signal.signal(sig, self._interrupt)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.t_spawn_unix = time.time()
            for part in self.parts:
                part.start(workdir)
            self.t_start = time.monotonic()
            self._monitor()
            self._wait_all()
            self.t_end = time.monotonic()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            stop_all(self.parts, grace=2.0)
            for part in self.parts:
                part.collect()
                part.out.close()
                part.err.close()
            for f in workdir.iterdir():
                f.unlink()
            workdir.rmdir()

    def _interrupt(self, signum: int, _frame: Any) -> None:
        self.interrupted = True
        self.hurry = self.hurry or signum == signal.SIGTERM

    def _monitor(self) -> None:
        """Until the broker exits: show progress, watch for failures, honour --seconds."""
        ctl = Control(self.plan.control, timeout=1.0, security=self.plan.security)
        stop_sent = False
        try:
            while self.broker.returncode is None:
                for part in self.parts[1:]:
                    rc = part.returncode
                    if rc not in (None, 0) and part.name not in (f[0] for f in self.failed):
                        self.failed.append((part.name, rc, part.tail()))
                elapsed = time.monotonic() - self.t_start
                want_stop = (self._fatal() or self.interrupted
                             or (self.plan.seconds and elapsed >= self.plan.seconds))
                if want_stop and not stop_sent:
                    stop_sent = self._stop(ctl)
                    if self.hurry:  # every part has ended: no more status to show
                        break
                try:
                    self.last_status = ctl.status()
                    self.progress(self.last_status)
                except (BrokerUnavailable, RuntimeError):
                    pass
                signals.sleep(0.25)
        finally:
            ctl.close()
        if self.broker.returncode != 0:
            self.failed.append(("broker", self.broker.returncode, self.broker.tail()))

    def _fatal(self) -> bool:
        """A failed sink or recorder ends the run; a dead worker does not, while another
        worker is left: the broker dispatches its frames again."""
        names = {f[0] for f in self.failed}
        workers = [p.name for p in self.parts if p.name.startswith("worker")]
        return bool(names - set(workers)) or bool(workers) and set(workers) <= names

    def _stop(self, ctl: Control) -> bool:
        if self.hurry:  # SIGTERM to every part at once: each ends what it holds. The
            # broker last: its END must reach no part before that part's own SIGTERM (a
            # part ended by END has let the signals go, and SIGTERM would then kill it)
            stop_all([*self.parts[1:], self.broker], grace=STOP_GRACE_S)
            return True
        try:
            ctl.stop()
            return True
        except (BrokerUnavailable, RuntimeError):
            self.broker.stop(grace=5.0)  # SIGTERM: the broker still ends the stream
            return True

    def _wait_all(self) -> None:
        """Everyone ends at the broker's END; a part that does not is stopped. A broker
        that failed sent no END, so then the others are stopped at once."""
        broker_ok = self.broker.returncode == 0
        # after SIGTERM a part still starting (or still waiting) is stopped, not awaited
        deadline = time.monotonic() + (0.0 if not broker_ok else 1.0 if self.hurry else 30.0)
        for part in self.parts[1:]:
            while part.returncode is None and time.monotonic() < deadline:
                time.sleep(0.05)
            rc = part.returncode
            if rc is None:
                if broker_ok and not self.hurry:  # else it is stopped below
                    self.failed.append((part.name, -1, "did not finish after end-of-stream"))
            elif rc != 0 and part.name not in (f[0] for f in self.failed):
                self.failed.append((part.name, rc, part.tail()))

    # --- the report -------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        by = {p.name: p.summary for p in self.parts}
        b, s = by.get("broker") or self.last_status, by.get("sink", {})
        workers = [by[p.name] for p in self.parts if p.name.startswith("worker")]
        rec = by.get("recorder")
        files = (rec or {}).get("files") or _recording_files(self.plan.record_path)
        recorded = recorded_frames(files) if rec is not None else 0
        fft = b.get("work", {}).get("groups", {}).get("fft", {})
        frame_mb = _frame_mb(b)
        published = b.get("frames_sent", 0)
        if not by.get("broker"):  # died: it sent at least what was seen and what arrived
            published = max(published, recorded, s.get("frames", 0))
        stages = {
            "captured": {"frames": published, "fps": b.get("avg_fps", 0.0),
                         "mb_per_s": b.get("mb_per_s", 0.0)},
            "published": {"frames": published, "fps": b.get("avg_fps", 0.0),
                          "mb_per_s": b.get("mb_per_s", 0.0)},
        }
        processing = "sink" in by
        if processing:
            stages["processed"] = {"frames": s.get("frames", 0), "fps": s.get("fps", 0.0),
                                   "mb_per_s": round(s.get("fps", 0.0) * frame_mb, 2),
                                   "latency_ms_p50": s.get("latency_ms_p50"),
                                   "latency_ms_p99": s.get("latency_ms_p99"),
                                   "alone_fps": _workers_alone_fps(workers)}
        if rec is not None:
            stages["recorded"] = {"frames": recorded,
                                  "fps": rec.get("fps", 0.0), "mb_per_s": rec.get("mb_per_s", 0),
                                  "latency_ms_p50": rec.get("latency_ms_p50"),
                                  "latency_ms_p99": rec.get("latency_ms_p99"),
                                  "alone_fps": rec.get("writer_fps")}
        lost_processed = published - s.get("frames", 0) if processing else 0
        lost_recorded = (published - recorded) if rec is not None else 0
        # after SIGTERM the parts stop where they are, as asked: what they had not taken
        # yet is counted (dropped) but fails nothing
        lost = not self.hurry and (lost_processed > 0
                                   or (self.plan.lossless_record and lost_recorded > 0))
        return {
            "ok": not self.failed and not lost,
            "seconds": round(self.t_end - self.t_start, 3),
            "startup_s": (round(b["first_frame_unix"] - self.t_spawn_unix, 3)
                          if b.get("first_frame_unix") else None),
            "first_result_s": (round(s["first_result_unix"] - self.t_spawn_unix, 3)
                               if s.get("first_result_unix") else None),
            "spawned_unix": self.t_spawn_unix,
            "efficiency": efficiency(stages),
            "stream": {"source": b.get("source"), "shape": b.get("shape"),
                       "dtype": b.get("dtype")},
            "stages": stages,
            "dropped": {"processing": max(lost_processed, 0),
                        "recording": max(lost_recorded, 0),
                        "recorder_queue": rec.get("dropped", 0) if rec else 0},
            "gaps": {"sink": s.get("gaps", 0), "recorder": rec.get("frames_missed", 0) if rec else 0},
            "redispatched": fft.get("redispatched", 0),
            "dead_workers": fft.get("dead_consumers", 0),
            "duplicates": s.get("duplicates", 0),
            "per_worker": s.get("per_worker", {}),
            "cpu_s": {p.name: p.summary.get("cpu_s") for p in self.parts},
            "curve": b.get("curve", False), "auth_refused": b.get("auth_refused", 0),
            "transports": {p.name: p.summary["transport"] for p in self.parts
                           if "transport" in p.summary},
            "shm_stalls": (b.get("shm") or {}).get("stalls", 0),
            "recording": [str(f) for f in files] if rec is not None else None,
            "failed": [{"part": n, "exit": rc, "why": _why(rc, tail), "stderr": tail}
                       for n, rc, tail in self.failed],
            "interrupted": self.interrupted,
            "hops": by_hop([b, *(p.summary for p in self.parts if p.name != "broker")]),
            "workers": workers and [{"fps": w.get("fps"), "frames": w.get("frames"),
                                     "compute_ms_p50": w.get("compute_ms_p50")}
                                    for w in workers],
        }


def _why(rc: int, tail: str) -> str:
    """Why a part ended: the signal that killed it, or its last line of stderr."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    last = tail.strip().splitlines()[-1].strip() if tail.strip() else ""
    return f"exit {rc}" + (f": {last}" if last else "")


def _recording_files(path: str | None) -> list[Path]:
    """The recording's file, or its rotation parts, as found on disk."""
    if not path:
        return []
    p = Path(path)
    return [p] if p.exists() else sorted(p.parent.glob(f"{p.stem}_[0-9]*{p.suffix}"))


def recorded_frames(files: list[Path] | list[str]) -> int:
    """Valid frames the recording's files hold, read back (also from a file whose
    writer was killed: SWMR read, its ``/valid_frames``)."""
    from .inspect import open_recording, valid_count

    total = 0
    for f in files:
        try:
            h5, _ = open_recording(f)
            with h5:
                total += valid_count(h5)
        except (OSError, KeyError):
            pass  # never created, or not a recording: it holds nothing
    return total


def _workers_alone_fps(workers: list[dict[str, Any]]) -> float | None:
    """What the FFT stage alone allows: each worker at its median compute time."""
    rates = [1000.0 / w["compute_ms_p50"] for w in workers if w.get("compute_ms_p50")]
    return round(sum(rates), 2) if rates else None


def efficiency(stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """End to end (the slowest final stage's rate) over the slowest stage alone."""
    final = [st["fps"] for name, st in stages.items() if name in ("processed", "recorded")]
    alone = {name: st["alone_fps"] for name, st in stages.items() if st.get("alone_fps")}
    if not final or not alone:
        return None
    slowest = min(alone, key=alone.__getitem__)
    e2e = min(final)
    return {"value": round(e2e / alone[slowest], 3), "end_to_end_fps": e2e,
            "slowest_stage": slowest, "slowest_alone_fps": alone[slowest]}


def _frame_mb(status: dict[str, Any]) -> float:
    import numpy as np

    shape, dtype = status.get("shape"), status.get("dtype")
    if not shape or not dtype:
        return 0.0
    return float(np.prod(shape)) * np.dtype(dtype).itemsize / 1e6


def format_report(rep: dict[str, Any]) -> str:
    """The summary as a plain-text table (rich renders the same rows when on a tty)."""
    first = rep["failed"][0] if rep["failed"] else None
    verdict = "OK" if rep["ok"] else "FAILED" + (
        f" ({first['part']} first, {first['why']})" if first else " (frames lost)")
    lines = [f"framebroker run: {rep['stream']['source']} -> {verdict} in {rep['seconds']} s"]
    lines.append(f"  {'stage':<10} {'frames':>8} {'fps':>9} {'MB/s':>9} {'p50 ms':>9} "
                 f"{'p99 ms':>9} {'alone fps':>10}")
    for name, st in rep["stages"].items():
        alone = st.get("alone_fps")
        lines.append(f"  {name:<10} {st['frames']:>8} {st.get('fps', 0):>9.1f} "
                     f"{st.get('mb_per_s', 0) or 0:>9.1f} {_ms(st.get('latency_ms_p50')):>9} "
                     f"{_ms(st.get('latency_ms_p99')):>9} "
                     f"{'-' if alone is None else f'{alone:.1f}':>10}")
    eff = rep.get("efficiency")
    if eff:
        lines.append(f"  pipeline efficiency {eff['value']:.2f}: end to end "
                     f"{eff['end_to_end_fps']:.1f} fps over the slowest stage alone "
                     f"({eff['slowest_stage']}, {eff['slowest_alone_fps']:.1f} fps)")
    if rep.get("startup_s") is not None:
        to_result = rep.get("first_result_s")
        lines.append(f"  start-up: {rep['startup_s']:.2f} s from starting the parts to the "
                     f"first frame" + ("" if to_result is None else
                                       f", {to_result:.2f} s to the first result"))
    d, g = rep["dropped"], rep["gaps"]
    lines.append(f"  dropped: processing {d['processing']}, recording {d['recording']} "
                 f"(recorder queue {d['recorder_queue']}); gaps: sink {g['sink']}, recorder "
                 f"{g['recorder']}; re-dispatched {rep['redispatched']} (dead workers "
                 f"{rep['dead_workers']}), duplicates removed {rep['duplicates']}")
    if rep.get("hops"):
        lines.append(f"  latency by hop, p50/p99: {format_hops(rep['hops'])}")
    lines.append("  cpu s: " + ", ".join(f"{k} {v}" for k, v in rep["cpu_s"].items()))
    if rep["recording"]:
        lines.append(f"  recording: {', '.join(rep['recording'])}")
    for f in rep["failed"]:
        lines.append(f"  FAILED: {f['part']} {f['why']}:\n{f['stderr']}")
    if rep["interrupted"]:
        lines.append("  interrupted by Ctrl-C: stopped cleanly")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def exit_code(rep: dict[str, Any]) -> int:
    if rep["failed"]:
        return EXIT_FAILED
    return EXIT_OK if rep["ok"] else EXIT_LOST


def default_workers() -> int:
    """One FFT worker per core: the broker, sink and recorder are mostly waiting on I/O."""
    return max(1, os.cpu_count() or 1)
