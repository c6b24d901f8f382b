"""framebroker installed the way a wheel installs (``pip install /path/to/clone``, not
editable) into a fresh venv, and run from outside the clone: ``bench`` and ``tune``
find their code in the package, write only where they are told, and ``run --config``
accepts what ``tune --save`` wrote.

One venv per test session (``--system-site-packages``, so the dependencies come from
this environment and pip's cache builds only framebroker itself); ``-m install``
selects these tests, ``-m "not install"`` leaves them out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import make_endpoints

pytestmark = pytest.mark.install
CLONE = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "fb"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root)],
                   check=True, timeout=120)
    pip = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(CLONE)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return root


def _framebroker(venv: Path, cwd: Path, *args: str, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed copy
    return subprocess.run([str(venv / "bin" / "framebroker"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_the_wheel_copy(venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import broker, broker.bench.transport as t; print(broker.__file__); "
                        "print(t.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert str(venv) in line and "site-packages" in line, line  # not the clone


def test_bench_and_tune_from_a_wheel_install(venv, tmp_path):
    out = tmp_path / "report"
    r = _framebroker(venv, tmp_path, "bench", "--quick", "--parts", "transport",
                     "--seconds", "0.2", "--repeat", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Bad address" not in r.stderr
    rows = json.loads((out / "transport.json").read_text())["rows"]
    assert {(row["transport"], row["method"]) for row in rows} >= {
        ("tcp", "pickle"), ("tcp", "framebroker"), ("tcp", "raw")}
    assert all(row["fps"] > 0 and len(row["fps_runs"]) == 2 for row in rows)
    assert "transport tcp, fps" in r.stdout and f"report: {out / 'report.md'}" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]

    t = _framebroker(venv, tmp_path, "tune", "--shape", "60x80", "--budget", "10",
                     "--only", "transport,fft", "--save", "t.toml")
    assert t.returncode == 0, t.stderr
    assert "recommended: framebroker run" in t.stdout and "wrote t.toml" in t.stdout
    config = tomllib.loads((tmp_path / "t.toml").read_text())
    assert config["shape"] == "60x80" and config["source"] == "synthetic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "t.toml"]

    eps = make_endpoints()
    run = _framebroker(venv, tmp_path, "run", "--config", "t.toml", "--frames", "50",
                       "--workers", "1", "--json", *eps.serve_args(), timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["stages"]["processed"]["frames"] == 50
