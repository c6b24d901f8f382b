"""imagezmq in (``--source imagezmq:`` / ``imagezmq-sub:``) and out (``bridge imagezmq``),
against the real ``imagezmq`` package in other processes (tests/imagezmq_peer.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import imagezmq
import numpy as np
import pytest
import zmq

from broker.client import Control, subscribe
from broker.izmq import ImagezmqSource, decode_jpeg, jpeg_shape
from broker.sources import check_synthetic, read_stamp, synthetic_frame
import imagezmq_peer as peer
from conftest import PY, cli, free_port, run_cli, summary, wait_status

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagezmq_peer.py")


def start_peer(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, PEER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    return out


def test_two_image_senders_raw_and_jpeg_into_one_stream(broker_factory, eps):
    """500 frames from two REQ ImageSender processes (one send_image, one send_jpg) reach
    a ``framebroker watch`` process and a lossless subscriber: all 500 at the watch, with
    no gap; at the subscriber raw ones exact and in order, JPEG ones within codec
    tolerance; and status counts each sender's frames under its text."""
    port = free_port()
    senders = [start_peer("send", f"tcp://127.0.0.1:{port}", "pi-raw", "250", "raw"),
               start_peer("send", f"tcp://127.0.0.1:{port}", "pi-jpeg", "250", "jpeg")]
    b = broker_factory("--source", f"imagezmq:tcp://127.0.0.1:{port}", "--frames", "500",
                       "--wait-subscribers", "2", "--json")
    b.wait_ready(timeout=60)
    w = cli("watch", "--broker", eps.control, "--policy", "block", "--json", "--progress",
            "0", "--timeout", "60")
    sub = subscribe("block", broker=eps.control, timeout=30)
    raw_ids, jpeg_ids, worst = [], [], 0.0
    try:
        while (frame := sub.recv()) is not None:
            assert frame.array.shape == peer.SHAPE
            fid = read_stamp(frame.array)
            if fid >= 0 and check_synthetic(frame.array, fid) == -1:
                raw_ids.append(fid)
            else:
                level, err = peer.smooth_id(frame.array)
                jpeg_ids.append(level)
                worst = max(worst, err)
    finally:
        sub.close()
    for s in senders:
        assert finished(s) == "done 250\n"
    watched = summary(w)
    assert watched["received"] == 500 and watched["gaps"] == 0 and watched["dropped"] == 0
    assert raw_ids == list(range(250))
    assert jpeg_ids == [i % peer.LEVELS for i in range(250)]
    assert worst < 3.0  # quality 90 on a smooth scene: about one grey level
    code, out, err = b.finish()
    assert code == 0, err
    status = json.loads(out)
    assert status["source_senders"] == {"pi-raw": 250, "pi-jpeg": 250}
    assert status["source_rejected"] == {} and status["frames_sent"] == 500


def test_sender_filter_and_pub_sub(broker_factory, eps):
    """imagezmq-sub: connects to a PUB ImageSender; --sender keeps one sender's frames and
    rejects the others as other_sender (counted), every kept frame exact."""
    port = free_port()
    stop = threading.Event()

    def publish() -> None:
        pub = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}", REQ_REP=False)
        i = 0
        while not stop.is_set():
            pub.send_image("cam-a" if i % 2 == 0 else "cam-b",
                           synthetic_frame((32, 48), "uint16", i))
            i += 1
            stop.wait(0.005)
        pub.close()

    t = threading.Thread(target=publish)
    t.start()
    try:
        b = broker_factory("--source", f"imagezmq-sub:tcp://127.0.0.1:{port}", "--sender",
                           "cam-a")
        b.wait_ready(timeout=60)
        sub = subscribe("drop", broker=eps.control, timeout=30)
        try:
            frames = [sub.recv() for _ in range(20)]
        finally:
            sub.close()
        ids = [read_stamp(f.array) for f in frames]
        assert all(check_synthetic(f.array, i) == -1 for f, i in zip(frames, ids))
        assert all(i % 2 == 0 for i in ids) and ids == sorted(ids)
        status = wait_status(eps.control, lambda s: s["source_rejected"].get("other_sender"))
        assert set(status["source_senders"]) == {"cam-a"}
        assert status["shape"] == [32, 48] and status["dtype"] == "uint16"
        assert set(status["source_rejected"]) == {"other_sender"}
    finally:
        stop.set()
        t.join()


