"""SIGTERM to each long-running subcommand while it streams: it ends with status 0, prints
its summary, and closes its files (plain h5py opens them; their frames are right).

How fast is measured by bench/shutdown.py (the target is 1 s); the waits here only
bound a hang."""
from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import h5py
import pytest
import numpy as np

from broker.client import BrokerUnavailable, Control
from broker.sources import check_synthetic
from conftest import PY, cli, free_port, wait_status

ROOT = Path(__file__).resolve().parent.parent

HANG_S = 10  # a hang detector, not a timing threshold


def _groups(status: dict, prefix: str) -> list[dict]:
    return [g for n, g in status["work"]["groups"].items() if n.startswith(prefix)]


def _streaming(status: dict) -> bool:
    """Every part has joined and taken frames: 2 subscribers (watch, view), 3 FFT workers
    acknowledged through the sink, the recorder and both shard writers."""
    fft = status["work"]["groups"].get("fft", {})
    records = _groups(status, "record")
    return (status["subscribers"] >= 2 and len(fft.get("members", {})) >= 3
            and fft.get("acked", 0) > 0 and len(records) == 3
            and all(g["acked"] > 0 for g in records))


def _sigterm(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, (proc.args, proc.returncode, out, err)
    return out, err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _recorded_frames_are_right(path, n_at_least: int = 1) -> int:
    """Plain h5py opens it (it was closed), and every valid frame is its synthetic frame."""
    with h5py.File(path) as f:
        ids = f["frame_id"][:]
        n = int(f["valid_frames"][()])
        assert f.attrs["complete"] == 1 and n == len(ids) >= n_at_least
        for k in range(0, n, 5):
            assert check_synthetic(f["frames"][k], int(ids[k])) == -1, ids[k]
    return n


def test_sigterm_ends_every_long_running_part_with_its_summary(eps, tmp_path):
    """Before: watch, worker and workers died of SIGTERM without a summary (workers left
    its two processes running), record --shards left its writers running and its files
    open, and sink and record exited 1."""
    broker = cli("serve", *eps.serve_args(), "--fps", "50", "--shape", "48x64",
                 "--frames", "0", "--progress", "0", "--wait-recorders", "3",
                 "--wait-workers", "3")
    client = ["--broker", eps.control, "--json"]
    parts = {
        "watch": cli("watch", *client, "--progress", "0"),
        "view": cli("view", "--broker", eps.control, "--http", f"127.0.0.1:{free_port()}",
                    "--nice", "0"),
        "record": cli("record", "--out", str(tmp_path / "r.h5"), *client),
        "shards": cli("record", "--out", str(tmp_path / "s.h5"), "--shards", "2", *client),
        "sink": cli("sink", "--out", str(tmp_path / "res.h5"), *client),
        "worker": cli("worker", *client, "--planner", "estimate"),
        "workers": cli("workers", *client, "--count", "2", "--planner", "estimate"),
    }
    try:
        wait_status(eps.control, _streaming, timeout=120)
        # the sink first: the workers then wait on it, and must still end on SIGTERM
        out = {name: _sigterm(parts[name]) for name in
               ("watch", "view", "sink", "worker", "workers", "record", "shards")}
        served, _ = _sigterm(broker)
    finally:
        for p in (*parts.values(), broker):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert _last_json(out["watch"][0])["received"] > 0
    assert out["view"][0].startswith("framebroker view: ")
    assert "framebroker serve: stream" in served
    sink = _last_json(out["sink"][0])
    assert sink["stopped_by"] == "SIGTERM" and sink["frames"] > 0
    with h5py.File(tmp_path / "res.h5") as f:  # closed: plain h5py opens it
        assert f.attrs["complete"] == 1
        np.testing.assert_array_equal(f["frame_id"][:], np.arange(sink["frames"]))
    worker = _last_json(out["worker"][0])
    assert worker["stopped_by"] == "SIGTERM" and worker["frames"] > 0
    workers = _last_json(out["workers"][0])
    assert workers["stopped_by"] == "SIGTERM" and workers["failed"] == 0
    assert all(w["stopped_by"] == "SIGTERM" for w in workers["workers"])
    rec = _last_json(out["record"][0])
    assert rec["stopped_by"] == "SIGTERM"
    assert _recorded_frames_are_right(tmp_path / "r.h5") == rec["frames_written"]
    shards = _last_json(out["shards"][0])
    assert shards["stopped_by"] == "SIGTERM"
    for k in range(2):  # each writer closed its file
        assert _recorded_frames_are_right(tmp_path / f"s_shard{k}.h5") > 0
    with h5py.File(tmp_path / "s.h5") as f:  # the master presents what they wrote
        assert f["frames"].shape[0] >= shards["frames_written"] > 0


def test_sigterm_ends_run_and_every_part_it_started(eps, tmp_path):
    """Before: SIGTERM killed run alone and left its broker, workers and sink running;
    then it stopped them one after the other. Now all at once, each closing its file."""
    rec = tmp_path / "run.h5"
    proc = cli("run", "--seconds", "0", "--frames", "0", "--fps", "50", "--workers", "1",
               "--shape", "48x64", "--planner", "estimate", "--record", str(rec),
               "--progress", "0", "--json", *eps.serve_args())
    try:
        wait_status(eps.control, lambda s: s["work"]["groups"].get("fft", {}).get("acked", 0)
                    > 0 and _groups(s, "record") and _groups(s, "record")[0]["acked"] > 0,
                    timeout=120)
        out, _ = _sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    rep = _last_json(out)
    assert rep["interrupted"] and not rep["failed"]
    assert rep["stages"]["processed"]["frames"] > 0
    assert _recorded_frames_are_right(rec) == rep["stages"]["recorded"]["frames"] > 0
    ctl = Control(eps.control, timeout=0.5)
    try:
        ctl.status()
        raise AssertionError("run's broker still answers")
    except BrokerUnavailable:  # its broker is gone too
        pass
    finally:
        ctl.close()


def test_the_shutdown_bench_writes_its_table_and_json(tmp_path):
    """bench/shutdown.py: one cell per subcommand and load, its rounds' median and max,
    and the exit statuses seen (a round's subcommand really streamed and was stopped)."""
    out = tmp_path / "shutdown.json"
    r = subprocess.run([PY, "bench/shutdown.py", "--only", "serve", "watch", "--load", "0",
                        "--repeat", "2", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["cells"]) == {"serve@load0", "watch@load0"}
    for cell in res["cells"].values():
        assert len(cell["seconds"]) == 2 and cell["exit_statuses"] == ["0"]
        assert cell["max_s"] == max(cell["seconds"]) and cell["median_s"] == float(
            np.median(cell["seconds"]))
    assert re.search(r"^watch +[0-9.]+ / [0-9.]+ +0$", r.stdout, re.M), r.stdout


@pytest.mark.parametrize("kind", ["imagezmq", "stream2"])
def test_sigterm_while_a_network_source_waits_for_its_first_frame(kind, tmp_path):
    """serve --source imagezmq:/stream2: waits for a sender before it binds its own
    sockets; SIGTERM then ends it cleanly with a line saying so (it used to die of the
    signal, exit -15, with no word)."""
    src = f"{kind}:tcp://127.0.0.1:{free_port()}"
    proc = cli("serve", "--source", src, "--pub", f"tcp://127.0.0.1:{free_port()}",
               "--work", f"tcp://127.0.0.1:{free_port()}",
               "--control", f"tcp://127.0.0.1:{free_port()}")
    waiting = proc.stderr.readline()
    assert "waiting for" in waiting and src.split(":", 1)[1] in waiting, waiting
    out, err = _sigterm(proc)
    assert f"stopped by SIGTERM while waiting for {src}; nothing was streamed" in err, err
    assert "Traceback" not in err
