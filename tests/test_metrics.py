"""--metrics: every part's /metrics scraped during a real pipeline and checked against
the broker's status and the frames each part handled; the exposure rule; the install
hint without prometheus-client; the hop histograms' arithmetic."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import h5py
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from broker.client import Control
from broker.hops import BOUNDS_S, Hop, by_hop, merge, quantile_ms
from broker.humanize import format_status
from conftest import PY, cli, free_port, run_cli, summary, wait_status

REPO = Path(__file__).resolve().parents[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics of the part on ``port``, parsed: (sample name, sorted labels) -> value."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
    deadline = time.monotonic() + 60
    while True:
        try:
            text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except OSError:  # the part is still starting
            assert time.monotonic() < deadline, f"no /metrics on port {port}"
            time.sleep(0.1)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def hop_count(samples: dict, hop: str) -> float:
    """A hop histogram's _count, whatever its labels (one series per process)."""
    counts = [v for (n, _), v in samples.items() if n == f"framebroker_{hop}_seconds_count"]
    assert len(counts) == 1, counts
    return counts[0]


def test_scraped_counters_match_status_and_hops_count_every_frame(eps, broker_factory,
                                                                   tmp_path):
    ports = {part: free_port() for part in ("serve", "worker", "sink", "record", "watch")}
    m = {part: ("--metrics", f"127.0.0.1:{port}") for part, port in ports.items()}
    b = broker_factory("--shape", "24x32", "--fps", "300", "--wait-workers", "1",
                       "--wait-recorders", "1", "--json", *m["serve"])
    b.wait_ready()
    client = ("--broker", eps.control, "--json", "--timeout", "60")
    sink = cli("sink", *client, *m["sink"])
    worker = cli("worker", *client, "--backend", "numpy", *m["worker"])
    out = tmp_path / "rec.h5"
    record = cli("record", "--out", str(out), *client, *m["record"])
    watch = cli("watch", *client, "--progress", "0", *m["watch"])
    wait_status(eps.control, lambda s: s["frames_sent"] >= 150 and s["subscribers"] == 1)
    bad = zmq.Context.instance().socket(zmq.REQ)
    bad.connect(eps.control)
    bad.send(b'{"cmd": 7}')  # a malformed request: refused, counted by reason
    assert bad.recv_json()["ok"] is False
    bad.close(linger=0)
    ctl = Control(eps.control, timeout=10)
    try:
        ctl.request("pause")  # no frame is captured after the reply: the counts stand still
        status = wait_status(eps.control, lambda s: all(
            g["pending"] == 0 for g in s["work"]["groups"].values()))
        n = status["frames_sent"]
        # the watch reports its counts every second: wait until the broker has its last
        deadline = time.monotonic() + 60
        while True:
            watch_m = scrape(ports["watch"])
            received = value(watch_m, "framebroker_frames_total")
            (name,) = [dict(labels)["subscriber"] for (sample, labels) in watch_m
                       if sample == "framebroker_capture_to_receive_seconds_count"]
            status = ctl.status()
            if status["consumers"].get(name, {}).get("received") == received:
                break
            assert time.monotonic() < deadline, (received, status["consumers"])
            time.sleep(0.2)
        broker_m = scrape(ports["serve"])
        assert value(broker_m, "framebroker_subscriber_received_total", client=name) == received
        assert value(broker_m, "framebroker_subscriber_gaps_total", client=name) == \
            status["consumers"][name]["gaps"]
        (reason, count), = status["control_rejected"].items()
        assert value(broker_m, "framebroker_rejects_total", channel="control",
                     reason=reason) == count == 1
        assert value(broker_m, "framebroker_frames_total") == n
        assert value(broker_m, "framebroker_bytes_total") == status["bytes_sent"] == n * 24 * 32
        assert hop_count(broker_m, "capture_to_publish") == n
        assert value(broker_m, "framebroker_subscribers", transport="tcp") == 1
        assert value(broker_m, "framebroker_work_members", transport="tcp") == 2
        for group in ("fft", "record"):
            g = status["work"]["groups"][group]
            assert value(broker_m, "framebroker_dispatched_total", group=group) == g["dispatched"]
            assert value(broker_m, "framebroker_acked_total", group=group) == g["acked"] == n
            assert value(broker_m, "framebroker_redispatched_total", group=group) == 0
            assert value(broker_m, "framebroker_pending_frames", group=group) == 0
        # read after the scrape, the status still says the same, and shows the hop
        again = Control(eps.control, timeout=10).status()
        assert again["frames_sent"] == n and again["hops"]["capture_to_publish"]["count"] == n
        assert "latency: p50/p99 capture->publish " in format_status(again)

        worker_m = scrape(ports["worker"])
        assert value(worker_m, "framebroker_frames_total") == n
        assert hop_count(worker_m, "receive_to_result") == n
        sink_m = scrape(ports["sink"])
        assert value(sink_m, "framebroker_frames_total") == n
        assert hop_count(sink_m, "capture_to_sink") == n
        assert value(sink_m, "framebroker_gaps_total") == 0
        rec_m = scrape(ports["record"])
        assert value(rec_m, "framebroker_frames_written_total") == n
        assert hop_count(rec_m, "receive_to_disk") == n
        assert hop_count(rec_m, "capture_to_receive") == n
        assert 0 < received <= n
        assert hop_count(watch_m, "capture_to_receive") == received
        # a histogram's buckets are cumulative and end at its count
        inf = [v for (name, labels), v in watch_m.items()
               if name == "framebroker_capture_to_receive_seconds_bucket"
               and ("le", "+Inf") in labels]
        assert inf == [received]
        ctl.request("stop")
    finally:
        ctl.close()
    code, stdout, err = b.finish()
    assert code == 0, err
    final = summary(worker)
    assert final["hops"]["receive_to_result"]["count"] == final["frames"] == n
    assert summary(sink)["hops"]["capture_to_sink"]["count"] == n
    rec = summary(record)
    assert rec["hops"]["receive_to_disk"]["count"] == rec["frames_written"] == n
    with h5py.File(out) as h5:  # what the recorder counted is what the file holds
        assert list(h5["frame_id"][:]) == list(range(n))
    seen = summary(watch, ok=(0, 3))
    assert seen["hops"]["capture_to_receive"]["count"] == seen["received"]
    assert json.loads(stdout.strip().splitlines()[-1])["hops"]["capture_to_publish"]["count"] == n