HOSTILE = [  # (parts, reason): each answered "rejected: REASON: ..." and counted
    ([b"{not json", b"x"], "bad_metadata"),
    ([b"[" * 1000 + b"]" * 1000, b"x"], "bad_metadata"),
    ([b'{"msg": "' + b"p" * 5000 + b'"}', b"x"], "bad_metadata"),
    ([b'{"msg": "p", "dtype": "uint8", "shape": [2]}'], "part_count"),
    ([b'{"msg": 7, "dtype": "uint8", "shape": [2]}', b"xx"], "bad_sender"),
    ([b'{"msg": "p", "dtype": "object", "shape": [2]}', b"xx"], "unknown_dtype"),
    ([b'{"msg": "p", "dtype": ">u2", "shape": [1]}', b"xx"], "unknown_dtype"),
    ([b'{"msg": "p", "dtype": "uint8", "shape": [2, -1]}', b"xx"], "bad_shape"),
    ([b'{"msg": "p", "dtype": "uint8", "shape": [100000, 100000, 4]}', b"xx"], "too_large"),
    ([b'{"msg": "p", "dtype": "uint8", "shape": [16, 16, 3]}', b"short"], "payload_size"),
    ([b'{"msg": "p"}', b"\xff\xd8 not a jpeg"], "bad_jpeg"),
]


def _meta(array: np.ndarray, name: str = "p") -> bytes:
    return json.dumps({"msg": name, "dtype": str(array.dtype),
                       "shape": list(array.shape)}).encode()


def test_hostile_peer_is_answered_counted_and_survived(broker_factory, eps):
    """Malformed metadata, before and after the first frame: each gets a reply naming
    its reason (a REQ sender is never left waiting) and a counter; valid frames pass."""
    port = free_port()
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 60000)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"tcp://127.0.0.1:{port}")
    b = broker_factory("--source", f"imagezmq:tcp://127.0.0.1:{port}", "--wait-subscribers",
                       "1", "--shm", "8slots")
    try:
        for parts, reason in HOSTILE:  # the source is waiting for its first frame
            req.send_multipart(parts)
            assert req.recv().startswith(f"rejected: {reason}: ".encode())
        first = synthetic_frame((16, 16, 3), "uint8", 0)
        req.send_multipart([_meta(first), first])
        assert req.recv() == b"OK"
        b.wait_ready(timeout=60)
        sub = subscribe("drop", broker=eps.control, timeout=30)
        try:
            for parts, reason in HOSTILE + [([_meta(np.zeros((8, 8), np.uint8)), bytes(64)],
                                             "shape_changed")]:
                req.send_multipart(parts)
                assert req.recv().startswith(f"rejected: {reason}: ".encode())
            frames = [sub.recv()]
            nxt = synthetic_frame((16, 16, 3), "uint8", 1)
            req.send_multipart([_meta(nxt), nxt])
            assert req.recv() == b"OK"
            frames.append(sub.recv())
            assert sub.transport == "shm"  # the ring's slots have the first frame's size
            assert [read_stamp(f.array) for f in frames] == [0, 1]
            assert all(check_synthetic(f.array, i) == -1 and f.intact()
                       for i, f in enumerate(frames))
        finally:
            sub.close()
        status = Control(eps.control, timeout=10).status()
        expected = {}
        for _, reason in HOSTILE * 2:
            expected[reason] = expected.get(reason, 0) + 1
        expected["shape_changed"] = 1
        assert status["source_rejected"] == expected
        assert status["source_senders"] == {"p": 2} and status["frames_sent"] == 2
        shown = run_cli("status", "--broker", eps.control).stdout
        assert f"source messages {2 * len(HOSTILE) + 1} (" in shown and "shape_changed 1" in shown
        assert "senders: 2 (p 2)" in shown
    finally:
        req.close()


def test_jpeg_decoders_agree_and_gray_stays_two_dimensional():
    """simplejpeg (with the header checked first) and OpenCV give the same pixels."""
    import cv2

    for frame in (peer.smooth_frame(3), peer.smooth_frame(3)[:, :, 0].copy()):
        data = memoryview(cv2.imencode(".jpg", frame)[1].tobytes())
        shape = jpeg_shape(data, 1 << 20)
        assert shape == frame.shape
        fast, slow = decode_jpeg(data, shape), decode_jpeg(data, None)
        assert fast.shape == slow.shape == frame.shape
        assert np.abs(fast.astype(int) - slow).max() <= 1
    with pytest.raises(Exception, match="too_large|over the"):
        jpeg_shape(memoryview(cv2.imencode(".jpg", peer.smooth_frame(0))[1].tobytes()), 100)


