"""Transport benchmark: framebroker PUB/SUB vs the naive pickle way vs raw pyzmq.

Every cell is one sender and one receiver (separate processes for tcp and ipc,
threads of one process for inproc) on the same PUB/SUB pattern, measured at the
receiver over a fixed time after a warm-up, repeated (interleaved across methods)
and reported as the median run, all in one run so the ratios compare like with like
on a noisy machine:

* ``pickle``: what users write first: ``send_pyobj({"id": i, "frame": array})`` and
  ``recv_pyobj()``.
* ``framebroker``: the real broker (synthetic source rendering every frame into a
  recycled buffer, header + zero-copy payload) to the real ``Subscriber`` (which
  validates each header and wraps the payload without a copy).
* ``raw``: one prebuilt ``zmq.Frame`` of the same bytes sent again and again, and
  received with ``copy=False``: the most pyzmq can do, with no per-frame work at all.
* transport ``shm``: the real broker with ``--shm`` (the source captures into a ring
  in /dev/shm) to the real ``Subscriber``, which gets a header naming a slot, checks
  the seqlock stamps before handing out the read-only view and again after (a frame
  that fails either check is a drop and is not counted), like the ipc ``framebroker``
  receiver gets a read-only view of its message. ``framebroker-copy`` also copies
  every frame out of the ring (``np.copyto`` into one preallocated buffer) before the
  second check, with ``policy="latest:1"`` (it is slower than the source, so it wants
  the newest frame): what a consumer that keeps frames pays. ``memcpy`` is the same bytes
  copied in one process with ``np.copyto`` into a preallocated buffer: what moving a
  frame costs when nothing but memory is involved. The source stays in the cache
  there (one 6-8 MB frame), so ``memcpy-ring`` copies from ``SHM_SLOTS`` frames in
  turn instead, the working set the ring has: the DRAM-bound limit of a copy-out.

The sender process is pinned to one core and the receiver to the other (``--no-pin``
to let the scheduler place them); without that, placement alone moves a cell 2x.

Run ``python bench/transport.py`` (``--quick`` for a short run); prints a table and
writes ``--out`` (default ``bench-TIMESTAMP/transport.json`` under the cwd).
``--transports ipc shm`` adds the
shared-memory table (shm vs zero-copy ipc vs memcpy).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from ..broker import BrokerConfig, free_tcp_endpoints
from ..client import Control, Subscriber
from ..izmq import imagezmq_installed, jpeg_encodable
from .common import (FrameSpec, add_frame_args, add_out_args, frame_specs, out_path, run_broker,
                     write_json)
from .stats import compare, diff_noise, median_row, own_noise

SIZES = {"640x480x3 u8": ((480, 640, 3), "uint8"),
         "1920x1080x3 u8": ((1080, 1920, 3), "uint8"),
         "2048x2048 u16": ((2048, 2048), "uint16")}
QUICK_SIZES = ("640x480x3 u8", "1920x1080x3 u8")
METHODS = ("pickle", "framebroker", "raw")
#: ``--peers``: what a user would run instead, in the same rounds (tcp and ipc). Each is a
#: sender in ``SENDERS`` and a receiver in ``RECEIVERS`` (see ``peer_methods``).
PEERS = ("imagezmq", "imagezmq-jpeg")
JPEG_QUALITY = 95
TRANSPORTS = ("tcp", "ipc", "inproc", "shm")
#: shm is opt-in (``--transports ipc shm``): ``framebroker bench`` keeps its table
DEFAULT_TRANSPORTS = ("tcp", "ipc", "inproc")
#: what each transport compares; shm rows are the broker's ring and plain memcpy
TRANSPORT_METHODS = {"tcp": METHODS, "ipc": METHODS, "inproc": METHODS,
                     "shm": ("framebroker", "framebroker-copy", "memcpy", "memcpy-ring")}
HWM = 16
SHM_SLOTS = 64


def _endpoints(transport: str, tag: str) -> dict[str, str]:
    if transport == "tcp":
        return dict(zip(("pub", "control", "work"), free_tcp_endpoints(3)))
    if transport in ("ipc", "shm"):
        base = Path(tempfile.gettempdir()) / f"fb-bench-{os.getpid()}-{tag}"
        return {k: f"ipc://{base}-{k}" for k in ("pub", "control", "work")}
    return {k: f"inproc://bench-{tag}-{k}" for k in ("pub", "control", "work")}


# --- senders: run until ``stop`` is set (or, for the broker, told to stop) -------

def send_pickle(ep: dict, spec: FrameSpec, stop, ctx=None) -> None:
    ctx = ctx or zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.bind(ep["pub"])
    frame = spec.frames(1)[0]
    i = 0
    while not stop.is_set():
        pub.send_pyobj({"id": i, "ts": time.time_ns(), "frame": frame})
        i += 1
    pub.close(linger=0)


def send_raw(ep: dict, spec: FrameSpec, stop, ctx=None) -> None:
    ctx = ctx or zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.bind(ep["pub"])
    frame = spec.frames(1)[0]
    payload = zmq.Frame(frame, copy=False)
    while not stop.is_set():
        pub.send(payload, copy=False)
    pub.close(linger=0)


def send_framebroker(ep: dict, spec: FrameSpec, stop, ctx=None, shm: str = "") -> None:
    cfg = BrokerConfig(pub=ep["pub"], control=ep["control"], work=ep["work"], sndhwm=HWM,
                       wait_subscribers=1, end_linger=0.0, linger_ms=0, shm=shm)
    run_broker(spec.open(), cfg, ctx)


def send_shm(ep: dict, spec: FrameSpec, stop, ctx=None) -> None:
    send_framebroker(ep, spec, stop, ctx, shm=f"{SHM_SLOTS}slots")


def send_imagezmq(ep: dict, spec: FrameSpec, stop, ctx=None, jpeg: bool = False) -> None:
    """imagezmq's PUB/SUB mode as its README shows it: ``send_image`` of the array, or
    ``send_jpg`` of ``cv2.imencode(".jpg", frame)`` per frame (uint8 frames only)."""
    import cv2
    import imagezmq

    frame = spec.frames(1)[0]
    sender = imagezmq.ImageSender(connect_to=ep["pub"], REQ_REP=False)  # binds
    sender.zmq_socket.setsockopt(zmq.SNDHWM, HWM)  # for the pipes made after it: all
    quality = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    i = 0
    while not stop.is_set():
        if jpeg:
            sender.send_jpg(str(i), cv2.imencode(".jpg", frame, quality)[1])
        else:
            sender.send_image(str(i), frame)
        i += 1
    sender.zmq_socket.close(linger=0)
    sender.zmq_context.term()  # imagezmq's own context: see run_broker


SENDERS: dict[str, Callable] = {"pickle": send_pickle, "raw": send_raw,
                                "framebroker": send_framebroker, "shm": send_shm,
                                "shm-copy": send_shm, "imagezmq": send_imagezmq,
                                "imagezmq-jpeg": lambda *a, **k: send_imagezmq(*a, **k,
                                                                               jpeg=True)}


def peer_methods(spec: FrameSpec) -> tuple[str, ...]:
    """The ``--peers`` columns this install and frame can have: imagezmq only where it is
    installed, its JPEG way only for uint8 gray or BGR frames."""
    if not imagezmq_installed():
        return ()
    jpeg = jpeg_encodable(spec.shape, spec.dtype)
    return tuple(m for m in PEERS if m != "imagezmq-jpeg" or jpeg)


# --- receivers: warm up, then count frames for ``seconds`` -------------------------

def _measure(recv_one: Callable[[], int], seconds: float, warmup: float) -> dict[str, Any]:
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < warmup:
        recv_one()
    n, nbytes = 0, 0
    t0 = time.perf_counter()
    while True:
        nbytes += recv_one()
        n += 1
        t = time.perf_counter() - t0
        if t >= seconds:
            return {"frames": n, "seconds": t, "fps": n / t, "mb_per_s": nbytes / t / 1e6}


def receive_shm(ep: dict, seconds: float, warmup: float, copy: bool,
                ctx=None, policy: str | None = None) -> dict[str, Any]:
    """Frames from the ring that passed both seqlock checks (``copy``: copied out first)."""
    ctx = ctx or zmq.Context.instance()
    # a consumer slower than the source wants the newest frame, not the oldest queued
    # one (which is the next to be overwritten): latest:1, as documented for viewers
    sub = Subscriber(broker=ep["control"], timeout=30, rcvhwm=HWM, ctx=ctx,
                     policy=policy or ("latest:1" if copy else "drop"))
    if sub.transport != "shm":
        raise RuntimeError(f"the shm receiver fell back to tcp: {sub.shm_fallback}")
    dst = np.empty(sub.ring.info.shape, sub.ring.info.dtype)

    def one() -> int:
        while True:
            frame = sub.recv()
            if copy:
                np.copyto(dst, frame.array)
            if sub.confirm(frame):
                return frame.array.nbytes

    try:
        return {**_measure(one, seconds, warmup), "overwritten": sub.overwritten}
    finally:
        sub.close()
        Control(ep["control"], timeout=5, ctx=ctx).stop()


def measure_memcpy(spec: FrameSpec, seconds: float, warmup: float,
                   frames: int = 1) -> dict[str, Any]:
    """``np.copyto`` into a preallocated buffer, in this process, from ``frames``
    distinct frames in turn (1: the same cache-hot frame again and again)."""
    srcs = spec.frames(frames)
    dst = np.empty_like(srcs[0])
    count = iter(range(1 << 62))

    def one() -> int:
        np.copyto(dst, srcs[next(count) % frames])
        return dst.nbytes

    return _measure(one, seconds, warmup)


def receive_imagezmq(ep: dict, seconds: float, warmup: float, jpeg: bool) -> dict[str, Any]:
    """imagezmq's ImageHub (SUB); the JPEG way decodes every frame back to pixels."""
    import cv2
    import imagezmq

    hub = imagezmq.ImageHub(open_port=ep["pub"], REQ_REP=False)
    hub.zmq_socket.setsockopt(zmq.RCVHWM, HWM)
    hub.zmq_socket.setsockopt(zmq.RCVTIMEO, 30000)

    def one() -> int:
        if jpeg:
            return cv2.imdecode(np.frombuffer(hub.recv_jpg()[1], np.uint8),
                                cv2.IMREAD_UNCHANGED).nbytes
        return hub.recv_image()[1].nbytes

    try:
        return _measure(one, seconds, warmup)
    finally:
        hub.zmq_socket.close(linger=0)


