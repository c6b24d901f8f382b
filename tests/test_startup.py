"""Start-up: what each part imports on its way to the first frame, and run's checks
before it starts its parts (issue 17: a default ``run`` should reach its first frame
quickly, and every part rebuilds the whole CLI parser)."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from broker.run import _listening
from conftest import PY, free_port

# Libraries no part of a default run uses (CURVE, --out *.h5, record, bench, tune, the
# scipy backend, video sources, Ray and the viewer bring them in when asked for).
HEAVY = ("h5py", "hdf5plugin", "scipy", "asyncio", "psutil", "cv2", "ray", "jsonschema",
         "selenium", "rich", "broker.benchmark", "broker.tune", "broker.recorder", "broker.zap")


def _loaded_after(code: str) -> list[str]:
    """Which HEAVY modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_parts_of_a_default_run_import_no_heavy_library():
    code = ("import broker.cli as cli\ncli.build_parser()\n"
            "import broker.broker, broker.sink, broker.workers, broker.run, broker.fft")
    assert _loaded_after(code) == []


def test_the_optional_paths_still_import_what_they_need():
    """The lazy imports are where they are used: an .h5 results file, CURVE's ZAP handler."""
    code = ("import broker.results_h5, broker.zap")
    assert {"h5py", "broker.recorder", "asyncio", "broker.zap"} <= set(_loaded_after(code))


def test_pyfftw_without_scipy_gives_the_same_spectrum_as_the_scipy_backend():
    """pyfftw is imported with its scipy interfaces hidden; scipy itself, and those
    interfaces, still import afterwards, and both backends agree on a real frame."""
    code = """
import sys
import numpy as np
from broker.fft import FFTProcessor, pyfftw
assert "scipy" not in sys.modules and "scipy.fftpack" not in sys.modules
frame = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 7919 % 251).astype(np.uint8)
a = FFTProcessor((48, 64), np.dtype("uint8"), output="magnitude", backend="pyfftw",
                 planner="estimate").process(frame).copy()
b = FFTProcessor((48, 64), np.dtype("uint8"), output="magnitude", backend="scipy",
                 planner="estimate").process(frame).copy()
import scipy.fftpack
import pyfftw.interfaces.scipy_fft
np.save(sys.stdout.buffer, np.stack([a, b]))
"""
    r = subprocess.run([PY, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    a, b = np.load(io.BytesIO(r.stdout))
    assert a.shape == (48, 33) and a.max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_listening_tells_a_free_address_from_a_listener(tmp_path):
    port = free_port()
    assert _listening(f"tcp://127.0.0.1:{port}") is False
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert _listening(f"tcp://127.0.0.1:{port}") is False  # bound, not listening
        s.listen()
        assert _listening(f"tcp://127.0.0.1:{port}") is True
    path = tmp_path / "control.sock"
    assert _listening(f"ipc://{path}") is False
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        assert _listening(f"ipc://{path}") is True
    assert _listening("inproc://control") is True  # cannot be told: ask the broker


def test_startup_bench_times_both_setups_to_their_first_frame(tmp_path):
    """bench/startup.py: one round of each setup, its phases in order (a smoke run: no
    speed is asserted), the JSON holds what the table printed."""
    out = tmp_path / "startup.json"
    script = Path(__file__).resolve().parent.parent / "bench" / "startup.py"
    res = subprocess.run([sys.executable, str(script), "--rounds", "1", "--frames", "20",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    run, sw = data["medians"]["run"], data["medians"]["serve+watch"]
    # the broker stamps its first frame just after sending it: a consumer may be earlier
    assert 0 < run["to_spawn_s"] < min(run["to_first_frame_s"], run["to_first_result_s"])
    assert sw["to_first_frame_at_broker_s"] > 0 and sw["to_first_frame_s"] > 0
    assert [r["setup"] for r in data["runs"]] == ["run", "serve+watch"]
    assert f"| run | first result | {run['to_first_result_s']:.2f} |" in res.stdout


def test_a_worker_retries_a_sink_not_bound_yet_at_once(eps, broker_factory):
    """The worker learns the results endpoint from the broker at the same moment as the
    sink, which binds it a little later: libzmq's default 100 ms before the retry
    delayed the first result, so the worker's PUSH retries after 10 ms (backing off)."""
    import zmq

    from broker.workers import RECONNECT_MS, Worker, WorkerConfig

    broker_factory("--frames", "5", "--wait-workers", "1", "--shape", "24x32").wait_ready()
    worker = Worker(WorkerConfig(broker=eps.control, planner="estimate"), log=lambda m: None,
                    ctx=zmq.Context())
    try:
        assert worker.push.getsockopt(zmq.RECONNECT_IVL) == RECONNECT_MS == 10
        assert worker.push.getsockopt(zmq.RECONNECT_IVL_MAX) == 1000
    finally:
        worker.close()
        worker.ctx.term()
