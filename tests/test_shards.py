"""Sharded lossless recording: N writers, one file each, read through one VDS master."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the codecs for reading compressed shards)
import numpy as np
import pytest

from broker import protocol as proto
from broker.client import Control
from broker.sources import check_synthetic
from broker.vds import MISSING_ID, finalise, shard_path, start_master
from conftest import cli, run_cli, summary, wait_status

SHAPE = "24x32"
N_FRAMES = 3000


def record(eps, path, *args: str):
    return cli("record", "--out", str(path), "--broker", eps.control, "--json", *args)


def check_master(path, n: int = N_FRAMES) -> None:
    """Plain h5py reads every frame through the master, in id order, pixel for pixel."""
    with h5py.File(path, "r") as f:
        assert f["frames"].is_virtual and f["frame_id"].is_virtual
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(n))
        frames = f["frames"][:]
        assert frames.shape == (n, 24, 32)
        bad = [i for i in range(n) if check_synthetic(frames[i], i) != -1]
        assert not bad, bad[:10]
        assert np.all(np.diff(f["timestamp_ns"][:].astype(np.int64)) >= 0)
        assert len(f["gaps"]) == 0
        assert (f.attrs["complete"], f.attrs["frames_written"], f.attrs["frames_missed"]) == \
            (1, n, 0)


def h5dump(*args: str) -> str:
    """h5dump (Debian's hdf5-tools, HDF5 1.10) from another directory: it must find the
    shard files through the master's relative source names."""
    exe = shutil.which("h5dump")
    if exe is None:
        pytest.skip("h5dump not installed (apt-get install -y hdf5-tools)")
    env = {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}  # compressed shards
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True,
                          timeout=120, cwd="/", env=env).stdout


@pytest.mark.parametrize("shards,compression,chunk,block", [
    (2, "none", 1, 1), (3, "none", 1, 1), (2, "bslz4", 4, 4),
    (3, "lz4", 4, 7)])  # 3000 = 142 cycles of 3 x 7 + 18: partial last blocks
def test_sharded_recording_reads_back_through_the_master(eps, broker_factory, tmp_path,
                                                         shards, compression, chunk, block):
    out = tmp_path / "run.h5"
    rec = record(eps, out, "--shards", str(shards), "--compression", compression,
                 "--chunk-frames", str(chunk), "--shard-block", str(block),
                 *(["--expect-frames", str(N_FRAMES)] if shards == 3 else []))
    b = broker_factory("--frames", str(N_FRAMES), "--wait-recorders", str(shards),
                       "--shape", SHAPE)
    res = summary(rec)
    assert b.finish()[0] == 0
    assert (res["frames_written"], res["frames_missed"], res["total"]) == (N_FRAMES, 0, N_FRAMES)
    for k in range(shards):  # each shard holds exactly its blocks, in the single-file layout
        sh = proto.Shard(k, shards, block)
        with h5py.File(shard_path(out, k)) as f:
            ids = f["frame_id"][:]
            np.testing.assert_array_equal(ids, [i for i in range(N_FRAMES) if sh.owns(i)])
            assert f.attrs["compression"] == compression and f.attrs["complete"] == 1
            assert (f.attrs["shard_index"], f.attrs["shard_count"]) == (k, shards)
            assert len(f["gaps"]) == 0 and f["frames"].shape[0] == len(ids)
        # regular strided mappings, not one per frame
    with h5py.File(out) as f:
        assert len(f["frames"].virtual_sources()) <= 2 * shards
        assert f.attrs["shard_block"] == block
    check_master(out)
    # the set moves together: relative source paths, read from elsewhere
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in [out, *(shard_path(out, k) for k in range(shards))]:
        p.rename(moved / p.name)
    check_master(moved / out.name)
    header = h5dump("-H", str(moved / out.name))
    for name in ("frames", "frame_id", "timestamp_ns", "gaps"):
        assert f'DATASET "{name}"' in header
    assert f"( {N_FRAMES}, 24, 32 )" in header
    ids = h5dump("-d", "/frame_id", "-s", "2990", "-c", "10", str(moved / out.name))
    assert "2990, 2991, 2992, 2993, 2994, 2995, 2996, 2997, 2998, 2999" in ids
    pixels = h5dump("-d", "/frames", "-s", "1,0,0", "-c", "1,1,8", "-y", "-w", "0",
                    str(moved / out.name))
    with h5py.File(moved / out.name) as f:
        expected = ", ".join(str(v) for v in f["frames"][1, 0, :8])
    assert expected in " ".join(pixels.split()).replace(" ,", ",")
    insp = cli("inspect", str(moved / out.name), "--json")
    info = summary(insp)
    assert info["frames"] == N_FRAMES and info["missing_frames"] == 0
    assert [s["frames"] for s in info["shards"]] == \
        [proto.Shard(k, shards, block).owned_before(N_FRAMES) for k in range(shards)]
    shard_path(moved / out.name, 0).rename(moved / "renamed.h5")  # breaks that mapping only
    with h5py.File(moved / out.name) as f:
        ids, frames = f["frame_id"][:], f["frames"][:]
    gone = np.array([proto.Shard(0, shards, block).owns(i) for i in range(N_FRAMES)])
    assert np.all(ids[gone] == MISSING_ID) and not np.any(frames[gone])
    np.testing.assert_array_equal(ids[~gone], np.flatnonzero(~gone))