def receive(method: str, ep: dict, seconds: float, warmup: float, ctx=None,
            policy: str | None = None) -> dict[str, Any]:
    """The receiving end of ``method``; ``policy`` is the framebroker Subscriber's."""
    ctx = ctx or zmq.Context.instance()
    if method in ("shm", "shm-copy"):
        return receive_shm(ep, seconds, warmup, method == "shm-copy", ctx, policy)
    if method in PEERS:
        return receive_imagezmq(ep, seconds, warmup, method == "imagezmq-jpeg")
    if method == "framebroker":
        sub = Subscriber(ep["pub"], topics=("cam",), timeout=30, rcvhwm=HWM, ctx=ctx,
                         policy=policy or "drop")

        def one() -> int:
            return sub.recv().array.nbytes

        try:
            return _measure(one, seconds, warmup)
        finally:
            sub.close()
            Control(ep["control"], timeout=5, ctx=ctx).stop()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVTIMEO, 30000)
    sock.connect(ep["pub"])
    if method == "pickle":
        def one() -> int:
            return sock.recv_pyobj()["frame"].nbytes
    else:
        def one() -> int:
            return len(sock.recv(copy=False))
    try:
        return _measure(one, seconds, warmup)
    finally:
        sock.close(linger=0)


PIN = True


