"""``framebroker bench`` and ``framebroker tune`` as real processes: they finish, write
what they promise where they are told (and nothing else), mark what they cannot tell,
and recommend flags ``run`` accepts. No timing thresholds: the figures depend on the
machine, the structure does not."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from broker.bench.stats import spread
from broker.bench.transport import peer_methods
from broker.bench.common import FrameSpec
from broker.cli import _apply_config, build_parser
from broker.recorder import RecordingWriter
from broker.sources import synthetic_frame
from conftest import PY, run_cli


def _png_ok(path) -> bool:
    image = cv2.imread(str(path))
    return image is not None and image.ndim == 3 and min(image.shape[:2]) > 100


def _rounds_ok(fig: dict, n: int) -> None:
    """A figure is the median of its n rounds, with their min and max."""
    runs = fig["fps_runs"]
    assert len(runs) == n
    assert fig["fps_min"] == min(runs) <= fig["fps"] <= max(runs) == fig["fps_max"]
    assert fig["fps"] == float(np.median(runs))


def test_bench_e2e_reports_efficiency_and_plot(tmp_path):
    r = run_cli("bench", "--quick", "--parts", "e2e", "--frames", "150", "--repeat", "2",
                "--out", str(tmp_path), timeout=400)
    assert r.returncode == 0, r.stderr
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["lost"] == {} and e2e["rounds"] == 2
    assert set(e2e["stages"]) == {"transport", "fft", "recorder"}
    assert e2e["stages"]["transport"]["source"] == "transport cells"  # transport not run
    for stage in e2e["stages"].values():
        _rounds_ok(stage, 2)
    e2e_runs = [min(a, b) for a, b in zip(e2e["pipeline"]["processed"]["fps_runs"],
                                          e2e["pipeline"]["recorded"]["fps_runs"])]
    assert e2e["e2e_fps_runs"] == e2e_runs and e2e["e2e_fps"] == float(np.median(e2e_runs))
    slowest = min(st["fps"] for st in e2e["stages"].values())
    assert e2e["efficiency"] == e2e["e2e_fps"] / slowest
    report = (tmp_path / "report.md").read_text()
    shown = "**noisy**" if e2e["noisy"] else f"**{e2e['efficiency']:.2f}**"
    assert f"**pipeline efficiency** | {shown}" in report
    assert "## Transport" not in report  # only the part that ran
    assert _png_ok(tmp_path / "e2e.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.json", "e2e.json", "e2e.png", "report.md"]  # no recordings left behind
    assert "pipeline FFT + recording" in r.stdout
    assert f"report: {tmp_path / 'report.md'}" in r.stdout


def test_bench_transport_writes_under_the_cwd_and_never_over_a_report(tmp_path):
    """No --out: a new bench-TIMESTAMP directory under the cwd, said where; --peers adds
    the imagezmq columns (where installed) in the same rounds; a second run into that
    directory is refused before it measures, unless --overwrite."""
    r = subprocess.run([PY, "-m", "broker.cli", "bench", "--parts", "transport", "--seconds",
                        "0.2", "--repeat", "2", "--peers"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    (out,) = tmp_path.iterdir()
    assert out.name.startswith("bench-") and out.is_dir()
    assert f"report: {out / 'report.md'}" in r.stdout
    assert f"in {out}" in r.stdout.splitlines()[-1]
    data = json.loads((out / "transport.json").read_text())
    assert data["seconds_per_cell"] == 0.2 and data["repeat"] == 2
    peers = set(peer_methods(FrameSpec()))
    assert {r["method"] for r in data["rows"]} == {"pickle", "framebroker", "raw"} | peers
    for row in data["rows"]:
        _rounds_ok(row, 2)
        assert isinstance(row["noisy"], list)
    report = (out / "report.md").read_text()
    assert "## Transport" in report and "| 640x480x3 u8 | tcp |" in report
    for peer in peers:
        assert f"{peer} fps" in report and f"vs {peer}" in report
    assert "transport tcp, fps" in r.stdout  # the summary table
    assert _png_ok(out / "transport.png")
    before = (out / "report.md").read_bytes()
    again = run_cli("bench", "--parts", "transport", "--out", str(out), timeout=60)
    assert again.returncode == 1
    assert "already holds report.md" in again.stderr and "--overwrite" in again.stderr
    assert (out / "report.md").read_bytes() == before


def _tune(tmp_path, *args: str) -> tuple[dict, str]:
    out, toml = tmp_path / "tune.json", tmp_path / "t.toml"
    r = run_cli("tune", "--record-dir", str(tmp_path), "--json", "--out", str(out),
                "--save", str(toml), *args, timeout=240)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert json.loads(out.read_text()) == result
    assert "recommended: framebroker run" in r.stderr  # the table, beside the JSON
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".h5") == [
        "t.toml", "tune.json"]  # nothing else written (the recorder trials cleaned up)
    return result, r.stderr


def _check_decisions(result: dict, table: str) -> None:
    """Each measured dimension: every setting in rounds; a recommendation only where its
    gain over run's default beats the spread; nothing said about what was not measured."""
    for o in result["outcomes"]:
        runs = o["runs"]
        if o["recommended"]:
            best, default = runs[o["recommended"]], runs[o["default"]]
            assert np.median(best) - np.median(default) > max(spread(best), spread(default))
        else:
            assert o["flags"] == {}
    flags = result["flags"]
    for s in result["skipped"]:
        assert f"skipped {s['dimension']}: {s['reason']}" in table
    measured = {o["dimension"] for o in result["outcomes"]}
    if "workers" not in measured:
        assert "workers" not in flags and "threads" not in flags
    if "recorder" not in measured:
        assert not {"chunk-frames", "compression", "compress-threads"} & set(flags)
    if "hwm" not in measured:
        assert "hwm" not in flags and "policy" not in table


