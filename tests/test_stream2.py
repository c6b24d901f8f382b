"""``--source stream2``: a DECTRIS SIMPLON Stream V2 detector, played by a test sender.

The sender is written from DECTRIS' public Stream V2 description (github.com/dectris/
documentation, stream_v2/README.md and cbor/dectris-compression-tag.md): one single-part
self-described CBOR message per start / image / end on a bound PUSH socket; images are a
map channel -> tag 40 [[rows, cols], typed array], the typed array (tag 69 uint16 LE,
70 uint32 LE) over a byte string or a tag-56500 compressed one, bslz4 in the bitshuffle
HDF5 filter's framing (uint64 BE size, uint32 BE block bytes, then bitshuffle's blocks)
and lz4 in the HDF5 LZ4 filter's framing.
"""
from __future__ import annotations

import datetime
import json
import random
import re
import shlex
import struct
import subprocess
import threading
from pathlib import Path

import bitshuffle
import cbor2
import h5py
import lz4.block
import numpy as np
import pytest
import zmq

from broker.stream2 import MAX_DEPTH, Reject, decode
from conftest import PY, cli, run_cli, summary, wait_status

BLOCK_BYTES = 8192  # what DECTRIS detectors use (their own test data's headers say so)
UNIQUE = "01HTESTSERIES000000000000A"


