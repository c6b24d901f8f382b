"""``framebroker record`` end to end: broker -> recorder process -> HDF5 file."""
from __future__ import annotations

import json
import signal
import time

import h5py
import hdf5plugin  # noqa: F401  (registers the codecs for reading)
import numpy as np
import pytest

from broker.client import Control
from broker.inspect import open_recording, valid_count
from broker.sources import check_synthetic
from conftest import acked, cli, run_cli, summary, wait_status


def record(eps, path, *args: str):
    return cli("record", "--out", str(path), "--broker", eps.control, "--json", *args)


def check_file(path, n: int, shape=(120, 160, 3)) -> None:
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        assert f["frames"].shape == (n, *shape)
        assert np.all(np.diff(f["timestamp_ns"][:].astype(np.int64)) >= 0)
        for i in range(n):
            assert check_synthetic(f["frames"][i], i) == -1, i
        assert f.attrs["frames_written"] == n and f.attrs["frames_missed"] == 0
        assert f.attrs["stream"] == "cam"
        assert len(f["gaps"]) == 0


@pytest.mark.parametrize("compression", ["none", "lz4", "bslz4", "zstd", "gzip"])
def test_record_1000_frames_lossless_every_codec(eps, broker_factory, tmp_path, compression):
    out = tmp_path / f"{compression}.h5"
    rec = record(eps, out, "--compression", compression, "--expect-frames", "1000")
    b = broker_factory("--frames", "1000", "--wait-recorders", "1", "--shape", "120x160x3")
    res = summary(rec)
    assert (res["frames_written"], res["frames_missed"], res["total"]) == (1000, 0, 1000)
    assert b.finish()[0] == 0
    check_file(out, 1000)
    with h5py.File(out) as f:
        assert f.attrs["compression"] == compression


def test_unknown_count_is_trimmed_and_rotation_continues_ids(eps, broker_factory, tmp_path):
    out = tmp_path / "rot.h5"
    rec = record(eps, out, "--max-frames-per-file", "300", "--grow-frames", "128")
    b = broker_factory("--frames", "700", "--wait-recorders", "1", "--shape", "120x160x3")
    res = summary(rec)
    assert res["frames_written"] == 700 and len(res["files"]) == 3
    assert b.finish()[0] == 0
    ids = []
    for path in res["files"]:
        with h5py.File(path) as f:
            n = len(f["frame_id"])
            assert f["frames"].shape[0] == n  # trimmed, not left at a growth block
            for i, fid in enumerate(f["frame_id"][:]):
                assert check_synthetic(f["frames"][i], int(fid)) == -1
            ids.extend(f["frame_id"][:].tolist())
    assert ids == list(range(700))


def test_slow_disk_lossless_records_every_frame_and_live_records_gaps(eps, broker_factory,
                                                                      tmp_path):
    """Same broker, same run: a throttled lossless recorder gets every frame (the
    source waits for it); a throttled live recorder drops and says exactly which."""
    lossless, live = tmp_path / "lossless.h5", tmp_path / "live.h5"
    r1 = record(eps, lossless, "--throttle", "0.003")
    r2 = record(eps, live, "--mode", "live", "--throttle", "0.01", "--queue-frames", "4",
                "--window", "4")
    b = broker_factory("--frames", "600", "--wait-recorders", "1", "--wait-subscribers", "1",
                       "--shape", "120x160x3", "--hwm", "1000")
    s1, s2 = summary(r1), summary(r2)
    assert b.finish()[0] == 0
    assert (s1["frames_written"], s1["frames_missed"]) == (600, 0)
    check_file(lossless, 600)
    assert s2["frames_written"] + s2["frames_missed"] == 600
    assert s2["frames_missed"] > 0 and s2["dropped"] > 0
    with h5py.File(live) as f:
        got = set(f["frame_id"][:].tolist())
        missing = set()
        for first, count in f["gaps"][:]:
            missing.update(range(int(first), int(first + count)))
        assert got | missing == set(range(600)) and not got & missing
        for i, fid in enumerate(f["frame_id"][:]):
            assert check_synthetic(f["frames"][i], int(fid)) == -1


