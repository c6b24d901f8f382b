"""Workers and shard writers placed as spawned processes or Ray actors.

Most Ray tests run ``framebroker workers --ray ADDRESS`` / ``record --shards N --ray
ADDRESS`` on one Ray instance this module starts (starting one costs seconds per
command here), as on a real cluster; one lets ``record --shards 2 --ray`` start its own
local instance, beside that shared one. Frames travel over
framebroker's ZeroMQ work channel, never through Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator

import h5py
import numpy as np
import pytest

from broker.sources import check_synthetic, synthetic_frame
from conftest import acked, cli, run_cli, wait_status
from conftest import summary as done

SHAPE = (48, 64)


def check_spectra(path, n: int) -> None:
    """Every frame id once, in order, each spectrum equal to numpy's rfft2 of the frame."""
    with h5py.File(path) as f:
        ids, spectra = f["frame_id"][:], f["result"][:]
    np.testing.assert_array_equal(ids, np.arange(n))
    for fid in range(0, n, max(1, n // 200)):
        ref = np.fft.rfft2(synthetic_frame(SHAPE, "uint8", fid).astype(np.float64))
        np.testing.assert_allclose(spectra[fid], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """The address of a Ray instance (loopback, no dashboard) for this module's tests."""
    ray = pytest.importorskip("ray")
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=False,
                   _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _members(control: str, n: int) -> list[str]:
    st = wait_status(control, lambda s: len(s["work"]["groups"].get("fft", {})
                                           .get("members", {})) >= n, timeout=180)
    return list(st["work"]["groups"]["fft"]["members"])


def test_workers_here_process_every_frame(eps, broker_factory, tmp_path):
    out = tmp_path / "results.h5"
    b = broker_factory("--frames", "600", "--wait-workers", "2", "--shape", "48x64")
    w = cli("workers", "--broker", eps.control, "--count", "2", "--fft-output", "spectrum",
            "--planner", "estimate", "--json")
    s = cli("sink", "--broker", eps.control, "--json", "--out", str(out))
    res = done(s)
    assert (res["frames"], res["gaps"], len(res["per_worker"])) == (600, 0, 2)
    ws = done(w)
    assert ws["placement"] == "local" and ws["frames"] == 600 and ws["ended"]
    assert len({r["pid"] for r in ws["workers"]}) == 2
    assert b.finish()[0] == 0
    check_spectra(out, 600)


def test_ray_workers_survive_a_sigkill_every_frame_once(eps, broker_factory, tmp_path,
                                                        ray_address):
    out, wisdom = tmp_path / "results.h5", tmp_path / "wisdom"
    b = broker_factory("--frames", "3000", "--wait-workers", "2", "--shape", "48x64",
                       "--fps", "300", "--worker-timeout", "1")
    w = cli("workers", "--ray", ray_address, "--count", "2", "--broker", eps.control,
            "--fft-output", "spectrum", "--planner", "measure", "--wisdom", str(wisdom),
            "--json", "--timeout", "120")
    s = cli("sink", "--broker", eps.control, "--json", "--out", str(out), "--timeout", "180")
    first = _members(eps.control, 2)
    victim, originals = first[0], {int(m.rpartition("-")[2]) for m in first}
    pid = int(victim.rpartition("-")[2])
    wait_status(eps.control, lambda st: st["frames_sent"] >= 500)
    os.kill(pid, signal.SIGKILL)  # the actor's process: Ray starts a new one
    # a new process took over (a member declared dead under load, before the kill, and
    # back at once, must not pass for it: wait for the victim to be gone)
    st = wait_status(eps.control, lambda st: victim not in st["work"]["groups"]["fft"]["members"]
                     and len(st["work"]["groups"]["fft"]["members"]) >= 2, timeout=180)
    assert st["work"]["groups"]["fft"]["dead_consumers"] >= 1
    res = done(s)
    assert (res["frames"], res["total"], res["gaps"]) == (3000, 3000, 0)
    ws = done(w)
    assert ws["placement"] == "ray" and ws["ended"] and ws["failed"] == 0
    pids = {r["pid"] for r in ws["workers"]}
    assert pid not in pids and len(pids) == 2
    [restarted] = [r for r in ws["workers"] if r["pid"] not in originals]
    # the new process planned from the wisdom its predecessors saved: no MEASURE again
    assert restarted["plans"] and all(p["wisdom_imported"] for p in restarted["plans"])
    assert b.finish()[0] == 0
    check_spectra(out, 3000)


def test_ray_shard_writers_record_through_the_master(eps, broker_factory, tmp_path,
                                                      ray_address):
    """--ray without ADDRESS: a local instance of its own, beside the module's."""
    out = tmp_path / "ray.h5"
    rec = cli("record", "--out", str(out), "--shards", "2", "--ray", "--broker", eps.control,
              "--json", "--timeout", "120")
    b = broker_factory("--fps", "500", "--wait-recorders", "2", "--shape", "24x32")
    wait_status(eps.control, acked("record-1of2-ray", 300), timeout=180)
    assert run_cli("stop", "--broker", eps.control).returncode == 0  # ends the actors too
    res = done(rec)
    n = res["total"]
    assert n > 600 and (res["frames_written"], res["frames_missed"]) == (n, 0)
    assert b.finish()[0] == 0
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        frames = f["frames"][:]
    assert all(check_synthetic(frames[i], i) == -1 for i in range(n))
    assert {p["pid"] for p in res["shards"]} and len({p["pid"] for p in res["shards"]}) == 2


def test_without_ray_the_flag_says_how_to_install_it(tmp_path):
    """Ray made unimportable in the child (a module shim first on its path)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError('No module named ray (blocked by test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for args in (["workers", "--ray", "--count", "2"],
                 ["record", "--out", str(tmp_path / "x.h5"), "--shards", "2", "--ray"]):
        p = cli(*args, "--broker", "tcp://127.0.0.1:1", "--timeout", "0.2", env=env)
        out, err = p.communicate(timeout=60)
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (out, err)
        assert "pip install 'framebroker[ray]'" in lines[0], err
    check = textwrap.dedent("""
        import sys
        try:
            import ray
        except ImportError:
            sys.exit(0)
        sys.exit(1)
    """)
    assert subprocess.run([sys.executable, "-c", check], env=env).returncode == 0


def test_ctrl_c_ends_the_ray_workers(eps, broker_factory, ray_address):
    b = broker_factory("--fps", "100", "--shape", "48x64")
    w = cli("workers", "--ray", ray_address, "--count", "2", "--broker", eps.control, "--no-sink",
            "--planner", "estimate", "--timeout", "120")
    pids = [int(m.rpartition("-")[2]) for m in _members(eps.control, 2)]
    w.send_signal(signal.SIGINT)
    out, err = w.communicate(timeout=120)
    assert w.returncode == 130, (out, err)
    deadline = time.monotonic() + 60
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.1)
    assert not alive, f"actor processes {alive} outlived Ctrl-C"
    assert run_cli("stop", "--broker", eps.control).returncode == 0
    assert b.finish()[0] == 0


def _holder(path) -> int:
    """The pid of the process that has ``path`` open (a shard writer's actor)."""
    import psutil

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["pid"]):
            try:
                if any(f.path == str(path) for f in proc.open_files()):
                    return proc.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process holds {path}")


def test_ray_restarts_a_killed_shard_writer_into_a_new_file(eps, broker_factory, tmp_path,
                                                            ray_address):
    from broker import protocol as proto
    from broker.vds import MISSING_ID, shard_path

    out, n = tmp_path / "again.h5", 3000
    rec = cli("record", "--out", str(out), "--shards", "2", "--ray", ray_address, "--broker",
              eps.control, "--json", "--timeout", "120", "--flush-frames", "32")
    b = broker_factory("--frames", str(n), "--fps", "600", "--wait-recorders", "2",
                       "--shape", "24x32", "--worker-timeout", "1", "--orphan-timeout", "60")
    wait_status(eps.control, acked("record-1of2-again", 300), timeout=180)
    os.kill(_holder(shard_path(out, 1)), signal.SIGKILL)
    res = done(rec, ok=(0, 3))  # 3: the frames the dead writer had not flushed are lost
    assert b.finish()[0] == 0
    master = res["master"]
    assert master["shards"][1]["files"] == ["again_shard1.h5", "again_shard1_r1.h5"]
    assert master["shards"][1]["recovered"] and master["shards"][0]["complete"]
    with h5py.File(shard_path(out, 1, 1)) as f:
        assert len(f["frame_id"]) > 0 and f.attrs["complete"] == 1  # the new writer's
    with h5py.File(out) as f:
        ids, frames, gaps = f["frame_id"][:], f["frames"][:], f["gaps"][:]
        assert list(f.attrs["shard_restarts"]) == [0, 1]
    assert len(ids) == n
    present = np.flatnonzero(ids != MISSING_ID)
    np.testing.assert_array_equal(ids[present], present)
    assert all(check_synthetic(frames[i], int(i)) == -1 for i in present)
    missing = {int(a) + j for a, c in gaps for j in range(int(c))}
    assert missing == set(range(n)) - set(present.tolist())
    assert all(proto.Shard(1, 2, 1).owns(i) for i in missing)  # only the killed shard's
    assert len(present) > n - 200  # a gap of unflushed frames, not the rest of the run