def bslz4(a: np.ndarray) -> cbor2.CBORTag:
    """Tag 56500 ["bslz4", element size, HDF5-framed bitshuffle-LZ4]."""
    blocks = bitshuffle.compress_lz4(a.reshape(-1), BLOCK_BYTES // a.itemsize).tobytes()
    return cbor2.CBORTag(56500, ["bslz4", a.itemsize,
                                 struct.pack(">QI", a.nbytes, BLOCK_BYTES) + blocks])


def lz4_framed(a: np.ndarray) -> cbor2.CBORTag:
    """Tag 56500 ["lz4", 0, HDF5-framed LZ4 blocks]."""
    raw, out = a.tobytes(), [struct.pack(">QI", a.nbytes, BLOCK_BYTES)]
    for i in range(0, len(raw), BLOCK_BYTES):
        block = lz4.block.compress(raw[i:i + BLOCK_BYTES], store_size=False)
        out += [struct.pack(">I", len(block)), block]
    return cbor2.CBORTag(56500, ["lz4", 0, b"".join(out)])


def multi_dim(a: np.ndarray, codec: str) -> cbor2.CBORTag:
    body = {"none": a.tobytes, "bslz4": lambda: bslz4(a), "lz4": lambda: lz4_framed(a)}[codec]()
    return cbor2.CBORTag(40, [list(a.shape), cbor2.CBORTag({2: 69, 4: 70}[a.itemsize], body)])


def message(fields: dict) -> bytes:
    """Self-described CBOR (tag 55799), as the detector sends and its reference client
    checks."""
    return cbor2.dumps(cbor2.CBORTag(55799, fields))


def start(channels: list[str], rows: int, cols: int, series_id: int = 7) -> bytes:
    return message({"type": "start", "series_id": series_id, "series_unique_id": UNIQUE,
                    "arm_date": datetime.datetime(2026, 12, 6, 20, 0, tzinfo=datetime.timezone.utc),
                    "beam_center_x": 31.5, "beam_center_y": 22.25, "channels": channels,
                    "count_time": 0.0009, "frame_time": 0.001, "detector_distance": 0.12,
                    "image_size_x": cols, "image_size_y": rows, "number_of_images": 0,
                    "pixel_size_x": 7.5e-05, "pixel_size_y": 7.5e-05,
                    "sensor_material": "CdTe", "threshold_energy": {c: 6000.0 for c in channels},
                    "goniometer": {"omega": {"increment": 0.1, "start": 0.0}},
                    "countrate_correction_lookup_table": cbor2.CBORTag(70, bytes(16)),
                    "user_data": {"sample": "lysozyme"}})


def image(image_id: int, planes: dict[str, np.ndarray], codec: str, series_id: int = 7) -> bytes:
    return message({"type": "image", "series_id": series_id, "series_unique_id": UNIQUE,
                    "image_id": image_id, "real_time": [900, 1_000_000],
                    "series_date": datetime.datetime(2026, 12, 6, 20, 0, 1,
                                                     tzinfo=datetime.timezone.utc),
                    "start_time": [image_id * 1000, 1_000_000],
                    "stop_time": [image_id * 1000 + 900, 1_000_000],
                    "data": {name: multi_dim(p, codec) for name, p in planes.items()}})


def end(series_id: int = 7) -> bytes:
    return message({"type": "end", "series_id": series_id, "series_unique_id": UNIQUE})


def planes_of(i: int, channels: list[str], rows: int, cols: int, dtype) -> dict[str, np.ndarray]:
    """Detector-like counts (mostly small, a few hot pixels), different per image and channel."""
    rng = np.random.default_rng(i)
    top = np.iinfo(dtype).max
    out = {}
    for c, name in enumerate(channels):
        p = rng.poisson(2 + c, (rows, cols)).astype(dtype)
        p[i % rows, :: 7] = top - c  # saturated pixels: the top of the range survives
        out[name] = p
    return out


def malformed(channels: list[str], rows: int, cols: int) -> dict[str, list[bytes]]:
    """Bad messages by the reason the source must count them under."""
    good = planes_of(0, channels, rows, cols, np.uint16)
    short = bslz4(good[channels[0]])
    short.value[2] = short.value[2][:-20]  # compressed bytes cut short
    wrong_size = bslz4(good[channels[0]][:-1])  # decompresses to fewer pixels than dims
    truncated = image(0, good, "none")
    return {
        "not_cbor": [b"\xff\x00garbage", truncated[: len(truncated) // 2]],
        "too_deep": [b"\x81" * (MAX_DEPTH + 10) + b"\x00"],
        "unknown_tag": [message({"type": "image", "data": cbor2.CBORTag(12345, b"x")}),
                        message({"type": "end", "x": cbor2.CBORTag(28, [1])})],
        "unknown_type": [message({"type": "config"})],
        "not_a_map": [cbor2.dumps([1, 2, 3])],
        "bad_compression": [message({"type": "image", "data": {channels[0]: cbor2.CBORTag(
            40, [[rows, cols], cbor2.CBORTag(69, short)])}})],
        "bad_array": [message({"type": "image", "data": {channels[0]: cbor2.CBORTag(
            40, [[rows, cols], cbor2.CBORTag(69, wrong_size)])}})],
        "too_large": [message({"type": "image", "data": {channels[0]: cbor2.CBORTag(
            56500, ["bslz4", 2, struct.pack(">QI", 2**40, 8192)])}})],
    }


def count(groups: dict[str, list[bytes]]) -> dict[str, int]:
    return {reason: len(msgs) for reason, msgs in groups.items()}


class Detector:
    """A PUSH socket on an ephemeral loopback port that sends what it is given, in order,
    from a thread (a PUSH send waits until the broker's PULL has connected)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.sndtimeo = 30_000  # a test that failed must not hang its teardown
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def send(self, messages: list[bytes], after: threading.Event | None = None) -> None:
        def run() -> None:
            if after is not None:
                after.wait(120)
            for m in messages:
                try:
                    self.sock.send(m)
                except zmq.Again:
                    return

        if self._thread is not None:
            self._thread.join()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(120)
        self.sock.close(linger=2000)
        self.ctx.term()


@pytest.fixture
def detector():
    d = Detector()
    yield d
    d.close()


def test_two_channel_series_is_recorded_pixel_for_pixel_and_bad_messages_are_counted(
        eps, broker_factory, detector, tmp_path):
    """uint16, two thresholds, raw and bslz4 images alternating; malformed messages
    before the start and in the middle of the series; status shows them (while the
    detector is idle: the broker still answers) and the recording is exact."""
    channels, rows, cols, n = ["threshold_1", "threshold_2"], 24, 40, 24
    frames = [planes_of(i, channels, rows, cols, np.uint16) for i in range(n)]
    bad = malformed(channels, rows, cols)
    early = {"not_cbor": [b"\x1f not CBOR"],
             "image_before_start": [image(0, frames[0], "none")],
             "end_before_start": [end()]}
    late = {**bad, "wrong_series": [image(5, frames[5], "none", series_id=8), end(series_id=8)],
            "start_during_series": [start(channels, rows, cols)],
            "wrong_shape": [image(5, planes_of(5, channels, rows, cols + 1, np.uint16), "none")],
            "wrong_channels": [image(5, {"threshold_1": frames[5]["threshold_1"]}, "none")],
            "missing_field": [message({"type": "image", "series_id": 7,
                                       "series_unique_id": UNIQUE, "data": {}})]}
    half = n // 2
    detector.send([m for ms in early.values() for m in ms] + [start(channels, rows, cols)]
                  + [image(i, frames[i], "bslz4" if i % 2 else "none") for i in range(half)]
                  + [m for ms in late.values() for m in ms])
    out = tmp_path / "series.h5"
    rec = cli("record", "--out", str(out), "--broker", eps.control, "--json")
    b = broker_factory("--source", f"stream2:{detector.endpoint}", "--wait-recorders", "1",
                       "--json")
    expected = count(late)
    expected["not_cbor"] += len(early["not_cbor"])
    expected.update({k: len(v) for k, v in early.items() if k != "not_cbor"})
    mid = wait_status(eps.control, lambda s: s["source_detail"] is not None
                      and s["source_detail"]["rejected"] == expected)
    detail = mid["source_detail"]
    assert mid["frames_sent"] <= half and not detail["ended"]
    assert mid["shape"] == [rows, cols, 2] and mid["dtype"] == "uint16"
    series = detail["series"]
    assert (series["series_id"], series["series_unique_id"], series["channels"]) == \
        (7, UNIQUE, channels)
    assert (series["beam_center_x"], series["pixel_size_x"], series["sensor_material"],
            series["arm_date"]) == (31.5, 7.5e-05, "CdTe", "2026-12-06T20:00:00+00:00")
    assert not {"threshold_energy", "goniometer", "countrate_correction_lookup_table",
                "user_data"} & set(series)  # scalars only

    detector.send([image(i, frames[i], "bslz4" if i % 2 else "none") for i in range(half, n)]
                  + [end()])
    res = summary(rec)
    assert (res["frames_written"], res["frames_missed"], res["total"]) == (n, 0, n)
    code, stdout, _ = b.finish()
    assert code == 0
    final = json.loads(stdout.strip().splitlines()[-1])
    assert final["source_detail"]["ended"] and final["source_detail"]["image_id_gaps"] == 0
    assert final["source_detail"]["rejected"] == expected
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        assert f["frames"].shape == (n, rows, cols, 2) and f["frames"].dtype == np.uint16
        source = f["source"].attrs
        assert (source["series_id"], source["series_unique_id"], list(source["channels"]),
                source["beam_center_y"], source["arm_date"]) == \
            (7, UNIQUE, channels, 22.25, "2026-12-06T20:00:00+00:00")
        for i in range(n):
            for c, name in enumerate(channels):
                np.testing.assert_array_equal(f["frames"][i][:, :, c], frames[i][name],
                                              err_msg=f"image {i} {name}")


def test_uint32_series_with_lz4_and_bslz4_is_recorded_exactly(eps, broker_factory, detector,
                                                              tmp_path):
    """One channel (frames H x W), uint32 with values above 16 bits, lz4 and bslz4; an
    image id the detector dealt to another client is a gap, and frame ids go on."""
    rows, cols, n = 20, 36, 10
    frames = [planes_of(i, ["threshold_1"], rows, cols, np.uint32) for i in range(n)]
    image_ids = [i if i < 4 else i + 1 for i in range(n)]  # id 4 went elsewhere
    detector.send([start(["threshold_1"], rows, cols, series_id=1)]
                  + [image(image_ids[i], frames[i], "lz4" if i % 2 else "bslz4", series_id=1)
                     for i in range(n)] + [end(series_id=1)])
    out = tmp_path / "u32.h5"
    rec = cli("record", "--out", str(out), "--broker", eps.control, "--json")
    b = broker_factory("--source", f"stream2:{detector.endpoint}", "--wait-recorders", "1",
                       "--json")
    assert summary(rec)["frames_written"] == n
    code, stdout, _ = b.finish()
    assert code == 0
    assert json.loads(stdout.strip().splitlines()[-1])["source_detail"]["image_id_gaps"] == 1
    with h5py.File(out) as f:
        assert f["frames"].shape == (n, rows, cols) and f["frames"].dtype == np.uint32
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        for i in range(n):
            np.testing.assert_array_equal(f["frames"][i], frames[i]["threshold_1"])
        assert f["frames"][0].max() == np.iinfo(np.uint32).max


@pytest.mark.parametrize("reason", ["not_cbor", "too_deep", "unknown_tag", "unknown_type",
                                    "not_a_map", "bad_compression", "bad_array", "too_large"])
def test_decode_names_the_reason(reason):
    for data in malformed(["t"], 8, 8)[reason]:
        with pytest.raises(Reject) as exc:
            decode(data)
        assert exc.value.reason == reason, (exc.value.reason, str(exc.value))


@pytest.mark.parametrize("rows, cols, dtype", [(8, 16, np.uint16), (67, 131, np.uint16),
                                               (45, 91, np.uint32)])
def test_decode_reads_what_the_sender_writes(rows, cols, dtype):
    """Whole blocks only; whole blocks, a partial block and a raw tail (the element
    count not a multiple of 8), in both dtypes."""
    planes = planes_of(3, ["a"], rows, cols, dtype)
    for codec in ("none", "bslz4", "lz4"):
        m = decode(image(3, planes, codec))
        assert m["image_id"] == 3 and m["series_date"].year == 2026
        np.testing.assert_array_equal(m["data"]["a"], planes["a"])


def test_without_the_extra_the_flag_fails_in_one_line():
    code = ("import sys; sys.modules['cbor2'] = None; from broker.cli import main; "
            "sys.exit(main(['serve', '--source', 'stream2:tcp://127.0.0.1:65301']))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True,
                                     timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "framebroker serve: error: --source stream2 needs cbor2: pip install 'framebroker[stream2]'"]


def test_bad_source_text_is_refused():
    r = run_cli("serve", "--source", "stream2:localhost")
    assert r.returncode == 2 and "stream2:tcp://HOST:PORT" in r.stderr


def test_corrupted_messages_are_rejects_never_crashes():
    """Seeded byte flips, cuts and insertions in valid messages of every codec: each
    decodes or is a counted Reject. (bitshuffle.decompress_lz4 crashed the process on
    such input; the source must not.)"""
    rng = random.Random(16)
    msgs = [image(1, planes_of(1, ["a", "b"], 16, 24, np.uint16), c)
            for c in ("none", "bslz4", "lz4")]
    reasons = set()
    for _ in range(1500):
        m = bytearray(rng.choice(msgs))
        i = rng.randrange(len(m))
        op = rng.randrange(3)
        if op == 0:
            m[i] = rng.randrange(256)
        elif op == 1:
            del m[i:]
        else:
            m[i:i] = rng.randbytes(rng.randint(1, 8))
        try:
            decode(bytes(m))
        except Reject as exc:
            reasons.add(exc.reason)
    assert {"not_cbor", "bad_compression"} <= reasons


def readme_commands() -> list[list[str]]:
    """The framebroker commands of the README's Stream V2 section, as written."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## From a DECTRIS detector (Stream V2)", 1)[1].split("\n## ", 1)[0]
    lines = [ln for block in re.findall(r"```text\n(.*?)```", section, re.S)
             for ln in block.splitlines() if ln.startswith("framebroker ")]
    return [shlex.split(re.sub(r"\s+#.*$", "", ln).strip().rstrip("&")) for ln in lines]


def test_the_readme_commands_take_a_series(eps, detector, tmp_path):
    commands = {words[1]: words[2:] for words in readme_commands()}
    assert set(commands) == {"record", "serve", "status"}
    channels, rows, cols, n = ["threshold_1", "threshold_2"], 16, 24, 6
    frames = [planes_of(i, channels, rows, cols, np.uint16) for i in range(n)]
    detector.send([start(channels, rows, cols)]
                  + [image(i, frames[i], "bslz4") for i in range(n)])  # the end after status
    dcu = "stream2:tcp://DCU:31001"
    assert dcu in commands["serve"]
    serve = [f"stream2:{detector.endpoint}" if w == dcu else w for w in commands["serve"]]
    rec = cli("record", *commands["record"], "--broker", eps.control, cwd=tmp_path)
    b = cli("serve", *serve, *eps.serve_args(), cwd=tmp_path)
    status = run_cli("status", *commands["status"], "--broker", eps.control)
    assert status.returncode == 0, status.stderr
    series = json.loads(status.stdout)["source_detail"]["series"]
    assert series["channels"] == channels and series["beam_center_x"] == 31.5
    detector.send([end()])
    assert rec.wait(120) == 0 and b.wait(120) == 0, (rec.communicate(), b.communicate())
    rec.communicate(), b.communicate()
    with h5py.File(tmp_path / "series.h5") as f:  # the README's read-back, as written
        assert f["source"].attrs["beam_center_x"] == 31.5
        for i in range(n):
            for c, name in enumerate(channels):
                np.testing.assert_array_equal(f["frames"][i][:, :, c], frames[i][name])


def test_one_message_may_not_decompress_past_its_budget(monkeypatch):
    """Each compressed string is within bounds, all of them together are not: refused
    before the one that passes the budget is decompressed."""
    from broker import stream2

    monkeypatch.setattr(stream2, "MAX_DECODED_BYTES", 3 * 64 * 64 * 2 - 1)
    planes = planes_of(0, ["a", "b", "c"], 64, 64, np.uint16)
    assert decode(image(0, {"a": planes["a"], "b": planes["b"]}, "lz4"))["image_id"] == 0
    with pytest.raises(Reject) as exc:
        decode(image(0, planes, "lz4"))
    assert exc.value.reason == "too_large"


def test_an_oversize_message_drops_the_connection_and_the_series_goes_on(monkeypatch,
                                                                         detector):
    """libzmq refuses a message over ZMQ_MAXMSGSIZE by dropping the connection and (4.3.5)
    never connects again by itself; the source does, and what the detector sends after
    that arrives."""
    from zmq.utils.monitor import recv_monitor_message

    from broker import stream2

    monkeypatch.setattr(stream2, "MAX_MESSAGE_BYTES", 64 * 1024)
    monitor = detector.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED
                                               | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    planes = [planes_of(i, ["a"], 8, 8, np.uint16) for i in range(2)]
    detector.send([start(["a"], 8, 8), image(0, planes[0], "none")])
    src = stream2.Stream2Source(detector.endpoint)  # returns once image 0 is queued
    try:
        # alone: what shares a read with the over-size message may be lost with it
        detector.send([bytes(100_000)])
        out = np.empty(src.shape, src.dtype)
        assert src.read_into(out) and np.array_equal(out, planes[0]["a"])
        while recv_monitor_message(monitor)["event"] != zmq.EVENT_DISCONNECTED:
            pass  # the first connection's handshake
        while not src.reconnects:
            src.ready(100)
        # sent on the new connection (sent before it, they would go down with the old one)
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        detector.send([image(1, planes[1], "none"), end()])
        assert src.read_into(out) and np.array_equal(out, planes[1]["a"])
        assert not src.read_into(out)
        assert (src.detail()["rejected"], src.detail()["reconnects"]) == ({}, 1)
    finally:
        src.close()
        detector.sock.disable_monitor()
        monitor.close()