def test_kill_9_of_the_recorder_leaves_a_readable_file(eps, broker_factory, tmp_path):
    out = tmp_path / "crash.h5"
    rec = record(eps, out, "--flush-frames", "50")
    b = broker_factory("--fps", "500", "--wait-recorders", "1", "--shape", "120x160x3")
    wait_status(eps.control, acked("record", 300))
    rec.send_signal(signal.SIGKILL)
    rec.communicate()
    f, _ = open_recording(out)  # a crashed SWMR file opens in SWMR read mode
    with f:
        n = valid_count(f)
        assert n >= 250  # everything up to the last flush
        np.testing.assert_array_equal(f["frame_id"][:n], np.arange(n))
        for i in range(n):
            assert check_synthetic(f["frames"][i], i) == -1, i
    Control(eps.control).stop()
    assert b.finish()[0] == 0  # the broker outlived its recorder


def test_unwritable_path_and_existing_file(eps, broker_factory, tmp_path):
    broker_factory("--fps", "10", "--shape", "120x160x3").wait_ready()
    r = run_cli("record", "--out", str(tmp_path / "missing" / "x.h5"), "--broker", eps.control)
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    existing = tmp_path / "keep.h5"
    existing.write_bytes(b"precious")
    r = run_cli("record", "--out", str(existing), "--broker", eps.control)
    assert r.returncode == 1 and "exists" in r.stderr
    assert existing.read_bytes() == b"precious"


def test_inspect_reports_the_recording(eps, broker_factory, tmp_path):
    out = tmp_path / "ins.h5"
    rec = record(eps, out, "--compression", "bslz4")
    b = broker_factory("--frames", "120", "--wait-recorders", "1", "--shape", "120x160x3",
                       "--fps", "200")
    summary(rec)
    b.finish()
    r = run_cli("inspect", str(out), "--json", "--out", str(tmp_path / "sheet.png"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["frames"] == 120 and info["missing_frames"] == 0 and info["complete"]
    with h5py.File(out) as f:
        ts = f["timestamp_ns"][:].astype(np.float64)
    assert info["rate_fps"] == pytest.approx(119 / ((ts[-1] - ts[0]) / 1e9), rel=1e-3)
    assert info["compression_ratio"] > 1.0
    import cv2
    assert cv2.imread(str(tmp_path / "sheet.png")) is not None


def test_broker_restart_closes_the_recording_with_the_first_session_intact(
        eps, broker_factory, tmp_path):
    out = tmp_path / "restart.h5"
    rec = record(eps, out, "--flush-frames", "10")
    first = broker_factory("--fps", "300", "--wait-recorders", "1", "--shape", "120x160x3")
    wait_status(eps.control, acked("record", 100))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.communicate()
    second = broker_factory("--frames", "5", "--wait-recorders", "1", "--shape", "120x160x3",
                            "--drain-timeout", "1")
    res = summary(rec, ok=(1,))
    assert res["session_changed"] is True and res["frames_written"] >= 100
    n = res["frames_written"]
    with h5py.File(out) as f:  # closed cleanly: a plain open works
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        for i in range(0, n, 7):
            assert check_synthetic(f["frames"][i], i) == -1
    assert second.finish()[0] == 0


def test_slow_latest_1_viewer_beside_a_lossless_recorder(eps, broker_factory, tmp_path):
    """A viewer that takes 50 ms per frame keeps only the newest frame: it never holds
    up the stream, its drops are counted exactly, and the recorder still gets all."""
    from broker.client import Subscriber
    out = tmp_path / "beside.h5"
    rec = record(eps, out)
    b = broker_factory("--frames", "2000", "--wait-recorders", "1", "--wait-subscribers", "1",
                       "--shape", "120x160x3")
    sub = Subscriber(broker=eps.control, timeout=30, policy="latest:1")
    delivered = []
    for frame in sub:
        assert check_synthetic(frame.array, frame.frame_id) == -1
        delivered.append(frame.frame_id)
        time.sleep(0.05)
    sub.close()
    assert sub.ended and sub.total == 2000
    assert delivered == sorted(delivered)
    assert len(delivered) + sub.dropped + sub.gaps + (sub.first_id or 0) == 2000
    assert sub.dropped > 0
    res = summary(rec)
    assert (res["frames_written"], res["frames_missed"]) == (2000, 0)
    assert b.finish()[0] == 0
