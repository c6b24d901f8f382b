"""framebroker's tcp subscriber against its peers, side by side in interleaved rounds.

One sender process and one receiver process on loopback tcp (pinned to separate cores,
as in the transport benchmark), each cell measured at the receiver for a fixed time
after a warm-up; the rounds run every method once in turn, so load drift hits all alike:

* ``tcp-socket``: no ZeroMQ at all: one prebuilt frame ``sendall`` again and again on a
  plain blocking loopback TCP socket, read with ``recv_into`` a preallocated buffer,
  frame by frame: no framing, no per-frame allocation, but one thread per side doing
  the syscalls itself (no I/O thread batching them), which is not always faster.
* ``imagezmq-reqrep``: imagezmq's default, ``ImageSender.send_image`` (REQ) to
  ``ImageHub.recv_image`` + ``send_reply`` (REP): raw arrays, lossless, one frame in
  flight.
* ``imagezmq-pubsub``: imagezmq with ``REQ_REP=False`` (PUB binds, SUB connects).
* ``pickle``: ``send_pyobj({"id", "ts", "frame"})`` PUB to ``recv_pyobj`` SUB.
* ``raw``: one prebuilt ``zmq.Frame`` resent again and again, PUB to SUB, received with
  ``copy=False``: pyzmq with no per-frame work at all.
* ``framebroker``: the real broker (synthetic source, every frame rendered into a
  recycled buffer, header + zero-copy payload) to the real ``Subscriber`` with the
  default ``drop`` policy and default HWMs, as ``framebroker serve`` / ``watch`` run.
* ``framebroker-flat-out``: the same with ``BrokerConfig.pub_inflight = 0``: the source
  renders flat out and the HWM drops what the subscriber cannot take (what every
  unpaced broker did before the source was paced by a lone subscriber).
* ``framebroker-block``: the same broker to a ``block`` subscriber (lossless, credit).

The imagezmq and raw senders resend one prebuilt frame; framebroker renders a new one
every time. PUB/SUB peers use ``--hwm`` (default: the broker's default, 64) on both
sides; imagezmq sets none itself (libzmq's 1000 would queue gigabytes).

Per cell it records the receiver's fps and MB/s, and the CPU seconds per delivered
frame of the sender and of the receiver process (all their threads, zmq's I/O thread
included) over the measured window. ``python bench/peers.py --out DIR/peers.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import zmq

from .. import protocol as proto
from ..broker import Broker, BrokerConfig, free_tcp_endpoints
from ..client import BlockingSubscriber, Control, Subscriber
from ..izmq import imagezmq_installed
from ..sources import SyntheticSource, synthetic_frame

SIZES = {"640x480x3 u8": ((480, 640, 3), "uint8"),
         "1920x1080x3 u8": ((1080, 1920, 3), "uint8"),
         "2048x2048 u16": ((2048, 2048), "uint16")}
METHODS = ("tcp-socket", "imagezmq-reqrep", "imagezmq-pubsub", "pickle", "raw",
           "framebroker", "framebroker-flat-out", "framebroker-block")
DEFAULT_HWM = BrokerConfig.sndhwm


# --- senders: run until ``stop`` is set (the broker: until told to stop) -------------

def send_imagezmq(ep: str, shape, dtype, stop, hwm: int, reqrep: bool) -> None:
    import imagezmq

    frame = synthetic_frame(shape, dtype, 0)
    if reqrep:
        sender = imagezmq.ImageSender(connect_to=ep, REQ_REP=True)
        sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 2000)  # the hub is gone: stop waiting
    else:
        # imagezmq binds before we can set the HWM: it applies to pipes made after
        # this, which is every one (the hub connects later)
        sender = imagezmq.ImageSender(connect_to=ep, REQ_REP=False)
        sender.zmq_socket.setsockopt(zmq.SNDHWM, hwm)
    i = 0
    try:
        while not stop.is_set():
            sender.send_image(str(i), frame)
            i += 1
    except zmq.Again:
        pass
    finally:
        sender.zmq_socket.close(linger=0)


def send_socket(ep: str, shape, dtype, stop) -> None:
    host, port = ep[len("tcp://"):].rsplit(":", 1)
    frame = memoryview(synthetic_frame(shape, dtype, 0)).cast("B")
    with socket.create_server((host, int(port))) as server:
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            try:
                while not stop.is_set():
                    conn.sendall(frame)
            except OSError:  # the receiver has measured and gone
                pass


def send_pub(ep: str, shape, dtype, stop, hwm: int, pickle: bool) -> None:
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, hwm)
    pub.bind(ep)
    frame = synthetic_frame(shape, dtype, 0)
    payload = zmq.Frame(frame, copy=False)
    i = 0
    while not stop.is_set():
        if pickle:
            pub.send_pyobj({"id": i, "ts": time.time_ns(), "frame": frame})
        else:
            pub.send(payload, copy=False)
        i += 1
    pub.close(linger=0)


def send_framebroker(eps: dict[str, str], shape, dtype, stop, hwm: int,
                     flat_out: bool = False) -> None:
    cfg = BrokerConfig(pub=eps["pub"], control=eps["control"], work=eps["work"], sndhwm=hwm,
                       wait_subscribers=1, end_linger=0.0, linger_ms=0,
                       **({"pub_inflight": 0} if flat_out else {}))
    broker = Broker(SyntheticSource(shape, dtype), cfg, log=lambda m: None)
    try:
        broker.run()
    finally:
        broker.close()


def _sender(method: str, eps: dict[str, str], shape, dtype, stop, hwm: int) -> None:
    if method == "tcp-socket":
        send_socket(eps["pub"], shape, dtype, stop)
    elif method.startswith("imagezmq"):
        send_imagezmq(eps["pub"], shape, dtype, stop, hwm, method == "imagezmq-reqrep")
    elif method.startswith("framebroker"):
        send_framebroker(eps, shape, dtype, stop, hwm, method == "framebroker-flat-out")
    else:
        send_pub(eps["pub"], shape, dtype, stop, hwm, method == "pickle")


# --- receivers -------------------------------------------------------------------------

def measure(recv_one: Callable[[], int], seconds: float, warmup: float,
            started=None) -> dict[str, Any]:
    """Frames and bytes from ``recv_one`` over ``seconds`` after ``warmup``; sets
    ``started`` when the measured window opens (the parent samples the sender's CPU)."""
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < warmup:
        recv_one()
    if started is not None:
        started.set()
    n, nbytes = 0, 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    while True:
        nbytes += recv_one()
        n += 1
        t = time.perf_counter() - t0
        if t >= seconds:
            cpu = time.process_time() - cpu0
            return {"frames": n, "seconds": t, "fps": n / t, "mb_per_s": nbytes / t / 1e6,
                    "receiver_cpu_ms_per_frame": cpu / n * 1e3}


def receive_socket(ep: str, shape, dtype, seconds: float, warmup: float,
                   started) -> dict[str, Any]:
    host, port = ep[len("tcp://"):].rsplit(":", 1)
    buf = memoryview(np.empty(shape, dtype)).cast("B")
    deadline = time.monotonic() + 60
    while True:  # the sender binds in its own process: retry until it listens
        try:
            conn = socket.create_connection((host, int(port)), timeout=60)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)

    def one() -> int:
        got = 0
        while got < len(buf):
            n = conn.recv_into(buf[got:])
            if not n:
                raise ConnectionError("the sender closed the connection")
            got += n
        return got

    with conn:
        return measure(one, seconds, warmup, started)


