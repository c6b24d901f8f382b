"""Read recordings back: a summary, a contact sheet, and following a file as it is written.

Everything here reads the layout :mod:`broker.recorder` writes, with plain h5py (plus
``import hdf5plugin`` for the compressed ones). The number of valid frames is
``/valid_frames``: the other datasets may be longer while the writer runs or after it
crashed (see the recorder's docstring for why). The master of a sharded recording
(broker/vds.py) reads the same way; its report also lists the shards, and frames no
shard holds (``/frame_id`` = 2**64-1) are reported missing, not counted as frames.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import h5py
import hdf5plugin  # noqa: F401  (registers the filters compressed recordings need)
import numpy as np

from . import vds
from .sources import geometry

_THUMB_WIDTH = 320
_PLOT_HEIGHT = 240


def open_recording(path: str | Path) -> tuple[h5py.File, bool]:
    """Open a recording read-only; returns (file, writer_still_marked).

    A file whose SWMR writer is running, or died without closing, refuses a plain open
    ("file is already open for write"); SWMR read mode opens it and sees every frame up to
    the writer's last flush. The flag is True in that case.
    """
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True), True
    if not vds.is_master(h5) or "total" in h5.attrs:
        return h5, False
    h5.close()  # a master not finalised yet: its shards are being written (SWMR)
    return h5py.File(path, "r", swmr=True), True


def valid_count(h5: h5py.File) -> int:
    """Frames of a recording that are complete on disk."""
    return int(h5["valid_frames"][()])


def inspect_file(path: str | Path) -> dict[str, Any]:
    """What a recording holds: frames, geometry, timing, missing ids and compression."""
    path = Path(path)
    h5, marked = open_recording(path)
    with h5:
        attrs = {k: _plain(v) for k, v in h5.attrs.items()}
        frames = h5["frames"]
        n = frames.shape[0] if vds.is_master(h5) else valid_count(h5)
        ids = h5["frame_id"][:n]
        ts = h5["timestamp_ns"][:n].astype(np.int64)
        gaps = h5["gaps"][:].astype(np.int64)
        frame_bytes = int(np.prod(frames.shape[1:])) * frames.dtype.itemsize
        stored = frames.id.get_storage_size()
        info: dict[str, Any] = {
            "path": str(path),
            "file_size": os.path.getsize(path),
            "complete": bool(attrs.get("complete", 0)) and not marked,
            "writer_mark": marked,
            "frames": n,
            "frames_allocated": frames.shape[0],
            "shape": tuple(frames.shape[1:]),
            "dtype": frames.dtype.name,
            "chunks": frames.chunks,
            "first_frame_id": int(ids[0]) if n else None,
            "last_frame_id": int(ids[-1]) if n else None,
            "missing": [(int(a), int(c)) for a, c in gaps],
            "missing_frames": int(gaps[:, 1].sum()) if len(gaps) else 0,
            "bytes_raw": n * frame_bytes,
            "bytes_stored": stored,
            "compression_ratio": n * frame_bytes / stored if stored else None,
            "attrs": attrs,
        }
        if vds.is_master(h5):
            present = ids != vds.MISSING_ID
            ids, ts = ids[present], ts[present]
            info.update(vds.master_details(path, h5), frames=int(present.sum()),
                        first_frame_id=int(ids[0]) if len(ids) else None,
                        last_frame_id=int(ids[-1]) if len(ids) else None,
                        bytes_raw=int(present.sum()) * frame_bytes)
            stored = info["bytes_stored"]
            info["compression_ratio"] = info["bytes_raw"] / stored if stored else None
    info.update(_timing(ts))
    return info


def _plain(value: Any) -> Any:
    """HDF5 attribute -> JSON-friendly Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _timing(ts: np.ndarray) -> dict[str, Any]:
    """Duration, mean rate and inter-frame interval statistics from the timestamps."""
    if len(ts) < 2:
        return {"duration_s": 0.0, "rate_fps": None, "interval_ms": None}
    duration = (ts[-1] - ts[0]) / 1e9
    dt_ms = np.diff(ts) / 1e6
    return {
        "duration_s": float(duration),
        "rate_fps": (len(ts) - 1) / duration if duration > 0 else None,
        "interval_ms": {"min": float(dt_ms.min()), "median": float(np.median(dt_ms)),
                        "max": float(dt_ms.max())},
    }


