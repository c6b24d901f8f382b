"""Frame sources: the synthetic scene and its verifier, video files written with
OpenCV here, and a camera that is not there."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from broker.sources import (Pacer, SourceError, SyntheticSource, VideoSource, CameraSource,
                            check_synthetic, read_stamp, synthetic_frame, SYNTH_DTYPES)
from broker.client import Subscriber
from conftest import cli, run_cli


@pytest.mark.parametrize("dtype", SYNTH_DTYPES)
@pytest.mark.parametrize("shape", [(480, 640, 3), (31, 47), (5,), (2, 3, 8, 4)])
def test_synthetic_frames_verify_and_detect_damage(shape, dtype):
    src = SyntheticSource(shape, dtype)
    buf = np.empty(shape, dtype)
    for fid in (0, 1, 359, 10**12):
        src._next = fid
        assert src.read_into(buf)
        assert check_synthetic(buf, fid) == -1
        assert check_synthetic(buf, fid + 1) != -1 or buf.nbytes < 16
    flat = buf.reshape(-1)
    for i in {0, flat.size // 2, flat.size - 1}:
        damaged = buf.copy()
        damaged.reshape(-1)[i] = damaged.reshape(-1)[i] + 1 if dtype[0] != "f" else -7.0
        assert check_synthetic(damaged, 10**12) == i


def test_synthetic_frames_differ_and_carry_their_id():
    a, b = synthetic_frame((480, 640, 3), "uint8", 7), synthetic_frame((480, 640, 3), "uint8", 8)
    assert read_stamp(a) == 7 and read_stamp(b) == 8
    far = synthetic_frame((480, 640, 3), "uint8", 7 + 180)
    assert 0 < np.count_nonzero(a != b) < np.count_nonzero(a != far)  # the disc moves
    assert a.std() > 10  # not a flat image: gradient, disc and noise


def test_synthetic_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="synthetic source renders"):
        SyntheticSource((4, 4), "complex64")


def _write_video(path, n: int, size=(160, 120)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(synthetic_frame((size[1], size[0], 3), "uint8", i * 40))
    writer.release()


def _decode_all(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            return frames
        frames.append(img)


def test_video_source_reads_every_frame_into_the_buffer(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path, 12)
    reference = _decode_all(path)
    assert len(reference) == 12
    src = VideoSource(path)
    assert src.shape == (120, 160, 3) and src.dtype == np.uint8
    buf = np.empty(src.shape, src.dtype)
    got = []
    while src.read_into(buf):
        got.append(buf.copy())
    assert len(got) == 12
    for a, b in zip(got, reference):
        np.testing.assert_array_equal(a, b)
    src.close()


def test_video_source_loops(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path, 5)
    reference = _decode_all(path)
    src = VideoSource(path, loop=True)
    buf = np.empty(src.shape, src.dtype)
    for i in range(13):
        assert src.read_into(buf)
        np.testing.assert_array_equal(buf, reference[i % 5])


def test_video_file_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        VideoSource(tmp_path / "missing.avi")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(SourceError, match="junk.avi"):
        VideoSource(junk)


def test_serving_a_video_file_end_to_end(tmp_path, eps, broker_factory):
    path = tmp_path / "clip.avi"
    _write_video(path, 20)
    reference = _decode_all(path)
    sub = cli("watch", "--broker", eps.control, "--json", "--progress", "0", "--timeout", "30")
    b = broker_factory("--source", f"video:{path}", "--wait-subscribers", "1",
                       "--hwm", "100")
    out, err = sub.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert (res["received"], res["total"], res["gaps"]) == (20, 20, 0), err
    assert b.finish()[0] == 0  # the video ended: the broker sent END and exited 0
    # and the pixels: one frame through the API, compared with an independent decode
    b2 = broker_factory("--source", f"video:{path}", "--loop", "--wait-subscribers", "1",
                        "--frames", "25", "--hwm", "100")
    with Subscriber(broker=eps.control, timeout=30) as s:
        frames = [(f.frame_id, f.array.copy()) for f in s]
    assert [fid for fid, _ in frames] == list(range(25))
    for fid, arr in frames:
        np.testing.assert_array_equal(arr, reference[fid % 20])
    assert b2.finish()[0] == 0


def test_absent_camera_fails_with_one_clear_line():
    with pytest.raises(SourceError, match="camera 0: cannot be opened"):
        CameraSource(0)
    r = run_cli("serve", "--source", "camera:7", "--frames", "1")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "framebroker serve: error: camera 7: cannot be opened (no such device, no permission, "
        "or in use by another program)")
    assert "Traceback" not in r.stderr


def test_pacer_schedules_from_the_start_not_from_the_last_frame():
    p = Pacer(100.0)
    p._t0 -= 0.5  # half a second late: 50 frames are due at once, none is skipped
    due = 0
    while p.wait_time() == 0.0 and due < 100:
        p.tick()
        due += 1
    assert 49 <= due <= 51
    assert p.resyncs == 0
    with pytest.raises(ValueError):
        Pacer(-1)


@pytest.mark.parametrize("shape,dtype", [((480, 640, 3), "uint8"), ((256, 256), "uint16"),
                                         ((7, 9, 2, 3), "float32")])
def test_incremental_render_into_recycled_buffers_equals_a_fresh_render(shape, dtype):
    """The source repaints only what moved in a buffer it rendered before; the result
    must be exactly the full render, whichever older frame the buffer held."""
    src = SyntheticSource(shape, dtype)
    bufs = [np.empty(shape, dtype) for _ in range(3)]
    for fid in range(200):
        buf = bufs[(fid * 7) % 3 if fid % 5 else fid % 3]
        src.read_into(buf)
        np.testing.assert_array_equal(buf, synthetic_frame(shape, dtype, fid))
    stranger = np.zeros(shape, dtype)  # never rendered by this source: full render
    src.read_into(stranger)
    assert check_synthetic(stranger, 200) == -1
