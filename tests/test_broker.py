"""The broker as a real process: fan-out integrity, start order, control, signals."""
from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest
import zmq

from broker import protocol as proto
from broker.client import BrokerUnavailable, Control, Subscriber
from broker.sources import check_synthetic
from conftest import make_endpoints, run_cli, summary, watch


def test_two_subscribers_get_2000_intact_frames_at_full_speed(eps, broker_factory):
    """Every frame verified against the synthetic source: a buffer reused while zmq
    still held it would show up here as a corrupt frame or a wrong id."""
    subs = [watch(eps, "--hwm", "2500") for _ in range(2)]
    b = broker_factory("--frames", "2000", "--wait-subscribers", "2", "--hwm", "2500")
    for s in subs:
        res = summary(s)
        assert res["received"] == 2000 and res["total"] == 2000
        assert res["gaps"] == 0 and res["missed"] == 0 and res["corrupt"] == 0
        assert res["rejected"] == {}
    rc, out, _ = b.finish()
    assert rc == 0 and "sent 2000 frames" in out


def test_subscriber_started_before_the_broker(eps, broker_factory):
    sub = watch(eps, "--hwm", "1000")  # broker not running yet: it waits for control
    time.sleep(0.3)  # make sure the subscriber really is first (not a synchronisation)
    assert sub.poll() is None
    broker_factory("--frames", "500", "--wait-subscribers", "1", "--hwm", "1000")
    res = summary(sub)
    assert (res["received"], res["gaps"], res["missed"], res["corrupt"]) == (500, 0, 0, 0)


def test_broker_started_before_the_subscriber(eps, broker_factory):
    b = broker_factory("--frames", "300", "--wait-subscribers", "1", "--hwm", "1000",
                       "--dtype", "uint16", "--shape", "256x320")
    b.wait_ready()
    assert Control(eps.control).status()["state"] == "waiting"
    res = summary(watch(eps, "--hwm", "1000"))
    assert (res["received"], res["gaps"], res["missed"], res["corrupt"]) == (300, 0, 0, 0)


def test_control_api_snapshot_status_pause_resume_stop(eps, broker_factory):
    b = broker_factory("--fps", "200")
    b.wait_ready()
    ctl = Control(eps.control, timeout=5)
    eps_reply = ctl.endpoints()
    assert eps_reply["pub"] == eps.pub and eps_reply["work"] == eps.work
    deadline = time.monotonic() + 20
    while ctl.status()["frames_sent"] < 5:
        assert time.monotonic() < deadline
    snap = ctl.snapshot()
    assert snap.array.shape == (480, 640, 3) and snap.array.dtype == np.uint8
    assert check_synthetic(snap.array, snap.frame_id) == -1
    assert not snap.array.flags.writeable
    assert ctl.pause() == {"ok": True, "paused": True}
    time.sleep(0.2)  # let a frame already in the loop go out
    frozen = ctl.status()
    assert frozen["state"] == "paused"
    time.sleep(0.3)
    assert ctl.status()["frames_sent"] == frozen["frames_sent"]
    ctl.resume()
    while ctl.status()["frames_sent"] <= frozen["frames_sent"]:
        assert time.monotonic() < deadline
    status = ctl.status()
    assert status["state"] == "streaming" and status["source"] == "synthetic 480x640x3 uint8"
    assert ctl.stop()["stopping"] is True
    rc, out, _ = b.finish()
    assert rc == 0 and "sent" in out


