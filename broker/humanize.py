"""Human-readable text for the CLI: people get formatted lines, programs get ``--json``.

Nothing here prints a Python repr, a ``None`` or raw JSON: counters by reason read
"3 (too-large 2, bad-header 1)", an unknown value is left out, and a broker's status
is laid out with connected subscribers apart from what departed ones last reported.
"""
from __future__ import annotations

from typing import Any, Mapping

from .hops import by_hop, format_hops
from .sources import format_shape

# a subscriber reports every second; an older report means it has left (or stalled)
CONNECTED_REPORT_S = 3.0


def counts(by_reason: Mapping[str, int]) -> str:
    """{'too-large': 2, 'bad-header': 1} -> '3 (too-large 2, bad-header 1)'; {} -> '0'."""
    total = sum(by_reason.values())
    if not total:
        return "0"
    parts = ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1])
                      if v)
    return f"{total} ({parts})"


def maybe(label: str, value: Any, unit: str = "") -> str:
    """', label value unit' when the value is known, '' when it is None."""
    if value is None:
        return ""
    return f", {label} {value}{' ' + unit if unit else ''}"


def format_reply(cmd: str, reply: Mapping[str, Any]) -> str:
    """One sentence for the answer to pause/resume/stop."""
    if cmd == "pause":
        return "paused" if reply.get("paused", True) else "not paused"
    if cmd == "resume":
        return "resumed" if not reply.get("paused", False) else "still paused"
    if cmd == "stop":
        sent = reply.get("frames")
        return "stopping: the broker sends end-of-stream and exits" + (
            f" ({sent} frames sent)" if sent is not None else "")
    return f"{cmd}: done"


def format_status(s: Mapping[str, Any]) -> str:
    """The broker's status for people: one labelled line per fact."""
    rows: list[tuple[str, str]] = []
    paused = s.get("paused")
    state = s.get("state", "")
    geometry = f"{format_shape(tuple(s['shape']))} {s['dtype']}"
    source = s["source"] if geometry in s["source"] else f"{s['source']}, {geometry}"
    rows.append(("stream", f"{s['stream']} ({source})"))
    line = state or ("paused" if paused else "streaming")
    waiting = s.get("waiting")
    if waiting:
        member = waiting.get("member")
        line += (f" for work group {waiting['group']}" + (f" (member {member})" if member else "")
                 + f" for {waiting['seconds']:.1f} s")
    rows.append(("state", line))
    rate = "0 fps now (paused)" if paused else f"{s['rate_fps']:.1f} fps now"
    rows.append(("frames", f"{s['frames_sent']} sent, {rate}, {s['avg_fps']:.1f} fps average, "
                           f"{s['mb_per_s']:.1f} MB/s, up {s['uptime_s']:.0f} s"))
    hops = by_hop([s])
    if hops:
        rows.append(("latency", f"p50/p99 {format_hops(hops)}"))
    t = s["transports"]
    rows.append(("subscribers", f"{s['subscribers']} connected (tcp {t['subscribers']['tcp']}, "
                                f"shm {t['subscribers']['shm']}), peak "
                                f"{s.get('peak_subscribers', s['subscribers'])}"))
    rows.append(("workers", f"tcp {t['workers']['tcp']}, shm {t['workers']['shm']}"))
    rows.append(("security", ("CURVE on" if s.get("curve") else "plain (no CURVE)")
                 + f", refused {s.get('auth_refused', 0)}"))
    if s.get("control_rejected"):
        rows.append(("rejected", f"control requests {counts(s['control_rejected'])}"))
    if s.get("source_senders"):
        rows.append(("senders", counts(s["source_senders"])))
    if s.get("source_rejected"):
        rows.append(("rejected", f"source messages {counts(s['source_rejected'])}"))
    ring = s.get("shm")
    if ring:
        rows.append(("ring", f"{ring['path']}, {ring['slots']} slots of {ring['slot_bytes']} "
                             f"bytes, {ring['slots_held']} held, stalls {ring['stalls']}"))
    for name, g in s["work"]["groups"].items():
        shm = sum(m.get("transport") == "shm" for m in g["members"].values())
        rows.append((f"group {name}", f"{len(g['members'])} members ({shm} shm), pending "
                                      f"{g['pending']}, acked {g['acked']}, re-dispatched "
                                      f"{g['redispatched']}"))
    if s["work"].get("rejected"):
        rows.append(("work", f"rejected {counts(s['work']['rejected'])}"))
    live, gone = [], []
    for name, c in s.get("consumers", {}).items():
        text = (f"{name} ({c['policy']}): received {c['received']}, dropped {c['dropped']}, "
                f"gaps {c['gaps']}, rejected {_total(c['rejected'])}")
        if c["age_s"] <= CONNECTED_REPORT_S:
            live.append(("", text))
        else:
            gone.append(("", f"{text} (last report {c['age_s']:.0f} s ago)"))
    if live:
        rows.append(("reporting", f"{len(live)} subscribers:"))
        rows += live
    if gone:
        rows.append(("departed", f"{len(gone)} recent reports from subscribers that left:"))
        rows += gone
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}}: {v}" if k else f"{'':>{width}}  {v}" for k, v in rows)


def _total(value: Any) -> str:
    return counts(value) if isinstance(value, Mapping) else str(value)
