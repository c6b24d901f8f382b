"""docs/schemas against the real broker: every reply type, every error, READY, and
64-bit identifiers that survive a float-only JSON parser. (conftest also validates
every reply any Control in the suite receives.)"""
from __future__ import annotations

import json
import os

import jsonschema
import pytest
import zmq

import replyschema
from broker import protocol as proto
from broker.client import BlockingSubscriber, Control, Subscriber, WorkConsumer
from conftest import cli, wait_status

CTX = zmq.Context.instance()
SMALL = ("--shape", "48x64x3")


def raw_request(endpoint: str, *parts: bytes, timeout_ms: int = 10000) -> list[bytes]:
    """One request on a fresh REQ socket, without the reference client in the way."""
    req = CTX.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, timeout_ms)
    try:
        req.connect(endpoint)
        req.send_multipart(list(parts))
        return req.recv_multipart()
    finally:
        req.close()


def stopped(b, control: str) -> None:
    """Stop a broker the clean way (a killed one would leave its ring to the next)."""
    c = Control(control)
    try:
        c.stop()
    finally:
        c.close()
    rc, _, err = b.finish()
    assert rc == 0, err


def test_every_schema_is_valid_and_every_reference_resolves():
    names = sorted(p.name for p in replyschema.SCHEMA_DIR.glob("*.json"))
    assert {*replyschema.REPLY.values(), "error.json", "ready.json", "request.json",
            "defs.json"} == set(names)
    for name in names:
        replyschema.validator(name)  # check_schema
    # the draft form of a reply, a JSON integer session, is caught
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        replyschema.validator("defs.json").evolve(
            schema={"$ref": "#/$defs/hex_id"}).validate(2**60 + 1)


def test_every_reply_type_of_a_busy_broker_fits_its_schema(eps, broker_factory):
    """A broker with a ring, a blocking subscriber, an FFT-style group with its acker,
    a reporting subscriber, a dissolved group and rejected messages of both channels:
    every reply and every optional part of status, validated and read."""
    b = broker_factory("--fps", "200", "--shm", "32slots", "--max-pending", "8", *SMALL)
    b.wait_ready()
    ctl = eps.control
    assert json.loads(raw_request(ctl, b'{"cmd": "snapshot"}')[0]) in (
        {"ok": False, "error": "no frame captured yet"}, {"ok": True})
    acker = CTX.socket(zmq.DEALER)
    acker.connect(eps.work)
    acker.send_multipart([b"READY", json.dumps({"group": "fft", "acks": "sink",
                                                "role": "acker"}).encode()])
    acker.send_multipart([b"NOPE"])  # rejected: unknown work command
    with Subscriber(broker=ctl, name="schema-sub", report_every=0.05, timeout=20) as sub, \
            BlockingSubscriber(broker=ctl, name="schema-block", timeout=20) as blocking, \
            WorkConsumer(broker=ctl, group="fft", acks="sink", name="w1", window=2) as fft:
        WorkConsumer(broker=ctl, group="gone", name="leaver").close()
        for receiver in (sub, blocking, fft):
            receiver.recv(timeout=20)
        s = wait_status(ctl, lambda s: "schema-sub" in s["consumers"]
                        and s["work"]["rejected"] and "gone" in s["work"]["dissolved"])
    acker.close(linger=0)
    assert s["session"] == s["endpoints"]["session"] == s["endpoints"]["shm"]["session"]
    assert s["shm"]["slots"] == 32 and s["shape"] == [48, 64, 3] and s["dtype"] == "uint8"
    assert s["work"]["rejected"] == {"bad_control": 1}
    groups = s["work"]["groups"]
    assert groups["fft"]["ackers"] == 1 and groups["fft"]["acks"] == "sink"
    assert groups["fft"]["members"]["w1"]["transport"] == "shm"
    assert "sub-schema-block" in groups and s["work"]["max_pending"] == 8
    assert s["consumers"]["schema-sub"]["policy"] == "drop"
    c = Control(ctl)  # each reply is validated by conftest as it arrives
    try:
        assert c.snapshot().array.shape == (48, 64, 3)
        assert c.pause() == {"ok": True, "paused": True}
        assert c.resume() == {"ok": True, "paused": False}
        assert c.request("report", client="x", policy="drop", received=1, dropped=0, gaps=0,
                         rejected=0, sessions=1) == {"ok": True}
        stop = c.stop()
    finally:
        c.close()
    assert stop["stopping"] is True and stop["frames"] >= 1
    rc, out, _ = b.finish()
    assert rc == 0


@pytest.mark.parametrize("parts,reason", [
    ([b'{"cmd": "dance"}'], "bad_control"),
    ([b'{"cmd": "status", "verbose": true}'], "bad_control"),
    ([b"status"], "bad_control"),
    ([b"[1, 2]"], "bad_control"),
    ([b'{"cmd": "status"}', b"extra"], "part_count"),
    ([b'{"cmd": "report", "client": "x"}'], "bad_control"),
])
def test_every_rejected_request_gets_an_error_reply_and_is_counted(parts, reason, eps,
                                                                    broker_factory):
    b = broker_factory("--fps", "50", *SMALL)
    b.wait_ready()
    reply = json.loads(raw_request(eps.control, *parts)[0])
    replyschema.check_reply(None, reply)
    assert reply["ok"] is False and reply["error"]
    s = wait_status(eps.control, lambda s: True)
    assert s["control_rejected"] == {reason: 1}
    stopped(b, eps.control)


