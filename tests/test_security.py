"""CURVE and heartbeats with real processes on loopback: who gets in, who is refused
(and logged, and counted), the pipeline end to end with keys, the non-loopback bind
rule, key generation, and a stopped peer dropped by ZMTP heartbeats."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import h5py
import pytest
import zmq
import zmq.auth

from broker.broker import free_tcp_endpoints
from broker.client import BrokerUnavailable, Control
from broker.security import Security, configure_socket, from_key_dir
from broker.sources import check_synthetic
from conftest import PY, cli, run_cli, wait_status


def _keys(tmp_path: Path) -> Path:
    r = run_cli("keys", "generate", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "keys"


def _server_flags(keys: Path) -> list[str]:
    return ["--curve-secret", str(keys / "private" / "server.key_secret"),
            "--curve-allow", str(keys / "public")]


def _client_flags(secret: Path, keys: Path) -> list[str]:
    return ["--curve-secret", str(secret), "--curve-server-key",
            str(keys / "public" / "server.key")]


def test_configure_socket_sets_every_shared_option(tmp_path):
    """One helper sets MAXMSGSIZE, the heartbeats and the CURVE role on each socket."""
    keys = _keys(tmp_path)
    ctx = zmq.Context()
    try:
        server = configure_socket(ctx.socket(zmq.ROUTER), "server",
                                  from_key_dir(keys, "server", heartbeat=0.5), 4096)
        client = configure_socket(ctx.socket(zmq.DEALER), "client", from_key_dir(keys, "client"))
        plain = configure_socket(ctx.socket(zmq.SUB), "client", Security(heartbeat=0))
        xpub = configure_socket(ctx.socket(zmq.XPUB), "server", Security(heartbeat=0.5), 256)
        assert server.getsockopt(zmq.MAXMSGSIZE) == 4096
        # no ZMTP heartbeats on a server with a bounded receive queue (the libzmq abort,
        # see configure_socket): TCP keepalive instead; an XPUB keeps them, unbounded
        assert server.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert (server.getsockopt(zmq.TCP_KEEPALIVE), server.getsockopt(zmq.TCP_KEEPALIVE_CNT)
                ) == (1, 3)
        assert (xpub.getsockopt(zmq.HEARTBEAT_IVL), xpub.getsockopt(zmq.HEARTBEAT_TIMEOUT),
                xpub.getsockopt(zmq.RCVHWM)) == (500, 1500, 0)
        assert (client.getsockopt(zmq.HEARTBEAT_IVL), client.getsockopt(zmq.TCP_KEEPALIVE)
                ) == (1000, -1)
        assert server.curve_server and not client.curve_server
        assert client.getsockopt(zmq.MECHANISM) == zmq.CURVE
        assert plain.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert plain.getsockopt(zmq.MECHANISM) == zmq.NULL
    finally:
        ctx.destroy(linger=0)


def test_keys_generate_makes_private_secrets_and_never_overwrites(tmp_path):
    keys = _keys(tmp_path)
    for name in ("server", "client"):
        secret = keys / "private" / f"{name}.key_secret"
        public = keys / "public" / f"{name}.key"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        pub, sec = zmq.auth.load_certificate(secret)
        assert sec is not None and len(sec) == 40  # z85 of 32 bytes
        assert zmq.auth.load_certificate(public) == (pub, None)  # public file: no secret
    assert stat.S_IMODE((keys / "private").stat().st_mode) == 0o700
    again = run_cli("keys", "generate", str(keys))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    named = run_cli("keys", "generate", str(keys), "--name", "cam2")
    assert named.returncode == 0, named.stderr
    assert str(keys / "private" / "cam2.key_secret") in named.stdout
    assert "--curve-allow" in named.stdout  # says how to use them
    assert sorted(p.name for p in (keys / "public").iterdir()) == [
        "cam2.key", "client.key", "server.key"]


def test_allowed_client_gets_frames_unknown_key_and_plain_client_are_refused(
        tmp_path, eps, broker_factory):
    keys = _keys(tmp_path)
    assert run_cli("keys", "generate", str(tmp_path / "other"), "--name", "intruder"
                   ).returncode == 0
    intruder = tmp_path / "other" / "private" / "intruder.key_secret"
    intruder_public = zmq.auth.load_certificate(intruder)[0].decode()
    client = from_key_dir(keys, "client")
    b = broker_factory("--fps", "200", "--wait-subscribers", "1", *_server_flags(keys))
    refused = [cli("watch", "--pub", eps.pub, "--timeout", "3", "--progress", "0", *flags)
               for flags in (_client_flags(intruder, keys), [])]
    allowed = cli("watch", "--broker", eps.control, "--verify", "--json", "--progress", "0",
                  "--frames", "100", "--timeout", "30",
                  *_client_flags(keys / "private" / "client.key_secret", keys))
    out, err = allowed.communicate(timeout=120)
    assert allowed.returncode == 0, (out, err)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["received"] == 100 and res["corrupt"] == 0 and res["gaps"] == 0
    for proc in refused:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "no frame from" in err, (out, err)
    status = wait_status(eps.control, lambda s: s["auth_refused"] >= 2, security=client)
    assert status["curve"] is True and status["peak_subscribers"] == 1
    with pytest.raises(BrokerUnavailable, match="if it runs with CURVE"):  # plain: silence
        Control(eps.control, timeout=1).status()
    Control(eps.control, timeout=5, security=client).stop()
    rc, _, err = b.finish()
    assert rc == 0, err
    assert f"refused CURVE client with key {intruder_public} from 127.0.0.1" in err
    assert f"refused a client on {eps.pub}: " in err  # the plain one: no key to name


@pytest.mark.parametrize("keys", ["fresh", "given"])
def test_pipeline_with_curve_processes_and_records_every_frame(tmp_path, keys):
    """Broker, sink, two workers and a lossless recorder, every socket CURVE: with
    keys ``run --curve`` makes for itself, or with a ``keys generate`` directory."""
    pub, work, control, results = free_tcp_endpoints(4)
    out = tmp_path / "run.h5"
    curve = ["--curve"] if keys == "fresh" else ["--curve-keys", str(_keys(tmp_path))]
    r = subprocess.run([PY, "-m", "broker.cli", "run", "--pub", pub, "--work", work,
                        "--control", control, "--results", results, "--planner", "estimate",
                        "--frames", "200", "--workers", "2", *curve, "--record", str(out),
                        "--json"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["curve"] is True and rep["auth_refused"] == 0
    for stage in ("published", "processed", "recorded"):
        assert rep["stages"][stage]["frames"] == 200, stage
    assert rep["ok"] is True and rep["failed"] == []
    with h5py.File(out) as f:
        assert list(f["frame_id"][:]) == list(range(200))
        assert all(check_synthetic(f["frames"][i], i) == -1 for i in range(0, 200, 17))


def test_non_loopback_bind_needs_curve_or_insecure(tmp_path, eps):
    keys = _keys(tmp_path)
    port = free_tcp_endpoints(1, "0.0.0.0")[0].rpartition(":")[2]
    wild = ["serve", "--pub", f"tcp://0.0.0.0:{port}", "--work", eps.work,
            "--control", eps.control, "--progress", "0"]
    r = run_cli(*wild, "--frames", "5")
    assert r.returncode == 2
    assert f"refusing to bind tcp://0.0.0.0:{port}" in r.stderr and "CURVE" in r.stderr
    r = run_cli(*wild, "--frames", "5", "--insecure")
    assert r.returncode == 0, r.stderr
    assert "warning: --insecure" in r.stderr
    b = cli(*wild, "--frames", "50", "--wait-subscribers", "1", *_server_flags(keys))
    watch = run_cli("watch", "--pub", f"tcp://127.0.0.1:{port}", "--json", "--progress", "0",
                    "--verify", "--timeout", "30",
                    *_client_flags(keys / "private" / "client.key_secret", keys))
    assert watch.returncode == 0, watch.stderr
    assert json.loads(watch.stdout.strip().splitlines()[-1])["received"] == 50
    _, err = b.communicate(timeout=60)
    assert b.returncode == 0 and "allowed because CURVE is on" in err


@pytest.mark.parametrize("case", ["missing", "public_as_secret", "allow_empty", "allow_absent",
                                  "allow_without_secret", "secret_as_server_key",
                                  "sink_not_server", "run_keys_absent"])
def test_key_mistakes_are_one_line_usage_errors(tmp_path, eps, case):
    keys = _keys(tmp_path)
    (tmp_path / "empty").mkdir()
    private, public = keys / "private", keys / "public"
    client_secret = str(private / "client.key_secret")
    argv, message = {
        "missing": (["serve", "--curve-secret", str(tmp_path / "nope"), "--curve-allow",
                     str(public)], "no such file"),
        "public_as_secret": (["serve", "--curve-secret", str(public / "server.key"),
                              "--curve-allow", str(public)], "holds only a public key"),
        "allow_empty": (["serve", "--curve-secret", str(private / "server.key_secret"),
                         "--curve-allow", str(tmp_path / "empty")], "no public key files"),
        "allow_absent": (["serve", "--curve-secret", str(private / "server.key_secret")],
                         "needs --curve-allow"),
        "allow_without_secret": (["serve", "--curve-allow", str(public)],
                                 "needs --curve-secret"),
        "secret_as_server_key": (["status", "--curve-secret", client_secret,
                                  "--curve-server-key", str(private / "server.key_secret")],
                                 "is a secret key file"),
        "run_keys_absent": (["run", "--curve-keys", str(tmp_path / "nokeys")],
                            "no such file"),
        "sink_not_server": (["sink", "--curve-secret", client_secret, "--curve-server-key",
                             str(public / "server.key"), "--curve-allow", str(public)],
                            "must be the server"),
    }[case]
    r = run_cli(*argv, "--control" if argv[0] in ("serve", "run") else "--broker", eps.control)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_heartbeat_drops_a_stopped_subscriber(eps, broker_factory):
    """A SIGSTOPped subscriber keeps its TCP connection open (the kernel still ACKs),
    so only the missing PONG shows it is dead: the broker's XPUB then sees the
    connection end as an unsubscription."""
    broker_factory("--fps", "50", "--heartbeat", "0.2")
    watch = cli("watch", "--broker", eps.control, "--progress", "0", "--timeout", "60",
                "--heartbeat", "0.2")
    try:
        wait_status(eps.control, lambda s: s["subscribers"] == 1)
        os.kill(watch.pid, signal.SIGSTOP)
        status = wait_status(eps.control, lambda s: s["subscribers"] == 0)
        assert status["peak_subscribers"] == 1
    finally:
        os.kill(watch.pid, signal.SIGCONT)
        watch.kill()
        watch.communicate()
