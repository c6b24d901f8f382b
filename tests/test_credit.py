"""Lossless recording returns credit the moment a frame is safe, with a window sized
from the frame size and the disk rate (broker/record.py)."""
from __future__ import annotations

import json
import socket
import subprocess
import threading

import numpy as np
import pytest

from broker.client import ReceiveTimeout, WorkConsumer
from broker.record import (FALLBACK_WINDOW, MIN_WINDOW, WINDOW_COVER_S, WINDOW_MEMORY,
                           auto_window)
from broker.recorder import RecordingWriter, ThreadedRecorder
from broker.run import efficiency
from broker.shm import ring_slots
from broker.sources import check_synthetic, synthetic_frame
from conftest import PY, make_endpoints

VGA, HD = 480 * 640 * 3, 1080 * 1920 * 3


def test_auto_window_covers_the_disk_for_the_cover_time_within_its_limits():
    small = 120 * 160 * 3
    assert auto_window(VGA, 2e8) == -(-int(2e8 * WINDOW_COVER_S) // VGA) == 11  # the rule
    assert auto_window(VGA, 2e9) == WINDOW_MEMORY // VGA == 27  # memory bound
    assert auto_window(small, 2e9, max_pending=64) == 32  # half the bound the source keeps
    assert auto_window(VGA, 2e9, ring_slots=40) == 20  # the source keeps half the ring
    assert auto_window(HD, 2e9) == auto_window(HD, 1e6) == MIN_WINDOW  # at least a few
    # over shm the ring, not the memory, bounds it: 50 ms at 2 GB/s of 1080p frames
    assert auto_window(HD, 2e9, max_pending=64, ring_slots=86) == 17 == -(
        -int(2e9 * WINDOW_COVER_S) // HD)
    assert auto_window(VGA, 2e9, max_pending=64, ring_slots=579) == 32
    assert (ring_slots("512MiB", VGA), ring_slots("512MiB", HD)) == (579, 86)  # README
    assert MIN_WINDOW <= FALLBACK_WINDOW


def test_writer_thread_tells_after_each_frame_is_written(tmp_path):
    """on_written runs after the frame is in the writer (its count already includes it),
    once per frame, so a DONE it triggers never covers a frame still queued."""
    seen: list[int] = []
    writer = RecordingWriter(path=tmp_path / "w.h5", shape=(24, 32, 3), dtype=np.uint8)
    rec = ThreadedRecorder(writer, queue_frames=4, on_written=lambda: seen.append(
        writer.frames_written))
    with rec:
        for i in range(50):
            rec.put(i, i, synthetic_frame((24, 32, 3), "uint8", i))
    assert seen == list(range(1, 51))
    assert rec.busy_s > 0


def test_watch_returns_credit_while_the_whole_window_is_held(eps, broker_factory):
    """Window 1, frame 0 held: no frame can come, so only the watched descriptor can
    make recv give the credit back; then frame 1 arrives within the same recv."""
    b = broker_factory("--frames", "3", "--wait-recorders", "1", "--shape", "24x32x3")
    b.wait_ready()
    c = WorkConsumer(broker=eps.control, group="record", window=1, acks="self", shm=False)
    r, w = socket.socketpair()
    try:
        f0 = c.recv(timeout=30)
        assert f0.frame_id == 0 and check_synthetic(f0.array, 0) == -1
        with pytest.raises(ReceiveTimeout):  # the credit is held: nothing is sent
            c.recv(timeout=1.0)
        woken: list[int] = []

        def on_wake() -> None:
            r.recv(1)
            woken.append(1)
            c.done(0)

        c.watch(r.fileno(), on_wake)
        threading.Timer(0.2, w.send, args=(b"x",)).start()
        f1 = c.recv(timeout=30)
        assert woken == [1] and f1.frame_id == 1 and check_synthetic(f1.array, 1) == -1
        c.done(1)
        f2 = c.recv(timeout=30)
        assert f2.frame_id == 2
        c.done(2)
        assert c.recv(timeout=30) is None and c.total == 3
    finally:
        c.close()
        r.close()
        w.close()
    assert b.finish()[0] == 0


def test_efficiency_is_end_to_end_over_the_slowest_stage_alone():
    stages = {"captured": {"fps": 900.0}, "published": {"fps": 900.0},
              "processed": {"fps": 400.0, "alone_fps": 1600.0},
              "recorded": {"fps": 380.0, "alone_fps": 475.0}}
    assert efficiency(stages) == {"value": 0.8, "end_to_end_fps": 380.0,
                                  "slowest_stage": "recorded", "slowest_alone_fps": 475.0}
    assert efficiency({"captured": {"fps": 9.0}}) is None


def test_run_reports_its_start_up_and_efficiency_from_its_own_stages(tmp_path):
    eps = make_endpoints()
    r = subprocess.run([PY, "-m", "broker.cli", "run", "--pub", eps.pub, "--work", eps.work,
                        "--control", eps.control, "--results", eps.results, "--planner",
                        "estimate", "--workers", "1", "--frames", "300", "--shape", "96x128x3",
                        "--record", str(tmp_path / "r.h5"), "--json"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    st = rep["stages"]
    assert st["recorded"]["alone_fps"] > 0 and st["processed"]["alone_fps"] > 0
    eff = rep["efficiency"]
    slowest = min(("processed", "recorded"), key=lambda k: st[k]["alone_fps"])
    e2e = min(st["processed"]["fps"], st["recorded"]["fps"])
    assert (eff["slowest_stage"], eff["end_to_end_fps"]) == (slowest, e2e)
    assert eff["value"] == round(e2e / st[slowest]["alone_fps"], 3)
    assert 0 < rep["startup_s"] < rep["seconds"] + 60
