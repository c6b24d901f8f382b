"""Random and mutated messages at every receiving socket: subscriber, worker, sink,
recorder and control. Every process stays up, counts each bad message, and still
handles the valid traffic that follows, with its content intact."""
from __future__ import annotations

import json
import struct

import h5py
import numpy as np
import zmq
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from broker import protocol as proto
from broker.broker import COMMANDS
from broker.client import Control, Subscriber
from broker.sources import check_synthetic, synthetic_frame
from conftest import cli, free_port

SHAPE = (16, 20)
CTX = zmq.Context.instance()
FIELDS = [("<B", 4), ("<B", 5), ("<B", 6), ("<B", 7), ("<I", 32), ("<I", 36), ("<I", 40),
          ("<I", 44), ("<B", 52), ("<B", 53)]


def frame_parts(fid: int, shape=SHAPE, dtype="uint8", kind=proto.Kind.FRAME) -> list[bytes]:
    arr = synthetic_frame(shape, dtype, fid)
    if kind == proto.Kind.RESULT:
        return [proto.result_header("cam", fid, 0, arr, proto.Output.PEAK, 1, 1), arr.tobytes()]
    return [proto.frame_header("cam", fid, 0, arr), arr.tobytes()]


@st.composite
def invalid_message(draw, kind=proto.Kind.FRAME) -> list[bytes]:
    """A message the protocol must reject: mutated from a valid one, or random."""
    header, payload = frame_parts(draw(st.integers(0, 10**6)), kind=kind)
    how = draw(st.sampled_from(["random", "truncate", "flip", "field", "payload", "parts"]))
    if how == "random":
        parts = draw(st.lists(st.binary(max_size=120), min_size=1, max_size=4))
    elif how == "truncate":
        parts = [header[:draw(st.integers(0, len(header) - 1))], payload]
    elif how == "flip":
        b = bytearray(header)
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        parts = [bytes(b), payload]
    elif how == "field":  # huge shapes, unknown dtypes/kinds/versions, lying lengths
        fmt, off = draw(st.sampled_from(FIELDS))
        b = bytearray(header)
        struct.pack_into(fmt, b, off, draw(st.integers(0, 255 if fmt == "<B" else 2**32 - 1)))
        parts = [bytes(b), payload]
    elif how == "payload":
        parts = [header, draw(st.binary(max_size=2 * len(payload)))]
    else:
        parts = draw(st.sampled_from([[header], [header, payload, payload],
                                      [payload, header]]))
    try:
        h, _ = proto.decode(parts)
        assume(h.kind != kind)  # still valid: not a fuzz case for this socket
    except proto.ProtocolError:
        pass
    return parts


def test_subscriber_survives_fuzz():
    pub = CTX.socket(zmq.XPUB)
    ep = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(ep)
    sub = Subscriber(ep, topics=("",), timeout=5, rcvhwm=10000)
    assert pub.recv() == b"\x01"
    state = {"sent": 0, "next": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(invalid_message(), min_size=1, max_size=5),
           st.binary(min_size=0, max_size=8))
    def check(messages, topic):
        for parts in messages:
            pub.send_multipart([topic or b"cam", *parts])
        state["sent"] += len(messages)
        fid = state["next"]
        state["next"] += 1
        pub.send_multipart([b"cam", *frame_parts(fid)])
        frame = sub.recv()
        assert frame is not None and frame.frame_id == fid
        assert check_synthetic(frame.array, fid) == -1

    check()
    assert sum(sub.rejected.values()) == state["sent"]
    assert sub.received == state["next"]
    sub.close()
    pub.close(linger=0)


def _fake_broker():
    router = CTX.socket(zmq.ROUTER)
    ep = f"tcp://127.0.0.1:{free_port()}"
    router.bind(ep)
    router.RCVTIMEO = 20000
    return router, ep


def _wait_ready(router) -> bytes:
    while True:
        ident, cmd, *_ = router.recv_multipart()
        if cmd == b"READY":
            return ident


# Each example starts a real process: a few examples of 20-40 messages each, no shrinking
# (a failure still prints the whole falsifying example).
FUZZ = settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.reuse, Phase.generate))


@FUZZ
@given(st.lists(invalid_message(), min_size=20, max_size=40))
def test_worker_survives_fuzz(messages):
    router, work = _fake_broker()
    pull = CTX.socket(zmq.PULL)
    results = f"tcp://127.0.0.1:{free_port()}"
    pull.bind(results)
    pull.RCVTIMEO = 20000
    w = cli("worker", "--work", work, "--results", results, "--planner", "estimate",
            "--fft-output", "spectrum", "--json", "--timeout", "20")
    ident = _wait_ready(router)
    for parts in messages:
        router.send_multipart([ident, *parts])
    odd = synthetic_frame((7,), "uint8", 0)  # valid on the wire, not a 2-D frame
    router.send_multipart([ident, proto.frame_header("cam", 99, 0, odd), odd.tobytes()])
    for fid in range(5):
        router.send_multipart([ident, *frame_parts(fid)])
    got = {}
    while len(got) < 5:
        header, payload = proto.decode(pull.recv_multipart())
        got[header.frame_id] = payload
    router.send_multipart([ident, proto.end_header("cam", 5, 0), b""])
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert sum(res["rejected"].values()) == len(messages) and res["unusable"] == 1
    for fid, spec in got.items():
        ref = np.fft.rfft2(synthetic_frame(SHAPE, "uint8", fid).astype(np.float64))
        np.testing.assert_allclose(spec, ref, atol=2e-5 * np.abs(ref).max())
    router.close(linger=0)
    pull.close(linger=0)