def test_jpeg_source_without_simplejpeg_decodes_with_opencv(monkeypatch):
    """Without simplejpeg the source decodes with OpenCV and checks the decoded size: a
    JPEG of another size is shape_changed, one beyond the byte limit too_large."""
    import cv2

    from broker import izmq

    monkeypatch.setattr(izmq, "_simplejpeg", lambda: None)
    port = free_port()
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}")
    replies: list[bytes] = []

    def send() -> None:
        for frame in (peer.smooth_frame(7), peer.smooth_frame(8)[:48], peer.smooth_frame(9)):
            replies.append(sender.send_jpg("pi", cv2.imencode(".jpg", frame)[1]))

    t = threading.Thread(target=send)
    t.start()
    try:
        source = ImagezmqSource(f"tcp://127.0.0.1:{port}", max_bytes=peer.SHAPE[0] * peer.SHAPE[1] * 3)
        out = np.empty(source.shape, source.dtype)
        levels = []
        for _ in range(2):
            source.read_into(out)
            levels.append(peer.smooth_id(out))
        t.join()
        source.close()
    finally:
        sender.close()
    assert source.shape == peer.SHAPE and [lv for lv, _ in levels] == [7, 9]
    assert all(err < 3.0 for _, err in levels)
    assert replies[0] == replies[2] == b"OK" and replies[1].startswith(b"rejected: shape_changed")
    assert source.rejected == {"shape_changed": 1}
    port = free_port()
    tiny = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}")
    t = threading.Thread(target=lambda: replies.append(
        tiny.send_jpg("pi", cv2.imencode(".jpg", peer.smooth_frame(0))[1])))
    t.start()
    try:
        with pytest.raises(Exception, match="rejected: {'too_large': 1}"):
            ImagezmqSource(f"tcp://127.0.0.1:{port}", max_bytes=100, first_timeout=2)
        t.join()
    finally:
        tiny.close()
    assert replies[-1].startswith(b"rejected: too_large: JPEG of 96x128x3 is over the 100")


def test_bridge_delivers_broker_frames_to_a_real_image_hub(broker_factory, eps):
    """bridge imagezmq --connect: synthetic broker frames reach an ImageHub process
    exact (each stamp checked); SIGTERM then ends the bridge with its summary."""
    port = free_port()
    hub = start_peer("hub", f"tcp://127.0.0.1:{port}", "8")
    b = broker_factory("--shape", "48x64x3", "--fps", "50")
    b.wait_ready()
    bridge = cli("bridge", "imagezmq", "--connect", f"tcp://127.0.0.1:{port}", "--broker",
                 eps.control, "--name", "lab", "--progress", "0.05", "--json")
    lines = [json.loads(line) for line in finished(hub).splitlines()]
    bridge.send_signal(signal.SIGTERM)
    out, err = bridge.communicate(timeout=60)
    assert bridge.returncode == 0, err
    result = json.loads(out)
    assert "bridge imagezmq: " in err and " frames sent, " in err  # progress lines
    assert len(lines) == 8
    assert all(r["name"] == "lab" and r["shape"] == [48, 64, 3] and r["bad"] == -1
               for r in lines)
    ids = [r["id"] for r in lines]
    assert ids == sorted(set(ids))
    assert result["signal"] == "SIGTERM" and result["mode"] == "req-rep"
    assert result["sent"] >= 8 and result["reply_timeouts"] <= 1  # the one the hub left


def test_bridge_jpeg_end_to_end_and_a_silent_hub(broker_factory, eps):
    """imagezmq in and out chained: smooth frames from a PUB ImageSender, through the
    broker, out as JPEG to an ImageHub, within tolerance; a hub that never answers costs
    each frame one reply timeout, counted, and the bridge goes on."""
    src, hub_port, dead = free_port(), free_port(), free_port()
    stop = threading.Event()

    def publish() -> None:
        pub = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{src}", REQ_REP=False)
        i = 0
        while not stop.is_set():
            pub.send_image("pi", peer.smooth_frame(i))
            i += 1
            stop.wait(0.01)
        pub.close()

    t = threading.Thread(target=publish)
    t.start()
    hub = imagezmq.ImageHub(open_port=f"tcp://127.0.0.1:{hub_port}")
    hub.zmq_socket.setsockopt(zmq.RCVTIMEO, 60000)
    try:
        b = broker_factory("--source", f"imagezmq-sub:tcp://127.0.0.1:{src}")
        b.wait_ready(timeout=60)
        bridge = cli("bridge", "imagezmq", "--connect", f"tcp://127.0.0.1:{hub_port}",
                     "--jpeg", "90", "--broker", eps.control, "--frames", "5", "--json")
        levels = []
        for _ in range(5):
            name, jpg = hub.recv_jpg()
            hub.send_reply(b"OK")
            shape = jpeg_shape(memoryview(jpg), 1 << 20)
            level, err = peer.smooth_id(decode_jpeg(memoryview(jpg), shape))
            assert name == "cam" and shape == peer.SHAPE and err < 3.0
            levels.append(level)
        result = summary(bridge)
        assert result["sent"] == 5 and result["jpeg"] == 90
        assert len(set(levels)) == 5  # five different frames, not one repeated
        silent = cli("bridge", "imagezmq", "--connect", f"tcp://127.0.0.1:{dead}",
                     "--broker", eps.control, "--frames", "2", "--reply-timeout", "0.3",
                     "--json")
        result = summary(silent)
        assert result["sent"] == 0 and result["reply_timeouts"] == 2
    finally:
        stop.set()
        t.join()
        hub.close()