@pytest.mark.parametrize("command", ["serve", "worker", "sink", "record", "watch", "view"])
def test_non_loopback_metrics_refused_without_insecure(command, eps, tmp_path):
    extra = {"serve": [*eps.serve_args()], "record": ["--out", str(tmp_path / "r.h5")],
             "view": ["--http", "127.0.0.1:0"]}.get(command, [])
    args = [command, *extra, "--metrics", "0.0.0.0:9100"]
    if command != "serve":
        args += ["--broker", eps.control]
    if command not in ("serve", "view"):
        args += ["--timeout", "1"]
    r = run_cli(*args)
    assert r.returncode == 2, r
    assert "refusing to serve --metrics on 0.0.0.0:9100" in r.stderr
    assert "--insecure" in r.stderr and "waiting for broker" not in r.stderr


def test_record_metrics_refused_with_shards(eps, tmp_path):
    r = run_cli("record", "--out", str(tmp_path / "s.h5"), "--shards", "2", "--metrics",
                "127.0.0.1:0", "--broker", eps.control, "--timeout", "1")
    assert r.returncode == 2, r
    assert "--metrics serves a single recorder" in r.stderr
    assert not (tmp_path / "s.h5").exists()


def test_a_taken_metrics_port_is_one_line_and_the_broker_keeps_serving(eps, broker_factory):
    """--metrics on a port something else holds: the part says so in one line and exits 1;
    the broker it was to join keeps serving, and a serve that fails this way has released
    its own sockets (a broker starts on the same endpoints right after)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        want = f"--metrics 127.0.0.1:{port}: cannot bind:"
        r = run_cli("serve", *eps.serve_args(), "--metrics", f"127.0.0.1:{port}")
        assert r.returncode == 1 and want in r.stderr and "Traceback" not in r.stderr, r
        b = broker_factory("--fps", "50", "--shape", "16x16")
        b.wait_ready()
        r = run_cli("worker", "--broker", eps.control, "--timeout", "5", "--metrics",
                    f"127.0.0.1:{port}")
        assert r.returncode == 1 and want in r.stderr and "Traceback" not in r.stderr, r
    sent = Control(eps.control, timeout=5).status()["frames_sent"]
    wait_status(eps.control, lambda st: st["frames_sent"] > sent)  # still streaming


def test_without_prometheus_client_the_flag_says_how_to_install(eps, tmp_path):
    hidden = tmp_path / "hide" / "prometheus_client"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"}
    r = subprocess.run([PY, "-m", "broker.cli", "watch", "--broker", eps.control,
                        "--metrics", "127.0.0.1:0", "--timeout", "5"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [
        "framebroker watch: error: --metrics needs prometheus-client, which is not "
        "installed: pip install 'framebroker[metrics]'"]
    # building the parser and running without --metrics never imports it
    probe = ("import sys; from broker.cli import build_parser; build_parser(); "
             "print('prometheus_client' in sys.modules)")
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip() == "False", r


def test_hop_buckets_quantiles_and_merge():
    h = Hop("receive_to_result")
    for _ in range(98):
        h.observe(0.001)  # exactly a bound: counted in that bucket (Prometheus' le)
    h.observe(5.0)
    h.observe(100.0)  # above the top bound: +Inf
    i = BOUNDS_S.index(0.001)
    assert h.counts[i] == 98 and h.counts[-1] == 1 and sum(h.counts) == 100
    s = h.summary()
    assert s["count"] == 100 and s["sum_s"] == pytest.approx(105.098)
    # interpolated within the bucket: rank 50 of the 98 in (0.631 ms, 1 ms]
    assert s["p50_ms"] == pytest.approx(0.631 + 0.369 * 50 / 98, abs=0.001)
    assert s["p99_ms"] == 6310.0  # rank 99: the top of the 5 s observation's bucket
    assert quantile_ms([0] * len(h.counts), 0.5) is None
    both = merge([h.summary(), h.summary()])
    assert both["count"] == 200 and both["buckets"][i] == 196
    assert both["p50_ms"] == s["p50_ms"]
    # run's table: per hop, over every part that measures it, without the buckets
    table = by_hop([{"hops": {"receive_to_result": h.summary()}},
                    {"hops": {"receive_to_result": h.summary()}}, {}])
    assert list(table) == ["receive_to_result"] and table["receive_to_result"]["count"] == 200
    assert "buckets" not in table["receive_to_result"]
    with pytest.raises(ValueError, match="unknown hop"):
        Hop("publish_to_receive")  # not measurable with the v1 header: no such hop


def _two_free_ports() -> int:
    """A port P with P+1 free too (workers --count 2 --metrics 127.0.0.1:P uses both)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two adjacent free ports")


