"""FFT worker: takes frames from the broker's work group, sends results to the sink.

A worker is its own process (started with spawn or as a CLI process, never forked:
FFTW threads and fork do not mix). It plans once per frame shape when it starts
(from the broker's status) so the first frame does not pay for planning, holds at
most ``window`` frames, and reports each one DONE only after its result was handed
to the results socket. While the sink is absent or slow, the result send waits in
short slices and the worker keeps heartbeating, so it is not declared dead for
being blocked by someone else.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from . import protocol as proto
from .client import DEFAULT_BROKER, Control, Frame, ReceiveTimeout, WorkConsumer, cpu_seconds
from .fft import FFTProcessor, WisdomStore
from .hops import Hop
from .security import PLAIN, Security, configure_socket
from .signals import Stopped, StopSignals, wakeup_fd

STOP_LINGER_MS = 200

MAX_PLANS = 4
RECONNECT_MS = 10  # the results PUSH's first retry when the sink is not bound yet
OUTPUT_CODES = {"spectrum": proto.Output.SPECTRUM, "magnitude": proto.Output.MAGNITUDE,
                "radial": proto.Output.RADIAL, "peak": proto.Output.PEAK}


@dataclass
class WorkerConfig:
    broker: str = DEFAULT_BROKER
    work: str | None = None
    results: str | None = None
    output: str = "peak"
    backend: str = "pyfftw"
    color: str = "gray"
    threads: int = 1
    planner: str = "measure"
    wisdom: str | None = None  # directory; None = the user cache dir
    window: int = 4
    sink: bool = True  # False: no results socket, DONE acknowledges (count only)
    worker_id: int = 0
    timeout: float = 10.0  # seconds without work (and without END) before giving up
    keep_running: bool = False  # survive END and wait for the next session
    sndhwm: int = 64
    security: Security = PLAIN  # CURVE client keys (optional) and the ZMTP heartbeat
    shm: bool = True  # read frames from the broker's ring when it offers one here
    metrics: tuple[str, int] | None = None  # --metrics HOST:PORT (see broker/metrics.py)


@dataclass
class WorkerStats:
    frames: int = 0
    compute_ns: deque[int] = field(default_factory=lambda: deque(maxlen=100_000))
    plans: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=16))
    unusable: int = 0  # valid on the wire, but no FFT takes it (1-D, complex, ...)
    t_first: float = 0.0
    t_last: float = 0.0
    hop: Hop = field(default_factory=lambda: Hop("receive_to_result"))

    def summary(self, consumer: WorkConsumer) -> dict[str, Any]:
        elapsed = self.t_last - self.t_first
        comp = np.array(self.compute_ns or [0], dtype=np.float64) / 1e6
        return {"frames": self.frames, "seconds": round(elapsed, 3),
                "fps": round((self.frames - 1) / elapsed, 2) if elapsed > 0 else 0.0,
                "compute_ms_p50": round(float(np.median(comp)), 3),
                "plans": list(self.plans), "rejected": dict(consumer.rejected),
                "unusable": self.unusable, "transport": consumer.transport,
                "ended": consumer.ended, "total": consumer.total, "cpu_s": cpu_seconds(),
                "hops": {self.hop.name: self.hop.summary()}}


class Worker:
    """One FFT worker; ``run()`` returns its summary."""

    def __init__(self, cfg: WorkerConfig, log: Callable[[str], None] | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.log = log or (lambda m: print(f"framebroker worker: {m}", file=sys.stderr,
                                           flush=True))
        self.worker_id = cfg.worker_id or os.getpid()
        self.stop = StopSignals()  # from the start: a stop while starting ends run() at once
        self.stop.install()
        self.stopped_by: str | None = None  # the stop signal that ended run()
        self.wisdom = WisdomStore(cfg.wisdom)
        self.consumer = WorkConsumer(cfg.work, broker=cfg.broker, group="fft",
                                     window=cfg.window, acks="sink" if cfg.sink else "self",
                                     name=f"worker-{self.worker_id}", connect_wait=cfg.timeout,
                                     shm=cfg.shm, ctx=self.ctx, security=cfg.security)
        self.push: zmq.Socket | None = None
        if cfg.sink:
            results = cfg.results or self.consumer.endpoints.get("results")
            if not results:
                raise ValueError("no results endpoint: give --results or --broker")
            self.push = configure_socket(self.ctx.socket(zmq.PUSH), "client", cfg.security)
            self.push.setsockopt(zmq.SNDHWM, cfg.sndhwm)
            self.push.setsockopt(zmq.LINGER, 5000)
            # the sink learns the same endpoints from the broker and may bind just after
            # this connect: retry at once, not after libzmq's 100 ms, backing off to 1 s
            self.push.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            self.push.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            self.push.connect(results)
        self.processors: dict[tuple, FFTProcessor] = {}
        self.stats = WorkerStats()
        self.exporter = None
        if cfg.metrics is not None:
            from .metrics import expose, worker_families
            self.exporter = expose(cfg.metrics, "worker", lambda: worker_families(self),
                                   self.log)
        self._plan_from_status()

    def _plan_from_status(self) -> None:
        """Plan for the broker's frame shape now, before any frame arrives."""
        if not self.consumer.endpoints:
            return
        ctl = Control(self.cfg.broker, timeout=2.0, ctx=self.ctx, security=self.cfg.security)
        try:
            status = ctl.status()
            self.processor(tuple(status["shape"]), np.dtype(status["dtype"]))
        except (TimeoutError, RuntimeError, ValueError) as exc:
            self.log(f"planning deferred to the first frame: {exc}")
        finally:
            ctl.close()

    def processor(self, shape: tuple[int, ...], dtype: np.dtype) -> FFTProcessor:
        """The plan for this frame geometry; at most MAX_PLANS are kept, so a peer that
        sends ever-new shapes cannot make the worker plan and hold without bound."""
        key = (shape, dtype.str)
        proc = self.processors.pop(key, None)
        if proc is None:
            if len(self.processors) >= MAX_PLANS:
                self.processors.pop(next(iter(self.processors)))
            cfg = self.cfg
            proc = FFTProcessor(shape, dtype, color=cfg.color, output=cfg.output,
                                backend=cfg.backend, threads=cfg.threads, planner=cfg.planner,
                                wisdom=self.wisdom)
            info = {"shape": list(shape), "dtype": str(dtype), **proc.plan_info}
            self.stats.plans.append(info)
            self.log(f"planned {shape} {dtype} ({proc.backend}/{cfg.planner}, {cfg.threads} "
                     f"thread(s)) in {info['planning_seconds'] * 1e3:.1f} ms; wisdom imported: "
                     f"{info['wisdom_imported']}, had plan: {info['wisdom_had_plan']}"
                     + (f", wisdom error: {info['wisdom_error']}" if info["wisdom_error"] else ""))
        self.processors[key] = proc  # most recently used last
        return proc

    def run(self) -> dict[str, Any]:
        """Until END, the timeout or a stop signal (SIGTERM, SIGHUP, SIGINT): that one
        ends it at once, with its summary. What it held goes back to the broker, which
        dispatches again what no sink acknowledged."""
        c, stop = self.consumer, self.stop
        c.watch(wakeup_fd(), stop.check)
        while not stop.signum:
            try:
                frame = c.recv(timeout=self.cfg.timeout)
            except ReceiveTimeout as exc:
                self.log(str(exc))
                break
            except Stopped:
                break
            if frame is None:
                if not self.cfg.keep_running:
                    break
                continue
            self._handle(frame, time.perf_counter())
        self.stopped_by = stop.name
        if stop.signum:
            self.log(f"stopped by {stop.name}")
        return {**self.stats.summary(c), "stopped_by": stop.name}

    def _handle(self, frame: Frame, received: float) -> None:
        h = frame.header
        try:
            proc = self.processor(h.shape, h.dtype)
            result = proc.process(frame.array)
        except ValueError as exc:  # a frame no FFT can take (1-D, 4-D, complex, ...)
            self.stats.unusable += 1
            self.log(f"frame {h.frame_id} not transformed: {exc}")
            self.consumer.done(h.frame_id)
            return
        if self.push is not None:
            header = proto.result_header(h.stream, h.frame_id, h.timestamp_ns, result,
                                         OUTPUT_CODES[self.cfg.output], self.worker_id,
                                         proc.last_compute_ns, h.session)
            if not self._send_result([header, result]):
                return  # stopped while the sink held it back: never DONE, dispatched again
        self.consumer.done(h.frame_id)
        st = self.stats
        st.hop.observe(time.perf_counter() - received)
        now = time.monotonic()
        if not st.frames:
            st.t_first = now
        st.t_last = now
        st.frames += 1
        st.compute_ns.append(proc.last_compute_ns)

    def _send_result(self, parts: list[Any]) -> bool:
        """Hand a result to the sink, heartbeating while the sink applies back-pressure;
        False if a stop signal came first."""
        assert self.push is not None
        while True:
            try:
                # copied: spectrum/magnitude results are the processor's reused buffers
                self.push.send_multipart(parts, flags=zmq.NOBLOCK)
                return True
            except zmq.Again:
                if self.stop.signum:
                    return False
                poller = zmq.Poller()
                poller.register(self.push, zmq.POLLOUT)
                poller.register(wakeup_fd(), zmq.POLLIN)
                poller.poll(int(self.consumer.heartbeat * 1000))
                self.consumer.heartbeat_now()

    def close(self) -> None:
        """After a stop signal, results still queued for the sink wait at most
        STOP_LINGER_MS: unacknowledged, their frames are dispatched again. The stop
        signals keep their hold until here, so closing is not cut short."""
        if self.exporter is not None:
            self.exporter.close()
        self.consumer.close()
        if self.push is not None:
            self.push.close(linger=STOP_LINGER_MS if self.stopped_by else None)
        self.stop.restore()