def _pin(cpu: int) -> None:
    """Sender on one core, receiver on the other (each with its zmq I/O thread), the
    same for every method: without it the scheduler's placement alone moves results 2x."""
    cpus = sorted(os.sched_getaffinity(0))
    if PIN and len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _configure(hwm: int, copy_threshold: int) -> None:
    """Socket settings for the sockets this process creates from now on: the senders and
    receivers read ``HWM`` when they make theirs, and pyzmq gives each new socket
    ``zmq.COPY_THRESHOLD`` (parts smaller than it are copied even with ``copy=False``)."""
    global HWM
    HWM = hwm
    zmq.COPY_THRESHOLD = copy_threshold


def _receiver_proc(method, ep, seconds, warmup, queue, pin, hwm, copy_threshold,
                   policy) -> None:
    global PIN
    PIN = pin
    _pin(1)
    _configure(hwm, copy_threshold)
    queue.put(receive(method, ep, seconds, warmup, policy=policy))


def _memcpy_proc(spec, seconds, warmup, queue, pin, frames) -> None:
    global PIN
    PIN = pin
    _pin(1)
    queue.put(measure_memcpy(spec, seconds, warmup, frames))


def _sender_proc(method, ep, spec, stop, pin, hwm, copy_threshold) -> None:
    global PIN
    PIN = pin
    _pin(0)
    _configure(hwm, copy_threshold)
    try:
        SENDERS[method](ep, spec, stop)
    finally:  # libzmq done with every zero-copy frame before the interpreter frees them
        zmq.Context.instance().destroy(linger=0)


