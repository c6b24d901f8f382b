"""What a per-frame latency observation costs: ``Hop.observe`` (broker/hops.py) against
prometheus-client's ``Histogram.observe`` with the same buckets, and the time a frame's
observation takes in context (``time.time_ns()`` plus the observe, as the parts do).

The best of ``--rounds`` rounds of ``--calls`` calls each, in ns per call, all in one
run (compare them with each other, not with another run's). Also times one scrape of a
broker-sized /metrics page in-process (the collector reading status and rendering the
text), which runs in the HTTP thread, not per frame. Prints a table and writes
``--out`` (default ``bench-TIMESTAMP/metrics.json`` under the cwd).
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Callable

from ..hops import BOUNDS_S, Hop
from .common import add_out_args, out_path, write_json


def best_ns(fn: Callable[[float], None], values: list[float], rounds: int) -> float:
    """Best round's ns per call of ``fn(v)`` over ``values``."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for v in values:
            fn(v)
        best = min(best, (time.perf_counter_ns() - t0) / len(values))
    return best


def loop_ns(values: list[float], rounds: int) -> float:
    """The empty loop's ns per call, subtracted from every figure."""
    return best_ns(lambda v: None, values, rounds)


def measure(calls: int, rounds: int) -> dict[str, float | None]:
    rng = random.Random(20261206)
    values = [10 ** rng.uniform(-4.5, -1) for _ in range(calls)]  # 30 µs .. 100 ms
    base = loop_ns(values, rounds)
    hop = Hop("capture_to_receive")
    rows: dict[str, float | None] = {
        "hop_observe_ns": best_ns(hop.observe, values, rounds) - base,
        "hop_since_capture_ns": best_ns(
            lambda v: hop.since_capture(time.time_ns() - 1_000_000), values, rounds) - base,
        "prometheus_observe_ns": None, "scrape_ms": None}
    try:
        from prometheus_client import CollectorRegistry, Histogram
    except ImportError:
        return rows
    hist = Histogram("bench_seconds", "bench", buckets=BOUNDS_S, registry=CollectorRegistry())
    rows["prometheus_observe_ns"] = best_ns(hist.observe, values, rounds) - base
    rows["scrape_ms"] = scrape_ms(rounds)
    return rows


def scrape_ms(rounds: int) -> float:
    """One render of a /metrics page with a broker's families and one hop, in ms."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from ..metrics import _c, _g, _PartCollector

    hop = Hop("capture_to_publish")
    for i in range(1000):
        hop.observe(i * 1e-5)
    fams = [_c(f"framebroker_c{i}", "bench", {("g", str(j)): j for j in range(4)}, ("a", "b"))
            for i in range(20)] + [_g("framebroker_g", "bench", 3)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PartCollector("serve", lambda: (fams, [(hop, {})])))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        generate_latest(registry)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    add_out_args(ap, "metrics")
    args = ap.parse_args(argv)
    out = out_path(args.out, "metrics", args.overwrite)
    rows = measure(args.calls, args.rounds)
    for name, v in rows.items():
        print(f"{name:<24} {'-' if v is None else f'{v:.1f}'}")
    if rows["prometheus_observe_ns"]:
        ratio = rows["prometheus_observe_ns"] / rows["hop_observe_ns"]
        print(f"prometheus-client / Hop observe: {ratio:.1f}x")
    write_json(out, {"calls": args.calls, "rounds": args.rounds,
                     **{k: None if v is None else round(v, 3) for k, v in rows.items()}})
    return 0
