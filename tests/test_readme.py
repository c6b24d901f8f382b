"""Every ``framebroker`` command in the README's shell examples, run as written.

The commands are taken from the README itself (so a new or changed example is tested
without touching this file), with only what a shared test machine needs rewritten:
the default ports become free ones (and 0.0.0.0 becomes 127.0.0.1: tests stay on
loopback), files go to a temporary directory. A client command gets a broker of its
own; a long-running command is stopped once it has shown it works (the broker's
`stop`, so parts end at end-of-stream as documented, or SIGINT for the ones that run
until stopped), and each must exit as the README says.
"""
from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from broker.protocol import BLOCK_GROUP_PREFIX
from conftest import PY, free_port, make_endpoints, wait_status

README = Path(__file__).resolve().parent.parent / "README.md"
# minutes-long measurements with tests of their own (tests/test_bench_cli.py)
SKIP = {"bench", "tune"}
CLIENTS = {"watch", "view", "status", "snapshot", "pause", "resume", "stop", "worker",
           "sink", "record"}
DEFAULT_PORTS = {"5555": "pub", "5556": "work", "5557": "control", "5558": "results"}


def readme_commands() -> list[str]:
    """Each framebroker command of the README's ```sh blocks: continuation lines joined,
    comments dropped, ``a; b`` kept together (they run in order), ``$C`` expanded."""
    commands, variables = [], {}
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip().rstrip("&").strip()
            assignment = re.fullmatch(r'(\w+)="(.*)"', line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if line.startswith("framebroker ") and line.split()[1] not in SKIP:
                commands.append(line)
    return commands


def test_the_readme_has_the_commands_this_test_expects():
    commands = readme_commands()
    subcommands = {shlex.split(part)[1] for c in commands for part in c.split(";")}
    assert subcommands >= {"serve", "watch", "view", "status", "snapshot", "pause", "worker",
                           "sink", "record", "inspect", "run", "keys"}, subcommands


class Workspace:
    """The temporary directory commands run in, with what the README assumes exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.procs: list[subprocess.Popen] = []
        self.eps = make_endpoints()
        self.http = free_port()
        self.extra = free_port()  # sink --publish
        self.metrics: dict[str, int] = {}  # --metrics 127.0.0.1:91NN -> a free port each
        self.security = None
        self.current: subprocess.Popen | None = None  # the broker started for clients

    def rewrite(self, words: list[str]) -> list[str]:
        out = []
        for w in words:
            for port, name in DEFAULT_PORTS.items():
                w = w.replace(f"127.0.0.1:{port}", getattr(self.eps, name).split("//")[1])
                w = w.replace(f"0.0.0.0:{port}", getattr(self.eps, name).split("//")[1])
            w = w.replace("127.0.0.1:8080", f"127.0.0.1:{self.http}")
            w = w.replace("127.0.0.1:5559", f"127.0.0.1:{self.extra}")
            w = re.sub(r"127\.0\.0\.1:(91\d\d)\b", lambda m: "127.0.0.1:"
                       f"{self.metrics.setdefault(m[1], free_port())}", w)
            out.append(w)
        sub = out[0]
        if sub in ("serve", "run"):
            for flag in ("pub", "work", "control", "results"):
                if f"--{flag}" not in out:
                    out += [f"--{flag}", getattr(self.eps, flag)]
        if sub in CLIENTS and "--broker" not in out:
            out += ["--broker", self.eps.control]
        if sub == "view" and "--http" not in out:
            out += ["--http", f"127.0.0.1:{self.http}"]
        return out

    def start(self, words: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen([PY, "-m", "broker.cli", *words], cwd=self.path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def run(self, words: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "broker.cli", *words], cwd=self.path, text=True,
                              capture_output=True, timeout=timeout)

    def broker_for(self, client: list[str]) -> subprocess.Popen:
        """A broker matching the client's security (CURVE if it carries keys), holding
        the stream until a long-running client has joined (so it misses nothing)."""
        hold = {"watch": ["--wait-subscribers", "1"], "view": ["--wait-subscribers", "1"],
                "record": ["--wait-recorders", "1"], "sink": ["--wait-workers", "1"]
                }.get(client[0] if client else "", [])
        args = ["serve", "--fps", "100", "--shape", "48x64x3", "--progress", "0",
                "--drain-timeout", "1", *hold,
                *self.eps.serve_args()]
        if "--curve-server-key" in client:
            keys = Path(client[client.index("--curve-server-key") + 1]).parent.parent
            args += ["--curve-secret", str(keys / "private" / "server.key_secret"),
                     "--curve-allow", str(keys / "public")]
        self.end_broker()
        proc = self.current = self.start(args)
        self.wait_control(client, streaming=not hold)
        return proc

    def end_broker(self) -> None:
        """Stop the broker a simple command (status, pause...) left running."""
        from broker.client import BrokerUnavailable

        if self.current is not None and self.current.poll() is None:
            try:
                self.stop_broker()
            except BrokerUnavailable:  # already stopping (framebroker stop), not answering
                pass
            assert self.current.wait(60) == 0
        self.current = None

    def wait_control(self, client: list[str], streaming: bool) -> None:
        from broker.security import Security

        sec = Security()
        if "--curve-server-key" in client:
            keys = Path(client[client.index("--curve-server-key") + 1]).parent.parent
            sec = Security(secret=self.path / keys / "private" / "client.key_secret",
                           server_key=self.path / keys / "public" / "server.key")
        wait_status(self.eps.control, lambda s: s["frames_sent"] > 0 or not streaming,
                    security=sec)
        self.security = sec

    def stop_broker(self) -> None:
        from broker.client import Control

        ctl = Control(self.eps.control, timeout=5, security=self.security)
        try:
            ctl.stop()
        finally:
            ctl.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def _joined(sub: str):
    """The broker's status once the long-running client ``sub`` has joined."""
    groups = lambda s: s["work"]["groups"]  # noqa: E731
    return {"watch": lambda s: s["subscribers"] or any(n.startswith(BLOCK_GROUP_PREFIX)
                                                       for n in groups(s)),
            "view": lambda s: s["subscribers"] > 0,
            "worker": lambda s: groups(s).get("fft", {}).get("members"),
            "sink": lambda s: groups(s).get("fft", {}).get("acked", 0) > 0,
            "record": lambda s: groups(s).get("record", {}).get("acked", 0) > 0}[sub]


@pytest.fixture
def ws(tmp_path):
    import cv2

    w = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 30.0,
                        (64, 48))
    for i in range(10):
        w.write(np.full((48, 64, 3), i * 20, np.uint8))
    w.release()
    workspace = Workspace(tmp_path)
    yield workspace
    workspace.close()