def run_cell(method: str, transport: str, shape, dtype, seconds: float, warmup: float,
             hwm: int = HWM, copy_threshold: int = zmq.COPY_THRESHOLD,
             source: str = "synthetic", policy: str | None = None) -> dict[str, Any]:
    """One sender and one receiver for ``seconds``; ``hwm`` and ``copy_threshold`` are
    the benchmark's fixed values unless ``framebroker tune`` sweeps them; ``source`` is
    a ``--source`` (its frames replace the synthetic ones, shape and dtype its own);
    ``policy`` the framebroker Subscriber's (default: drop)."""
    spec = FrameSpec(source, tuple(shape), np.dtype(dtype).name)
    spawn = mp.get_context("spawn")
    if method in ("memcpy", "memcpy-ring"):  # one process, on the receivers' core
        queue = spawn.Queue()
        frames = SHM_SLOTS if method == "memcpy-ring" else 1
        proc = spawn.Process(target=_memcpy_proc, args=(spec, seconds, warmup, queue, PIN,
                                                         frames))
        proc.start()
        try:
            return queue.get(timeout=120)
        finally:
            proc.join(10)
    if transport == "shm":  # the broker's ring, viewed or copied out
        method = {"framebroker": "shm", "framebroker-copy": "shm-copy"}[method]
    ep = _endpoints(transport, f"{method}-{spec.shape[0]}")
    if transport == "inproc":
        saved = (HWM, zmq.COPY_THRESHOLD)
        _configure(hwm, copy_threshold)
        ctx = zmq.Context()
        stop = threading.Event()
        sender = threading.Thread(target=SENDERS[method], args=(ep, spec, stop, ctx))
        sender.start()
        time.sleep(0.05)  # inproc needs the bind before the connect
        try:
            return receive(method, ep, seconds, warmup, ctx, policy)
        finally:
            stop.set()
            sender.join()
            ctx.term()
            _configure(*saved)
    stop, queue = spawn.Event(), spawn.Queue()
    sender = spawn.Process(target=_sender_proc, args=(method, ep, spec, stop, PIN, hwm,
                                                       copy_threshold))
    receiver = spawn.Process(target=_receiver_proc, args=(method, ep, seconds, warmup, queue,
                                                          PIN, hwm, copy_threshold, policy))
    sender.start()
    receiver.start()
    try:
        return queue.get(timeout=120)
    finally:
        stop.set()
        receiver.join(10)
        sender.join(10)
        for p in (sender, receiver):
            if p.is_alive():
                p.kill()
        for path in ep.values():
            if path.startswith("ipc://"):
                Path(path[6:]).unlink(missing_ok=True)


def interleaved_pubsub(spec: FrameSpec, settings: list[tuple[str, int, str]], rounds: int,
                       box: float, warmup: float, deadline: float = float("inf"),
                       on_window: Callable[[int, int, float], None] = lambda *a: None,
                       soft_deadline: float = float("inf")) -> list[list[float]]:
    """framebroker PUB/SUB fps of every ``(transport, hwm, policy)`` setting, in
    interleaved rounds of short windows, for ``framebroker tune``.

    One broker process per setting, all started at once (so the start-up is paid once,
    not per trial), each paused except the one being measured; the subscribers live in
    this process and take turns: resume, drop ``warmup`` s of frames, count ``box`` s,
    pause. A round that would end after ``deadline`` (a ``time.monotonic()`` value) is
    not started, nor a third or later one that would end after ``soft_deadline``. Returns the fps of each setting per round (shm frames are counted only
    when they pass both seqlock checks)."""
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    procs, subs, ctls = [], [], []
    try:
        for i, (transport, hwm, _) in enumerate(settings):
            ep = _endpoints("tcp" if transport == "tcp" else "ipc", f"panel{i}-{os.getpid()}")
            method = "shm" if transport == "shm" else "framebroker"
            procs.append(spawn.Process(target=_sender_proc, args=(
                method, ep, spec, stop, False, hwm, zmq.COPY_THRESHOLD)))
            procs[-1].start()
            ctls.append((ep, Control(ep["control"], timeout=30)))
        for (ep, ctl), (transport, hwm, policy) in zip(ctls, settings):
            subs.append(Subscriber(broker=ep["control"], timeout=30, rcvhwm=hwm,
                                   policy=policy, shm=transport == "shm"))
            if transport == "shm" and subs[-1].transport != "shm":
                raise RuntimeError(f"shm fell back to tcp: {subs[-1].shm_fallback}")
            ctl.pause()
        runs: list[list[float]] = [[] for _ in settings]
        window = len(settings) * (box + warmup + 0.05)
        for r in range(rounds):
            if time.monotonic() + window > (deadline if r < 2 else soft_deadline):
                break
            for i, (sub, (_, ctl)) in enumerate(zip(subs, ctls)):
                ctl.resume()
                one = lambda s=sub: s.recv().array.nbytes if s.transport != "shm" else (
                    _confirmed(s))  # noqa: E731
                fps = _measure(one, box, warmup)["fps"]
                ctl.pause()
                runs[i].append(fps)
                on_window(r, i, fps)
        return runs
    finally:
        for sub in subs:
            sub.close()
        for ep, ctl in ctls:
            try:
                ctl.stop()
            except (TimeoutError, RuntimeError):
                pass
            ctl.close()
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        for ep, _ in ctls:
            for path in ep.values():
                if path.startswith("ipc://"):
                    Path(path[6:]).unlink(missing_ok=True)


