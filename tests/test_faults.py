"""Faults: a broker restarted under running consumers, and drop counts in its status."""
from __future__ import annotations

import signal
import time

import h5py
import numpy as np
import pytest

from broker import protocol as proto
from broker.broker import MAX_REPORTING_CLIENTS
from broker.client import Control, Subscriber, block_group, subscribe
from broker.sources import check_synthetic, synthetic_frame
from conftest import acked, cli, free_port, run_cli, summary, wait_status

SHAPE = (64, 80)


def test_latest_subscriber_drops_show_in_the_broker_status(eps, broker_factory):
    """The broker cannot see a subscriber's drops (they happen in its own queue), so the
    subscriber reports them; status must show exactly the subscriber's own counts."""
    broker_factory("--fps", "500", "--shape", "64x80")
    sub = Subscriber(broker=eps.control, policy="latest:1", name="slow-viewer",
                     report_every=0.2, timeout=10)
    got = []
    while len(got) < 20:
        frame = sub.recv()
        assert check_synthetic(frame.array, frame.frame_id) == -1
        got.append(frame.frame_id)
        time.sleep(0.03)  # slower than the stream: the latest:1 queue drops
    live = wait_status(eps.control, lambda s: s["consumers"].get("slow-viewer", {})
                       .get("dropped", 0) > 0)
    assert live["consumers"]["slow-viewer"]["policy"] == "latest:1"
    sub.close()  # sends a last report
    final = sub.report()
    assert final["dropped"] > 0 and final["received"] >= 20
    status = Control(eps.control).status()
    shown = status["consumers"]["slow-viewer"]
    assert {k: shown[k] for k in final if k != "client"} == \
        {k: v for k, v in final.items() if k != "client"}


def test_bad_reports_are_refused_and_the_table_is_bounded(eps, broker_factory):
    b = broker_factory("--fps", "50", "--shape", "64x80")
    b.wait_ready()
    ctl = Control(eps.control, timeout=5)
    good = {"client": "x", "policy": "drop", "received": 1, "dropped": 0, "gaps": 0,
            "rejected": 0, "sessions": 1}
    bad = [{**good, "received": -1}, {**good, "gaps": True}, {**good, "client": ""},
           {**good, "client": "n" * 65}, {**good, "policy": 7},
           {k: v for k, v in good.items() if k != "sessions"}, {**good, "extra": 1},
           {**good, "dropped": 2**64}, {**good, "client": "bell\x07"}]
    for report in bad:
        with pytest.raises(RuntimeError, match="report"):
            ctl.request("report", **report)
    for k in range(MAX_REPORTING_CLIENTS + 40):
        ctl.request("report", **{**good, "client": f"c{k}"})
    status = ctl.status()
    assert len(status["consumers"]) == MAX_REPORTING_CLIENTS
    assert "c0" not in status["consumers"] and f"c{MAX_REPORTING_CLIENTS + 39}" in \
        status["consumers"]
    # 2**64 does not fit 64 signed bits: refused by the JSON decoder itself
    assert status["control_rejected"] == {"bad_control": len(bad) - 1, "json_number": 1}
    assert status["frames_sent"] > 0 and ctl.request("status")["state"] == "streaming"
    ctl.close()


