"""Sharded lossless recording: N writer processes, one file each, one VDS master.

``framebroker record OUT.h5 --shards N`` starts N writer processes on this host (spawn);
``--shard K/N`` is one writer of N, for starting writers on other hosts (or by hand).
Frame ids are assigned in blocks of ``--shard-block`` ids (default: the chunk size, so a
chunk never spans shards): block b goes to shard b mod N. Each shard is a lossless
member of its own work group (``record-KofN-OUT``, see broker/dispatch.py), so the broker
sends it only its own frames and the source waits for the slowest shard: nothing is
lost. Shard K writes ``OUT_shardK.h5`` with the single-file layout (broker/recorder.py);
``OUT.h5`` is the VDS master over all of them (broker/vds.py): written when the first
writer starts, finalised by every writer that ends, from what the files hold.

Start the broker with ``--wait-recorders N`` so no shard misses the first frames.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import protocol as proto
from .client import Control
from .record import RecordConfig, Recording
from .vds import finalise, next_incarnation, shard_path, start_master


def shard_group(master: str | Path, shard: proto.Shard) -> str:
    """The work group of one shard: ``record-KofN-STEM`` (STEM: the master's file name,
    reduced to group characters and cut to fit), so writers of the same recording started
    anywhere meet in the same group, and another recording's shards get every frame too.
    Every group named ``record...`` counts for ``serve --wait-recorders``."""
    stem = "".join(c if c in proto.GROUP_CHARS else "-" for c in Path(master).stem.lower())
    return f"record-{shard.index}of{shard.count}-{stem}"[:proto.MAX_GROUP_NAME]


def shard_config(cfg: RecordConfig, shard: proto.Shard, incarnation: int = 0) -> RecordConfig:
    """The config of one shard's writer: its own file and its own part of the stream."""
    return dataclasses.replace(cfg, path=str(shard_path(cfg.path, shard.index, incarnation)),
                               shard=shard, group=shard_group(cfg.path, shard))


def open_master(cfg: RecordConfig, count: int, block: int) -> None:
    """Write the live master from the broker's status (unless it is already there)."""
    ctl = Control(cfg.broker, timeout=min(2.0, cfg.timeout), security=cfg.security)
    try:
        ctl.wait(cfg.timeout)
        status = ctl.status()
    finally:
        ctl.close()
    start_master(cfg.path, count=count, block=block, shape=tuple(status["shape"]),
                 dtype=np.dtype(status["dtype"]), stream=status["stream"],
                 session=proto.decode_id(status["session"]), compression=cfg.compression,
                 overwrite=cfg.overwrite)


def record_shard(cfg: RecordConfig, shard: proto.Shard,
                 log: Callable[[str], None] | None = None, master: bool = True,
                 restarted: bool = False) -> dict[str, Any]:
    """One shard's writer, start to end-of-stream; finalises the master at the end.

    ``master=False``: a coordinator owns the master (it starts it and finalises it).
    ``restarted``: this writer replaces one of the same shard that died (Ray restarted
    it): it writes the shard's next file, OUT_shardK_r1.h5, ..., never over the last."""
    if cfg.mode != "lossless":
        raise ValueError("sharded recording is lossless: --mode live takes every frame")
    if master:
        open_master(cfg, shard.count, shard.block)
    incarnation = next_incarnation(cfg.path, shard.index) if restarted else 0
    rec = Recording(shard_config(cfg, shard, incarnation), log=log)
    try:
        summary = rec.run()
    finally:
        rec.close()
    summary["shard"] = shard.to_json()
    if master:
        summary["master"] = finalise(cfg.path, summary["total"])
        for sh in summary["master"]["shards"]:
            if sh["open_on"] is not None:
                (log or log_line)(
                    f"{sh['file']} is still open by its writer on {sh['open_on']}: read "
                    f"{cfg.path} with swmr=True until that writer ends and finalises it")
    return summary