@FUZZ
@given(st.lists(invalid_message(kind=proto.Kind.RESULT), min_size=20, max_size=40))
def test_sink_survives_fuzz(messages):
    router, work = _fake_broker()
    results = f"tcp://127.0.0.1:{free_port()}"
    s = cli("sink", "--work", work, "--results", results, "--json", "--timeout", "20")
    acker = _wait_ready(router)
    push = CTX.socket(zmq.PUSH)
    push.connect(results)
    for parts in messages:
        push.send_multipart(parts)
    for fid in range(5):
        push.send_multipart(frame_parts(fid, kind=proto.Kind.RESULT))
    acked: set[int] = set()
    while len(acked) < 5:  # the sink acknowledges what it holds
        ident, cmd, *body = router.recv_multipart()
        if cmd == b"ACK":
            acked.update(proto.decode_ids(body[0]))
    router.send_multipart([acker, proto.end_header("cam", 5, 0), b""])
    out, err = s.communicate(timeout=60)
    assert s.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert (res["frames"], res["gaps"]) == (5, 0)
    assert sum(res["rejected"].values()) == len(messages)
    router.close(linger=0)
    push.close(linger=0)


@FUZZ
@given(messages=st.lists(invalid_message(), min_size=20, max_size=40))
def test_recorder_survives_fuzz_and_keeps_what_it_recorded(messages, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "fuzz.h5"
    router, work = _fake_broker()
    dead_control = f"tcp://127.0.0.1:{free_port()}"
    r = cli("record", "--out", str(out), "--work", work, "--broker", dead_control, "--json",
            "--timeout", "3", "--flush-frames", "1")
    ident = _wait_ready(router)
    router.send_multipart([ident, *frame_parts(0)])  # the file takes this geometry
    for parts in messages:
        router.send_multipart([ident, *parts])
    router.send_multipart([ident, *frame_parts(1, shape=(8, 8))])  # valid, wrong geometry
    for fid in range(2, 10):
        router.send_multipart([ident, *frame_parts(fid)])
    router.send_multipart([ident, proto.end_header("cam", 10, 0), b""])
    stdout, err = r.communicate(timeout=60)
    assert r.returncode == 3, err  # lossless, and frame 1 could not be recorded: exit 3
    res = json.loads(stdout.strip().splitlines()[-1])
    assert sum(res["rejected"].values()) == len(messages) and res["mismatched"] == 1
    with h5py.File(out) as f:
        ids = f["frame_id"][:].tolist()
        assert ids == [0, *range(2, 10)]
        for i, fid in enumerate(ids):
            assert check_synthetic(f["frames"][i], fid) == -1
        assert f["gaps"][:].tolist() == [[1, 1]]
    router.close(linger=0)


def test_control_survives_fuzz(eps, broker_factory):
    b = broker_factory("--fps", "20", "--shape", "16x20")
    b.wait_ready()
    req = CTX.socket(zmq.REQ)
    req.connect(eps.control)
    req.RCVTIMEO = 5000
    count = {"n": 0}

    json_like = st.one_of(st.binary(max_size=300),
                          st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                       lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                                       max_leaves=10).map(lambda v: json.dumps(v).encode()),
                          st.dictionaries(st.sampled_from(["cmd", "x", "args"]),
                                          st.integers() | st.text() | st.none())
                          .map(lambda v: json.dumps(v).encode()))

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(json_like)
    def check(msg):
        try:
            req_ = proto.decode_request(msg)
            if req_["cmd"] in COMMANDS and set(req_) == {"cmd"}:
                return  # a real command (stop, pause, ...), not a fuzz case
        except proto.ProtocolError:
            pass
        req.send(msg)
        reply = proto.decode_reply(req.recv())
        assert reply["ok"] is False and reply["error"]
        count["n"] += 1

    check()
    status = Control(eps.control).status()
    assert sum(status["control_rejected"].values()) == count["n"]
    assert status["state"] == "streaming"
    req.close(linger=0)


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the most memory the process ever held, so a brief allocation shows too."""
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_oversized_messages_are_refused_before_they_are_allocated(eps, broker_factory):
    """64 MiB at the broker's control socket (limit 64 KiB) and work socket (limit
    16 MiB): libzmq drops each connection on the size prefix (ZMQ_MAXMSGSIZE), so the
    broker's peak memory does not grow by anything like it, and it keeps serving."""
    b = broker_factory("--fps", "200", "--shape", "64x80")
    b.wait_ready()
    before = _peak_rss_mb(b.proc.pid)
    huge = np.zeros(64 * 2**20, np.uint8)
    for kind, ep in ((zmq.REQ, eps.control), (zmq.DEALER, eps.work)):
        sock = CTX.socket(kind)
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        mon.RCVTIMEO = 20000  # no disconnect: the message was taken, and the test fails
        sock.connect(ep)
        sock.send_multipart([b"READY", huge] if kind == zmq.DEALER else [huge], copy=False)
        while recv_monitor_message(mon)["event"] != zmq.EVENT_DISCONNECTED:
            pass  # the broker closed this connection: the size prefix was over the limit
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)
    grown = _peak_rss_mb(b.proc.pid) - before
    watch = cli("watch", "--broker", eps.control, "--frames", "20", "--verify", "--json",
                "--progress", "0", "--timeout", "30")
    out, err = watch.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert (res["received"], res["corrupt"]) == (20, 0), err
    assert Control(eps.control).status()["state"] == "streaming"
    print(f"broker peak RSS grew by {grown:.1f} MB for two 64 MiB messages")
    assert grown < 32, f"peak RSS grew by {grown:.0f} MB for 64 MiB messages"
