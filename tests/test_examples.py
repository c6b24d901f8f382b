"""The second implementation: examples/ was written from docs/protocol.md alone and
imports nothing from ``broker``. Each example runs against a real broker over tcp, ipc
and shm, and every frame id and content stamp it reports is checked."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PY, Endpoints

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FRAMES = 300
# a queue longer than the stream at every hop, so no frame can be dropped and the test
# can demand every id (lossy delivery is the protocol's, tested elsewhere)
STREAM = ("--frames", str(FRAMES), "--wait-subscribers", "1", "--hwm", "1000",
          "--shape", "48x64x3")
STDLIB = set(sys.stdlib_module_names)


def ipc_endpoints(tmp_path: Path) -> Endpoints:
    return Endpoints(*(f"ipc://{tmp_path}/{name}" for name in ("pub", "work", "ctl", "res")))


def example(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, str(EXAMPLES / name), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=EXAMPLES)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    return json.loads(out.strip().splitlines()[-1])


def served(broker_factory, eps: Endpoints, name: str, *args: str, shm: str = "") -> dict:
    """Run example ``name`` against a broker streaming FRAMES synthetic frames."""
    b = broker_factory(*STREAM, *(("--shm", shm) if shm else ()), endpoints=eps)
    b.wait_ready()
    res = result(example(name, eps.control, *args))
    rc, out, err = b.finish()
    assert rc == 0, err
    return res


def test_examples_import_nothing_from_broker_and_stay_small():
    for path in sorted(EXAMPLES.glob("*.py")):
        tree = ast.parse(path.read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
        assert mods - STDLIB <= {"zmq", "wire"}, (path.name, mods - STDLIB)
        assert len(path.read_text().splitlines()) < 150, path.name


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_subscriber_example_gets_every_frame_intact(transport, eps, broker_factory,
                                                    tmp_path):
    ep = eps if transport == "tcp" else ipc_endpoints(tmp_path)
    res = served(broker_factory, ep, "subscribe.py")
    assert res["ids"] == list(range(FRAMES))  # each one's content stamp matched its id
    assert (res["total"], res["rejected"]) == (FRAMES, 0)
    assert len(res["session"]) == 16 and int(res["session"], 16) >= 0


@pytest.mark.parametrize("transport", ["tcp", "ipc", "shm"])
def test_work_member_example_acknowledges_every_frame(transport, eps, broker_factory,
                                                      tmp_path):
    """A member of a ``sub-`` group (counted by --wait-subscribers) that acknowledges
    with DONE: the broker sends END only once the group acknowledged everything."""
    ep = ipc_endpoints(tmp_path) if transport == "ipc" else eps
    args = ("sub-example", "--window", "8") + (("--shm",) if transport == "shm" else ())
    res = served(broker_factory, ep, "work_member.py", *args,
                 shm="512slots" if transport == "shm" else "")
    assert res["ids"] == list(range(FRAMES))
    assert (res["total"], res["rejected"]) == (FRAMES, 0)
    assert res["transport"] == ("shm" if transport == "shm" else "tcp")


def test_shm_reader_example_reads_every_frame_from_the_ring(eps, broker_factory):
    """1024 slots for 300 frames: no slot is reused, so every frame must be read."""
    res = served(broker_factory, eps, "shm_reader.py", shm="1024slots")
    assert res["ids"] == list(range(FRAMES))
    assert (res["total"], res["rejected"], res["overwritten"]) == (FRAMES, 0, 0)
    assert res["slots"] == 1024