def test_broker_restart_subscriber_worker_and_sink_carry_on(eps, broker_factory, tmp_path):
    """SIGKILL the broker mid-stream and start a new one on the same endpoints: the
    subscriber, the worker and the sink stay up, join the new session by themselves,
    report where the old one stopped and what of the new one they missed, and finish
    with the new session's END."""
    out = tmp_path / "results.h5"
    first = broker_factory("--fps", "200", "--shape", "64x80", "--wait-workers", "1")
    watch = cli("watch", "--broker", eps.control, "--verify", "--json", "--progress", "0",
                "--timeout", "60", "--hwm", "5000")
    worker = cli("worker", "--broker", eps.control, "--json", "--planner", "estimate",
                 "--fft-output", "spectrum", "--timeout", "60")
    sink = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "60")
    old = wait_status(eps.control, acked("fft", 100))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.communicate()

    second = broker_factory("--fps", "200", "--shape", "64x80", "--wait-workers", "1",
                            "--frames", "300")
    new = second.wait_ready()
    assert new["session"] != old["session"]

    w = summary(watch, ok=(0, 3))  # 3: frames were lost (the restart) and said so
    assert w["sessions"] == 2 and w["corrupt"] == 0 and w["rejected"] == {}
    (restart,) = w["restarts"]
    assert (restart["old_session"], restart["new_session"]) == (old["session"], new["session"])
    assert restart["last_id"] >= old["frames_sent"] - 1
    # the only ids missed are those of the new session sent before the subscriber was back
    assert w["gaps"] == restart["first_id"] and w["missed"] == restart["first_id"]
    assert w["total"] == 300 and w["ended"] is True

    s = summary(sink)
    wk = summary(worker)
    assert second.finish()[0] == 0
    assert wk["ended"] is True
    with h5py.File(out) as f:
        ids, spectra = f["frame_id"][:], f["result"][:]
    # session 1 in order up to where the broker died, then all of session 2 (the new broker
    # waited for the worker, so it dispatched every frame), each spectrum right
    restart_at = int(np.flatnonzero(np.diff(ids.astype(np.int64)) < 0)[0]) + 1
    np.testing.assert_array_equal(ids[:restart_at], np.arange(restart_at))
    np.testing.assert_array_equal(ids[restart_at:], np.arange(300))
    assert restart_at > 100 and s["total"] == 300
    for k in (0, restart_at - 1, restart_at, len(ids) - 1):
        ref = np.fft.rfft2(synthetic_frame(SHAPE, "uint8", int(ids[k])).astype(np.float64))
        np.testing.assert_allclose(spectra[k], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_report_is_a_known_command_with_validated_arguments():
    """The wire-level check the broker uses (no process needed)."""
    req = proto.decode_request(proto.encode_request(
        "report", client="a", policy="drop", received=3, dropped=1, gaps=0, rejected=0,
        sessions=1))
    assert proto.validate_report(req)["received"] == 3
    with pytest.raises(proto.BadControlMessage, match="received"):
        proto.validate_report({**req, "received": 1.5})


def test_a_dead_lossless_recorder_holds_the_source_only_until_its_group_dissolves(
        eps, broker_factory, tmp_path):
    """SIGKILL the only lossless recorder: the broker holds its frames (it may come back)
    for --orphan-timeout, then abandons them and the stream runs on for the subscriber;
    a recorder started later records every frame from where it joined."""
    b = broker_factory("--fps", "600", "--frames", "3000", "--shape", "64x80",
                       "--wait-recorders", "1", "--wait-subscribers", "1",
                       "--worker-timeout", "0.5", "--orphan-timeout", "1", "--hwm", "5000")
    watch = cli("watch", "--broker", eps.control, "--verify", "--json", "--progress", "0",
                "--timeout", "60", "--hwm", "5000")
    first = cli("record", "--out", str(tmp_path / "a.h5"), "--broker", eps.control, "--json")
    wait_status(eps.control, acked("record", 50))
    first.send_signal(signal.SIGKILL)
    first.communicate()
    gone = wait_status(eps.control, lambda s: "record" in s["work"]["dissolved"])
    assert gone["work"]["dissolved"]["record"] > 0 and "record" not in gone["work"]["groups"]
    wait_status(eps.control, lambda s: s["frames_sent"] > gone["frames_sent"] + 100)

    second = cli("record", "--out", str(tmp_path / "b.h5"), "--broker", eps.control, "--json")
    rec = summary(second)
    w = summary(watch)
    assert b.finish()[0] == 0
    assert (w["received"], w["gaps"], w["corrupt"], w["total"]) == (3000, 0, 0, 3000)
    with h5py.File(tmp_path / "b.h5") as f:
        ids = f["frame_id"][:]
        assert len(ids) == rec["frames_written"] > 100 and ids[-1] == 2999
        np.testing.assert_array_equal(ids, np.arange(ids[0], 3000))
        for k in range(0, len(ids), 97):
            assert check_synthetic(f["frames"][k], int(ids[k])) == -1


def test_block_policy_gets_every_frame_and_slows_the_source_instead(eps, broker_factory):
    """A blocking subscriber slower than an unpaced source: nothing dropped, every frame
    right, and the broker's source waited for it (back-pressure, not loss)."""
    b = broker_factory("--frames", "400", "--shape", "64x80", "--wait-subscribers", "2",
                       "--max-pending", "16")
    b.wait_ready()
    cli_sub = cli("watch", "--broker", eps.control, "--verify", "--json", "--progress", "0",
                  "--timeout", "30", "--policy", "block", "--name", "cli-block")
    with subscribe("block", broker=eps.control, name="Slow Block", timeout=30,
                   report_every=0.2) as sub:
        ids = []
        for frame in sub:
            assert check_synthetic(frame.array, frame.frame_id) == -1
            ids.append(frame.frame_id)
            time.sleep(0.002)
            if frame.frame_id == 200:
                status = Control(eps.control).status()
                assert status["backpressure_waits"] > 0  # the source waited for us
                assert status["work"]["groups"]["sub-slow-block"]["members"]
        final = sub.report()
    assert ids == list(range(400))
    assert final["dropped"] == 0 and final["gaps"] == 0 and final["policy"] == "block"
    w = summary(cli_sub)
    assert w["policy"] == "block" and w["corrupt"] == 0 and w["gaps"] == 0
    rc, out, err = b.finish()
    assert rc == 0, err


def test_block_group_names_are_valid_groups():
    assert block_group("Slow Block") == "sub-slow-block"
    assert len(block_group("x" * 100)) == 32
    assert proto.decode_ready(proto.encode_ready(proto.Ready(
        block_group("ÄÖ/ü"), 4, "self", "n", "consumer"))).group == "sub-----"


def test_sink_killed_and_replaced_the_new_one_gets_everything_the_old_did_not_ack(
        eps, broker_factory, tmp_path):
    """SIGKILL the sink mid-stream: workers carry on, the source waits once --max-pending
    results are unacknowledged (a subscriber beside it loses nothing), and a new sink is
    sent every frame from the oldest one its predecessor had not acknowledged, in order."""
    b = broker_factory("--fps", "500", "--frames", "1500", "--shape", "64x80",
                       "--wait-workers", "2", "--hwm", "5000", "--wait-subscribers", "1")
    watch = cli("watch", "--broker", eps.control, "--verify", "--json", "--progress", "0",
                "--timeout", "60", "--hwm", "5000")
    workers = [cli("worker", "--broker", eps.control, "--json", "--planner", "estimate",
                   "--fft-output", "spectrum", "--timeout", "60") for _ in range(2)]
    first = cli("sink", "--broker", eps.control, "--json", "--timeout", "60")
    wait_status(eps.control, acked("fft", 200))
    first.send_signal(signal.SIGKILL)
    first.communicate()
    stalled = wait_status(eps.control, lambda s: s["work"]["groups"]["fft"]["ackers"] == 0)
    out = tmp_path / "second.h5"
    second = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "60")
    res = summary(second)
    assert (res["total"], res["gaps"], res["late"]) == (1500, 0, 0)
    with h5py.File(out) as f:
        ids, spectra = f["frame_id"][:], f["result"][:]
    start = int(ids[0])
    assert start <= stalled["work"]["groups"]["fft"]["acked"] + 64  # what the first had not acked
    np.testing.assert_array_equal(ids, np.arange(start, 1500))
    for k in (0, len(ids) // 2, len(ids) - 1):
        ref = np.fft.rfft2(synthetic_frame(SHAPE, "uint8", int(ids[k])).astype(np.float64))
        np.testing.assert_allclose(spectra[k], ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    w = summary(watch)
    assert (w["received"], w["gaps"], w["corrupt"]) == (1500, 0, 0)
    for wk in workers:
        assert summary(wk)["ended"] is True
    assert b.finish()[0] == 0


def test_new_flags_refuse_what_they_cannot_do(eps, broker_factory):
    """One line and exit 2 each: a results PUB on a network address without CURVE, and
    --policy block with flags that only mean something on PUB."""
    broker_factory("--fps", "50", "--shape", "64x80").wait_ready()
    r = run_cli("sink", "--broker", eps.control, "--publish", "tcp://0.0.0.0:5999")
    assert r.returncode == 2 and "refusing to publish results on tcp://0.0.0.0:5999" in r.stderr
    r = run_cli("watch", "--broker", eps.control, "--policy", "block", "--pub", eps.pub)
    assert r.returncode == 2 and "--pub and --stream do not apply" in r.stderr
    for r in (run_cli("watch", "--policy", "latest:0"), run_cli("watch", "--name", "a\x07")):
        assert r.returncode == 2 and "Traceback" not in r.stderr
    assert Control(eps.control).status()["state"] == "streaming"  # the broker never noticed


def test_a_results_pub_that_cannot_bind_is_a_clear_error(eps, broker_factory):
    broker_factory("--fps", "50", "--shape", "64x80").wait_ready()
    busy = f"tcp://127.0.0.1:{free_port()}"
    first = cli("sink", "--broker", eps.control, "--publish", busy, "--timeout", "30")
    wait_status(eps.control, lambda s: s["work"]["groups"].get("fft", {}).get("ackers", 0))
    r = run_cli("sink", "--broker", eps.control, "--results", f"tcp://127.0.0.1:{free_port()}",
                "--publish", busy)
    first.kill()
    first.communicate()
    assert r.returncode == 1 and f"cannot bind the results PUB {busy}" in r.stderr, r.stderr
