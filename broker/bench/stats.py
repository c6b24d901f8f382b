"""Figures that can be trusted: a median of interleaved rounds with its min and max, and
the rules that mark a figure *noisy* instead of presenting it as a result.

On a shared, loaded machine one round can be 10x another (a pickle cell here measured
80, 8 and 184 fps). So every figure keeps its rounds, and a comparison is marked noisy
(in the report and the JSON, with the reason) when

* a measured *limit* comes out below the thing it bounds (the limit run was disturbed,
  or the "limit" is not one), or
* the round-to-round spread is wider than the difference being reported (the order of
  the two could flip in the next run), or
* a figure's own rounds lie more than ``SPREAD_LIMIT`` times apart.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

SPREAD_LIMIT = 2.0  # max/min of one figure's rounds beyond which it is noise, not a figure


def figure(runs: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "runs"}`` of one figure's rounds."""
    runs = [float(r) for r in runs]
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs),
            "runs": runs}


def median_row(runs: Sequence[dict[str, Any]], key: str = "fps") -> dict[str, Any]:
    """One row for a figure measured in rounds: the lower-median round's fields, with
    ``key`` the median of the rounds (other rates scaled alike), ``KEY_min``/``KEY_max``
    and ``KEY_runs``."""
    ordered = sorted(runs, key=lambda r: r[key])
    row = dict(ordered[(len(ordered) - 1) // 2])
    f = figure([r[key] for r in runs])
    scale = f["median"] / row[key] if row[key] else 1.0
    for name in ("mb_per_s", "mb_s"):
        if isinstance(row.get(name), (int, float)):
            row[name] *= scale
    row.update({key: f["median"], f"{key}_min": f["min"], f"{key}_max": f["max"],
                f"{key}_runs": f["runs"]})
    return row


def spread(runs: Sequence[float]) -> float:
    return max(runs) - min(runs)


def own_noise(runs: Sequence[float], what: str) -> str | None:
    """A figure whose rounds disagree by more than ``SPREAD_LIMIT``x."""
    lo, hi = min(runs), max(runs)
    if len(runs) > 1 and (lo <= 0 or hi / lo > SPREAD_LIMIT):
        return f"{what}: rounds {lo:.4g}-{hi:.4g} ({'inf' if lo <= 0 else f'{hi / lo:.1f}'}x apart)"
    return None


def limit_noise(value: Sequence[float], limit: Sequence[float], what: str,
                limit_name: str) -> str | None:
    """The limit's median is below the value it bounds: that limit was not measured."""
    v, lim = statistics.median(value), statistics.median(limit)
    if lim < v:
        return f"{what}: the limit ({limit_name}, {lim:.4g}) is below the value it bounds ({v:.4g})"
    return None


def diff_noise(a: Sequence[float], b: Sequence[float], what: str) -> str | None:
    """The two figures' medians differ by less than either's round-to-round spread."""
    d = abs(statistics.median(a) - statistics.median(b))
    s = max(spread(a), spread(b))
    if s > d:
        return (f"{what}: the spread between rounds ({s:.4g}) is wider than the difference "
                f"({d:.4g})")
    return None


def compare(value: Sequence[float] | None, *, base: Sequence[float] | None = None,
            limit: Sequence[float] | None = None, what: str = "",
            base_name: str = "the naive way", limit_name: str = "the limit") -> list[str]:
    """Every reason a "value vs base, value of limit" comparison is noisy (empty: sound)."""
    if not value:
        return []
    reasons = [own_noise(value, what)]
    if base:
        reasons += [own_noise(base, f"{what} {base_name}"),
                    diff_noise(value, base, f"{what} vs {base_name}")]
    if limit:
        reasons += [own_noise(limit, f"{what} {limit_name}"),
                    limit_noise(value, limit, what, limit_name)]
    return [r for r in reasons if r]


def error_bars(figures: Sequence[dict[str, Any] | None]) -> list[list[float]]:
    """matplotlib's ``yerr`` (below, above the median) for figures from :func:`figure`."""
    below = [f["median"] - f["min"] if f else 0.0 for f in figures]
    above = [f["max"] - f["median"] if f else 0.0 for f in figures]
    return [below, above]