def _wait_line(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if re.search(pattern, line):
            return
        assert time.monotonic() < deadline, pattern
    raise AssertionError(f"exited ({proc.wait()}) before reporting {pattern!r}")


def _sequence(ws: Workspace, line: str) -> None:
    """Run one README line (``a; b; c`` in order) and check each exits as documented."""
    for part in (p.strip() for p in line.split(";")):
        words = ws.rewrite(shlex.split(part)[1:])
        sub = words[0]
        if sub in ("serve", "run"):
            ws.end_broker()  # they bind the same ports
        if sub == "serve":
            if "camera:0" in words:  # documented: a clear line and exit 1 (no camera here)
                r = ws.run(words)
                assert r.returncode == 1 and "camera 0: cannot be opened" in r.stderr, r
                continue
            proc = ws.start(words)
            _wait_line(proc, r"framebroker serve: serving ")
            ws.security = _server_security(ws, words)
            ws.stop_broker()
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, (words, out, err)
            assert out.startswith("framebroker serve: stream")
        elif sub == "run":  # runs 1000+ frames: stop it once it reports progress
            proc = ws.start(words)
            _wait_line(proc, r"^run: published [1-9]")  # streaming: every part has joined
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (words, out, err)
            assert "published" in out
        elif sub in ("keys", "inspect"):
            if sub == "inspect" and not (ws.path / words[1]).exists():
                _record_for_inspect(ws, words[1])
            r = ws.run(words)
            assert r.returncode == 0, (words, r)
        elif sub in ("status", "snapshot", "pause", "resume", "stop"):
            if ws.current is None or ws.current.poll() is not None:
                ws.broker_for(words)
            r = ws.run(words)
            assert r.returncode == 0, (words, r)
            assert r.stdout.strip() and "{" not in r.stdout and "None" not in r.stdout
        else:  # long-running clients: they end at the broker's end-of-stream
            broker = ws.broker_for(words)
            proc = ws.start(words)
            if sub == "sink":  # its results come from a worker (the README starts several)
                ws.start(["worker", "--planner", "estimate", "--broker", ws.eps.control,
                          *_client_keys(words)])
            if sub == "view":
                _wait_line(proc, r"subscribed to")
                proc.send_signal(signal.SIGTERM)
            else:
                wait_status(ws.eps.control, _joined(sub), security=ws.security)
                ws.stop_broker()
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (words, out, err)
            if sub == "view":  # the broker streams on without it
                ws.stop_broker()
            assert broker.wait(60) == 0
            ws.current = None
    ws.end_broker()


def _client_keys(sink_words: list[str]) -> list[str]:
    """The client flags that match a CURVE sink's server keys (keys generate layout)."""
    if "--curve-server-key" not in sink_words:
        return []
    keys = Path(sink_words[sink_words.index("--curve-server-key") + 1]).parent.parent
    return ["--curve-secret", str(keys / "private" / "client.key_secret"),
            "--curve-server-key", str(keys / "public" / "server.key")]


def _server_security(ws: Workspace, words: list[str]):
    from broker.security import Security

    if "--curve-secret" not in words:
        return Security()
    keys = Path(words[words.index("--curve-secret") + 1]).parent.parent
    return Security(secret=ws.path / keys / "private" / "client.key_secret",
                    server_key=ws.path / keys / "public" / "server.key")


def _record_for_inspect(ws: Workspace, name: str) -> None:
    ws.broker_for(["record"])
    proc = ws.start(["record", "--out", name, "--broker", ws.eps.control])
    wait_status(ws.eps.control, _joined("record"), security=ws.security)
    ws.end_broker()
    proc.communicate(timeout=120)


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command(ws, line):
    if "curve" in line and "keys generate" not in line:
        ws.run(["keys", "generate", "keys/"])
    _sequence(ws, line)