def test_an_over_limit_request_gets_an_error_reply(eps, broker_factory):
    """Above MAX_CONTROL_BYTES but within what the socket lets through."""
    if not hasattr(proto, "MAX_CONTROL_WIRE_BYTES"):
        pytest.skip("the over-limit error reply comes with the bounded-parsing change")
    b = broker_factory("--fps", "50", *SMALL)
    b.wait_ready()
    n = proto.MAX_CONTROL_BYTES + 4096
    reply = json.loads(raw_request(eps.control, b'{"cmd": "status", "x": "'
                                   + b"a" * (n - 26) + b'"}')[0])
    replyschema.check_reply(None, reply)
    assert "too large" in reply["error"] and f"{n} bytes" in reply["error"], reply
    assert wait_status(eps.control, lambda s: True)["control_rejected"] == {"too_large": 1}
    stopped(b, eps.control)


def test_a_request_above_the_socket_limit_costs_its_connection_and_nothing_else(
        eps, broker_factory):
    """libzmq drops a message larger than the control socket's MAXMSGSIZE by closing
    the connection: the requester sees a disconnect, never a reply; others are served."""
    b = broker_factory("--fps", "50", *SMALL)
    b.wait_ready()
    limit = getattr(proto, "MAX_CONTROL_WIRE_BYTES", proto.MAX_CONTROL_BYTES)
    req = CTX.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    monitor = req.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        req.connect(eps.control)
        req.send(b'{"cmd": "status", "x": "' + b"a" * limit + b'"}')
        assert monitor.poll(60000), "the broker kept the connection"
        assert not req.poll(0)
    finally:
        req.disable_monitor()
        monitor.close()
        req.close()
    assert wait_status(eps.control, lambda s: True)["state"] == "streaming"
    stopped(b, eps.control)


def test_identifiers_survive_a_float_only_json_parser(eps, broker_factory):
    """JavaScript-style parsing (every number a double) of endpoints and status keeps
    the session, the ring's inode and device exact, and every other number too."""
    b = broker_factory("--fps", "100", "--shm", "8slots", *SMALL)
    b.wait_ready()
    with Subscriber(broker=eps.control, shm=False, timeout=20) as sub:
        header_session = sub.recv().header.session
    for cmd in ("endpoints", "status"):
        raw = raw_request(eps.control, proto.encode_request(cmd))[0]
        as_floats = json.loads(raw, parse_int=float)
        assert as_floats == json.loads(raw)  # no integer in the reply lost a bit
        eps_reply = as_floats if cmd == "endpoints" else as_floats["endpoints"]
        assert int(as_floats["session"], 16) == header_session
        st = os.stat(eps_reply["shm"]["path"])
        assert (int(eps_reply["shm"]["inode"], 16), int(eps_reply["shm"]["device"], 16)) == (
            st.st_ino, st.st_dev)
    assert proto.decode_id(proto.encode_id(2**64 - 1)) == 2**64 - 1
    for bad in (12, "0x1", "ABCDEF0123456789", "123"):
        with pytest.raises(proto.BadControlMessage):
            proto.decode_id(bad)
    stopped(b, eps.control)


READY_CASES = [
    ({"group": "fft"}, True),
    ({"group": "fft", "window": 4, "acks": "sink", "name": "w", "role": "acker",
      "transport": "shm"}, True),
    ({"group": "fft", "extra": [1, 2], "shard": None}, True),  # extra keys are ignored
    ({"group": "x" * 32}, True),
    ({}, False), ({"group": ""}, False), ({"group": "FFT"}, False), ({"group": "x" * 33}, False),
    ({"group": "fft", "window": 0}, False), ({"group": "fft", "window": 1025}, False),
    ({"group": "fft", "window": True}, False), ({"group": "fft", "window": "4"}, False),
    ({"group": "fft", "acks": "none"}, False), ({"group": "fft", "role": "boss"}, False),
    ({"group": "fft", "name": "n" * 129}, False), ({"group": "fft", "name": 7}, False),
    ({"group": "fft", "transport": "udp"}, False), (["fft"], False),
]


@pytest.mark.parametrize("body,valid", READY_CASES)
def test_the_ready_schema_accepts_exactly_what_the_broker_accepts(body, valid):
    schema_ok = replyschema.validator("ready.json").is_valid(body)
    try:
        proto.decode_ready(json.dumps(body).encode())
        broker_ok = True
    except proto.BadControlMessage:
        broker_ok = False
    assert schema_ok == broker_ok == valid


def test_cli_processes_of_the_suite_log_their_replies_for_validation(eps, broker_factory):
    """The subprocess half of the suite-wide check: `framebroker status` in a process of
    its own records the reply it received (validated after the test by conftest)."""
    b = broker_factory("--fps", "50", *SMALL)
    b.wait_ready()
    log = os.environ["FRAMEBROKER_REPLY_LOG"]
    p = cli("status", "--broker", eps.control, "--json")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    with open(log) as f:
        mine = [json.loads(line) for line in f if json.loads(line)["pid"] == p.pid]
    # the CLI first waits for the broker ('endpoints'), then asks what it was told to
    assert [m["cmd"] for m in mine] == ["endpoints", "status"]
    assert mine[-1]["reply"]["session"] == json.loads(out)["session"]
    replyschema.check_reply("status", mine[-1]["reply"])
    stopped(b, eps.control)


def test_serve_json_prints_a_final_status_that_fits_the_schema(eps):
    p = cli("serve", *eps.serve_args(), "--frames", "20", "--progress", "0", "--json", *SMALL)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    replyschema.check_reply("status", {"ok": True, **final})
    assert final["state"] == "stopped" and final["frames_sent"] == 20