def test_workers_serve_metrics_on_consecutive_ports(eps, broker_factory):
    port = _two_free_ports()
    b = broker_factory("--shape", "16x16", "--fps", "100", "--wait-workers", "2")
    b.wait_ready()
    workers = cli("workers", "--count", "2", "--broker", eps.control, "--no-sink",
                  "--backend", "numpy", "--json", "--timeout", "60",
                  "--metrics", f"127.0.0.1:{port}")
    try:
        wait_status(eps.control, lambda s: s["work"]["groups"].get("fft", {}).get("acked", 0)
                    >= 20)
        per_port = [scrape(p) for p in (port, port + 1)]
        for samples in per_port:
            assert value(samples, "framebroker_info", role="worker", version="0.1.0") == 1
            assert value(samples, "framebroker_frames_total") == hop_count(
                samples, "receive_to_result")
        Control(eps.control, timeout=10).request("stop")
        out = summary(workers)
    finally:
        if workers.poll() is None:
            workers.kill()
    assert b.finish()[0] == 0
    frames = sorted(w["frames"] for w in out["workers"])
    assert sum(frames) == out["frames"] and all(
        w["hops"]["receive_to_result"]["count"] == w["frames"] for w in out["workers"])


def test_run_reports_every_hop(tmp_path, eps):
    r = run_cli("run", "--frames", "60", "--shape", "24x32", "--workers", "1", "--backend",
                "numpy", "--record", str(tmp_path / "r.h5"), "--json", "--progress", "0",
                *eps.serve_args(), timeout=240)
    assert r.returncode == 0, r
    rep = json.loads(r.stdout)
    assert list(rep["hops"]) == ["capture_to_publish", "capture_to_receive",
                                 "receive_to_result", "capture_to_sink", "receive_to_disk"]
    assert {h["count"] for h in rep["hops"].values()} == {60}
    for h in rep["hops"].values():
        assert 0 < h["p50_ms"] <= h["p99_ms"]
    from broker.run import format_report

    line = [ln for ln in format_report(rep).splitlines() if "latency by hop" in ln]
    assert line and "capture->publish" in line[0] and "receive->disk" in line[0]


