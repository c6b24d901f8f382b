"""``framebroker bridge imagezmq``: broker frames to an imagezmq hub that already runs.

Existing imagezmq receivers (an ``ImageHub`` loop with ``recv_image`` or
``recv_jpg``) keep working unchanged while the camera moves behind a broker: the
bridge subscribes like any subscriber (``latest:1`` by default, so a slow hub sees
the newest frame rather than a queue of old ones) and sends each frame with the
``imagezmq`` package's own ``ImageSender``, so the wire is imagezmq's by construction.

REQ/REP (``--connect``, the hub binds): every frame waits for the hub's reply, at most
``reply_timeout``; a hub that does not answer costs that frame (counted in
``reply_timeouts``) and the REQ socket is made again, the only way to reset a REQ
(ZeroMQ's "lazy pirate" pattern), which also reconnects. PUB/SUB (``--bind``, the hub
connects its SUB): frames are sent without waiting, as imagezmq's PUB mode does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from .izmq import encode_jpeg, imagezmq_installed, jpeg_encodable
from .signals import StopSignals, Stopped
from .sources import format_shape

INSTALL_HINT = "bridge imagezmq needs the imagezmq package: pip install 'framebroker[imagezmq]'"


def require_imagezmq() -> Any:
    """The imagezmq module, or ImportError with the one line that says how to get it."""
    if not imagezmq_installed():
        raise ImportError(INSTALL_HINT)
    import imagezmq

    return imagezmq


@dataclass
class BridgeStats:
    """What the bridge did, for the progress lines and the summary."""

    sent: int = 0
    bytes: int = 0
    reply_timeouts: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> tuple[float, float]:
        """(frames/s, MB/s) of what was sent, since the start."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return self.sent / elapsed, self.bytes / elapsed / 1e6


class ImagezmqOut:
    """One imagezmq ImageSender towards the hub, remade after a reply timeout."""

    def __init__(self, endpoint: str, *, reqrep: bool, name: str, jpeg: int = 0,
                 reply_timeout: float = 5.0) -> None:
        self.imagezmq = require_imagezmq()
        self.endpoint, self.reqrep, self.name = endpoint, reqrep, name
        self.jpeg, self.reply_timeout = jpeg, reply_timeout
        self.sender = self._open()

    def _open(self) -> Any:
        sender = self.imagezmq.ImageSender(connect_to=self.endpoint, REQ_REP=self.reqrep)
        ms = max(1, int(self.reply_timeout * 1000))
        sender.zmq_socket.setsockopt(zmq.LINGER, 0)
        sender.zmq_socket.setsockopt(zmq.SNDTIMEO, ms)  # REQ: no hub connected yet
        sender.zmq_socket.setsockopt(zmq.RCVTIMEO, ms)  # REQ: the hub's reply
        return sender

    def send(self, frame: np.ndarray) -> bool:
        """Send one frame; False if the hub did not take it in time (REQ/REP)."""
        try:
            if self.jpeg:
                self.sender.send_jpg(self.name, encode_jpeg(frame, self.jpeg))
            else:
                self.sender.send_image(self.name, frame)
        except zmq.Again:
            self.close()
            self.sender = self._open()
            return False
        return True

    def close(self) -> None:
        self.sender.zmq_socket.close(linger=0)
        self.sender.zmq_context.term()


def run_bridge(sub: Any, out: ImagezmqOut, *, frames: int, progress: float,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Forward frames from ``sub`` to ``out`` until END, ``frames`` frames, a stop
    signal, or ``sub``'s timeout with nothing arriving; returns the summary. Closes both."""
    stats = BridgeStats()
    stops = StopSignals()
    stops.install()
    next_line = time.monotonic() + progress if progress else None
    checked = False
    try:
        with stops.raising():
            while not frames or stats.sent + stats.reply_timeouts < frames:
                frame = sub.recv()
                if frame is None:
                    break
                if out.jpeg and not checked:
                    if not jpeg_encodable(frame.array.shape, frame.array.dtype):
                        raise ValueError(f"--jpeg takes 8-bit gray or BGR frames; the stream "
                                         f"is {format_shape(frame.array.shape)} "
                                         f"{frame.array.dtype}")
                    checked = True
                if out.send(frame.array):
                    stats.sent += 1
                    stats.bytes += frame.array.nbytes
                else:
                    stats.reply_timeouts += 1
                    log(f"bridge imagezmq: no reply from {out.endpoint} within "
                        f"{out.reply_timeout:g} s; reconnecting (frame {frame.frame_id} lost)")
                if next_line is not None and time.monotonic() >= next_line:
                    log(progress_line(stats, sub))
                    next_line = time.monotonic() + progress
    except Stopped:
        pass
    finally:
        stops.restore()
        sub.close()
        out.close()
    fps, mbps = stats.rate()
    s = sub.stats()
    return {"sent": stats.sent, "reply_timeouts": stats.reply_timeouts,
            "received": s["received"], "dropped": s["dropped"], "gaps": s["gaps"],
            "seconds": round(time.monotonic() - stats.started, 3), "fps": round(fps, 2),
            "mb_per_s": round(mbps, 2), "hub": out.endpoint,
            "mode": "req-rep" if out.reqrep else "pub-sub", "jpeg": out.jpeg or None,
            "signal": stops.name}


def progress_line(stats: BridgeStats, sub: Any) -> str:
    fps, mbps = stats.rate()
    s = sub.stats()
    return (f"bridge imagezmq: {stats.sent} frames sent, {fps:.1f} fps, {mbps:.1f} MB/s, "
            f"dropped {s['dropped']}, gaps {s['gaps']}, reply timeouts {stats.reply_timeouts}")


def summary_line(s: dict[str, Any]) -> str:
    return (f"bridge imagezmq: sent {s['sent']} frames to {s['hub']} ({s['mode']}"
            + (f", JPEG quality {s['jpeg']}" if s["jpeg"] else "")
            + f") in {s['seconds']:.2f} s, {s['fps']} fps, {s['mb_per_s']} MB/s; received "
              f"{s['received']}, dropped {s['dropped']}, gaps {s['gaps']}, reply timeouts "
              f"{s['reply_timeouts']}")
