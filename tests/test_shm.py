"""The shared-memory transport with real broker processes: integrity, overwrite
detection, back-pressure for lossless consumers, and ring lifetimes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from broker import protocol as proto
from broker import shm
from broker.client import Control, Subscriber, WorkConsumer
from broker.sources import check_synthetic
from conftest import cli, make_endpoints, summary, wait_status, watch

SMALL = ("--shape", "64x80x3")


def ring_of(b) -> Path:
    return Path(b.wait_ready()["shm"]["path"])


def test_shm_and_tcp_subscribers_get_the_same_2000_intact_frames(eps, broker_factory):
    """The ring holds the whole stream, so a slow verifier loses nothing to overwrites:
    any content error is a transport bug, not a drop."""
    subs = {"shm": watch(eps, "--hwm", "2500"),
            "tcp": watch(eps, "--hwm", "2500", "--no-shm")}
    b = broker_factory("--frames", "2000", "--wait-subscribers", "2", "--hwm", "2500",
                       "--shm", "2100slots", *SMALL)
    ring = ring_of(b)
    assert ring.exists() and ring.name.startswith("framebroker-cam-")
    results = {t: summary(p) for t, p in subs.items()}
    for transport, res in results.items():
        assert res["transport"] == transport
        assert (res["received"], res["total"], res["gaps"], res["missed"]) == (2000, 2000, 0, 0)
        assert res["corrupt"] == 0 and res["overwritten"] == 0 and res["rejected"] == {}
    rc, out, _ = b.finish()
    assert rc == 0 and "sent 2000 frames" in out
    assert not ring.exists()


def test_frame_ids_match_across_transports(eps, broker_factory):
    b = broker_factory("--frames", "300", "--wait-subscribers", "2", "--hwm", "400",
                       "--shm", "400slots", *SMALL)
    b.wait_ready()
    with Subscriber(broker=eps.control, timeout=20, rcvhwm=400) as s_shm, \
            Subscriber(broker=eps.control, timeout=20, rcvhwm=400, shm=False) as s_tcp:
        assert (s_shm.transport, s_tcp.transport) == ("shm", "tcp")
        got: dict[str, list[int]] = {"shm": [], "tcp": []}
        for sub in (s_shm, s_tcp):
            for frame in sub:
                assert frame.transport == sub.transport
                assert not frame.array.flags.writeable
                assert check_synthetic(frame.array, frame.frame_id) == -1
                assert sub.confirm(frame)
                got[sub.transport].append(frame.frame_id)
        assert got["shm"] == got["tcp"] == list(range(300))
    assert b.finish()[0] == 0


def test_slow_shm_subscriber_counts_overwrites_and_never_gets_a_wrong_frame(eps, broker_factory):
    """The subscriber stops reading (holding one frame) until the broker has lapped the
    8-slot ring many times: the held frame fails the seqlock's second check, and every
    queued header names a reused slot, which must be counted, never delivered."""
    b = broker_factory("--wait-subscribers", "1", "--shm", "8slots", *SMALL)
    b.wait_ready()
    with Subscriber(broker=eps.control, timeout=20, rcvhwm=1000) as sub:
        assert sub.transport == "shm"
        skipped = 0
        while True:  # the broker runs flat out: even the first frame may be overwritten
            first = sub.recv()
            try:
                assert check_synthetic(first.copy(), first.frame_id) == -1
                break
            except shm.FrameOverwritten:
                skipped += 1
        wait_status(eps.control, lambda s: s["frames_sent"] >= first.frame_id + 100)
        Control(eps.control).stop()
        assert not first.intact()
        with pytest.raises(shm.FrameOverwritten):
            first.copy()
        assert not sub.confirm(first)
        delivered = late = 0
        for frame in sub:
            try:
                kept = frame.copy()  # rechecks the stamps: the copy is the frame's
            except shm.FrameOverwritten:  # reused while we copied (the broker may still
                late += 1                 # be finishing its last frames)
                continue
            assert check_synthetic(kept, frame.frame_id) == -1
            delivered += 1
        stats = sub.stats()
    assert stats["overwritten"] > 1 and stats["ended"]
    assert stats["received"] == delivered + late + skipped + 1 and stats["rejected"] == {}
    # every frame the ring lost was never received (the held first one was, then failed)
    assert stats["missed"] >= stats["overwritten"] - 1
    assert b.finish()[0] == 0


def test_lossless_shm_consumer_throttles_the_source_instead_of_overwriting(eps, broker_factory):
    """4 slots, a window of 4: once the consumer holds 4 frames every slot is busy, so
    the source must stall (counted) until a DONE frees one. Then every frame arrives."""
    b = broker_factory("--frames", "300", "--wait-recorders", "1", "--shm", "4slots", *SMALL)
    b.wait_ready()
    cons = WorkConsumer(broker=eps.control, group="record", window=4, acks="self")
    try:
        assert cons.transport == "shm"
        ids = []
        frame = cons.recv(timeout=20)
        wait_status(eps.control, lambda s: s["shm"]["stalls"] > 0)
        while frame is not None:
            assert frame.transport == "shm" and frame.intact()
            assert check_synthetic(frame.array, frame.frame_id) == -1
            ids.append(frame.frame_id)
            cons.done(frame.frame_id)
            frame = cons.recv(timeout=20)
        assert ids == list(range(300))
        assert cons.overwritten == 0 and dict(cons.rejected) == {}
    finally:
        cons.close()
    rc, out, _ = b.finish()
    assert rc == 0 and "sent 300 frames" in out


def test_status_shows_transports_and_the_ring(eps, broker_factory):
    b = broker_factory("--fps", "200", "--shm", "16slots", "--drain-timeout", "0.5", *SMALL)
    b.wait_ready()
    with Subscriber(broker=eps.control, timeout=10) as s_shm, \
            Subscriber(broker=eps.control, timeout=10, shm=False) as s_tcp:
        assert s_shm.recv() is not None and s_tcp.recv() is not None
        worker = WorkConsumer(broker=eps.control, group="record", window=2, acks="self")
        try:
            status = wait_status(eps.control, lambda s: s["transports"]["subscribers"] == {
                "tcp": 1, "shm": 1} and s["transports"]["workers"]["shm"] == 1)
        finally:
            worker.close()
    assert status["shm"]["slots"] == 16 and status["subscribers"] == 2
    member = next(iter(status["work"]["groups"]["record"]["members"].values()))
    assert member["transport"] == "shm"
    r = cli("status", "--broker", eps.control)
    out, _ = r.communicate(timeout=30)
    assert re.search(r"subscribers: \d+ connected \(tcp \d+, shm \d+\)", out) and "16 slots" in out
    Control(eps.control).stop()
    assert b.finish()[0] == 0


def test_sigkill_of_the_broker_leaves_a_stale_ring_the_next_broker_removes(broker_factory):
    first = broker_factory("--fps", "100", "--shm", "8slots", *SMALL,
                           endpoints=make_endpoints())
    stale = ring_of(first)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(30)
    assert stale.exists()  # nothing can unlink on SIGKILL...
    nxt = broker_factory("--fps", "100", "--shm", "8slots", *SMALL, endpoints=make_endpoints())
    fresh = ring_of(nxt)
    assert not stale.exists() and fresh.exists()  # ...the next broker of the stream does
    Control(nxt.eps.control).stop()
    rc, _, err = nxt.finish()
    assert rc == 0 and f"removed stale ring {stale}" in err
    assert not fresh.exists()


def test_sigkill_of_a_consumer_leaks_nothing(eps, broker_factory):
    b = broker_factory("--fps", "300", "--shm", "8slots", *SMALL)
    ring = ring_of(b)
    viewer = watch(eps)
    wait_status(eps.control, lambda s: s["transports"]["subscribers"]["shm"] == 1)
    viewer.send_signal(signal.SIGKILL)
    viewer.communicate(timeout=30)
    with Subscriber(broker=eps.control, timeout=10) as sub:  # still serving
        frame = sub.recv()
        assert sub.transport == "shm" and check_synthetic(frame.array, frame.frame_id) == -1
    Control(eps.control).stop()
    assert b.finish()[0] == 0
    assert not ring.exists()


def test_a_ring_that_is_not_here_falls_back_to_tcp(eps, broker_factory):
    """A client on another host sees an advert whose file does not exist or is another
    file: it must quietly take payloads instead."""
    b = broker_factory("--fps", "200", "--shm", "8slots", *SMALL)
    advert = b.wait_ready()["shm"]
    inode = proto.decode_id(advert["inode"])
    for bad in ({**advert, "inode": proto.encode_id(inode + 1)},
                {**advert, "inode": inode},  # a JSON integer: a draft broker's advert
                {**advert, "boot_id": "0" * 36},
                {**advert, "path": "/dev/shm/framebroker-elsewhere-0"}):
        with pytest.raises((OSError, proto.BadRing, proto.BadControlMessage)):
            shm.RingReader(bad)
    reader = shm.RingReader(advert)
    assert reader.info.nslots == 8 and reader.info.owner_pid == b.proc.pid
    Control(eps.control).stop()
    assert b.finish()[0] == 0


def test_bad_slot_and_wrong_size_ring_are_specific_errors(eps, broker_factory, tmp_path):
    b = broker_factory("--fps", "200", "--shm", "8slots", *SMALL)
    advert = b.wait_ready()["shm"]
    reader = shm.RingReader(advert)
    frame = np.zeros((64, 80, 3), np.uint8)
    session = proto.decode_id(advert["session"])
    for slot, err in ((8, proto.BadSlot), (2**32 - 1, proto.BadSlot)):
        h = proto.decode([proto.shm_frame_header("cam", 0, 0, frame, session, slot, 1),
                          b""])[0]
        with pytest.raises(err, match="out of range"):
            reader.view(h)
    wrong = proto.decode([proto.shm_frame_header("cam", 0, 0, frame[:, :40], session, 0, 1),
                          b""])[0]
    with pytest.raises(proto.BadRing):
        reader.view(wrong)
    with pytest.raises(proto.PayloadSizeMismatch):  # SHM_FRAME carries no payload
        proto.decode([proto.shm_frame_header("cam", 0, 0, frame, 1, 0, 1), b"x"])
    ring = Path(advert["path"])
    copy = shm.SHM_DIR / f"{shm.PREFIX}test-wrong-size-{os.getpid()}"
    try:
        copy.write_bytes(ring.read_bytes()[:-4096])
        st = copy.stat()
        with pytest.raises(proto.BadRing, match="ring file is"):
            shm.RingReader({**advert, "path": str(copy), "inode": proto.encode_id(st.st_ino),
                            "device": proto.encode_id(st.st_dev)})
    finally:
        copy.unlink()
    Control(eps.control).stop()
    assert b.finish()[0] == 0


@pytest.mark.parametrize("text,slots", [("64slots", 64), ("1MiB", 51), ("2GB", 97656)])
def test_ring_size_syntax(text, slots):
    assert shm.ring_slots(text, 20480 - 64) == slots  # 5-page slots
    for bad in ("1slots", "lots", "0.5slots", "1kB"):
        with pytest.raises(ValueError):
            shm.ring_slots(bad, 20480 - 64)


def test_pipeline_over_shm_records_and_transforms_every_frame(tmp_path):
    """``run --shm``: the FFT worker and the lossless recorder read frames from the ring
    (the broker holds each slot until they are done with it); every frame is recorded
    intact and transformed once."""
    import h5py

    from conftest import PY

    eps = make_endpoints()
    out = tmp_path / "run.h5"
    r = subprocess.run([PY, "-m", "broker.cli", "run", "--pub", eps.pub, "--work", eps.work,
                        "--control", eps.control, "--results", eps.results, "--planner",
                        "estimate", "--frames", "300", "--workers", "1", "--shape", "64x80x3",
                        "--shm", "128slots", "--record", str(out), "--json"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    for stage in ("captured", "published", "processed", "recorded"):
        assert rep["stages"][stage]["frames"] == 300, stage
    assert set(rep["transports"].values()) == {"shm"} and len(rep["transports"]) == 2
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(300))
        for i in range(300):
            assert check_synthetic(f["frames"][i], i) == -1, i


def test_bad_shm_headers_are_counted_and_the_subscriber_keeps_going(eps, broker_factory):
    """A peer that sends SHM_FRAME headers naming slots out of range, another ring's
    session or another geometry: each is rejected by reason, then a valid header for
    a slot the real broker wrote is delivered. (A fake control socket advertises the
    real ring with our own header PUB.)"""
    import threading

    import zmq

    b = broker_factory("--fps", "200", "--shm", "8slots", *SMALL)
    real = b.wait_ready()
    wait_status(eps.control, lambda s: s["frames_sent"] >= 10)
    Control(eps.control).pause()  # the slots stay as they are from now on
    wait_status(eps.control, lambda s: s["state"] == "paused")
    ctx = zmq.Context.instance()
    pub_ep = f"ipc://@framebroker-test-fake-{os.getpid()}"
    pub = ctx.socket(zmq.XPUB)
    pub.bind(pub_ep)
    rep = ctx.socket(zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    advert = {k: v for k, v in real.items() if k != "ok"}
    advert["shm"] = {**real["shm"], "pub": pub_ep}

    def serve_endpoints() -> None:
        rep.recv()
        rep.send(proto.encode_reply(True, **advert))

    t = threading.Thread(target=serve_endpoints)
    t.start()
    sub = Subscriber(broker=f"tcp://127.0.0.1:{port}", timeout=10)
    t.join()
    try:
        assert sub.transport == "shm"
        pub.recv()  # the subscription arrived: what we send now reaches it
        reader = shm.RingReader(real["shm"])
        slot = 3
        fid = int(reader.heads[slot, 2])
        frame = np.zeros((64, 80, 3), np.uint8)
        session = proto.decode_id(real["session"])
        bad = [proto.shm_frame_header("cam", fid, 0, frame, session, 8, fid + 1),
               proto.shm_frame_header("cam", fid, 0, frame, session + 1, slot, fid + 1),
               proto.shm_frame_header("cam", fid, 0, frame[:32], session, slot, fid + 1)]
        for h in bad:
            pub.send_multipart([b"cam", h, b""])
        pub.send_multipart([b"cam", proto.shm_frame_header("cam", fid, 0, frame, session, slot,
                                                           fid + 2), b""])  # stale stamp
        pub.send_multipart([b"cam", proto.shm_frame_header("cam", fid, 0, frame, session, slot,
                                                           fid + 1), b""])
        got = sub.recv()
        assert got.frame_id == fid and check_synthetic(got.array, fid) == -1 and got.intact()
        assert dict(sub.rejected) == {"bad_slot": 1, "bad_ring": 2}
        assert sub.overwritten == 1
    finally:
        sub.close()
        pub.close(linger=0)
        rep.close(linger=0)
    Control(eps.control).stop()
    assert b.finish()[0] == 0
