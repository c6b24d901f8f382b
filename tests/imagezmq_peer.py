"""Real imagezmq peers (the ``imagezmq`` package itself) for tests/test_imagezmq.py.

    python imagezmq_peer.py send ENDPOINT NAME COUNT raw|jpeg
        an ImageSender (REQ/REP, like a Raspberry Pi): raw sends synthetic frames 0..COUNT-1
        (each stamped with its id), jpeg sends smooth_frame(i) with send_jpg; prints
        "done N" after the last reply.
    python imagezmq_peer.py hub ENDPOINT COUNT
        an ImageHub (REQ/REP) that receives COUNT raw frames, answers each, and prints one
        JSON line per frame: sender text, shape, stamped id, first bad index (-1: exact).
"""
from __future__ import annotations

import json
import sys

import cv2
import imagezmq
import numpy as np

from broker.sources import check_synthetic, read_stamp, synthetic_frame

SHAPE = (96, 128, 3)
JPEG_QUALITY = 90
LEVELS = 100  # smooth_frame(i) is the base gradient plus i % LEVELS grey levels


def base_gradient(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A smooth scene (JPEG keeps it within a few grey levels), values 0..140."""
    y = np.linspace(0, 60, shape[0])[:, None, None]
    x = np.linspace(0, 80, shape[1])[None, :, None]
    tint = np.linspace(1.0, 0.8, shape[2])[None, None, :]
    return ((x + y) * tint).astype(np.uint8)


def smooth_frame(i: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Frame ``i`` of the JPEG sender: its id is the brightness offset (mod LEVELS)."""
    return base_gradient(shape) + np.uint8(i % LEVELS)


def smooth_id(frame: np.ndarray) -> tuple[int, float]:
    """(i % LEVELS, mean absolute error against smooth_frame(i)) for a decoded frame."""
    base = base_gradient(frame.shape).astype(np.int16)
    i = int(round(float(np.mean(frame.astype(np.int16) - base))))
    err = float(np.mean(np.abs(frame.astype(np.int16) - smooth_frame(i, frame.shape))))
    return i % LEVELS, err


def send(endpoint: str, name: str, count: int, kind: str) -> None:
    sender = imagezmq.ImageSender(connect_to=endpoint)
    for i in range(count):
        if kind == "raw":
            sender.send_image(name, synthetic_frame(SHAPE, "uint8", i))
        else:
            _, jpg = cv2.imencode(".jpg", smooth_frame(i), [cv2.IMWRITE_JPEG_QUALITY,
                                                             JPEG_QUALITY])
            sender.send_jpg(name, jpg)
    print(f"done {count}", flush=True)


def hub(endpoint: str, count: int) -> None:
    image_hub = imagezmq.ImageHub(open_port=endpoint)
    for _ in range(count):
        name, image = image_hub.recv_image()
        image_hub.send_reply(b"OK")
        fid = read_stamp(image)
        print(json.dumps({"name": name, "shape": list(image.shape), "id": fid,
                          "bad": check_synthetic(image, fid) if fid >= 0 else 0}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        hub(sys.argv[2], int(sys.argv[3]))