def test_bridge_pub_mode_to_a_subscribing_hub(broker_factory, eps):
    """bridge imagezmq --bind: a PUB for ImageHub(REQ_REP=False); frames arrive exact."""
    port = free_port()
    b = broker_factory("--shape", "32x40", "--dtype", "uint16", "--fps", "100")
    b.wait_ready()
    bridge = cli("bridge", "imagezmq", "--bind", f"tcp://127.0.0.1:{port}", "--broker",
                 eps.control, "--progress", "0", "--json")
    hub = imagezmq.ImageHub(open_port=f"tcp://127.0.0.1:{port}", REQ_REP=False)
    hub.zmq_socket.setsockopt(zmq.RCVTIMEO, 60000)
    try:
        got = [hub.recv_image() for _ in range(5)]
    finally:
        hub.close()
    bridge.send_signal(signal.SIGTERM)
    result = summary(bridge)
    assert all(name == "cam" and check_synthetic(img, read_stamp(img)) == -1
               for name, img in got)
    assert result["mode"] == "pub-sub" and result["sent"] >= 5
    r = run_cli("bridge", "imagezmq", "--bind", f"tcp://127.0.0.1:{port}", "--jpeg", "90",
                "--broker", eps.control)
    assert r.returncode == 2
    assert "--jpeg takes 8-bit gray or BGR frames; the stream is 32x40 uint16" in r.stderr


def test_refusals_before_anything_binds(tmp_path):
    """imagezmq has no CURVE: a wildcard bind needs --insecure; its port may not be one
    the broker binds; a bridge without the imagezmq package says how to install it."""
    r = run_cli("serve", "--source", "imagezmq:tcp://*:65100", "--pub", "tcp://127.0.0.1:65101")
    assert r.returncode == 2 and "imagezmq has no encryption" in r.stderr
    r = run_cli("serve", "--source", "imagezmq:tcp://127.0.0.1:65102", "--pub",
                "tcp://127.0.0.1:65102")
    assert r.returncode == 2 and "use the same port 65102" in r.stderr
    r = run_cli("serve", "--source", "imagezmq:127.0.0.1:65102")
    assert r.returncode == 2 and "imagezmq:tcp://HOST:PORT" in r.stderr
    (tmp_path / "imagezmq.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([PY, "-m", "broker.cli", "bridge", "imagezmq", "--connect",
                        "tcp://127.0.0.1:65103", "--broker", "tcp://127.0.0.1:65104"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "framebroker bridge: error: bridge imagezmq needs the imagezmq package: "
        "pip install 'framebroker[imagezmq]'"]


def test_source_waits_for_its_first_frame_and_says_so():
    port = free_port()
    said: list[str] = []
    with pytest.raises(Exception, match="no valid frame in 0.3 s"):
        ImagezmqSource(f"tcp://127.0.0.1:{port}", first_timeout=0.3, log=said.append)
    assert said == [f"imagezmq: waiting for the first frame on tcp://127.0.0.1:{port}"]


def test_readme_imagezmq_commands_parse():
    """The README's imagezmq and bridge lines (text blocks: they need Pis and hubs) are
    valid command lines; what they do is tested above."""
    import re
    import shlex
    from pathlib import Path

    from broker.cli import build_parser

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [re.sub(r"\s+#.*$", "", line) for block in re.findall(r"```text\n(.*?)```",
                                                                    text, re.DOTALL)
             for line in block.splitlines() if "imagezmq" in line
             and line.startswith("framebroker ")]
    assert len(lines) == 8
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.func is not None
