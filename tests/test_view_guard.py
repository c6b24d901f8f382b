"""The viewer against hostile browsers and sockets: DNS rebinding (Host header), and
idle connections that would each hold a thread (issue 11, case 9). Real broker and
viewer processes, raw sockets."""
from __future__ import annotations

import http.client
import socket
import time

import psutil

from broker.view import IDLE_TIMEOUT_S, MAX_CONNECTIONS
from conftest import cli, free_port

HANG = 60.0  # seconds: a bound on a hang, not a performance threshold


def _get(port: int, host: str | None = None, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _viewer(broker_factory, eps):
    """A broker and a viewer of it, serving."""
    b = broker_factory("--fps", "30", "--shape", "60x80x3")
    b.wait_ready()
    port = free_port()
    proc = cli("view", "--broker", eps.control, "--http", f"127.0.0.1:{port}")
    deadline = time.monotonic() + HANG
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if _get(port)[0] == 200:
                return proc, port, b
        except OSError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_host_header_must_be_ours(eps, broker_factory):
    """A DNS-rebinding page reaches the viewer as Host: evil.example: refused (403);
    the viewer's own addresses and localhost are served."""
    proc, port, broker = _viewer(broker_factory, eps)
    try:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            status, body = _get(port, host)
            assert status == 403 and b"<html" not in body.lower()[:200] or b"Host" in body
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            status, body = _get(port, host)
            assert status == 200 and b"framebroker" in body, host
        assert _get(port, "evil.example", "/stats")[0] == 403
    finally:
        for p in (proc, broker.proc):  # SIGTERM: both end by themselves
            p.terminate()
            p.communicate(timeout=30)


def test_idle_sockets_do_not_hold_a_thread_each(eps, broker_factory):
    """300 raw sockets that connect and send nothing: each is either answered 503 at once
    or held (at most MAX_CONNECTIONS at a time, a thread each) and dropped after
    IDLE_TIMEOUT_S; the viewer never runs more threads than that, and the real page is
    served afterwards."""
    proc, port, broker = _viewer(broker_factory, eps)
    ps = psutil.Process(proc.pid)
    before = ps.num_threads()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(300)]
    peak, outcome = ps.num_threads(), {"503": 0, "dropped": 0}
    try:
        for s in socks:
            s.settimeout(IDLE_TIMEOUT_S + HANG)  # a bound on a hang: idle ones must be dropped
            data = s.recv(100)
            outcome["503" if data.startswith(b"HTTP/1.0 503") else "dropped"] += 1
            assert data in (b"",) or data.startswith(b"HTTP/1.0 503"), data
            peak = max(peak, ps.num_threads())
        assert outcome["503"] >= 1 and outcome["dropped"] >= 1, outcome
        assert peak <= before + MAX_CONNECTIONS + 4, (before, peak)  # + its own threads
        status, body = _get(port)
        assert status == 200 and b"framebroker" in body
        assert ps.num_threads() <= before + 2
    finally:
        for s in socks:
            s.close()
        for p in (proc, broker.proc):  # SIGTERM: both end by themselves
            p.terminate()
            p.communicate(timeout=30)