def format_report(info: dict[str, Any]) -> str:
    """A few aligned lines for a terminal."""
    attrs = info["attrs"]
    state = ("closed cleanly" if info["complete"] else
             "still being written, or its writer died (opened in SWMR mode)"
             if info["writer_mark"] else "not closed by its writer (recovered?)")
    ids = (f"{info['first_frame_id']} .. {info['last_frame_id']}" if info["frames"] else "-")
    missing = info["missing_frames"]
    ranges = ", ".join(f"{a}" if c == 1 else f"{a}-{a + c - 1}" for a, c in info["missing"][:8])
    if len(info["missing"]) > 8:
        ranges += f", ... ({len(info['missing'])} ranges)"
    rate = f"{info['rate_fps']:.2f} fps" if info["rate_fps"] else "-"
    iv = info["interval_ms"]
    intervals = (f"min {iv['min']:.2f} / median {iv['median']:.2f} / max {iv['max']:.2f} ms"
                 if iv else "-")
    ratio = info["compression_ratio"]
    lines = [
        ("file", f"{info['path']} ({info['file_size'] / 1e6:.1f} MB, {state})"),
        ("stream", f"{attrs.get('stream', '')!s} from {attrs.get('source', '')!s}"),
        ("written by", f"{attrs.get('software', '?')} at {attrs.get('start_time', '?')}"),
        ("frames", f"{info['frames']} x {'x'.join(map(str, info['shape']))} {info['dtype']}"
                   f" (ids {ids}, file {attrs.get('file_index', '?')})"),
        ("missing", f"{missing} frame(s)" + (f": {ranges}" if missing else "")),
        ("duration", f"{info['duration_s']:.3f} s at {rate}"),
        ("intervals", intervals),
        ("compression", f"{attrs.get('compression', '?')}, chunks {info['chunks']}, ratio "
                        + (f"{ratio:.2f}x" if ratio else "-")),
    ]
    if "shards" in info:
        lines.append(("shards", f"{len(info['shards'])} in blocks of {info['shard_block']} "
                      f"ids" + ("" if info["finalised"] else " (master not finalised yet)")
                      + ": " + ", ".join(
                          f"{s['file']} {s['frames']}"
                          + ("" if s["complete"] else " (not closed)")
                          + (f" missing {s['missing']}" if s["missing"] > 0 else "")
                          for s in info["shards"])))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


# --- contact sheet -----------------------------------------------------------------------