def _receive(method: str, eps: dict[str, str], seconds: float, warmup: float, hwm: int,
             started, shape, dtype) -> dict[str, Any]:
    if method == "tcp-socket":
        return receive_socket(eps["pub"], shape, dtype, seconds, warmup, started)
    if method.startswith("framebroker"):
        if method != "framebroker-block":
            sub = Subscriber(broker=eps["control"], timeout=30)
        else:
            sub = BlockingSubscriber(broker=eps["control"], timeout=30)
        try:
            return measure(lambda: sub.recv().array.nbytes, seconds, warmup, started)
        finally:
            sub.close()
            Control(eps["control"], timeout=5).stop()
    if method.startswith("imagezmq"):
        import imagezmq

        reqrep = method == "imagezmq-reqrep"
        hub = imagezmq.ImageHub(open_port=eps["pub"], REQ_REP=reqrep)
        hub.zmq_socket.setsockopt(zmq.RCVTIMEO, 30000)
        if not reqrep:
            hub.zmq_socket.setsockopt(zmq.RCVHWM, hwm)

        def one() -> int:
            _, image = hub.recv_image()
            if reqrep:
                hub.send_reply(b"OK")
            return image.nbytes

        try:
            return measure(one, seconds, warmup, started)
        finally:
            hub.zmq_socket.close(linger=0)
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVTIMEO, 30000)
    sock.connect(eps["pub"])
    if method == "pickle":
        def one() -> int:
            return sock.recv_pyobj()["frame"].nbytes
    else:
        def one() -> int:
            return len(sock.recv(copy=False))
    try:
        return measure(one, seconds, warmup, started)
    finally:
        sock.close(linger=0)


