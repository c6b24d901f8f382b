"""``--source h5:FILE[:DATASET]``: a recording made by ``record`` replayed through a real
broker, frame for frame, pixel for pixel, in its order, at its own pace or at --fps."""
from __future__ import annotations

import json

import h5py
import hdf5plugin  # noqa: F401  (registers the codecs for reading)
import numpy as np
import pytest

from broker.client import subscribe
from broker.sources import H5Source, RecordedPacer, SourceError, SourceSpec, check_synthetic
from conftest import cli, make_endpoints, run_cli, summary

SHAPE = (120, 160, 3)
N = 150


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A synthetic stream recorded by the real recorder (bslz4, 4 frames per chunk) at
    300 fps, so its timestamps are spaced like a camera's."""
    path = tmp_path_factory.mktemp("rec") / "rec.h5"
    eps = make_endpoints()
    rec = cli("record", "--out", str(path), "--broker", eps.control, "--json", "--frames", str(N),
              "--compression", "bslz4", "--chunk-frames", "4")
    serve = cli("serve", *eps.serve_args(), "--progress", "0", "--frames", str(N), "--fps", "300",
                "--wait-recorders", "1", "--shape", "x".join(map(str, SHAPE)))
    assert summary(rec)["frames_written"] == N
    serve.communicate(timeout=60)
    assert serve.returncode == 0
    return path


def _replay(path, *serve_args: str) -> list[tuple[int, int, np.ndarray]]:
    """Serve the recording and take every frame, losslessly (a block subscriber)."""
    eps = make_endpoints()
    broker = cli("serve", *eps.serve_args(), "--progress", "0", "--json", "--wait-subscribers", "1",
                 "--source", f"h5:{path}", *serve_args)
    try:
        with subscribe("block", broker=eps.control, timeout=30) as sub:
            frames = [(f.frame_id, f.timestamp_ns, f.array.copy()) for f in sub]
        out, err = broker.communicate(timeout=60)
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.communicate()
    assert broker.returncode == 0, err
    return frames


def test_replayed_recording_is_pixel_identical_and_in_order(recording):
    frames = _replay(recording)
    with h5py.File(recording) as f:
        stored, ids = f["frames"][:], f["frame_id"][:]
    assert len(frames) == N == len(stored)
    assert [fid for fid, _, _ in frames] == list(range(N)) == ids.tolist()
    for (fid, _, arr), ref, rec_id in zip(frames, stored, ids):
        np.testing.assert_array_equal(arr, ref)
        assert check_synthetic(arr, int(rec_id)) == -1  # the recorded frame's own stamp


def test_replay_keeps_the_recorded_pace_unless_fps(recording):
    """Replayed at its timestamps, the broker's frame spacing follows the recording's
    (300 fps); an untimed H5Source (benchmarks) has no schedule."""
    with h5py.File(recording) as f:
        recorded = np.diff(f["timestamp_ns"][:].astype(np.int64))
    frames = _replay(recording, "--frames", "60")
    sent = np.diff([ts for _, ts, _ in frames])
    assert len(frames) == 60
    # the schedule never sends a frame early: each gap is at least the recorded one,
    # minus the clock's granularity (no upper bound: a loaded machine may be late)
    assert np.all(np.cumsum(sent) >= np.cumsum(recorded[:59]) - 2_000_000)
    assert H5Source(recording, timed=False).pacer() is None
    src = H5Source(recording)
    assert isinstance(src.pacer(), RecordedPacer)
    src.close()


def test_recorded_pacer_follows_the_timestamps_and_laps():
    ts = np.array([0, 10, 30, 60], dtype=np.int64) * 1_000_000  # ms
    p = RecordedPacer(ts)
    p._t0 -= 0.035  # 35 ms into the schedule: frames 0, 1, 2 are due, 3 is not
    due = 0
    while p.wait_time() == 0.0 and due < 10:
        p.tick()
        due += 1
    assert due == 3
    assert 0.015 < p.wait_time() <= 0.025
    p._t0 -= 0.040 + 0.030  # the next lap's first frame: 60 ms + one median step (20 ms)
    p.tick()
    assert p.wait_time() == 0.0 and p.resyncs == 0


def test_source_spec_and_errors(tmp_path, recording):
    assert SourceSpec.parse("h5:/x/rec.h5") == SourceSpec("h5", "/x/rec.h5", "frames")
    assert SourceSpec.parse("h5:rec.h5:cam/raw") == SourceSpec("h5", "rec.h5", "cam/raw")
    assert str(SourceSpec.parse("h5:rec.h5:cam/raw")) == "h5:rec.h5:cam/raw"
    with pytest.raises(ValueError, match="h5:FILE"):
        SourceSpec.parse("h5:")
    with pytest.raises(SourceError, match="no such file"):
        H5Source(tmp_path / "missing.h5")
    with pytest.raises(SourceError, match="no frames dataset 'nope'.*frame_id"):
        H5Source(recording, "nope")
    r = run_cli("serve", "--source", f"h5:{recording}:timestamp_ns", "--frames", "1")
    assert r.returncode == 1 and "of shape (N, H, ...)" in r.stderr, r.stderr


def test_run_processes_and_records_a_replayed_recording(recording, tmp_path):
    """``run --source h5:FILE``: every recorded frame through FFT workers and a lossless
    recorder, and the new recording holds the same pixels."""
    out = tmp_path / "again.h5"
    eps = make_endpoints()
    r = run_cli("run", "--json", "--source", f"h5:{recording}", "--fps", "1000",
                "--frames", "0", "--seconds", "60", "--workers", "1", "--record", str(out),
                *eps.serve_args(), timeout=180)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["stages"]["processed"]["frames"] == N
    assert report["stages"]["recorded"]["frames"] == N
    with h5py.File(recording) as a, h5py.File(out) as b:
        np.testing.assert_array_equal(a["frames"][:], b["frames"][:])