def _confirmed(sub: Subscriber) -> int:
    """The next ring frame that passed both seqlock checks."""
    while True:
        frame = sub.recv()
        if sub.confirm(frame):
            return frame.array.nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short cells (for CI and smoke runs)")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per cell")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved runs per cell; the median is reported (default 3)")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--transports", nargs="*", default=list(DEFAULT_TRANSPORTS),
                    choices=TRANSPORTS,
                    help="default: tcp ipc inproc; add shm for the shared-memory columns")
    ap.add_argument("--no-pin", action="store_true",
                    help="let the scheduler place sender and receiver (noisier)")
    ap.add_argument("--peers", action="store_true",
                    help="add imagezmq (raw and JPEG, where installed) to the tcp and ipc "
                         "cells, in the same rounds")
    add_frame_args(ap)
    add_out_args(ap, "transport")
    args = ap.parse_args(argv)
    out = out_path(args.out, "transport", args.overwrite)
    global PIN
    PIN = not args.no_pin
    if args.quick and args.transports == list(DEFAULT_TRANSPORTS):
        args.transports = ["tcp"]
    seconds = args.seconds or (0.3 if args.quick else 2.0)
    warmup = 0.15 if args.quick else 0.5
    specs = frame_specs(args, SIZES, QUICK_SIZES if args.quick else None)
    rows = measure_rows(specs, args.transports, seconds, warmup, args.repeat, args.peers)
    print_table(rows)
    print_shm_table(rows)
    write_json(out, {"machine": platform_info(), "seconds_per_cell": seconds,
                     "repeat": args.repeat, "hwm": HWM, "pinned": PIN, "rows": rows})
    return 0


def measure_rows(specs: list[FrameSpec], transports: list[str], seconds: float,
                 warmup: float, repeat: int, peers: bool = False) -> list[dict[str, Any]]:
    """Every (frame, transport, method) cell ``repeat`` times, the methods interleaved in
    each round so that drift hits them alike; one row per cell: the median round's
    figures, ``fps_min``/``fps_max``/``fps_runs``, and ``noisy`` (reasons, or empty)."""
    rows = []
    for spec in specs:
        extra = peer_methods(spec) if peers else ()
        for transport in transports:
            methods = TRANSPORT_METHODS[transport]
            methods += extra if transport in ("tcp", "ipc") else ()
            samples: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(repeat):
                for method in methods:
                    samples[method].append(run_cell(method, transport, spec.shape, spec.dtype,
                                                    seconds, warmup, source=spec.source))
            for method, runs in samples.items():
                rows.append({"size": spec.label, "transport": transport, "method": method,
                             **median_row(runs)})
                print(f"  {spec.label:>15} {transport:>6} {method:>14}: median "
                      f"{rows[-1]['fps']:8.1f} fps of {[round(r['fps']) for r in runs]}",
                      file=sys.stderr, flush=True)
    return mark_noise(rows)


