"""Shared helpers: free loopback ports, real broker processes, the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pytest

# One ring directory per test session (before broker.shm reads it; parts started by the
# tests inherit it), so that two sessions running side by side never judge each other's rings.
os.environ["FRAMEBROKER_SHM_DIR"] = tempfile.mkdtemp(prefix="fb-tests-", dir="/dev/shm")

import broker.client  # noqa: E402
from broker import shm  # noqa: E402
from broker.broker import free_tcp_endpoints
from broker.client import Control
from broker.security import PLAIN, Security

REPLY_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replycheck")
sys.path.insert(0, REPLY_CHECK)
import replyrecord  # noqa: E402
import replyschema  # noqa: E402

PY = sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    return int(free_tcp_endpoints(1, host)[0].rpartition(":")[2])


@dataclass
class Endpoints:
    pub: str
    work: str
    control: str
    results: str

    def serve_args(self) -> list[str]:
        return ["--pub", self.pub, "--work", self.work, "--control", self.control,
                "--results", self.results]


def make_endpoints(host: str = "127.0.0.1") -> Endpoints:
    return Endpoints(*free_tcp_endpoints(4, host))


@pytest.fixture
def eps() -> Endpoints:
    return make_endpoints()


def cli(*args: str, **kw) -> subprocess.Popen:
    """Start ``framebroker ARGS`` as a real process (stdout/stderr captured)."""
    return subprocess.Popen([PY, "-m", "broker.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def summary(proc: subprocess.Popen, ok: tuple[int, ...] = (0,)) -> dict:
    """The JSON summary a ``--json`` part prints last, once it exited with a code in ``ok``."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode in ok, (proc.returncode, out, err)
    return json.loads(out.strip().splitlines()[-1])


def watch(eps: "Endpoints", *args: str) -> subprocess.Popen:
    """``framebroker watch`` verifying every frame, with a JSON summary at the end."""
    return cli("watch", "--broker", eps.control, "--verify", "--json", "--progress", "0",
               "--timeout", "30", *args)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "broker.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


class BrokerProc:
    """A ``framebroker serve`` process; stopped (and reaped) when the test ends."""

    def __init__(self, eps: Endpoints, *args: str) -> None:
        self.eps = eps
        self.proc = cli("serve", *eps.serve_args(), "--progress", "0", *args)

    def wait_ready(self, timeout: float = 20) -> dict:
        ctl = Control(self.eps.control, timeout=0.5)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"broker exited: {self.proc.communicate()}")
                try:
                    return ctl.endpoints()
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        finally:
            ctl.close()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def broker_factory(eps: Endpoints) -> Iterator:
    procs: list[BrokerProc] = []

    def start(*args: str, endpoints: Endpoints | None = None) -> BrokerProc:
        b = BrokerProc(endpoints or eps, *args)
        procs.append(b)
        return b

    yield start
    for b in procs:
        b.kill()
    if any(b.proc.returncode == -signal.SIGKILL for b in procs):
        shm.remove_stale()  # what the next broker of the stream would do


def ring_files() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(shm.PREFIX + "*") if p.is_file()}


@pytest.fixture(autouse=True, scope="session")
def _no_ring_left_behind() -> Iterator[None]:
    """No test may leave a framebroker ring in /dev/shm (files of other runs that were
    there before the session are not ours to judge)."""
    before = ring_files()
    yield
    left = ring_files() - before
    if not left:
        shutil.rmtree(shm.SHM_DIR, ignore_errors=True)
    assert not left, f"rings left in {shm.SHM_DIR}: {sorted(left)}"


def wait_status(control: str, ready, timeout: float = 60, security: Security = PLAIN) -> dict:
    """Poll the broker's status until ``ready(status)``; fails the test after ``timeout``
    (a bound on a hang, not a performance threshold)."""
    ctl = Control(control, timeout=5, security=security)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status = ctl.status()
                if ready(status):
                    return status
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "broker never reached the awaited state"
            time.sleep(0.01)
    finally:
        ctl.close()


def acked(group: str, n: int):
    """``wait_status`` predicate: ``group`` has acknowledged more than ``n`` frames."""
    return lambda s: s["work"]["groups"].get(group, {}).get("acked", 0) > n


def kill_holding_frames(control: str, pid: int) -> None:
    """SIGKILL worker ``pid`` while it holds frames: stop it first, so the broker's
    credit fills its window, then kill it. The re-dispatch is then certain, not luck."""
    os.kill(pid, signal.SIGSTOP)
    wait_status(control, lambda s: s["work"]["groups"]["fft"]["members"]
                .get(f"worker-{pid}", {}).get("inflight", 0) > 0)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _quiet_opencv() -> None:
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


# --- every control reply of the suite is validated against docs/schemas -------------

REPLIES_SEEN: Counter[str] = Counter()  # command -> replies validated (both sources)
_bad_replies: list[str] = []
_lock = threading.Lock()


def _check(cmd: str | None, reply: object, where: str) -> None:
    try:
        replyschema.check_reply(cmd, reply)
    except replyschema.jsonschema.ValidationError as exc:
        with _lock:
            _bad_replies.append(f"{where}: reply to {cmd!r} breaks docs/schemas: "
                                f"{exc.message} at {list(exc.absolute_path)}: {reply}")
        raise
    with _lock:
        REPLIES_SEEN[str(cmd)] += 1


@pytest.fixture(autouse=True, scope="session")
def _control_replies_validated() -> Iterator[None]:
    """This process's Control validates each reply as it arrives; the CLI processes
    tests start log theirs (tests/replycheck), validated after each test. (Not in
    pytest's tmp_path: other pytest runs on the machine may prune that.)"""
    replyrecord.install(broker.client, lambda cmd, reply: _check(cmd, reply, "test process"))
    fd, log = tempfile.mkstemp(prefix="framebroker-replies-", suffix=".jsonl")
    os.close(fd)
    os.environ[replyrecord.LOG_ENV] = log
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPLY_CHECK, os.environ.get("PYTHONPATH")) if p)
    try:
        yield
    finally:
        os.unlink(log)


@pytest.fixture(autouse=True)
def _no_reply_breaks_the_schemas() -> Iterator[None]:
    log = os.environ[replyrecord.LOG_ENV]
    start = os.path.getsize(log)
    yield
    with open(log, "rb") as f:
        f.seek(start)
        lines = f.read().splitlines()
    for line in lines:
        entry = json.loads(line)
        try:
            _check(entry["cmd"], entry["reply"], f"CLI process {entry['pid']}")
        except replyschema.jsonschema.ValidationError:
            pass  # recorded in _bad_replies
    with _lock:
        bad, _bad_replies[:] = list(_bad_replies), []
    assert not bad, "\n".join(bad)
