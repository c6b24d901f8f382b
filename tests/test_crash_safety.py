"""Nothing acknowledged is lost, nothing spoofed is taken: the sink and the recorder
against hostile peers, SIGKILL, stop signals and a full disk, and what ``run`` says
when one of its parts dies (all real processes, real files)."""
from __future__ import annotations

import hashlib
import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from broker import protocol as proto
from broker.recorder import RecorderError, recover
from broker.run import format_report
from broker.sources import check_synthetic, synthetic_frame
from conftest import acked, cli, free_port, make_endpoints, run_cli, summary, wait_status
from test_run import _children, run_args

SHAPE = (64, 80)


def worker(eps, *args: str):
    return cli("worker", "--broker", eps.control, "--json", "--planner", "estimate",
               "--fft-output", "spectrum", "--timeout", "60", *args)


def session_id(value: int | str) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def read_results(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What a sink's .h5 file holds, read as documented (SWMR, the first
    /valid_results rows), so it works while the file is written or after a kill."""
    with h5py.File(path, "r", swmr=True) as f:
        n = int(f["valid_results"][()])
        return f["frame_id"][:n], f["result"][:n]


def stop(broker) -> None:
    """SIGTERM, so the broker ends its stream and exits by itself (no SIGKILL left to
    the fixture: nothing for it to clean up after)."""
    broker.proc.terminate()
    broker.proc.communicate(timeout=60)


def check_spectra(ids: np.ndarray, spectra: np.ndarray, every: int = 1) -> None:
    """Each row equals numpy's rfft2 of the synthetic frame its id names."""
    assert len(ids) == len(spectra)
    for k in range(0, len(ids), every):
        ref = np.fft.rfft2(synthetic_frame(SHAPE, "uint8", int(ids[k])).astype(np.float64))
        np.testing.assert_allclose(spectra[k], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


# --- spoofed results (issue 11, case 3) -------------------------------------------------

def _hostile(results_ep: str, session: int, stop: threading.Event, sent: dict) -> None:
    """A raw pyzmq peer pushing RESULTs the sink must refuse: another session (with ids
    the real stream uses, and 2**40), and the real session far past the window."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100)
    push.connect(results_ep)
    fake = np.zeros((SHAPE[0], SHAPE[1] // 2 + 1), np.complex64)
    while not stop.is_set():
        for fid, sess in [(2 ** 40, session ^ 1), (5, session ^ 1), (300, session + 7),
                          (2 ** 40, session), *((10 ** 6 + k, session) for k in range(1025))]:
            header = proto.result_header("cam", fid, time.time_ns(), fake, proto.Output.SPECTRUM,
                                         666, 1, session=sess)
            try:
                push.send_multipart([header, fake], flags=zmq.NOBLOCK)
                sent["n"] += 1
            except zmq.Again:
                time.sleep(0.01)
        time.sleep(0.02)
    push.close(linger=0)
    ctx.term()


def test_spoofed_results_are_counted_rejects_and_change_nothing(eps, broker_factory, tmp_path):
    """A hostile peer pushes results of another session (one with frame id 2**40, others
    with ids the stream really uses) and of the real session far past the window, the
    whole time: every real result still arrives, once, in order, equal to numpy; the
    spoofed ones are counted rejects; the log stays short."""
    out = tmp_path / "results.h5"
    b = broker_factory("--frames", "800", "--fps", "300", "--shape", "64x80",
                       "--wait-workers", "1")
    w = worker(eps)
    s = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "60")
    st = wait_status(eps.control, acked("fft", 20))
    stop, sent = threading.Event(), {"n": 0}
    t = threading.Thread(target=_hostile, args=(eps.results, session_id(st["session"]), stop,
                                                sent))
    t.start()
    try:
        out_s, err = s.communicate(timeout=180)
    finally:
        stop.set()
        t.join()
    assert s.returncode == 0, err
    res = json.loads(out_s.strip().splitlines()[-1])
    assert (res["frames"], res["total"], res["gaps"], res["duplicates"]) == (800, 800, 0, 0)
    assert set(res["rejected"]) == {"foreign_session", "out_of_window"}
    assert 0 < sum(res["rejected"].values()) <= sent["n"] and "666" not in res["per_worker"]
    assert len(err.splitlines()) < 20, err  # one line per reason, not one per message
    with h5py.File(out) as f:
        ids, spectra = f["frame_id"][:], f["result"][:]
    np.testing.assert_array_equal(ids, np.arange(800))
    check_spectra(ids, spectra, every=7)
    assert summary(w)["ended"] is True and b.finish()[0] == 0


def test_sink_results_bind_follows_the_exposure_rule():
    """``sink --results`` on a network address is refused without CURVE, like serve's
    binds; --insecure allows it with a warning."""
    port = free_port()
    r = run_cli("sink", "--results", f"tcp://0.0.0.0:{port}", "--timeout", "1")
    assert r.returncode == 2 and f"refusing to bind tcp://0.0.0.0:{port}" in r.stderr
    r = run_cli("sink", "--broker", f"tcp://127.0.0.1:{free_port()}", "--results",
                f"tcp://0.0.0.0:{port}", "--insecure", "--timeout", "1")
    assert "framebroker sink: warning: --insecure" in r.stderr and r.returncode == 1


# --- the sink's file (case 5) -------------------------------------------------------------

def test_killed_sink_and_its_replacement_hold_every_acknowledged_result(
        eps, broker_factory, tmp_path):
    """SIGKILL a sink writing --out mid-stream: its file opens (SWMR) and holds at least
    every result the broker counted as acknowledged, in order; a second sink gets the
    rest; the two files together hold every id, each spectrum right, and the second
    reports no gap it did not have."""
    b = broker_factory("--fps", "400", "--frames", "1500", "--shape", "64x80",
                       "--wait-workers", "2")
    workers = [worker(eps) for _ in range(2)]
    first_out, second_out = tmp_path / "first.h5", tmp_path / "second.h5"
    first = cli("sink", "--broker", eps.control, "--json", "--out", str(first_out),
                "--timeout", "60")
    wait_status(eps.control, acked("fft", 300))
    first.send_signal(signal.SIGKILL)
    first.communicate()
    stalled = wait_status(eps.control, lambda s: s["work"]["groups"]["fft"]["ackers"] == 0)
    acked_by_first = stalled["work"]["groups"]["fft"]["acked"]
    ids1, spectra1 = read_results(first_out)
    assert len(ids1) >= acked_by_first > 300
    np.testing.assert_array_equal(ids1, np.arange(len(ids1)))
    check_spectra(ids1, spectra1, every=11)

    second = cli("sink", "--broker", eps.control, "--json", "--out", str(second_out),
                 "--timeout", "60")
    res = summary(second)
    assert (res["total"], res["gaps"]) == (1500, 0)
    with h5py.File(second_out) as f:  # closed normally: plain h5py, trimmed
        ids2, spectra2 = f["frame_id"][:], f["result"][:]
        assert f.attrs["complete"] == 1 and f["valid_results"][()] == len(ids2)
    assert ids2[0] <= acked_by_first and res["frames"] == len(ids2)
    np.testing.assert_array_equal(ids2, np.arange(ids2[0], 1500))
    check_spectra(ids2, spectra2, every=11)
    assert set(ids1.tolist()) | set(ids2.tolist()) == set(range(1500))
    for wk in workers:
        assert summary(wk)["ended"] is True
    assert b.finish()[0] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_close_the_sink_file(eps, broker_factory, tmp_path, sig):
    """kill -TERM / -HUP / Ctrl-C: the sink writes what it holds, closes the file (plain
    h5py opens it) and prints its summary; every result in it is right."""
    out = tmp_path / "results.h5"
    b = broker_factory("--fps", "200", "--shape", "64x80", "--wait-workers", "1")
    w = worker(eps)
    s = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "60")
    wait_status(eps.control, acked("fft", 100))
    s.send_signal(sig)
    res = summary(s)  # a stop signal is a clean end: status 0
    assert res["stopped_by"] == signal.Signals(sig).name
    with h5py.File(out) as f:
        ids, spectra = f["frame_id"][:], f["result"][:]
        assert f.attrs["complete"] == 1
    assert len(ids) == res["frames"] == res["saved"] >= 100
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    check_spectra(ids, spectra, every=13)
    w.kill()
    w.communicate()
    stop(b)


def _fsize(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_stops_the_sink_at_once_and_keeps_what_it_acknowledged(
        eps, broker_factory, tmp_path):
    """Under RLIMIT_FSIZE the sink's writes fail (EFBIG, as on a full disk): it exits at
    once with a clear error; the file opens (SWMR) with every result up to its last
    flush; the broker never saw an acknowledgement for a result that is not in it."""
    out = tmp_path / "results.h5"
    b = broker_factory("--fps", "200", "--shape", "64x80", "--wait-workers", "1")
    w = worker(eps)
    s = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "60",
            preexec_fn=_fsize(3_000_000))  # ~140 results of 64x41 complex64, > max-pending
    _, err = s.communicate(timeout=120)
    assert s.returncode == 1, err
    assert "File too large" in err and str(out) in err and "Traceback" not in err
    st = wait_status(eps.control, lambda s: s["work"]["groups"]["fft"]["ackers"] == 0)
    ids, spectra = read_results(out)
    assert len(ids) >= st["work"]["groups"]["fft"]["acked"] and len(ids) > 0
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    check_spectra(ids, spectra)
    w.kill()
    w.communicate()
    stop(b)


@pytest.mark.parametrize("suffix", [".h5", ".npy"])
def test_sink_refuses_to_overwrite_its_out_file(tmp_path, suffix):
    out = tmp_path / f"old{suffix}"
    out.write_bytes(b"precious")
    r = run_cli("sink", "--broker", f"tcp://127.0.0.1:{free_port()}", "--out", str(out),
                "--timeout", "1")
    assert r.returncode == 1 and "exists; pass --overwrite to replace it" in r.stderr
    assert out.read_bytes() == b"precious"


def test_npy_out_is_readable_after_sigkill(eps, broker_factory, tmp_path):
    """A .npy --out is rewritten in place with the count at each flush: after SIGKILL
    np.load reads every result acknowledged."""
    out = tmp_path / "results.npy"
    b = broker_factory("--fps", "200", "--shape", "64x80", "--wait-workers", "1")
    w = worker(eps)
    s = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "60")
    wait_status(eps.control, acked("fft", 100))
    s.send_signal(signal.SIGKILL)
    s.communicate()
    st = wait_status(eps.control, lambda s: s["work"]["groups"]["fft"]["ackers"] == 0)
    spectra = np.load(out)
    assert len(spectra) >= st["work"]["groups"]["fft"]["acked"] > 100
    check_spectra(np.arange(len(spectra)), spectra, every=17)
    w.kill()
    w.communicate()
    stop(b)


# --- the recorder and stop signals (case 6) -------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_close_the_recording(eps, broker_factory, tmp_path, sig):
    """``record r.h5 & kill $!`` (and -HUP, Ctrl-C): the recorder writes what it holds and
    closes the file: plain h5py opens it, every frame it says is valid is intact."""
    out = tmp_path / "r.h5"
    b = broker_factory("--fps", "200", "--shape", "60x80x3", "--wait-recorders", "1")
    rec = cli("record", "--out", str(out), "--broker", eps.control, "--json", "--timeout", "60")
    wait_status(eps.control, acked("record", 100))
    rec.send_signal(sig)
    res = summary(rec)  # a stop signal is a clean end: status 0
    assert res["stopped_by"] == signal.Signals(sig).name
    with h5py.File(out) as f:  # plain open: the file was closed
        n = int(f["valid_frames"][()])
        assert f.attrs["complete"] == 1 and n == res["frames_written"] >= 100
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        for i in range(0, n, 7):
            assert check_synthetic(f["frames"][i], i) == -1, i
    stop(b)


# --- run's summary when a part dies (case 6) ---------------------------------------------

def _run_and_kill(tmp_path, part: str) -> tuple[dict, int]:
    """``run --record`` streaming; SIGKILL one part once frames are recorded; return the
    summary and the valid frames the recording really holds."""
    eps = make_endpoints()
    out = tmp_path / "r.h5"
    proc = subprocess.Popen(run_args(eps, "--seconds", "120", "--fps", "200", "--shape",
                                     "60x80x3", "--workers", "1", "--record", str(out),
                                     "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (victim,) = _children(proc, {"recorder": "record", "broker": "serve"}[part], 1)
    wait_status(eps.control, acked("record", 300))
    victim.kill()
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (stdout, err)
    with h5py.File(out, "r", swmr=True) as f:
        held = int(f["valid_frames"][()])
        np.testing.assert_array_equal(f["frame_id"][:held], np.arange(held))
    return json.loads(stdout.strip().splitlines()[-1]), held


def test_run_with_its_recorder_killed_reports_what_the_file_holds(tmp_path):
    rep, held = _run_and_kill(tmp_path, "recorder")
    assert held > 100 and rep["stages"]["recorded"]["frames"] == held
    assert rep["failed"][0]["part"] == "recorder"
    assert rep["failed"][0]["why"] == "killed by SIGKILL"


def test_run_with_its_broker_killed_reports_what_the_file_holds(tmp_path):
    rep, held = _run_and_kill(tmp_path, "broker")
    assert held > 100 and rep["stages"]["recorded"]["frames"] == held
    assert rep["stream"]["source"] is not None
    assert rep["stages"]["published"]["frames"] >= held
    assert [f["part"] for f in rep["failed"]] == ["broker"]
    assert rep["failed"][0]["why"] == "killed by SIGKILL"
    headline = format_report(rep).splitlines()[0]
    assert "-> FAILED (broker first, killed by SIGKILL)" in headline and "None" not in headline
    with h5py.File(tmp_path / "r.h5") as f:  # the recorder was stopped with SIGTERM: closed
        assert f.attrs["complete"] == 1 and len(f["frame_id"]) == held


# --- recover() on a full disk (case 7) ---------------------------------------------------

def _killed_recording(path: Path, frames: int) -> int:
    """A recording whose writer was SIGKILLed after ``frames`` flushed frames."""
    child = subprocess.Popen([sys.executable, "tests/recorder_child.py", "forever", str(path),
                              "lz4"], stdout=subprocess.PIPE, text=True)
    flushed = 0
    while flushed < frames:
        flushed = int(child.stdout.readline())
    child.kill()
    child.wait()
    return flushed


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recover_on_a_full_disk_refuses_and_leaves_the_file_as_it_was(tmp_path):
    """recover() where the file cannot grow (RLIMIT_FSIZE at its size, as on a full disk):
    a clear error, the file byte for byte unchanged, still open with SWMR and read by
    ``inspect``; with room it then recovers as usual."""
    path = tmp_path / "killed.h5"
    flushed = _killed_recording(path, 200)
    before = _digest(path)
    size = path.stat().st_size
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size}))\n"
            "from broker.recorder import RecorderError, recover\n"
            "try:\n"
            f"    recover({str(path)!r})\n"
            "except RecorderError as exc:\n"
            "    sys.exit(f'error {exc}')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not enough room to recover it safely" in r.stderr, r.stderr
    assert "File too large" in r.stderr and _digest(path) == before
    with h5py.File(path, "r", swmr=True) as f:
        assert int(f["valid_frames"][()]) >= flushed
    r = run_cli("inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["frames"] >= flushed
    n = recover(path)
    with h5py.File(path) as f:  # plain h5py after a recover with room
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))


def test_a_failed_recover_puts_the_file_back(tmp_path):
    """A killed SWMR writer's file that is not a recording: recover() clears its
    "open for write" mark, fails on the layout, and puts back what it changed: the file
    is byte for byte as before and still opens with SWMR."""
    path = tmp_path / "other.h5"
    code = ("import os, signal, h5py, numpy as np\n"
            f"f = h5py.File({str(path)!r}, 'w', libver=('v110', 'v110'))\n"
            "f.create_dataset('x', data=np.arange(10), maxshape=(None,), chunks=(4,))\n"
            "f.swmr_mode = True\n"
            "f.flush()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    before = _digest(path)
    with pytest.raises(RecorderError, match="not a recoverable recording"):
        recover(path)
    assert _digest(path) == before
    with h5py.File(path, "r", swmr=True) as f:
        np.testing.assert_array_equal(f["x"][:], np.arange(10))