def _shard_pids(proc: subprocess.Popen, n: int) -> dict[int, int]:
    """The writer pids the coordinator announces on stderr."""
    pids: dict[int, int] = {}
    while len(pids) < n:
        line = proc.stderr.readline()
        assert line, "record --shards ended before announcing its writers"
        m = re.search(r"shard (\d+) pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
    return pids


@pytest.mark.parametrize("shards,compression,chunk", [(2, "none", 1), (3, "bslz4", 4)])
def test_a_shard_killed_mid_run_leaves_its_flushed_frames_and_a_reported_gap(
        eps, broker_factory, tmp_path, shards, compression, chunk):
    out = tmp_path / "kill.h5"
    rec = record(eps, out, "--shards", str(shards), "--flush-frames", "32", "--compression",
                 compression, "--chunk-frames", str(chunk))
    b = broker_factory("--frames", str(N_FRAMES), "--wait-recorders", str(shards), "--shape",
                       SHAPE, "--fps", "300", "--worker-timeout", "1", "--orphan-timeout", "1")
    ctl = Control(eps.control, timeout=10)  # in-process: a CLI might start after the end
    pids = _shard_pids(rec, shards)
    group = f"record-1of{shards}-kill"
    wait_status(eps.control, lambda s: s["work"]["groups"].get(group, {}).get("acked", 0) > 400)
    ctl.pause()  # mid-run, files open
    with h5py.File(out, "r", swmr=True) as f:  # the live master, while the shards write
        ids = f["frame_id"][:]
        live = np.flatnonzero(ids == np.arange(len(ids)))
        assert len(live) > 400 and all(check_synthetic(f["frames"][int(i)], int(i)) == -1
                                       for i in live[::7])
        assert np.all((ids == np.arange(len(ids))) | (ids == MISSING_ID))
    live_report = summary(cli("inspect", str(out), "--json"))
    assert live_report["writer_mark"] and live_report["frames"] >= len(live)
    ctl.resume()
    ctl.close()
    os.kill(pids[1], signal.SIGSTOP)  # holding unflushed frames, then gone
    time.sleep(0.2)
    os.kill(pids[1], signal.SIGKILL)  # the stream runs on to its end without it
    out_text, err = rec.communicate(timeout=180)
    assert rec.returncode == 1, (out_text, err)  # a writer failed
    assert f"shard 1/{shards}: exited with -9" in err
    assert b.finish()[0] == 0
    res = __import__("json").loads(out_text.strip().splitlines()[-1])
    n = res["total"]
    assert n == N_FRAMES
    master = res["master"]
    assert master["shards"][1]["recovered"] and not master["shards"][1]["complete"]
    kept = master["shards"][1]["frames"]
    assert kept >= 32  # at least one flush happened before the kill (acked > 400)
    with h5py.File(out) as f:
        ids = f["frame_id"][:]
        frames = f["frames"][:]
        gaps = f["gaps"][:]
        attrs = dict(f.attrs)
    assert len(ids) == n
    present = ids != MISSING_ID
    np.testing.assert_array_equal(ids[present], np.flatnonzero(present))
    for i in np.flatnonzero(present):  # every frame readable is the right one
        assert check_synthetic(frames[i], int(i)) == -1, i
    sh1 = proto.Shard(1, shards, chunk)
    # shard 0 complete; shard 1 up to its last flush: the first `kept` ids it owns
    expected = {i for i in range(n) if not sh1.owns(i)} | \
        {sh1.frame_id(o) for o in range(kept)}
    assert set(np.flatnonzero(present).tolist()) == expected
    missing = {int(a) + j for a, c in gaps for j in range(int(c))}
    assert missing == set(range(n)) - expected
    assert attrs["complete"] == 0 and attrs["frames_missed"] == len(missing)
    assert list(attrs["shard_missing"]) == [0, len(missing)] + [0] * (shards - 2)
    assert list(attrs["shard_recovered"]) == [0, 1] + [0] * (shards - 2)
    assert not np.any(frames[~present])  # fill, never another frame's pixels
    text = cli("inspect", str(out))
    report, _ = text.communicate(timeout=60)
    assert f"missing      {len(missing)} frame(s)" in report
    assert "kill_shard1.h5" in report and "not closed" in report
    assert f"( {N_FRAMES}, 24, 32 )" in h5dump("-H", str(out))


def test_a_shard_left_open_on_another_host_is_recovered_once_its_writers_are_gone(
        eps, broker_factory, tmp_path):
    """`record --shard 0/2` never touches shard 1's file, which a writer on another host
    marks open (that writer may still run, and no pid there can be checked): it says so,
    and the master reads with swmr=True. finalise(writers_gone=True) (what `record
    --shards N` does once every writer ended, Ray actors elsewhere included) recovers
    it: plain h5py then reads every frame flushed before the kill through the master."""
    out = tmp_path / "far.h5"
    child = subprocess.Popen([sys.executable, str(Path(__file__).parent / "recorder_child.py"),
                              "shard", str(shard_path(out, 1)), "other-host"],
                             stdout=subprocess.PIPE, text=True)
    while int(child.stdout.readline()) < 50:  # shard 1: the odd ids, flushed every 10
        pass
    child.kill()
    child.communicate()
    b = broker_factory("--frames", "400", "--wait-recorders", "1", "--shape", SHAPE)
    other = tmp_path / "other.h5"  # another recording's master (another session)
    start_master(other, count=2, block=1, shape=(24, 32), dtype=np.dtype("u1"), stream="x",
                 session=7, compression="none", overwrite=False)
    refused = record(eps, other, "--shard", "0/2")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode != 0 and "pass --overwrite" in err, err
    assert not shard_path(other, 0).exists()
    rec = record(eps, out, "--shard", "0/2")
    _, err = rec.communicate(timeout=180)
    assert rec.returncode == 0, err
    assert b.finish()[0] == 0
    assert "far_shard1.h5 is still open by its writer on other-host" in err
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(shard_path(out, 1)).close()  # untouched
    with h5py.File(out) as f:
        kept = int(f.attrs["shard_frames"][1])
        assert list(f.attrs["shard_recovered"]) == [0, 0] and f.attrs["complete"] == 0
    expected = set(range(0, 400, 2)) | {2 * o + 1 for o in range(kept)}
    with h5py.File(out, "r", swmr=True) as f:
        ids = f["frame_id"][:]
    assert kept >= 50 and set(np.flatnonzero(ids != MISSING_ID).tolist()) == expected
    far = finalise(out, 400, writers_gone=True)["shards"][1]
    assert (far["open_on"], far["recovered"], far["frames"]) == (None, True, kept)
    with h5py.File(out) as f:  # plain h5py now
        ids, frames, gaps = f["frame_id"][:], f["frames"][:], f["gaps"][:]
        assert list(f.attrs["shard_recovered"]) == [0, 1]
    present = np.flatnonzero(ids != MISSING_ID)
    assert set(present.tolist()) == expected and len(ids) == max(400, 2 * kept)
    assert all(ids[i] == i and check_synthetic(frames[i], int(i)) == -1 for i in present)
    assert {int(a) + j for a, c in gaps for j in range(int(c))} == set(range(len(ids))) - expected
    again = cli("record", "--out", str(out), "--shard", "0/2", "--broker", "tcp://127.0.0.1:1",
                "--timeout", "0.2")
    _, err = again.communicate(timeout=60)
    assert again.returncode != 0 and "far_shard0.h5 exists" in err, err


def test_shards_started_separately_make_the_same_master(eps, broker_factory, tmp_path):
    """Two --shard K/N commands (as on two hosts) and one --shards 2 command record the
    same session: the two masters map the same frames the same way. The second --shard
    command starts once the first has written the master: it joins that master (it used
    to refuse it as an existing --out, and the other writers waited for it for 30 s)."""
    a, b_ = tmp_path / "a.h5", tmp_path / "b.h5"
    together = record(eps, a, "--shards", "2", "--chunk-frames", "2")
    one = record(eps, b_, "--shard", "0/2", "--chunk-frames", "2")
    br = broker_factory("--frames", str(N_FRAMES), "--wait-recorders", "4", "--shape", SHAPE)
    wait_status(eps.control, lambda s: "record-0of2-b" in s["work"]["groups"])
    assert b_.is_file()  # written before its writer joined
    two = record(eps, b_, "--shard", "1/2", "--chunk-frames", "2")
    s_two, s_one = summary(two), summary(one)  # two first: it fails at once, if at all
    summary(together)
    assert br.finish()[0] == 0
    assert s_one["shard"] == {"index": 0, "count": 2, "block": 2}
    assert (s_one["frames_written"], s_two["frames_written"]) == (N_FRAMES // 2, N_FRAMES // 2)
    check_master(a)
    check_master(b_)
    with h5py.File(a) as fa, h5py.File(b_) as fb:
        for name in ("frames", "frame_id", "timestamp_ns", "gaps"):
            np.testing.assert_array_equal(fa[name][()], fb[name][()])
        for name in ("frames", "frame_id"):
            ma = [(m.file_name.replace("a_", "X_"), m.dset_name,
                   m.vspace.get_regular_hyperslab(), m.src_space.get_regular_hyperslab())
                  for m in fa[name].virtual_sources()]
            mb = [(m.file_name.replace("b_", "X_"), m.dset_name,
                   m.vspace.get_regular_hyperslab(), m.src_space.get_regular_hyperslab())
                  for m in fb[name].virtual_sources()]
            assert ma == mb
        skip = {"shard_files", "start_time"}
        assert {k: str(v) for k, v in fa.attrs.items() if k not in skip} == \
            {k: str(v) for k, v in fb.attrs.items() if k not in skip}


def test_shard_flags_are_checked(tmp_path):
    for args, message in ((["--shard", "2/2"], "index < count"),
                          (["--shard", "x"], "K/N"),
                          (["--shards", "2", "--shard", "0/2"], "not both"),
                          (["--shards", "2", "--mode", "live"], "lossless"),
                          (["--shard", "0/2", "--max-frames-per-file", "100"], "one file"),
                          (["--shards", "2", "--max-bytes-per-file", "1"], "one file")):
        p = cli("record", "--out", str(tmp_path / "x.h5"), "--broker", "tcp://127.0.0.1:1",
                "--timeout", "0.2", *args)
        _, err = p.communicate(timeout=60)
        assert p.returncode != 0 and message in err.strip().splitlines()[-1], (args, err)
        assert "Traceback" not in err


def test_run_records_with_shards(tmp_path):
    from conftest import make_endpoints

    eps = make_endpoints()
    out = tmp_path / "run.h5"
    r = cli("run", "--frames", "1000", "--workers", "1", "--planner", "estimate", "--shape",
            SHAPE, "--record", str(out), "--shards", "2", "--json", "--pub", eps.pub,
            "--work", eps.work, "--control", eps.control, "--results", eps.results)
    rep = summary(r)
    assert rep["ok"] and rep["stages"]["recorded"]["frames"] == 1000
    assert rep["recording"] == [str(out)]
    check_master(out, 1000)


def test_recorder_scaling_benchmark_reports_1_2_4_shards(tmp_path):
    """bench/shards.py measures every shard count in one run (figures are not judged:
    only that each run recorded every frame and was measured)."""
    import json

    from broker.bench import shards as bench

    out = tmp_path / "shards.json"
    r = subprocess.run([sys.executable, "bench/shards.py", "--quick", "--shape", "64x64",
                        "--frames", "200", "--repeat", "1", "--record-dir", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [row["shards"] for row in data["rows"]] == [1, 2, 4]
    for row in data["rows"]:
        assert row["mb_per_s"] > 0 and row["cpu_s_per_shard"] > 0
        assert len(data["runs"][str(row["shards"])][0]["cpu_s_per_shard"]) == row["shards"]
    assert "| 4 |" in bench.section(data) and "| 4 |" in r.stdout
    bench.plot(data, tmp_path / "shards.png")
    assert (tmp_path / "shards.png").stat().st_size > 1000
    assert not list(tmp_path.glob("shards-bench-*"))  # its files are gone


def test_a_sharded_group_gets_only_its_blocks_and_keeps_its_shard(eps, broker_factory):
    from broker.client import WorkConsumer

    b = broker_factory("--frames", "300", "--wait-subscribers", "1", "--shape", SHAPE)
    mine = proto.Shard(1, 3, 4)
    a = WorkConsumer(broker=eps.control, group="sub-g", window=8, shard=mine, connect_wait=30)
    other = WorkConsumer(broker=eps.control, group="sub-g", window=8,
                         shard=proto.Shard(0, 3, 4), connect_wait=30)
    try:
        wait_status(eps.control, lambda s: s["work"]["rejected"].get("bad_control", 0) >= 1)
        got = []
        while (frame := a.recv(timeout=30)) is not None:
            assert check_synthetic(frame.array, frame.frame_id) == -1
            got.append(frame.frame_id)
            a.done(frame.frame_id)
        assert got == [i for i in range(300) if mine.owns(i)]
    finally:
        a.close()
        other.close()
    assert b.finish()[0] == 0


@pytest.mark.parametrize("bad", [{"index": 2, "count": 2, "block": 1},
                                 {"index": 0, "count": 0, "block": 1},
                                 {"index": 0, "count": 2, "block": 0},
                                 {"index": 0, "count": 2, "block": True},
                                 {"index": 0, "count": 2}, "0/2", [0, 2, 1],
                                 {"index": 0, "count": 2, "block": 1, "x": 1}])
def test_ready_rejects_a_malformed_shard(bad):
    body = ('{"group": "record", "window": 4, "acks": "self", "shard": '
            + __import__("json").dumps(bad) + "}").encode()
    with pytest.raises(proto.BadControlMessage, match="shard"):
        proto.decode_ready(body)


def test_ctrl_c_closes_every_shard_and_finalises_the_master(eps, broker_factory, tmp_path):
    out = tmp_path / "int.h5"
    rec = record(eps, out, "--shards", "2")
    b = broker_factory("--fps", "500", "--wait-recorders", "2", "--shape", SHAPE,
                       "--worker-timeout", "1", "--orphan-timeout", "1")
    wait_status(eps.control, lambda s: s["work"]["groups"].get("record-1of2-int", {})
                .get("acked", 0) > 200)
    rec.send_signal(signal.SIGINT)
    stdout, err = rec.communicate(timeout=120)
    assert rec.returncode == 0, err  # a stop signal is a clean end, with the summary
    assert json.loads(stdout.strip().splitlines()[-1])["stopped_by"] == "SIGINT"
    assert run_cli("stop", "--broker", eps.control).returncode == 0
    assert b.finish()[0] == 0
    for k in range(2):
        with h5py.File(shard_path(out, k)) as f:  # plain open: closed by its writer
            assert f.attrs["complete"] == 1
    with h5py.File(out) as f:
        assert "total" in f.attrs  # finalised
        ids, frames = f["frame_id"][:], f["frames"][:]
    present = np.flatnonzero(ids != MISSING_ID)
    assert len(present) > 400
    np.testing.assert_array_equal(ids[present], present)
    assert all(check_synthetic(frames[i], int(i)) == -1 for i in present)
