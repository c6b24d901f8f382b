"""Wire format: round trips over every dtype and shape, and every malformed message
rejected with its specific error, both in-process and from a raw zmq peer."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol as proto
from broker.client import Subscriber
from broker.sources import check_synthetic, synthetic_frame
from conftest import free_port

DTYPES = list(proto.DTYPES.values())


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(DTYPES),
       shape=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple),
       frame_id=st.integers(0, 2**64 - 1), ts=st.integers(0, 2**64 - 1),
       session=st.integers(0, 2**64 - 1), stream=st.text(min_size=1, max_size=40),
       seed=st.integers(0, 2**32 - 1))
def test_frame_round_trip(dtype, shape, frame_id, ts, session, stream, seed):
    if not 1 <= len(stream.encode()) <= proto.MAX_NAME:
        return
    rng = np.random.default_rng(seed)
    array = np.frombuffer(rng.bytes(int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape)
    header = proto.frame_header(stream, frame_id, ts, array, session)
    assert len(header) == proto.HEADER_SIZE + len(stream.encode())
    h, out = proto.decode_topic([stream.encode(), header, array.tobytes()])
    assert (h.kind, h.stream, h.frame_id, h.timestamp_ns, h.session) == (
        proto.Kind.FRAME, stream, frame_id, ts, session)
    assert out.dtype == dtype and out.shape == shape
    assert out.tobytes() == array.tobytes()
    assert not out.flags.writeable


def test_end_and_result_round_trip():
    h, arr = proto.decode([proto.end_header("cam", 2000, 5, session=9), b""])
    assert (h.kind, h.total, h.session, arr) == (proto.Kind.END, 2000, 9, None)
    spec = np.arange(12, dtype=np.complex64).reshape(3, 4)
    rh = proto.result_header("cam", 7, 11, spec, proto.Output.SPECTRUM, worker_id=3,
                             compute_ns=1234)
    h, arr = proto.decode([rh, spec.tobytes()])
    assert (h.kind, h.frame_id, h.output, h.worker_id, h.compute_ns) == (
        proto.Kind.RESULT, 7, proto.Output.SPECTRUM, 3, 1234)
    np.testing.assert_array_equal(arr, spec)


def _good() -> tuple[bytes, bytes]:
    frame = synthetic_frame((4, 6), "uint16", 3)
    return proto.frame_header("cam", 3, 1, frame), frame.tobytes()


def _patch(header: bytes, fmt: str, offset: int, value: int) -> bytes:
    b = bytearray(header)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def malformed() -> list[tuple[str, list[bytes], type[proto.ProtocolError]]]:
    """(name, message parts without topic, expected error) for every rule."""
    h, p = _good()
    return [
        ("one part", [h], proto.BadPartCount),
        ("three parts", [h, p, b"x"], proto.BadPartCount),
        ("truncated header", [h[:40], p], proto.TruncatedHeader),
        ("empty header", [b"", p], proto.TruncatedHeader),
        ("name length lies", [h[:-1], p], proto.TruncatedHeader),
        ("bad magic", [b"JUNK" + h[4:], p], proto.BadMagic),
        ("unknown version", [_patch(h, "<B", 4, 99), p], proto.UnsupportedVersion),
        ("unknown kind", [_patch(h, "<B", 5, 42), p], proto.UnknownKind),
        ("unknown dtype", [_patch(h, "<B", 6, 200), p], proto.UnknownDtype),
        ("zero dims", [_patch(h, "<B", 7, 0), p], proto.BadShape),
        ("five dims", [_patch(h, "<B", 7, 5), p], proto.BadShape),
        ("zero-length axis", [_patch(h, "<I", 32, 0), p], proto.BadShape),
        ("huge declared shape", [_patch(_patch(h, "<I", 32, 2**31), "<I", 36, 2**31), p],
         proto.FrameTooLarge),
        ("short payload", [h, p[:-2]], proto.PayloadSizeMismatch),
        ("long payload", [h, p + b"\0\0"], proto.PayloadSizeMismatch),
        ("name not utf-8", [h[:-3] + b"\xff\xfe\xfd", p], proto.BadStreamName),
        ("END with dims", [_patch(h, "<B", 5, 2), p], proto.BadShape),
    ]


@pytest.mark.parametrize("name,parts,error", malformed(), ids=[m[0] for m in malformed()])
def test_malformed_rejected_with_specific_error(name, parts, error):
    with pytest.raises(error) as info:
        proto.decode(parts)
    assert str(info.value)  # says what was wrong


def test_max_bytes_is_configurable_and_checked_before_payload():
    h, p = _good()
    with pytest.raises(proto.FrameTooLarge, match="exceeds the limit of 10 bytes"):
        proto.decode([h, p], max_bytes=10)


def test_encode_refuses_what_the_wire_cannot_carry():
    with pytest.raises(proto.UnknownDtype):
        proto.frame_header("cam", 0, 0, np.zeros(3, dtype="U3"))
    with pytest.raises(proto.BadShape):
        proto.frame_header("cam", 0, 0, np.zeros((1, 1, 1, 1, 2)))
    with pytest.raises(proto.BadStreamName):
        proto.frame_header("x" * 300, 0, 0, np.zeros(3))


def test_control_messages_validated():
    assert proto.decode_request(proto.encode_request("status")) == {"cmd": "status"}
    for bad in (b"\xff", b"[]", b'{"cmd": 3}', b"{" * 70000):
        with pytest.raises(proto.BadControlMessage):
            proto.decode_request(bad)


def test_subscriber_counts_every_malformed_message_and_keeps_receiving():
    """A raw PUB peer sends each malformed message, then valid frames: each bad one is
    rejected with its reason, and every valid frame after it still arrives intact."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    ep = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(ep)
    sub = Subscriber(ep, topics=("cam",), timeout=5)
    assert pub.recv() == b"\x01cam"  # subscription arrived: nothing sent is lost
    cases = malformed()
    for _, parts, _ in cases:
        pub.send_multipart([b"cam", *parts])
    pub.send_multipart([b"cam", b"only-topic-and-one"])  # wrong part count with a topic
    good_h, good_p = _good()
    pub.send_multipart([b"cam", good_h, good_p])
    for fid in range(10, 15):
        frame = synthetic_frame((48, 64, 3), "uint8", fid)
        pub.send_multipart([b"cam", proto.frame_header("cam", fid, 0, frame), frame],
                           copy=False)
    pub.send_multipart([b"cam", proto.end_header("cam", 15, 0), b""])
    got = list(sub)
    assert [f.frame_id for f in got] == [3, 10, 11, 12, 13, 14]
    assert all(check_synthetic(f.array, f.frame_id) == -1 for f in got)
    expected: dict[str, int] = {}
    for _, _, err in cases:
        expected[err.reason] = expected.get(err.reason, 0) + 1
    expected["part_count"] += 1
    assert dict(sub.rejected) == expected
    assert sub.ended and sub.total == 15
    assert sub.gaps == 6  # ids 4..9 never sent
    sub.close()
    pub.close(linger=0)
