"""Reachable discovery: a client that reached a wildcard-bound broker through another host
name is handed data endpoints on that name. Loopback aliases (127.0.0.2, 127.0.0.3)
stand in for hosts; CURVE is on, since a 0.0.0.0 bind needs it."""
from __future__ import annotations

import numpy as np

from broker.broker import free_tcp_endpoints
from broker.client import BlockingSubscriber, Control, Subscriber, reachable, resolve
from broker.security import from_key_dir
from broker.sources import check_synthetic
from conftest import Endpoints, run_cli


def test_reachable_rewrites_only_host_local_and_wildcard_hosts():
    eps = {"pub": "tcp://127.0.0.1:5555", "work": "tcp://0.0.0.0:5556",
           "control": "tcp://*:5557", "results": "tcp://10.1.2.3:5558", "stream": "cam",
           "shm": {"pub": "ipc://@x"}}
    got = reachable(eps, "tcp://127.0.0.2:5557")
    assert got["pub"] == "tcp://127.0.0.2:5555" and got["work"] == "tcp://127.0.0.2:5556"
    assert got["control"] == "tcp://127.0.0.2:5557"
    assert got["results"] == "tcp://10.1.2.3:5558"  # advertised: another host, kept
    assert got["shm"] == {"pub": "ipc://@x"} and got["stream"] == "cam"
    for here in ("tcp://127.0.0.1:5557", "tcp://localhost:5557", "tcp://[::1]:5557",
                 "ipc:///tmp/x"):
        assert reachable(eps, here) == eps  # on the broker's host: nothing changes
    assert reachable({"pub": "tcp://[::]:1"}, "tcp://[fd00::2]:7")["pub"] == "tcp://[fd00::2]:1"


def test_client_through_another_host_name_gets_endpoints_there_with_curve(tmp_path,
                                                                          broker_factory):
    assert run_cli("keys", "generate", str(tmp_path / "keys")).returncode == 0
    keys = tmp_path / "keys"
    ports = [ep.rpartition(":")[2] for ep in free_tcp_endpoints(4, "0.0.0.0")]
    eps = Endpoints(*(f"tcp://0.0.0.0:{p}" for p in ports[:3]), f"tcp://127.0.0.1:{ports[3]}")
    client = from_key_dir(keys, "client")
    b = broker_factory("--frames", "100", "--fps", "400", "--wait-subscribers", "2",
                       "--curve-secret", str(keys / "private" / "server.key_secret"),
                       "--curve-allow", str(keys / "public"), endpoints=eps)
    local = Control(f"tcp://127.0.0.1:{ports[2]}", timeout=10, security=client)
    try:  # on the broker's host the advertised loopback addresses stay as they are
        assert local.wait(30)["pub"] == f"tcp://127.0.0.1:{ports[0]}"
    finally:
        local.close()
    via2, via3 = f"tcp://127.0.0.2:{ports[2]}", f"tcp://127.0.0.3:{ports[2]}"
    assert resolve(via2, None, "work", 10, security=client)[0] == f"tcp://127.0.0.2:{ports[1]}"
    sub = Subscriber(broker=via2, timeout=30, security=client, rcvhwm=1000)
    lossless = BlockingSubscriber(broker=via3, name="far", timeout=30, security=client)
    try:
        assert sub.endpoint == f"tcp://127.0.0.2:{ports[0]}"
        assert lossless.endpoint == f"tcp://127.0.0.3:{ports[1]}"
        got = {}
        for receiver in (lossless, sub):  # the lossless one first: the source waits for it
            ids = []
            for frame in receiver:
                assert check_synthetic(frame.array, frame.frame_id) == -1
                ids.append(frame.frame_id)
            got[receiver] = ids
        assert got[lossless] == list(range(100))  # every frame, over 127.0.0.3
        assert got[sub] and np.all(np.diff(got[sub]) > 0)  # live, over 127.0.0.2
        assert sub.total == 100
    finally:
        sub.close()
        lossless.close()
    rc, _, err = b.finish()
    assert rc == 0, err