def mark_noise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``noisy`` on every row: framebroker's against pickle (the naive way) and raw (the
    limit) of its cell; every other row's own rounds; peers against framebroker."""
    by = {(r["size"], r["transport"], r["method"]): r for r in rows}
    for r in rows:
        key = (r["size"], r["transport"])
        runs = lambda m: (by.get((*key, m)) or {}).get("fps_runs")  # noqa: E731
        what = f"{r['size']} {r['transport']} {r['method']}"
        if r["method"] == "framebroker" and r["transport"] != "shm":
            r["noisy"] = compare(r["fps_runs"], base=runs("pickle"), limit=runs("raw"),
                                 what=what, base_name="pickle", limit_name="raw pyzmq")
        elif r["method"] in PEERS:
            fb = runs("framebroker")
            r["noisy"] = [x for x in (own_noise(r["fps_runs"], what), fb and diff_noise(
                fb, r["fps_runs"], f"{r['size']} {r['transport']} framebroker vs {r['method']}"))
                          if x]
        else:
            r["noisy"] = compare(r["fps_runs"], what=what)
    return rows


def platform_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def fps_cell(row: dict[str, Any] | None) -> str:
    """``median (min-max)`` of a row's rounds."""
    if row is None:
        return "–"
    return f"{row['fps']:.0f} ({row['fps_min']:.0f}-{row['fps_max']:.0f})"


def ratio_cell(f: dict[str, Any], other: dict[str, Any] | None, kind: str,
               fmt: str = ".2f") -> str:
    """framebroker's figure over ``other`` (a ``base`` to beat or a ``limit``), or
    "noisy" when the rounds cannot tell (:func:`broker.bench.stats.compare`)."""
    if other is None or not other["fps"]:
        return "–"
    noisy = compare(f["fps_runs"], **{kind: other["fps_runs"]})
    return "noisy" if noisy else format(f["fps"] / other["fps"], fmt) + ("" if "%" in fmt
                                                                       else "x")


def print_table(rows: list[dict]) -> None:
    """framebroker vs pickle vs raw (and --peers) per frame and transport, each figure
    with its rounds' range; a ratio the rounds cannot tell apart is printed as "noisy"
    and every reason is listed below."""
    by = {(r["size"], r["transport"], r["method"]): r for r in rows}
    peers = [m for m in PEERS if any(r["method"] == m for r in rows)]
    print("\n| frame | transport | pickle fps | framebroker fps | raw pyzmq fps | "
          + "".join(f"{m} fps | " for m in peers)
          + "framebroker MB/s | vs pickle | vs raw |" + "".join(f" vs {m} |" for m in peers))
    print("|---" * (8 + 2 * len(peers)) + "|")
    reasons = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for transport in dict.fromkeys(r["transport"] for r in rows):
            p, f, r = (by.get((size, transport, m)) for m in METHODS)
            if not (p and f and r):
                continue
            others = [by.get((size, transport, m)) for m in peers]
            reasons += f["noisy"] + [x for o in others if o for x in o["noisy"]]
            ratios = [ratio_cell(f, p, "base"), ratio_cell(f, r, "limit", ".0%"),
                      *(ratio_cell(f, o, "base") for o in others)]
            print(f"| {size} | {transport} | {fps_cell(p)} | {fps_cell(f)} | {fps_cell(r)} | "
                  + "".join(f"{fps_cell(o)} | " for o in others) + f"{f['mb_per_s']:.0f} |"
                  + "".join(f" {x} |" for x in ratios))
    for reason in reasons:
        print(f"  noisy: {reason}")


def print_shm_table(rows: list[dict]) -> None:
    """shm against zero-copy ipc (same run) and against memcpy of the same bytes."""
    by = {(r["size"], r["transport"], r["method"]): r for r in rows}
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        ipc, ring, kept, cpy, cpy_ring = (by.get((size, t, m)) for t, m in (
            ("ipc", "framebroker"), ("shm", "framebroker"), ("shm", "framebroker-copy"),
            ("shm", "memcpy"), ("shm", "memcpy-ring")))
        if not (ipc and ring and kept and cpy and cpy_ring):
            continue
        lines.append(f"| {size} | {ipc['fps']:.0f} | {ring['fps']:.0f} | {kept['fps']:.0f} | "
                     f"{cpy['fps']:.0f} | {cpy_ring['fps']:.0f} | "
                     f"{ring['fps'] / ipc['fps']:.1f}x | {ring['fps'] / cpy['fps']:.2f}x | "
                     f"{kept['fps'] / ipc['fps']:.1f}x | {kept['fps'] / cpy_ring['fps']:.2f}x |")
    if lines:
        print("\n| frame | zero-copy ipc fps | shm fps | shm + copy fps | memcpy fps | "
              f"memcpy from {SHM_SLOTS} frames fps | shm / ipc | shm / memcpy | "
              f"shm + copy / ipc | shm + copy / memcpy from {SHM_SLOTS} frames |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