def test_view_serves_the_hop_of_the_frames_it_shows(eps, broker_factory):
    port = free_port()
    b = broker_factory("--shape", "24x32", "--fps", "60")
    b.wait_ready()
    view = cli("view", "--broker", eps.control, "--http", "127.0.0.1:0", "--max-fps", "20",
               "--metrics", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            samples = scrape(port)
            shown = value(samples, "framebroker_frames_shown_total")
            if shown >= 3:
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
        count = hop_count(samples, "capture_to_receive")
        assert shown <= count <= shown + 1  # observed as a frame is shown, counted after
        assert value(samples, "framebroker_frames_total") >= count
        assert value(samples, "framebroker_info", role="view", version="0.1.0") == 1
    finally:
        view.terminate()
        view.communicate(timeout=60)
    assert view.returncode == 0


def test_bench_metrics_writes_its_figures(tmp_path):
    out = tmp_path / "m.json"
    r = subprocess.run([PY, str(REPO / "bench" / "metrics.py"), "--calls", "2000",
                        "--rounds", "2", "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r
    data = json.loads(out.read_text())
    assert data["calls"] == 2000 and data["rounds"] == 2
    for key in ("hop_observe_ns", "hop_since_capture_ns", "prometheus_observe_ns", "scrape_ms"):
        assert data[key] > 0, data
    assert "prometheus-client / Hop observe" in r.stdout


def test_scrapes_while_streaming_flat_out_leave_the_broker_serving(eps, broker_factory):
    """The collector reads the broker's tables from the HTTP thread while the loop
    changes them (subscriber reports, work groups): every scrape parses, the counts
    only grow, and the broker ends cleanly."""
    port = free_port()
    b = broker_factory("--shape", "16x16", "--fps", "0", "--json", "--metrics",
                       f"127.0.0.1:{port}")
    b.wait_ready()
    watch = cli("watch", "--broker", eps.control, "--progress", "0", "--json",
                "--policy", "latest:1", "--timeout", "60")
    worker = cli("worker", "--broker", eps.control, "--no-sink", "--backend", "numpy",
                 "--json", "--timeout", "60")
    try:
        wait_status(eps.control, lambda s: s["consumers"] and s["work"]["groups"].get(
            "fft", {}).get("acked", 0) > 0)
        last = -1.0
        for _ in range(40):
            samples = scrape(port)
            frames = value(samples, "framebroker_frames_total")
            assert frames >= last and hop_count(samples, "capture_to_publish") >= frames - 1
            last = frames
        Control(eps.control, timeout=10).request("stop")
    finally:
        for p in (watch, worker):
            if p.poll() is None:
                p.communicate(timeout=60)
    code, out, err = b.finish()
    assert code == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["hops"]["capture_to_publish"]["count"] == final["frames_sent"] >= last
