"""``framebroker bench`` and ``framebroker tune`` as real processes: they finish, write
what they promise and recommend flags ``run`` accepts. No timing thresholds: the
figures depend on the machine, the structure does not."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from broker.cli import build_parser
from conftest import run_cli


def _png_ok(path) -> bool:
    image = cv2.imread(str(path))
    return image is not None and image.ndim == 3 and min(image.shape[:2]) > 100


def test_bench_e2e_reports_efficiency_and_plot(tmp_path):
    r = run_cli("bench", "--quick", "--only", "e2e", "--frames", "300", "--out-dir",
                str(tmp_path), timeout=240)
    assert r.returncode == 0, r.stderr
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["lost"] == {}
    assert set(e2e["stages"]) == {"transport", "fft", "recorder"}
    assert e2e["stages"]["transport"]["source"] == "one transport cell"  # transport not run
    assert all(st["fps"] > 0 for st in e2e["stages"].values())
    assert e2e["e2e_fps"] == min(e2e["pipeline"]["processed"]["fps"],
                                 e2e["pipeline"]["recorded"]["fps"])
    slowest = min(st["fps"] for st in e2e["stages"].values())
    assert e2e["efficiency"] == e2e["e2e_fps"] / slowest
    report = (tmp_path / "report.md").read_text()
    assert f"**pipeline efficiency** | **{e2e['efficiency']:.2f}**" in report
    assert "## Transport" not in report  # only the part that ran
    assert _png_ok(tmp_path / "e2e.png")
    assert not list(tmp_path.glob("e2e-*")), "temporary recordings left behind"
    assert "pipeline FFT + recording" in r.stdout
    assert f"report: {tmp_path / 'report.md'}" in r.stdout


def test_bench_transport_tiny_cells(tmp_path):
    r = run_cli("bench", "--only", "transport", "--seconds", "0.2", "--repeat", "1",
                "--out-dir", str(tmp_path), timeout=400)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "transport.json").read_text())
    assert data["seconds_per_cell"] == 0.2 and data["repeat"] == 1
    assert {r["method"] for r in data["rows"]} == {"pickle", "framebroker", "raw"}
    # the peers (imagezmq where installed); the limit is the fastest of them
    assert {"tcp-socket", "raw", "framebroker"} <= {r["method"] for r in data["peers"]}
    assert "the fastest peer (imagezmq, raw PUB, plain socket)" in r.stdout
    report = (tmp_path / "report.md").read_text()
    assert "## Transport" in report and "| 640x480x3 u8 | tcp |" in report
    assert "transport tcp, fps" in r.stdout  # the summary table
    assert _png_ok(tmp_path / "transport.png")
    assert not (tmp_path / "e2e.png").exists()


def _tune(tmp_path, *args: str) -> dict:
    out = tmp_path / "tune.json"
    r = run_cli("tune", "--shape", "60x80", "--dir", str(tmp_path), "--json", "--out",
                str(out), *args, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert json.loads(out.read_text()) == result
    assert "recommended: framebroker run" in r.stderr  # the table, beside the JSON
    assert [p.name for p in tmp_path.iterdir()] == ["tune.json"]  # nothing else written
    return result


def _parse_run(flags: str):
    return build_parser().parse_args(["run", *shlex.split(flags)])


def test_tune_recommends_flags_run_accepts(tmp_path):
    result = _tune(tmp_path, "--budget", "20")
    assert result["shape"] == [60, 80] and result["budget_s"] == 20
    tried = {t["dimension"] for t in result["trials"]}
    skipped = {s["dimension"] for s in result["skipped"]}
    assert tried | skipped >= {"transport", "fft", "workers", "recorder", "hwm"}
    for t in result["trials"]:
        assert t["figure"] is None or t["figure"] > 0, t
    assert sum(t["chosen"] for t in result["trials"]) == len(result["best"])
    args = _parse_run(result["recommendation"])
    assert result["command"] == "framebroker run " + result["recommendation"]
    if "hwm" in result["best"]:
        assert f"--hwm {args.hwm}" in result["recommendation"]
    if "recorder" in result["best"]:
        assert result["best"]["recorder"] == f"chunk {args.chunk_frames}, {args.compression}"


def test_tune_workers_runs_the_pipeline(tmp_path):
    result = _tune(tmp_path, "--budget", "14", "--only", "fft,workers")
    workers = [t for t in result["trials"] if t["dimension"] == "workers"]
    assert len(workers) >= 2 and all(t["figure"] for t in workers), workers
    args = _parse_run(result["recommendation"])
    assert result["best"]["workers"].startswith(f"{args.workers} x {args.threads} thread")
    assert {t["dimension"] for t in result["trials"]} == {"fft", "workers"}


def test_peers_bench_measures_framebroker_beside_imagezmq_and_raw_in_one_run(tmp_path):
    """bench/peers.py: every method gets a cell of real frames at the receiver, the
    JSON holds what the table printed (a smoke run: no speed is asserted)."""
    pytest.importorskip("imagezmq")  # in the test extra
    out = tmp_path / "peers.json"
    methods = ["tcp-socket", "imagezmq-reqrep", "raw", "framebroker", "framebroker-flat-out"]
    script = Path(__file__).resolve().parent.parent / "bench" / "peers.py"
    res = subprocess.run([sys.executable, str(script), "--sizes", "640x480x3 u8",
                          "--methods", *methods, "--seconds", "0.2", "--warmup", "0.05",
                          "--repeat", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == methods
    for row in data["rows"]:
        assert row["frames"] > 0 and row["mb_per_s"] > 0
        assert row["mb_per_s"] == pytest.approx(row["fps"] * 640 * 480 * 3 / 1e6)
    assert "| 640x480x3 u8 |" in res.stdout
    assert data["header"]["pack_us"] > 0 and data["header"]["validate_us"] > 0


def test_gray_bench_times_bgr_to_gray_beside_opencv(tmp_path):
    """bench/gray.py: every method timed at every size, the table and JSON agree."""
    out = tmp_path / "gray.json"
    script = Path(__file__).resolve().parent.parent / "bench" / "gray.py"
    res = subprocess.run([sys.executable, str(script), "--rounds", "1", "--number", "2",
                          "--repeat", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["size"] for r in rows} == {"640x480x3 u8", "1920x1080x3 u8"}
    assert {"bgr_to_gray", "opencv 1 thread"} <= {r["method"] for r in rows}
    assert all(r["us"] > 0 for r in rows) and "| 640x480x3 u8 |" in res.stdout