def test_control_from_the_cli(eps, broker_factory, tmp_path):
    b = broker_factory("--fps", "100", "--shape", "120x160")
    b.wait_ready()
    ctl = Control(eps.control, timeout=5)
    deadline = time.monotonic() + 20
    while ctl.status()["frames_sent"] < 3:
        assert time.monotonic() < deadline
    status = run_cli("status", "--broker", eps.control, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["shape"] == [120, 160]
    for out in (tmp_path / "snap.npy", tmp_path / "snap.png"):
        r = run_cli("snapshot", "--broker", eps.control, "--out", str(out))
        assert r.returncode == 0, r.stderr
        fid = int(r.stdout.split()[2])
        if out.suffix == ".npy":
            arr = np.load(out)
        else:
            import cv2
            arr = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
        assert check_synthetic(np.ascontiguousarray(arr), fid) == -1
    assert run_cli("pause", "--broker", eps.control).returncode == 0
    assert ctl.status()["paused"] is True
    assert run_cli("resume", "--broker", eps.control).returncode == 0
    assert ctl.status()["paused"] is False
    r = run_cli("stop", "--broker", eps.control, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["stopping"] is True
    assert b.finish()[0] == 0


def test_control_against_no_broker_times_out_cleanly():
    eps = make_endpoints()
    ctl = Control(eps.control, timeout=0.3)
    with pytest.raises(BrokerUnavailable, match=r"after \d+\.\d s \(asked 'status' once; "
                                                r"if it runs with CURVE, pass security=") as e:
        ctl.status()
    assert e.value.waited >= 0.3
    with pytest.raises(BrokerUnavailable):  # the REQ socket was recreated, not stuck
        ctl.status()
    r = run_cli("status", "--broker", eps.control, "--timeout", "0.3")
    assert r.returncode == 1
    assert re.match(rf"framebroker status: error: no answer from the broker at "
                    rf"{eps.control} after \d+\.\d s \(asked 'endpoints' once", r.stderr), r.stderr
    assert "Traceback" not in r.stderr


def test_bad_control_requests_get_errors_and_the_broker_keeps_serving(eps, broker_factory):
    b = broker_factory("--fps", "50")
    b.wait_ready()
    req = zmq.Context.instance().socket(zmq.REQ)
    req.connect(eps.control)
    req.RCVTIMEO = 5000
    bad = [b"not json", b"[1,2]", b'{"cmd": "format_disk"}', b'{"cmd": "status", "x": 1}',
           b'{"nocmd": 1}', b"\xff\xfe"]
    for msg in bad:
        req.send(msg)
        reply = proto.decode_reply(req.recv())
        assert reply["ok"] is False and reply["error"]
    req.send_multipart([b'{"cmd": "status"}', b"extra"])
    assert proto.decode_reply(req.recv())["ok"] is False
    status = Control(eps.control).status()
    assert sum(status["control_rejected"].values()) == len(bad) + 1
    assert status["state"] in ("streaming", "waiting")
    req.close(linger=0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_the_stream_cleanly(eps, broker_factory, sig):
    b = broker_factory("--fps", "500", "--shape", "64x64")
    b.wait_ready()
    sub = Subscriber(broker=eps.control, timeout=10)
    assert sub.recv() is not None
    b.proc.send_signal(sig)
    frames = list(sub)  # ends at END, not by timeout
    assert sub.ended and sub.total is not None
    assert sub.received == sub.total - (sub.first_id or 0)
    assert all(f.frame_id < sub.total for f in frames)
    rc, out, _ = b.finish()
    assert rc == 0 and out.startswith("framebroker serve: stream 'cam'")
    sub.close()


def test_bad_flags_get_clear_errors():
    for args, needle in ((["serve", "--shape", "0x3"], "zero dimension"),
                         (["serve", "--dtype", "str"], "dtype 'str'"),
                         (["serve", "--fps", "-1"], "must be a finite number >= 0"),
                         (["serve", "--pub", "localhost:5555"], "must look like"),
                         (["serve", "--source", "webcam"], "must be 'synthetic'")):
        r = run_cli(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)


def test_port_in_use_is_a_clear_error(eps, broker_factory):
    broker_factory("--fps", "10").wait_ready()
    r = run_cli("serve", *eps.serve_args(), "--frames", "1")
    assert r.returncode == 1 and "cannot bind" in r.stderr and "Traceback" not in r.stderr


def test_non_loopback_bind_is_refused_without_insecure(eps, broker_factory):
    from conftest import free_port
    port = free_port()
    r = run_cli("serve", "--pub", f"tcp://0.0.0.0:{port}", "--control", eps.control,
                "--work", eps.work, "--frames", "1")
    assert r.returncode == 2
    assert "refusing to bind tcp://0.0.0.0" in r.stderr and "--insecure" in r.stderr
    # with --insecure it binds (only binding is tested; traffic stays on loopback)
    b = broker_factory("--pub", f"tcp://0.0.0.0:{port}", "--insecure", "--fps", "50")
    eps_reply = b.wait_ready()
    assert eps_reply["pub"] == f"tcp://127.0.0.1:{port}"  # wildcard advertised as loopback
    with Subscriber(broker=eps.control, timeout=10) as sub:
        frame = sub.recv()
        assert check_synthetic(frame.array, frame.frame_id) == -1
    Control(eps.control).stop()
    rc, _, err = b.finish()
    assert rc == 0 and "warning: --insecure" in err


def _slow_read(sub: Subscriber, delay: float) -> list[int]:
    """Frame ids of the whole stream, read ``delay`` seconds apart (a slow consumer),
    each checked against the synthetic source."""
    ids = []
    while (frame := sub.recv()) is not None:
        assert check_synthetic(frame.array, frame.frame_id) == -1
        ids.append(frame.frame_id)
        time.sleep(delay)
    return ids


def test_an_unpaced_source_makes_only_the_frames_a_lone_subscriber_takes(eps, broker_factory):
    """A flat-out source with one slow tcp subscriber and a 4-frame HWM: before, it made
    thousands of frames a second and the HWM dropped almost all of them (gaps). Now it
    makes the next frame only while fewer than 2 are on their way, so nothing is
    dropped and the waits are counted in status."""
    b = broker_factory("--frames", "150", "--wait-subscribers", "1", "--hwm", "4",
                       "--shape", "120x160x3", "--json")
    with Subscriber(broker=eps.control, timeout=30, rcvhwm=2, report_every=0) as sub:
        ids = _slow_read(sub, 0.004)
    assert ids == list(range(150)) and sub.gaps == 0 and sub.total == 150
    rc, out, _ = b.finish()
    assert rc == 0 and json.loads(out)["pub_waits"] > 0


def test_with_two_subscribers_the_slow_one_does_not_pace_the_source(eps, broker_factory):
    """Pacing is for a lone subscriber only: with two, the source is not held for the
    slow one (no waits counted), so the drop policy's promise stands: each subscriber
    has its own queue, and a slow one cannot slow the other."""
    fast = watch(eps, "--hwm", "1000")
    b = broker_factory("--frames", "1000", "--wait-subscribers", "2", "--hwm", "1000",
                       "--shape", "120x160x3", "--json", "--end-linger", "30")
    with Subscriber(broker=eps.control, timeout=30, rcvhwm=1000, report_every=0) as slow:
        ids = _slow_read(slow, 0.002)
    res = summary(fast)
    assert res["received"] == 1000 and res["gaps"] == 0 and res["corrupt"] == 0
    assert ids == list(range(1000))
    rc, out, _ = b.finish()
    assert rc == 0 and json.loads(out)["pub_waits"] == 0
