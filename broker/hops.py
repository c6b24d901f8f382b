"""Per-hop latency histograms, cheap enough to observe on every frame.

Each pipeline part times the hop it can see (``HOPS``) into a :class:`Hop`: fixed
bucket bounds, five per decade from 10 µs to 10 s, and one ``bisect`` plus two
additions per frame (``bench/metrics.py`` measures it against prometheus-client's own
``Histogram.observe``). The counts are always kept, with or without ``--metrics``: the
parts' summaries carry them (``Hop.summary``), so ``framebroker run`` can print every
hop's p50/p99 without scraping anything, and ``broker/metrics.py`` exposes the same
counts as Prometheus histograms at scrape time.

Only the capture time travels in the v1 frame header, so a receiver cannot see when a
frame was published, and a sink cannot see when a result was sent: those hops are
measured from the capture time and named for what they measure (``capture_to_receive``,
``capture_to_sink``), not for what one might wish to know. Capture times are the
broker host's ``CLOCK_REALTIME``: across hosts the figures include the clocks' offset.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Iterable

#: bucket upper bounds in seconds (Prometheus ``le``): 10^(k/5), 10 µs .. 10 s
BOUNDS_S: tuple[float, ...] = tuple(float(f"{10 ** (k / 5):.3g}") for k in range(-25, 6))

#: hop name -> (the part that measures it, what it measures)
HOPS: dict[str, tuple[str, str]] = {
    "capture_to_publish": ("serve", "from the frame's capture time to its send call returning "
                                    "(handed to libzmq for every subscriber and work member)"),
    "capture_to_receive": ("watch, view, record", "from the capture time in the header to the "
                                                  "frame's arrival at this subscriber"),
    "receive_to_result": ("worker", "from the frame's arrival at the worker to its result "
                                    "handed to the results socket"),
    "capture_to_sink": ("sink", "from the frame's capture time to its result's arrival at "
                                "the sink"),
    "receive_to_disk": ("record", "from the frame's arrival at the recorder to the writer "
                                  "thread's HDF5 write returning (flushed every "
                                  "--flush-frames/--flush-seconds)"),
}


class Hop:
    """One hop's latency histogram: counts per bucket of ``BOUNDS_S`` (the last one is
    +Inf) and the sum. ``observe`` runs in one thread; a scrape in another reads a
    copy of the counts (a list copy is atomic under the GIL)."""

    __slots__ = ("name", "counts", "sum_s")

    def __init__(self, name: str) -> None:
        if name not in HOPS:
            raise ValueError(f"unknown hop {name!r}; known: {', '.join(HOPS)}")
        self.name = name
        self.counts = [0] * (len(BOUNDS_S) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS_S, seconds)] += 1
        self.sum_s += seconds

    def since_capture(self, timestamp_ns: int) -> None:
        """Observe the time from a header's capture time (``time.time_ns()``) until now."""
        self.observe((time.time_ns() - timestamp_ns) * 1e-9)

    def summary(self) -> dict[str, Any]:
        """Count, sum, p50/p99 in ms and the bucket counts: what a part's summary holds,
        and all ``merge`` needs to combine several parts (workers) exactly."""
        return summarize(list(self.counts), self.sum_s)


def summarize(counts: list[int], sum_s: float) -> dict[str, Any]:
    """A hop summary from bucket counts (see ``Hop.summary``)."""
    return {"count": sum(counts), "sum_s": round(sum_s, 6),
            "p50_ms": quantile_ms(counts, 0.5), "p99_ms": quantile_ms(counts, 0.99),
            "buckets": counts}


def merge(summaries: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """One hop's summaries from several processes as one (None if there are none)."""
    items = [s for s in summaries if s and len(s.get("buckets", ())) == len(BOUNDS_S) + 1]
    if not items:
        return None
    counts = [sum(col) for col in zip(*(s["buckets"] for s in items))]
    return summarize(counts, sum(s["sum_s"] for s in items))


def quantile_ms(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile in ms, interpolated linearly within its bucket as Prometheus'
    ``histogram_quantile`` does (so within a factor of 1.6 of the exact value); None
    with no observations. Observations above the top bound report the top bound."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(BOUNDS_S):
                return round(BOUNDS_S[-1] * 1e3, 3)
            lo = BOUNDS_S[i - 1] if i else 0.0
            return round((lo + (BOUNDS_S[i] - lo) * (rank - seen) / n) * 1e3, 3)
        seen += n
    return round(BOUNDS_S[-1] * 1e3, 3)


def by_hop(part_summaries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every part's ``hops`` merged per hop (several workers into one), in ``HOPS``
    order, without the bucket counts: what ``framebroker run`` reports."""
    parts = [s.get("hops") or {} for s in part_summaries]
    out = {}
    for name in HOPS:
        merged = merge(p[name] for p in parts if name in p)
        if merged is not None and merged["count"]:
            out[name] = {k: v for k, v in merged.items() if k != "buckets"}
    return out


def format_hops(hops: dict[str, dict[str, Any]]) -> str:
    """``capture->publish 0.1/0.4 ms, ...`` (p50/p99), for one summary line."""
    return ", ".join(f"{name.replace('_to_', '->')} {h['p50_ms']:g}/{h['p99_ms']:g} ms"
                     for name, h in hops.items())