def contact_sheet(path: str | Path, png_out: str | Path, n: int = 6) -> Path:
    """Write a PNG: ``n`` frames spread over the recording, and the inter-frame intervals.

    Drawn with OpenCV alone (already a dependency), so no plotting library is needed.
    Non-uint8 frames are stretched between their 0.5 and 99.5 percentiles.
    """
    h5, _marked = open_recording(path)
    with h5:
        count = valid_count(h5)
        if count == 0:
            raise ValueError(f"{path}: no frames to show")
        picks = np.unique(np.linspace(0, count - 1, max(1, n)).round().astype(int))
        ids = h5["frame_id"][:count]
        thumbs = [_thumbnail(h5["frames"][int(k)], int(ids[k])) for k in picks]
        ts = h5["timestamp_ns"][:count].astype(np.int64)
    cols = min(3, len(thumbs))
    rows = -(-len(thumbs) // cols)
    th, tw = max(t.shape[0] for t in thumbs), _THUMB_WIDTH
    sheet = np.full((rows * th, cols * tw, 3), 32, np.uint8)
    for k, thumb in enumerate(thumbs):
        r, c = divmod(k, cols)
        sheet[r * th:r * th + thumb.shape[0], c * tw:(c + 1) * tw] = thumb
    image = np.vstack([sheet, _interval_plot(ts, sheet.shape[1])])
    png_out = Path(png_out)
    if not cv2.imwrite(str(png_out), image):
        raise OSError(f"{png_out}: OpenCV could not write the PNG")
    return png_out


def _to_display(frame: np.ndarray) -> np.ndarray:
    """Any frame -> (rows, cols, 3) uint8 (BGR, like OpenCV sources deliver)."""
    rows, cols, chans = geometry(frame.shape)
    img = frame.reshape(rows, cols, chans)
    img = img[:, :, :3] if chans >= 3 else img[:, :, :1]
    if img.dtype != np.uint8:
        data = np.nan_to_num(img.astype(np.float32))
        lo, hi = np.percentile(data, (0.5, 99.5))
        img = np.clip((data - lo) * (255.0 / max(hi - lo, 1e-12)), 0, 255).astype(np.uint8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def _thumbnail(frame: np.ndarray, frame_id: int) -> np.ndarray:
    img = _to_display(frame)
    height = max(1, round(img.shape[0] * _THUMB_WIDTH / img.shape[1]))
    img = cv2.resize(img, (_THUMB_WIDTH, height), interpolation=cv2.INTER_AREA)
    cv2.putText(img, f"#{frame_id}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3,
                cv2.LINE_AA)
    cv2.putText(img, f"#{frame_id}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255),
                1, cv2.LINE_AA)
    return img


def _interval_plot(ts: np.ndarray, width: int) -> np.ndarray:
    """Inter-frame interval (ms) against frame index, with a labelled y axis."""
    plot = np.full((_PLOT_HEIGHT, width, 3), 255, np.uint8)
    font, black, grey = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (200, 200, 200)
    left, right, top, bottom = 60, width - 10, 28, _PLOT_HEIGHT - 24
    cv2.putText(plot, "inter-frame interval (ms) by frame", (left, 18), font, 0.5, black, 1,
                cv2.LINE_AA)
    dt_ms = np.diff(ts) / 1e6
    if len(dt_ms) == 0:
        cv2.putText(plot, "fewer than 2 frames", (left, _PLOT_HEIGHT // 2), font, 0.5, black, 1)
        return plot
    hi = float(dt_ms.max()) * 1.05 or 1.0
    for frac in (0.0, 0.5, 1.0):
        y = int(bottom - frac * (bottom - top))
        cv2.line(plot, (left, y), (right, y), grey, 1)
        cv2.putText(plot, f"{frac * hi:.3g}", (4, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.putText(plot, f"0 .. {len(dt_ms)}", (left, _PLOT_HEIGHT - 6), font, 0.4, black, 1,
                cv2.LINE_AA)
    x = left + np.arange(len(dt_ms)) * (right - left) / max(len(dt_ms) - 1, 1)
    y = bottom - dt_ms / hi * (bottom - top)
    points = np.stack([x, y], axis=1).round().astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(plot, [points], False, (200, 80, 0), 1, cv2.LINE_AA)
    return plot


# --- following a live file ------------------------------------------------------------------

def follow(path: str | Path, interval: float = 0.5,
           idle_timeout: float | None = None) -> Iterator[int]:
    """Yield the valid frame count of a SWMR recording each time it changes (first the
    current count). Stops after ``idle_timeout`` seconds without growth, if given."""
    with h5py.File(path, "r", swmr=True) as h5:
        valid = h5["valid_frames"]
        last, changed = -1, time.monotonic()
        while True:
            valid.refresh()
            count = int(valid[()])
            if count != last:
                last, changed = count, time.monotonic()
                yield count
            elif idle_timeout is not None and time.monotonic() - changed >= idle_timeout:
                return
            time.sleep(interval)
