"""``framebroker run``: the whole pipeline as one command, its summary and its failures."""
from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from broker.sources import check_synthetic
from conftest import PY, acked, kill_holding_frames, make_endpoints, wait_status


def run_args(eps, *args: str) -> list[str]:
    return [PY, "-m", "broker.cli", "run", "--pub", eps.pub, "--work", eps.work,
            "--control", eps.control, "--results", eps.results, "--planner", "estimate", *args]


def test_run_500_frames_with_recording(tmp_path):
    eps = make_endpoints()
    out = tmp_path / "run.h5"
    r = subprocess.run(run_args(eps, "--frames", "500", "--record", str(out), "--json"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    for stage in ("captured", "published", "processed", "recorded"):
        assert rep["stages"][stage]["frames"] == 500, stage
    assert rep["dropped"] == {"processing": 0, "recording": 0, "recorder_queue": 0}
    assert rep["gaps"] == {"sink": 0, "recorder": 0}
    assert rep["ok"] is True and rep["failed"] == []
    assert sum(rep["per_worker"].values()) == 500
    assert all(v is not None and v > 0 for v in rep["cpu_s"].values())
    assert 0 < rep["first_result_s"] < rep["seconds"] + 60
    with h5py.File(out) as f:
        ids = f["frame_id"][:]
        np.testing.assert_array_equal(ids, np.arange(500))
        frames = f["frames"]
        assert frames.shape == (500, 480, 640, 3)
        for i in range(500):
            assert check_synthetic(frames[i], i) == -1, i


def test_run_plain_summary_on_defaults():
    eps = make_endpoints()
    r = subprocess.run(run_args(eps, "--frames", "300"), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert "-> OK" in r.stdout
    lines = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[2:6]}
    assert lines["published"][1] == "300" and lines["processed"][1] == "300"
    startup = next(ln for ln in r.stdout.splitlines() if "start-up:" in ln).split()
    assert startup[-5:] == ["s", "to", "the", "first", "result"] and float(startup[-6]) > 0


def _children(proc: subprocess.Popen, subcommand: str | None, n: int,
              timeout: float = 60) -> list:
    """The run's child processes (``python -m broker.cli SUBCOMMAND ...``)."""
    deadline = time.monotonic() + timeout
    while True:
        kids = [c for c in psutil.Process(proc.pid).children(recursive=True)
                if c.cmdline()[1:3] == ["-m", "broker.cli"]
                and subcommand in (None, c.cmdline()[3])]
        if len(kids) >= n or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def test_worker_killed_during_run_every_frame_still_processed():
    eps = make_endpoints()
    proc = subprocess.Popen(run_args(eps, "--frames", "3000", "--workers", "2", "--json",
                                     "--shape", "240x320x3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = _children(proc, "worker", 2)
    wait_status(eps.control, acked("fft", 300))
    kill_holding_frames(eps.control, workers[0].pid)
    out, err = proc.communicate(timeout=180)
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["stages"]["processed"]["frames"] == 3000, err
    assert rep["gaps"]["sink"] == 0 and rep["dropped"]["processing"] == 0
    assert rep["redispatched"] >= 1 and rep["dead_workers"] == 1
    assert [f["part"] for f in rep["failed"]] == ["worker1"]
    assert proc.returncode == 1  # a part failed, even though nothing was lost


def test_recorder_that_cannot_write_stops_the_run(tmp_path):
    eps = make_endpoints()
    bad = tmp_path / "no" / "such" / "dir" / "run.h5"
    r = subprocess.run(run_args(eps, "--frames", "200", "--record", str(bad), "--json"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""  # refused before any part started
    assert r.stderr.strip() == f"framebroker run: error: {bad}: directory {bad.parent} does not exist"


def _workdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("framebroker-run-*")}


def test_sigint_stops_every_part_cleanly(tmp_path):
    eps = make_endpoints()
    before = _workdirs()
    proc = subprocess.Popen(run_args(eps, "--seconds", "60", "--fps", "200", "--record",
                                     str(tmp_path / "r.h5")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = _children(proc, None, 5)
    assert len(kids) == 5  # broker, sink, 2 workers, recorder
    wait_status(eps.control, lambda st: st["frames_sent"] > 50)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "interrupted by Ctrl-C: stopped cleanly" in out, (out, err)
    assert "-> OK" in out
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    with h5py.File(tmp_path / "r.h5") as f:
        n = len(f["frame_id"])
        assert n > 50
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
    assert _workdirs() <= before  # its temporary directory is gone


def test_config_file_holds_flags_and_flags_override_it(tmp_path):
    eps = make_endpoints()
    cfg = tmp_path / "run.toml"
    cfg.write_text('frames = 120\nworkers = 1\nfft-output = "radial"\nshape = "60x80"\n')
    r = subprocess.run(run_args(eps, "--config", str(cfg), "--frames", "150", "--json"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["stages"]["processed"]["frames"] == 150  # the flag wins over the file
    assert rep["stream"]["shape"] == [60, 80] and len(rep["per_worker"]) == 1
    cfg.write_text("frames = 10\ncolour = 'gray'\n")
    r = subprocess.run(run_args(eps, "--config", str(cfg)), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown key 'colour'" in r.stderr


def test_run_refuses_to_join_a_broker_already_running(eps, broker_factory):
    broker_factory("--fps", "10", "--shape", "60x80").wait_ready()
    r = subprocess.run(run_args(eps, "--frames", "50"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert f"a broker is already running at {eps.control}" in r.stderr


def test_a_broker_that_cannot_start_ends_the_run_with_its_error():
    import zmq
    eps = make_endpoints()
    squatter = zmq.Context.instance().socket(zmq.PULL)
    squatter.bind(eps.pub)  # the broker's PUB address is taken
    r = subprocess.run(run_args(eps, "--frames", "50", "--json"), capture_output=True,
                       text=True, timeout=60)
    squatter.close(linger=0)
    assert r.returncode == 1
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert [f["part"] for f in rep["failed"]] == ["broker"]  # the others were only stopped
    assert f"cannot bind {eps.pub}" in rep["failed"][0]["stderr"]
    assert rep["stages"]["published"]["frames"] == 0
