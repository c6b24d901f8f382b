"""The FFT pipeline as real processes: broker -> workers -> sink, in order, nothing lost."""
from __future__ import annotations

import time

import h5py
import numpy as np
import zmq

from broker import protocol as proto
from broker.client import Control
from broker.sources import synthetic_frame
from conftest import cli, kill_holding_frames, make_endpoints, wait_status
from conftest import summary as done

SHAPE = (64, 80)


def worker(eps, *args: str):
    return cli("worker", "--broker", eps.control, "--json", "--planner", "estimate", *args)


def sink(eps, *args: str):
    return cli("sink", "--broker", eps.control, "--json", *args)


def check_results_file(path, n: int) -> None:
    """Every frame id once, in order, each spectrum equal to numpy's rfft2 of the frame."""
    with h5py.File(path) as f:
        ids, spectra = f["frame_id"][:], f["result"][:]
    np.testing.assert_array_equal(ids, np.arange(n))
    assert spectra.shape == (n, SHAPE[0], SHAPE[1] // 2 + 1)
    for fid in range(0, n, max(1, n // 100)):
        ref = np.fft.rfft2(synthetic_frame(SHAPE, "uint8", fid).astype(np.float64))
        np.testing.assert_allclose(spectra[fid], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_three_workers_2000_frames_every_id_once_in_order(eps, broker_factory, tmp_path):
    out = tmp_path / "results.h5"
    b = broker_factory("--frames", "2000", "--wait-workers", "3", "--shape", "64x80")
    workers = [worker(eps, "--fft-output", "spectrum") for _ in range(3)]
    s = sink(eps, "--out", str(out))
    res = done(s)
    assert (res["frames"], res["total"], res["gaps"], res["late"]) == (2000, 2000, 0, 0)
    assert res["rejected"] == {}
    assert sum(res["per_worker"].values()) == 2000 and len(res["per_worker"]) == 3
    for w in workers:
        assert done(w)["ended"] is True
    assert b.finish()[0] == 0
    check_results_file(out, 2000)


def test_sigkill_of_a_worker_mid_run_loses_nothing(eps, broker_factory, tmp_path):
    out = tmp_path / "results.h5"
    b = broker_factory("--frames", "3000", "--wait-workers", "3", "--shape", "64x80",
                       "--worker-timeout", "1")
    workers = [worker(eps, "--fft-output", "spectrum") for _ in range(3)]
    s = sink(eps, "--out", str(out))
    wait_status(eps.control, lambda st: st["frames_sent"] >= 500)
    kill_holding_frames(eps.control, workers[0].pid)
    workers[0].communicate()
    status = wait_status(eps.control,
                         lambda st: st["work"]["groups"]["fft"]["dead_consumers"] > 0)
    fft = status["work"]["groups"]["fft"]
    assert fft["redispatched"] >= 1 and fft["dead_consumers"] == 1
    res = done(s)
    assert (res["frames"], res["total"], res["gaps"]) == (3000, 3000, 0)
    for w in workers[1:]:
        assert done(w)["ended"] is True
    rc, stdout, _ = b.finish()
    assert rc == 0 and "re-dispatched 0" not in stdout
    check_results_file(out, 3000)


def test_start_order_workers_first_then_broker_then_sink_last(eps, broker_factory, tmp_path):
    out = tmp_path / "results.h5"
    workers = [worker(eps, "--fft-output", "spectrum") for _ in range(2)]
    time.sleep(0.5)  # the workers are really first: they wait for the broker
    b = broker_factory("--frames", "400", "--wait-workers", "2", "--shape", "64x80")
    b.wait_ready()
    time.sleep(0.5)  # a sink that comes late: the stream waits for it (--wait-workers)
    assert Control(eps.control).status()["frames_sent"] == 0
    s = sink(eps, "--out", str(out))
    res = done(s)
    # nothing was finished before the sink joined, so nothing was dispatched twice
    assert (res["frames"], res["gaps"], res["duplicates"]) == (400, 0, 0)
    for w in workers:
        done(w)
    assert b.finish()[0] == 0
    check_results_file(out, 400)


def test_sink_first_then_workers_then_broker(eps, broker_factory, tmp_path):
    out = tmp_path / "results.h5"
    s = sink(eps, "--out", str(out), "--results", eps.results)
    workers = [worker(eps, "--fft-output", "spectrum") for _ in range(2)]
    b = broker_factory("--frames", "300", "--wait-workers", "2", "--shape", "64x80")
    res = done(s)
    assert (res["frames"], res["gaps"]) == (300, 0)
    for w in workers:
        done(w)
    assert b.finish()[0] == 0
    check_results_file(out, 300)


def test_restarted_worker_plans_from_wisdom(eps, broker_factory, tmp_path):
    wisdom = tmp_path / "wisdom"
    plans = []
    for _ in range(2):
        e = make_endpoints()
        b = broker_factory("--frames", "20", "--wait-workers", "1", "--shape", "96x128",
                           endpoints=e)
        w = cli("worker", "--broker", e.control, "--json", "--planner", "measure",
                "--wisdom", str(wisdom), "--no-sink")
        plans.append(done(w)["plans"][0])
        assert b.finish()[0] == 0
    first, second = plans
    assert (first["wisdom_imported"], first["wisdom_had_plan"], first["wisdom_saved"]) == (
        False, False, True)
    assert (second["wisdom_imported"], second["wisdom_had_plan"]) == (True, True)
    assert second["wisdom_error"] is None


def test_malformed_results_are_rejected_and_the_sink_keeps_going(eps, broker_factory):
    b = broker_factory("--frames", "200", "--wait-workers", "1", "--shape", "64x80")
    s = sink(eps, "--results", eps.results)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.IMMEDIATE, 1)  # sends wait for the sink's bind: delivered before
    push.connect(eps.results)          # the worker (started below) can make the first result
    frame = synthetic_frame(SHAPE, "uint8", 0)
    garbage = [
        [b"garbage"],
        [b"FBRK" + b"\0" * 80, b""],
        [proto.frame_header("cam", 0, 0, frame), frame.tobytes()],  # a FRAME, not a RESULT
        [proto.result_header("cam", 5, 0, np.zeros(3, np.float32), proto.Output.PEAK, 1, 1),
         b"\0" * 11],
    ]
    for parts in garbage:
        push.send_multipart(parts)
    w = worker(eps)
    res = done(s)
    assert (res["frames"], res["gaps"]) == (200, 0)
    assert sum(res["rejected"].values()) == len(garbage)
    assert set(res["rejected"]) == {"part_count", "unsupported_version", "unknown_kind",
                                    "payload_size"}
    done(w)
    assert b.finish()[0] == 0
    push.close(linger=0)


def test_sink_on_a_busy_results_port_is_a_clear_error(eps, broker_factory):
    broker_factory("--fps", "10", "--shape", "64x80").wait_ready()
    blocker = zmq.Context.instance().socket(zmq.PULL)
    blocker.bind(eps.results)
    from conftest import run_cli
    r = run_cli("sink", "--broker", eps.control, "--timeout", "5")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot bind the results endpoint {eps.results}" in r.stderr
    blocker.close(linger=0)