def record_sharded(cfg: RecordConfig, count: int, block: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """``--shards N``: N spawned writers; the master written first and finalised last
    (after every writer ended, killed ones included: their files are recovered)."""
    from .placement import start_local

    open_master(cfg, count, block)
    shards = [proto.Shard(k, count, block) for k in range(count)]
    results = start_local("shard", [(cfg, s) for s in shards], log)  # a stop: they report
    return combine(cfg, shards, results, log)


def combine(cfg: RecordConfig, shards: list[proto.Shard], results: list[dict[str, Any] | str],
            log: Callable[[str], None]) -> dict[str, Any]:
    """Finalise the master once every writer ended and sum up: one summary."""
    per = []
    for s, r in zip(shards, results):
        error = r if isinstance(r, str) else None
        if error:
            log(f"shard {s.index}/{s.count}: {error}")
        per.append({"index": s.index, "error": error, **({} if error else r)})
    totals = [p["total"] for p in per if p.get("total") is not None]
    total = max(totals) if totals else None
    # every writer has ended (joined, or failed for good on Ray, maybe on another host):
    # a file one left marked open is recovered wherever it was written
    master = finalise(cfg.path, total, writers_gone=True)
    ok = [p for p in per if not p["error"]]
    seconds = max((p.get("seconds", 0) for p in ok), default=0)
    written = sum(p.get("bytes_written", 0) for p in ok)
    return {"mode": "lossless", "shards": per, "master": master, "files": [cfg.path],
            "frames_written": master["frames"], "frames_missed": master["frames_missing"],
            "total": total, "ended": len(ok) == len(per) and all(p.get("ended") for p in ok),
            "session_changed": any(p.get("session_changed") for p in ok),
            "stopped_by": next((p["stopped_by"] for p in ok if p.get("stopped_by")), None),
            "dropped": 0, "seconds": seconds, "bytes_written": written,
            "mb_per_s": round(written / seconds / 1e6, 2) if seconds else 0.0,
            "fps": round(master["frames"] / seconds, 2) if seconds else 0.0,
            "cpu_s": round(sum(p.get("cpu_s") or 0 for p in per), 3),
            "cpu_s_per_shard": [p.get("cpu_s") for p in per]}


def summary_line(s: dict[str, Any], master_path: str) -> str:
    """One line for ``record --shards`` / ``--shard``: what the master presents."""
    m = s["master"]
    shards = ", ".join(f"{sh['file']} {sh['frames']}" + ("" if sh["complete"] else " (not closed)")
                       for sh in m["shards"])
    return (f"framebroker record: {master_path}: {m['frames']} frames of {m['extent']} in "
            f"{len(m['shards'])} shards ({shards}); missing {m['frames_missing']}")


def check_flags(mode: str, shards: int, shard: str | None, block: int,
                ray: str | None, rotating: bool = False) -> proto.Shard | None:
    """The sharding flags' rules (ValueError naming the flag), checked before anything
    connects; returns the one shard ``--shard K/N`` names, if any. ``rotating``: a
    ``--max-frames-per-file`` or ``--max-bytes-per-file`` was given; a shard writes one
    file (the master maps OUT_shardK.h5 and a restarted writer's _rN files, never
    rotation parts), so that is refused rather than recorded where the master cannot see."""
    if bool(shards) == bool(shard):
        raise ValueError("give --shards N (all writers here) or --shard K/N (one), not both")
    if mode != "lossless":
        raise ValueError("sharded recording is lossless: --mode live takes every frame")
    if rotating:
        raise ValueError("a shard writes one file: --max-frames-per-file and "
                         "--max-bytes-per-file do not combine with --shards or --shard "
                         "(more shards make smaller files)")
    if ray is not None and not shards:
        raise ValueError("--ray starts the writers of --shards N as Ray actors")
    return proto.parse_shard(shard, block) if shard else None


class ShardedRecording:
    """What ``framebroker record`` runs with ``--shards N`` or ``--shard K/N``
    (``run()`` returns the summary, ``close()`` is for the CLI's part protocol)."""

    def __init__(self, cfg: RecordConfig, *, shards: int = 0, shard: str | None = None,
                 block: int = 1, ray: str | None = None, restarts: int = 3) -> None:
        self.shard = check_flags(cfg.mode, shards, shard, block, ray,
                                 bool(cfg.max_frames_per_file or cfg.max_bytes_per_file))
        if ray is not None:
            from .placement import require_ray
            require_ray()  # fail now, in one line, before anything starts
        self.cfg, self.count, self.ray, self.restarts = cfg, shards, ray, restarts
        self.block = block

    def run(self) -> dict[str, Any]:
        if self.shard is not None:
            return record_shard(self.cfg, self.shard, log=log_line)
        if self.ray is not None:
            from .placement import record_on_ray
            return record_on_ray(self.cfg, self.count, self.block, self.ray, self.restarts,
                                 log_line)
        return record_sharded(self.cfg, self.count, self.block, log_line)

    def close(self) -> None:
        """Nothing to release: every writer closes its own file."""


def log_line(message: str) -> None:
    print(f"framebroker record: {message}", file=sys.stderr, flush=True)