def _pin(cpu: int, pin: bool) -> None:
    """Sender on one core, receiver on the other (each with its zmq I/O thread)."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _sender_proc(method, eps, shape, dtype, stop, hwm, pin) -> None:
    _pin(0, pin)
    _sender(method, eps, shape, dtype, stop, hwm)


def _receiver_proc(method, eps, shape, dtype, seconds, warmup, hwm, pin, started,
                   queue) -> None:
    _pin(1, pin)
    queue.put(_receive(method, eps, seconds, warmup, hwm, started, shape, dtype))


def run_cell(method: str, shape, dtype, seconds: float, warmup: float, hwm: int = DEFAULT_HWM,
             pin: bool = True) -> dict[str, Any]:
    """One sender and one receiver process; the receiver's rates and both CPU costs."""
    spawn = mp.get_context("spawn")
    eps = dict(zip(("pub", "control", "work"), free_tcp_endpoints(3)))
    stop, started, queue = spawn.Event(), spawn.Event(), spawn.Queue()
    receiver = spawn.Process(target=_receiver_proc, args=(method, eps, shape, dtype, seconds,
                                                          warmup, hwm, pin, started, queue))
    sender = spawn.Process(target=_sender_proc, args=(method, eps, shape, dtype, stop, hwm,
                                                      pin))
    # REP/SUB-side binds first for imagezmq REQ/REP (the hub binds); others bind in the sender
    receiver.start()
    sender.start()
    try:
        if not started.wait(120):
            raise RuntimeError(f"{method}: the receiver never started measuring")
        proc = psutil.Process(sender.pid)
        cpu0 = sum(proc.cpu_times()[:2])
        result = queue.get(timeout=120)
        cpu1 = sum(proc.cpu_times()[:2])
        result["sender_cpu_ms_per_frame"] = (cpu1 - cpu0) / result["frames"] * 1e3
        return result
    finally:
        stop.set()
        receiver.join(10)
        sender.join(10)
        for p in (sender, receiver):
            if p.is_alive():
                p.kill()
                p.join()


