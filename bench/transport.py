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
writes ``bench/results/transport.json``. ``--transports ipc shm`` adds the
shared-memory table (shm vs zero-copy ipc vs memcpy).
"""
from __future__ import annotations

import argparse
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.broker import Broker, BrokerConfig, free_tcp_endpoints  # noqa: E402
from broker.client import Control, Subscriber  # noqa: E402
from broker.sources import SyntheticSource, synthetic_frame  # noqa: E402

SIZES = {"640x480x3 u8": ((480, 640, 3), "uint8"),
         "1920x1080x3 u8": ((1080, 1920, 3), "uint8"),
         "2048x2048 u16": ((2048, 2048), "uint16")}
METHODS = ("pickle", "framebroker", "raw")
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

def send_pickle(ep: dict, shape, dtype, stop, ctx=None) -> None:
    ctx = ctx or zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.bind(ep["pub"])
    frame = synthetic_frame(shape, dtype, 0)
    i = 0
    while not stop.is_set():
        pub.send_pyobj({"id": i, "ts": time.time_ns(), "frame": frame})
        i += 1
    pub.close(linger=0)


def send_raw(ep: dict, shape, dtype, stop, ctx=None) -> None:
    ctx = ctx or zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.bind(ep["pub"])
    payload = zmq.Frame(synthetic_frame(shape, dtype, 0), copy=False)
    while not stop.is_set():
        pub.send(payload, copy=False)
    pub.close(linger=0)


def send_framebroker(ep: dict, shape, dtype, stop, ctx=None, shm: str = "") -> None:
    cfg = BrokerConfig(pub=ep["pub"], control=ep["control"], work=ep["work"], sndhwm=HWM,
                       wait_subscribers=1, end_linger=0.0, linger_ms=0, shm=shm)
    broker = Broker(SyntheticSource(shape, dtype), cfg, log=lambda m: None, ctx=ctx)
    try:
        broker.run()
    finally:
        broker.close()


def send_shm(ep: dict, shape, dtype, stop, ctx=None) -> None:
    send_framebroker(ep, shape, dtype, stop, ctx, shm=f"{SHM_SLOTS}slots")


SENDERS: dict[str, Callable] = {"pickle": send_pickle, "raw": send_raw,
                                "framebroker": send_framebroker, "shm": send_shm,
                                "shm-copy": send_shm}


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
                ctx=None) -> dict[str, Any]:
    """Frames from the ring that passed both seqlock checks (``copy``: copied out first)."""
    ctx = ctx or zmq.Context.instance()
    # a consumer slower than the source wants the newest frame, not the oldest queued
    # one (which is the next to be overwritten): latest:1, as documented for viewers
    sub = Subscriber(broker=ep["control"], timeout=30, rcvhwm=HWM, ctx=ctx,
                     policy="latest:1" if copy else "drop")
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


def measure_memcpy(shape, dtype, seconds: float, warmup: float,
                   frames: int = 1) -> dict[str, Any]:
    """``np.copyto`` into a preallocated buffer, in this process, from ``frames``
    distinct frames in turn (1: the same cache-hot frame again and again)."""
    srcs = [synthetic_frame(shape, dtype, i) for i in range(frames)]
    dst = np.empty_like(srcs[0])
    count = iter(range(1 << 62))

    def one() -> int:
        np.copyto(dst, srcs[next(count) % frames])
        return dst.nbytes

    return _measure(one, seconds, warmup)


def receive(method: str, ep: dict, seconds: float, warmup: float, ctx=None) -> dict[str, Any]:
    ctx = ctx or zmq.Context.instance()
    if method in ("shm", "shm-copy"):
        return receive_shm(ep, seconds, warmup, method == "shm-copy", ctx)
    if method == "framebroker":
        sub = Subscriber(ep["pub"], topics=("cam",), timeout=30, rcvhwm=HWM, ctx=ctx)

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


def _receiver_proc(method, ep, seconds, warmup, queue, pin, hwm, copy_threshold) -> None:
    global PIN
    PIN = pin
    _pin(1)
    _configure(hwm, copy_threshold)
    queue.put(receive(method, ep, seconds, warmup))


def _memcpy_proc(shape, dtype, seconds, warmup, queue, pin, frames) -> None:
    global PIN
    PIN = pin
    _pin(1)
    queue.put(measure_memcpy(shape, dtype, seconds, warmup, frames))


def _sender_proc(method, ep, shape, dtype, stop, pin, hwm, copy_threshold) -> None:
    global PIN
    PIN = pin
    _pin(0)
    _configure(hwm, copy_threshold)
    SENDERS[method](ep, shape, dtype, stop)


def run_cell(method: str, transport: str, shape, dtype, seconds: float, warmup: float,
             hwm: int = HWM, copy_threshold: int = zmq.COPY_THRESHOLD) -> dict[str, Any]:
    """One sender and one receiver for ``seconds``; ``hwm`` and ``copy_threshold`` are
    the benchmark's fixed values unless ``framebroker tune`` sweeps them."""
    spawn = mp.get_context("spawn")
    if method in ("memcpy", "memcpy-ring"):  # one process, on the receivers' core
        queue = spawn.Queue()
        frames = SHM_SLOTS if method == "memcpy-ring" else 1
        proc = spawn.Process(target=_memcpy_proc, args=(shape, dtype, seconds, warmup, queue,
                                                         PIN, frames))
        proc.start()
        try:
            return queue.get(timeout=120)
        finally:
            proc.join(10)
    if transport == "shm":  # the broker's ring, viewed or copied out
        method = {"framebroker": "shm", "framebroker-copy": "shm-copy"}[method]
    ep = _endpoints(transport, f"{method}-{shape[0]}")
    if transport == "inproc":
        saved = (HWM, zmq.COPY_THRESHOLD)
        _configure(hwm, copy_threshold)
        ctx = zmq.Context()
        stop = threading.Event()
        sender = threading.Thread(target=SENDERS[method], args=(ep, shape, dtype, stop, ctx))
        sender.start()
        time.sleep(0.05)  # inproc needs the bind before the connect
        try:
            return receive(method, ep, seconds, warmup, ctx)
        finally:
            stop.set()
            sender.join()
            ctx.term()
            _configure(*saved)
    stop, queue = spawn.Event(), spawn.Queue()
    sender = spawn.Process(target=_sender_proc, args=(method, ep, shape, dtype, stop, PIN,
                                                       hwm, copy_threshold))
    receiver = spawn.Process(target=_receiver_proc, args=(method, ep, seconds, warmup, queue,
                                                          PIN, hwm, copy_threshold))
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
                    help="also the tcp peers table (imagezmq where installed; "
                         "broker/bench/peers.py), same sizes, seconds and rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transport.json")
    args = ap.parse_args(argv)
    global PIN
    PIN = not args.no_pin
    seconds = args.seconds or (0.5 if args.quick else 2.0)
    warmup = 0.2 if args.quick else 0.5
    rows = []
    for size in args.sizes:
        shape, dtype = SIZES[size]
        for transport in args.transports:
            methods = TRANSPORT_METHODS[transport]
            samples: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(args.repeat):  # interleaved, so drift hits every method alike
                for method in methods:
                    samples[method].append(run_cell(method, transport, shape, dtype, seconds,
                                                    warmup))
            for method, runs in samples.items():
                best = sorted(runs, key=lambda r: r["fps"])[len(runs) // 2]  # the median run
                rows.append({"size": size, "transport": transport, "method": method, **best,
                             "fps_runs": [round(r["fps"], 1) for r in runs]})
                print(f"  {size:>15} {transport:>6} {method:>12}: median {best['fps']:8.1f} fps "
                      f"of {[round(r['fps']) for r in runs]}", file=sys.stderr, flush=True)
    print_table(rows)
    print_shm_table(rows)
    peer_rows = []
    if args.peers:
        from broker.bench import peers
        methods = [m for m in peers.METHODS
                   if peers.imagezmq_available() or not m.startswith("imagezmq")]
        peer_rows = peers.measure_rows(args.sizes, methods, seconds, warmup, args.repeat,
                                       peers.DEFAULT_HWM, PIN)
        peers.print_table(peer_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform_info(), "seconds_per_cell": seconds,
                                    "repeat": args.repeat, "hwm": HWM, "pinned": PIN,
                                    "rows": rows, "peers": peer_rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


def platform_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def print_table(rows: list[dict]) -> None:
    by = {(r["size"], r["transport"], r["method"]): r for r in rows}
    print(f"\n| frame | transport | pickle fps | framebroker fps | raw pyzmq fps | "
          f"framebroker MB/s | vs pickle | vs raw |")
    print("|---|---|---|---|---|---|---|---|")
    for size in dict.fromkeys(r["size"] for r in rows):
        for transport in dict.fromkeys(r["transport"] for r in rows):
            p, f, r = (by.get((size, transport, m)) for m in METHODS)
            if not (p and f and r):
                continue
            print(f"| {size} | {transport} | {p['fps']:.0f} | {f['fps']:.0f} | {r['fps']:.0f} | "
                  f"{f['mb_per_s']:.0f} | {f['fps'] / p['fps']:.2f}x | "
                  f"{f['fps'] / r['fps']:.0%} |")


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