def _run_args(toml_path):
    """What ``framebroker run --config FILE`` makes of the file (it must accept it)."""
    argv = ["run", "--config", str(toml_path)]
    parser = build_parser()
    _apply_config(parser, argv)
    return parser.parse_args(argv)


def test_tune_measures_in_rounds_and_saves_a_config_run_accepts(tmp_path):
    result, table = _tune(tmp_path, "--shape", "60x80", "--budget", "20")
    assert result["shape"] == [60, 80] and result["budget_s"] == 20
    measured = {o["dimension"] for o in result["outcomes"]}
    assert measured | {s["dimension"] for s in result["skipped"]} == {
        "transport", "fft", "workers", "recorder", "hwm"}
    assert "transport" in measured  # the first dimension always fits 20 s
    transport = next(o for o in result["outcomes"] if o["dimension"] == "transport")
    assert transport["default"] == "tcp" and {"tcp", "ipc"} <= set(transport["settings"])
    assert all(len(transport["runs"][s]) >= 2 for s in transport["settings"]) or (
        transport["reason"].startswith("not tuned") and not transport["recommended"])
    _check_decisions(result, table)
    config = tomllib.loads((tmp_path / "t.toml").read_text())
    assert config == result["flags"]
    args = _run_args(tmp_path / "t.toml")
    assert args.shape == (60, 80) and args.dtype == "uint8"
    for key, value in config.items():
        if key not in ("source", "shape", "shm"):  # parsed into objects; checked apart
            assert str(getattr(args, key.replace("-", "_"))) == str(value)
    assert bool(args.shm) == ("shm" in config) and str(args.source) == config["source"]
    assert result["command"] == "framebroker run " + shlex.join(
        [a for k, v in config.items() for a in (f"--{k}", str(v))])
    if result["predicted"]:
        p = result["predicted"]
        assert p["min"] <= p["median"] <= p["max"] and "predicted:" in table


def test_tune_a_replayed_recording(tmp_path):
    """--source h5:FILE: the recording's own frames and shape, not --shape's."""
    path = tmp_path / "rec.h5"
    with RecordingWriter(path=path, shape=(48, 64), dtype="uint16", stream="cam",
                         source="test", frames_expected=20) as w:
        for i in range(20):
            w.write(i, i, synthetic_frame((48, 64), "uint16", i))
    result, table = _tune(tmp_path, "--source", f"h5:{path}", "--budget", "12", "--only",
                          "transport,fft")
    assert (result["shape"], result["dtype"]) == ([48, 64], "uint16")
    assert result["flags"]["source"] == f"h5:{path}" and "shape" not in result["flags"]
    assert {o["dimension"] for o in result["outcomes"]} <= {"transport", "fft"}
    assert f"48x64 uint16 from h5:{path}" in table
    _check_decisions(result, table)
    assert _run_args(tmp_path / "t.toml").source.kind == "h5"


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