def measure_rows(sizes: list[str], methods: list[str], seconds: float, warmup: float,
                 repeat: int, hwm: int, pin: bool) -> list[dict[str, Any]]:
    """The median run of every (size, method), rounds interleaved across methods."""
    rows = []
    for size in sizes:
        shape, dtype = SIZES[size]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(repeat):
            for method in methods:
                runs[method].append(run_cell(method, shape, dtype, seconds, warmup, hwm, pin))
        for method, results in runs.items():
            med = sorted(results, key=lambda r: r["fps"])[len(results) // 2]
            rows.append({"size": size, "method": method, **med,
                         "fps_runs": [round(r["fps"], 1) for r in results]})
            print(f"  {size:>15} {method:>18}: median {med['fps']:8.1f} fps of "
                  f"{[round(r['fps']) for r in results]}", file=sys.stderr, flush=True)
    return rows


def header_costs(shape=(480, 640, 3), dtype="uint8", n: int = 500,
                 runs: int = 200) -> dict[str, float]:
    """Microseconds to pack one FRAME header, and to validate one received
    ``[topic, header, payload]`` and wrap the payload: the best of ``runs`` short runs
    of ``n`` calls (short, so that on a loaded machine some run is not preempted)."""
    frame = synthetic_frame(shape, dtype, 0)
    header = proto.frame_header("cam", 1, time.time_ns(), frame, 1)
    parts = [zmq.Frame(b"cam"), zmq.Frame(header), zmq.Frame(frame)]

    def best(fn: Callable[[], object]) -> float:
        fastest = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            fastest = min(fastest, (time.perf_counter() - t0) / n * 1e6)
        return round(fastest, 2)

    return {"pack_us": best(lambda: proto.frame_header("cam", 1, 2, frame, 1)),
            "validate_us": best(lambda: proto.decode_topic(parts))}


def print_table(rows: list[dict[str, Any]]) -> None:
    """Sizes down, methods across, and framebroker over imagezmq REQ/REP (same run)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["size"], r["method"]): r for r in rows}
    print("\n| frame | " + " | ".join(f"{m} fps" for m in methods)
          + " | framebroker / imagezmq-reqrep | framebroker / fastest peer"
            " | framebroker CPU ms/frame (sender + receiver) |")
    print("|---" * (len(methods) + 4) + "|")
    for size in dict.fromkeys(r["size"] for r in rows):
        cells = [by.get((size, m)) for m in methods]
        fb = by.get((size, "framebroker"))
        peers = [c for m, c in zip(methods, cells) if c and not m.startswith("framebroker")]
        best = max(peers, key=lambda c: c["fps"]) if peers else None
        ratios = []
        for ref in (by.get((size, "imagezmq-reqrep")), best):
            ratios.append(f"{fb['fps'] / ref['fps']:.2f}x" if fb and ref else "–")
        ratio = " | ".join(ratios)
        cpu = (f"{fb['sender_cpu_ms_per_frame']:.2f} + {fb['receiver_cpu_ms_per_frame']:.2f}"
               if fb else "–")
        print(f"| {size} | " + " | ".join("–" if c is None else f"{c['fps']:.0f}" for c in cells)
              + f" | {ratio} | {cpu} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="*", default=None, choices=METHODS,
                    help="default: all (the imagezmq ones only if imagezmq is installed)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; median reported")
    ap.add_argument("--hwm", type=int, default=DEFAULT_HWM, help="HWM of every PUB/SUB peer")
    ap.add_argument("--no-pin", action="store_true", help="let the scheduler place processes")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = ap.parse_args(argv)
    methods = args.methods or [m for m in METHODS
                               if imagezmq_installed() or not m.startswith("imagezmq")]
    load = os.getloadavg()
    rows = measure_rows(args.sizes, methods, args.seconds, args.warmup, args.repeat, args.hwm,
                        not args.no_pin)
    print_table(rows)
    header = header_costs()
    print(f"\nheader (640x480x3 u8): pack {header['pack_us']} us, validate + wrap "
          f"{header['validate_us']} us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(), "numpy": np.__version__,
                    "cpus": os.cpu_count()},
        "load_before": load, "load_after": os.getloadavg(), "seconds_per_cell": args.seconds,
        "repeat": args.repeat, "hwm": args.hwm, "pinned": not args.no_pin, "rows": rows,
        "header": header},
        indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
