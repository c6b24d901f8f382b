"""``framebroker``: the command line. One subcommand per role, every tunable a flag.

Client subcommands take ``--broker`` (the control endpoint) and learn the data
endpoints from it; explicit endpoint flags override. Errors a user can cause (bad
flags, an absent camera, an unreachable broker) end in one clear line and a
non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import numpy as np
import zmq

from . import __version__
from . import protocol as proto
from .argtypes import (_checked_by, _client_name, _deprecated, _dtype,
                        _endpoint, _http_address, _mib, _nonneg_float, _nonneg_int,
                        _policy, _positive_float, _positive_int, _ring_size, _shape,
                        _source, _stream, _value_range)
from .bench.command import add_bench, add_tune
from .client import DEFAULT_BROKER, BrokerUnavailable, Control, ReceiveTimeout, subscribe
from .humanize import counts, format_reply, format_status, maybe
from .security import (HEARTBEAT_S, Security, SecurityError, check_exposure,
                       check_page_exposure, check_results_exposure, from_key_dir, generate_keys)
from .sources import format_shape

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOST = 0, 1, 2, 3


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _add_no_shm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-shm", action="store_true",
                   help="receive full payloads over the socket even if the broker offers a "
                        "shared-memory ring on this host")


# --- the shared vocabulary: one flag per concept, on every subcommand -------------------

def _add_out(p: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    """--out PATH and --overwrite: every command that writes a file."""
    p.add_argument("--out", type=Path, default=None, required=required, metavar="PATH",
                   help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output file if it exists (default: refuse)")


def _add_progress(p: argparse.ArgumentParser, default: float) -> None:
    p.add_argument("--progress", type=_nonneg_float, default=default, metavar="SECONDS",
                   help="seconds between progress lines on stderr (0 = none, default "
                        "%(default)s)")


def _add_json(p: argparse.ArgumentParser, what: str = "the summary") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON document on stdout, for programs")


def _checked_output(path: Path, overwrite: bool,
                    suffixes: Sequence[str] | None = None) -> Path:
    """outputs.check_output with the CLI's words (--out, --overwrite)."""
    from .outputs import BadSuffix, OutputError, OutputExists, check_output

    try:
        return check_output(path, overwrite, suffixes)
    except OutputExists:
        raise CliError(f"{path} exists; pass --overwrite to replace it") from None
    except OutputError as exc:
        raise CliError(str(exc), EXIT_USAGE if isinstance(exc, BadSuffix) else EXIT_ERROR
                       ) from None


def _say_size(prog: str, path: Path, nbytes: int, anyway: bool) -> None:
    """Print the expected size of a recording and refuse to start one its filesystem
    cannot hold (unless ``anyway``, --no-space-check)."""
    from .outputs import NotEnoughSpace, check_space, format_bytes

    print(f"{prog}: {path} will take about {format_bytes(nbytes)}", file=sys.stderr)
    if anyway:
        return
    try:
        check_space(path, nbytes)
    except NotEnoughSpace as exc:
        raise CliError(f"{exc}; free some space, record fewer frames, or pass "
                       f"--no-space-check to start anyway") from None


def _broker_error(exc: BrokerUnavailable) -> CliError:
    return CliError(exc.explain("if it runs with CURVE, give --curve-secret and "
                                "--curve-server-key"))


def _wait_for_broker(args: argparse.Namespace, security: Security) -> dict[str, Any]:
    """Wait up to --timeout for the broker's first answer, saying so on stderr once a
    second after the first; every local check has run before this."""
    prog = f"framebroker {args.command}"
    ctl = Control(args.broker, security=security)
    try:
        return ctl.wait(args.timeout, on_wait=lambda s: print(
            f"{prog}: waiting for broker at {args.broker} ({s:.0f} s)", file=sys.stderr,
            flush=True))
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    finally:
        ctl.close()


# --- subcommands ----------------------------------------------------------------------

CLIENT_TIMEOUT_S = 30.0


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", type=_endpoint, default=DEFAULT_BROKER,
                   help="the broker's control endpoint (default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=CLIENT_TIMEOUT_S,
                   metavar="SECONDS",
                   help="how long to wait for the broker: for its first answer and, once "
                        "connected, for data (default %(default)s)")
    _add_security_args(p)


def _add_security_args(p: argparse.ArgumentParser) -> None:
    """CURVE and heartbeat flags, the same on every subcommand that binds or connects."""
    g = p.add_argument_group("security", "CURVE encryption and client authentication (make "
                                         "keys with: framebroker keys generate DIR)")
    g.add_argument("--curve-secret", type=Path, default=None, metavar="FILE",
                   help="this process's .key_secret file (serve and sink: the server's; "
                        "clients: their own, listed in the server's --curve-allow)")
    g.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE",
                   help="clients: the server's public .key file")
    g.add_argument("--curve-allow", type=Path, default=None, metavar="DIR",
                   help="serve and sink: directory of the public keys (*.key) to admit")
    g.add_argument("--heartbeat", type=_nonneg_float, default=HEARTBEAT_S, metavar="SECONDS",
                   help="ZMTP heartbeat interval; a peer silent for 3 of them is dropped "
                        "(0 = off, default %(default)s)")


def _warn(args: argparse.Namespace) -> Callable[[str], None]:
    """A one-line notice on stderr, prefixed with the subcommand."""
    return lambda message: print(f"framebroker {args.command}: {message}", file=sys.stderr)


def _security(args: argparse.Namespace, *, binds: bool, connects: bool) -> Security:
    """The security settings from the flags, every key file checked now (a bad key is a
    usage error at start, not a failed handshake later)."""
    sec = Security(secret=args.curve_secret, server_key=args.curve_server_key,
                   allow=args.curve_allow, heartbeat=args.heartbeat)
    try:
        sec.check(binds=binds, connects=connects)
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return sec


def _add_metrics(p: argparse.ArgumentParser) -> None:
    """--metrics HOST:PORT, on every long-running part; and --insecure where the part
    has none yet (the same opt-in for any non-loopback bind)."""
    p.add_argument("--metrics", type=_http_address, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback "
                        "unless --insecure; port 0 picks a free one, printed on stderr; "
                        "pip install 'framebroker[metrics]')")
    if "--insecure" not in p._option_string_actions:
        p.add_argument("--insecure", action="store_true",
                       help="allow --metrics on a non-loopback address")


def _check_metrics(args: argparse.Namespace) -> None:
    """--metrics: the library is there and the address allowed, before any connection."""
    if args.metrics is None:
        return
    from .metrics import MetricsError, check_exposure, require

    try:
        require()
        check_exposure(*args.metrics, args.insecure, warn=_warn(args))
    except (MetricsError, SecurityError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _expose(args: argparse.Namespace, read: Callable[[], Any]) -> Any:
    """Start this part's /metrics (None without --metrics); a taken port is one line."""
    if args.metrics is None:
        return None
    from .metrics import MetricsError, expose

    try:
        return expose(args.metrics, args.command, read, _warn(args))
    except MetricsError as exc:
        raise CliError(str(exc)) from None


def _metrics_of(role: str) -> Callable[..., Any]:
    """broker/metrics.py's reader of a part, imported only when a scrape comes."""
    from . import metrics

    return getattr(metrics, f"{role}_families")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a broker: capture frames and publish them",
                       description="Capture frames from a source and serve them on PUB "
                                   "(fan-out), work (load-balanced) and control sockets.")
    p.add_argument("--source", type=_source, default="synthetic",
                   help="synthetic | video:PATH | camera:INDEX | h5:FILE[:DATASET] (a "
                        "recording, replayed at its timestamps unless --fps) | "
                         "imagezmq:tcp://HOST:PORT (bind; REQ ImageSenders connect) | "
                         "imagezmq-sub:tcp://HOST:PORT (a PUB ImageSender) | "
                         "stream2:tcp://HOST:PORT (a DECTRIS detector's Stream V2: one series) "
                         "(default synthetic)")
    p.add_argument("--sender", default=None, type=_stream,
                   help="imagezmq: take only frames whose sender text is this (default: "
                        "every sender, into the one stream)")
    p.add_argument("--shape", type=_shape, default=(480, 640, 3),
                   help="synthetic frame shape, e.g. 480x640x3 (default 480x640x3)")
    p.add_argument("--dtype", type=_dtype, default="uint8",
                   help="synthetic frame dtype (default uint8)")
    p.add_argument("--loop", action="store_true",
                   help="restart a video file or recording at its end")
    p.add_argument("--width", type=_nonneg_int, default=0, help="camera: requested width")
    p.add_argument("--height", type=_nonneg_int, default=0, help="camera: requested height")
    p.add_argument("--camera-fps", type=_nonneg_float, default=0.0,
                   help="camera: requested frame rate")
    p.add_argument("--fps", type=_nonneg_float, default=None,
                   help="pace the stream at this rate, drift-free (0 = as fast as possible; "
                        "default: a video file's own rate, an h5: recording's own "
                        "timestamps, else as fast as possible)")
    p.add_argument("--frames", type=_nonneg_int, default=0,
                   help="stop after this many frames (0 = until stopped)")
    p.add_argument("--stream", type=_stream, default="cam", help="stream name and PUB topic")
    p.add_argument("--pub", type=_endpoint, default="tcp://127.0.0.1:5555",
                   help="PUB endpoint to bind (default %(default)s)")
    p.add_argument("--work", type=_endpoint, default="tcp://127.0.0.1:5556",
                   help="work-dispatch endpoint to bind (default %(default)s)")
    p.add_argument("--control", type=_endpoint, default="tcp://127.0.0.1:5557",
                   help="control endpoint to bind (default %(default)s)")
    p.add_argument("--results", type=_endpoint, default="tcp://127.0.0.1:5558",
                   help="results endpoint the sink binds, handed to workers "
                        "(default %(default)s)")
    p.add_argument("--advertise", default="",
                   help="host to hand out for wildcard binds (default 127.0.0.1)")
    p.add_argument("--hwm", type=_positive_int, default=64,
                   help="frames queued per subscriber before PUB drops for that subscriber "
                        "(default %(default)s)")
    _deprecated(p, "--sndhwm", "--hwm", "hwm", type=_positive_int)
    p.add_argument("--wait-subscribers", type=_nonneg_int, default=0,
                   help="hold the stream until this many subscribers (any policy) have "
                        "subscribed")
    p.add_argument("--wait-workers", type=_nonneg_int, default=0,
                   help="hold the stream until this many FFT workers (and, if they send "
                        "results to a sink, the sink) have joined")
    p.add_argument("--wait-recorders", type=_nonneg_int, default=0,
                   help="hold the stream until this many lossless recorders have joined")
    p.add_argument("--max-pending", type=_positive_int, default=64,
                   help="unacknowledged frames per work group before the source waits "
                        "(default %(default)s)")
    p.add_argument("--worker-timeout", type=_nonneg_float, default=2.0,
                   help="seconds of silence before a work consumer is declared dead and "
                        "its frames are dispatched again (default %(default)s)")
    p.add_argument("--orphan-timeout", type=_nonneg_float, default=10.0,
                   help="seconds a work group may have no member and no acker (a lossless "
                        "recorder or every worker died) before its frames are abandoned "
                        "and the source runs on (default %(default)s)")
    p.add_argument("--drain-timeout", type=_nonneg_float, default=10.0,
                   help="seconds to wait at the end for work groups to acknowledge")
    p.add_argument("--end-linger", type=_nonneg_float, default=1.0,
                   help="seconds to keep repeating end-of-stream for subscribers")
    p.add_argument("--linger-ms", type=_nonneg_int, default=500,
                   help="ms to keep sending queued messages at exit (default %(default)s)")
    p.add_argument("--max-frame-mib", type=_mib, default=proto.DEFAULT_MAX_BYTES,
                   help="largest frame accepted from a source, MiB (default 256)")
    _add_progress(p, 5.0)
    p.add_argument("--shm", type=_ring_size, default=None,
                   help="also serve same-host consumers from a shared-memory ring in "
                        "/dev/shm of this size: a slot count ('64slots') or bytes ('1GiB', "
                        "'512MiB'); only headers then go over zmq to them")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without CURVE (and "
                        "--metrics on one)")
    _deprecated(p, "--quiet", "--progress 0", "progress", nargs=0, const=0.0)
    _add_json(p, "the final status")
    _add_security_args(p)
    _add_metrics(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .broker import Broker, BrokerConfig, install_signal_handlers
    from .signals import Stopped, StopSignals
    from .sources import SourceError, open_source, pace_rate

    security = _security(args, binds=True, connects=False)
    try:
        check_exposure((args.pub, args.work, args.control), args.insecure, security.curve,
                       warn=_warn(args))
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.source.kind == "imagezmq":
        _check_imagezmq_bind(args)
    _check_metrics(args)
    stop = StopSignals()  # a network source waits here for its first frame or series
    stop.install()
    try:
        with stop.raising():
            source = open_source(args.source, shape=args.shape, dtype=args.dtype,
                                 loop=args.loop, width=args.width, height=args.height,
                                 camera_fps=args.camera_fps, sender=args.sender or "",
                                 max_bytes=args.max_frame_mib,
                                 log=lambda m: print(f"framebroker serve: {m}",
                                                     file=sys.stderr, flush=True))
    except Stopped as exc:
        print(f"framebroker serve: {exc} while waiting for {args.source}; nothing was "
              f"streamed", file=sys.stderr, flush=True)
        return EXIT_OK
    except (SourceError, proto.ProtocolError) as exc:
        raise CliError(str(exc)) from None
    finally:
        stop.restore()
    nbytes = int(np.prod(source.shape)) * source.dtype.itemsize
    if nbytes > args.max_frame_mib:
        source.close()
        raise CliError(f"frames of {nbytes} bytes exceed --max-frame-mib "
                       f"({args.max_frame_mib / 2**20:g} MiB)")
    cfg = BrokerConfig(stream=args.stream, pub=args.pub, work=args.work, control=args.control,
                       results=args.results, advertise=args.advertise,
                       fps=pace_rate(source, args.fps), frames=args.frames, sndhwm=args.hwm,
                       wait_subscribers=args.wait_subscribers, wait_workers=args.wait_workers,
                       wait_recorders=args.wait_recorders, max_pending=args.max_pending,
                       worker_timeout=args.worker_timeout, orphan_timeout=args.orphan_timeout,
                       drain_timeout=args.drain_timeout,
                       end_linger=args.end_linger, linger_ms=args.linger_ms,
                       progress=args.progress, security=security,
                       shm=args.shm or "")
    try:
        broker = Broker(source, cfg)
    except (SourceError, ValueError, OSError) as exc:
        source.close()
        raise CliError(str(exc)) from None
    try:
        exporter = _expose(args, lambda: _metrics_of("broker")(broker))
    except CliError:
        broker.close()
        source.close()
        raise
    install_signal_handlers(broker)
    broker.log(f"serving {source.description} as {args.stream!r} on {args.pub} "
               f"(control {args.control}, work {args.work})"
               + (f", ring {broker.ring.path} ({broker.ring.info.nslots} slots)"
                  if broker.ring is not None else ""))
    try:
        status = broker.run()
    finally:
        if exporter is not None:
            exporter.close()
        broker.close()
        source.close()
        # Wait out the linger before the interpreter frees the buffers that queued
        # zero-copy messages still point into (otherwise libzmq may send freed memory).
        zmq.Context.instance().destroy(linger=min(args.linger_ms, 200) if broker.hurry
                                       else args.linger_ms)
    print(json.dumps(status) if args.json else f"framebroker serve: {broker.summary_line()}",
          flush=True)
    return EXIT_ERROR if status["error"] else EXIT_OK


def _check_imagezmq_bind(args: argparse.Namespace) -> None:
    """The imagezmq REP's address, before anything binds: reachable from the network
    only with --insecure (imagezmq has no CURVE), and not a port the broker binds too
    (imagezmq's default, 5555, is also the default --pub)."""
    from .izmq import check_exposure as check_imagezmq_exposure

    ep = args.source.target
    try:
        check_imagezmq_exposure(ep, args.insecure, _warn(args))
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    port = ep.rpartition(":")[2]
    for flag, other in (("--pub", args.pub), ("--work", args.work), ("--control", args.control)):
        if other.startswith("tcp://") and other.rpartition(":")[2] == port:
            raise CliError(f"--source {args.source} and {flag} {other} use the same port "
                           f"{port}; move the broker's (e.g. {flag} tcp://127.0.0.1:5565) so "
                           f"the ImageSenders keep theirs", EXIT_USAGE)


def _add_watch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="subscribe and show live fps, MB/s, gaps, latency",
                       description="Subscribe to a stream and report rate, gaps and capture "
                                   "latency; ends with a summary at end-of-stream or Ctrl-C.")
    _add_client_args(p)
    p.add_argument("--pub", type=_endpoint, default=None, help="PUB endpoint (overrides --broker)")
    p.add_argument("--stream", type=_stream, default=None,
                   help="stream to subscribe to (default: the broker's)")
    p.add_argument("--frames", type=_nonneg_int, default=0,
                   help="stop after this many frames (0 = until end-of-stream)")
    p.add_argument("--hwm", type=_positive_int, default=64,
                   help="frames queued locally before zmq drops (default %(default)s)")
    _deprecated(p, "--rcvhwm", "--hwm", "hwm", type=_positive_int)
    p.add_argument("--policy", type=_policy, default="drop",
                   help="slow consumer: drop (ZeroMQ HWM, seen as gaps), latest:N (keep "
                        "only the newest N frames; count the rest as dropped) or block "
                        "(lossless: the source waits for this subscriber)")
    p.add_argument("--verify", action="store_true",
                   help="check every frame against the synthetic source (content and id)")
    p.add_argument("--name", default="", type=_client_name,
                   help="name under which the broker's status shows this subscriber's "
                        "drop counts (default: sub-HOST-PID-N)")
    _add_progress(p, 1.0)
    _deprecated(p, "--interval", "--progress", "progress", type=_nonneg_float)
    _add_json(p)
    _add_no_shm(p)
    _add_metrics(p)
    p.set_defaults(func=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    from .hops import Hop
    from .watch import lost as watch_lost, summary_line as watch_summary_line, watch_stream

    if args.policy == "block" and (args.pub or args.stream):
        raise CliError("--policy block takes frames from the broker's work channel; "
                       "--pub and --stream do not apply", EXIT_USAGE)
    security = _security(args, binds=False, connects=True)
    _check_metrics(args)
    if args.policy == "block" or not args.pub:
        _wait_for_broker(args, security)
    try:
        common = {"broker": args.broker, "timeout": args.timeout,
                  "connect_wait": args.timeout, "name": args.name, "shm": not args.no_shm,
                  "security": security}
        if args.policy == "block":
            sub = subscribe("block", **common)
        else:
            sub = subscribe(args.policy, endpoint=args.pub, rcvhwm=args.hwm,
                            topics=(args.stream,) if args.stream else None, **common)
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    hop = Hop("capture_to_receive")
    exporter = _expose(args, lambda: _metrics_of("watch")(sub, hop))
    try:
        summary = watch_stream(sub, frames=args.frames, progress=args.progress,
                               verify=args.verify, log=lambda m: print(
                                   m, file=sys.stderr, flush=True), hop=hop)
    except ReceiveTimeout as exc:
        raise CliError(str(exc)) from None
    finally:
        if exporter is not None:
            exporter.close()
    print(json.dumps(summary) if args.json else watch_summary_line(summary))
    return EXIT_LOST if watch_lost(summary) else EXIT_OK


def _jpeg_quality(text: str) -> int:
    value = _positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality is 1-100, got {text!r}")
    return value


def _add_bridge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bridge", help="forward the stream to another system's receivers",
                       description="Subscribe to a broker and send its frames on in another "
                                   "system's wire format.")
    kinds = p.add_subparsers(dest="bridge", required=True, metavar="KIND")
    q = kinds.add_parser("imagezmq", help="send frames to an imagezmq ImageHub",
                         description="Subscribe to a broker and send each frame to an "
                                     "existing imagezmq ImageHub with imagezmq's own "
                                     "ImageSender (needs framebroker[imagezmq]).")
    _add_client_args(q)
    to = q.add_mutually_exclusive_group(required=True)
    to.add_argument("--connect", type=_endpoint, metavar="tcp://HUB:PORT",
                    help="REQ/REP: the hub's address (ImageHub() binds it); every frame "
                         "waits for the hub's reply")
    to.add_argument("--bind", type=_endpoint, metavar="tcp://HOST:PORT",
                    help="PUB/SUB: bind a PUB here for a hub made with "
                         "ImageHub(open_port=..., REQ_REP=False)")
    q.add_argument("--jpeg", type=_jpeg_quality, default=0, metavar="QUALITY",
                   help="send_jpg at this quality (1-100) instead of raw send_image "
                        "(8-bit gray or BGR frames)")
    q.add_argument("--name", type=_stream, default=None,
                   help="the sender text the hub receives with each frame (default: the "
                        "stream name)")
    q.add_argument("--policy", type=_policy, default="latest:1",
                   help="slow hub: latest:N (default latest:1: the hub gets the newest "
                        "frame), drop, or block (lossless: the source waits for the hub)")
    q.add_argument("--frames", type=_nonneg_int, default=0,
                   help="stop after this many frames (0 = until end-of-stream)")
    q.add_argument("--reply-timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="REQ/REP: how long to wait for the hub's reply before the frame is "
                        "counted lost and the socket is made again (default %(default)s)")
    q.add_argument("--insecure", action="store_true",
                   help="allow --bind on a non-loopback address (imagezmq has no encryption)")
    _add_progress(q, 5.0)
    _add_json(q)
    q.set_defaults(func=cmd_bridge_imagezmq)


def cmd_bridge_imagezmq(args: argparse.Namespace) -> int:
    from .bridge import ImagezmqOut, require_imagezmq, run_bridge, summary_line
    from .izmq import check_exposure as check_imagezmq_exposure

    try:
        require_imagezmq()
        if args.bind:
            check_imagezmq_exposure(args.bind, args.insecure, _warn(args))
    except ImportError as exc:
        raise CliError(str(exc)) from None
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    security = _security(args, binds=False, connects=True)
    eps = _wait_for_broker(args, security)
    try:
        sub = subscribe(args.policy, broker=args.broker, timeout=args.timeout,
                        connect_wait=args.timeout, shm=False, security=security,
                        **({} if args.policy == "block" else {"rcvhwm": 4}))
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    try:
        out = ImagezmqOut(args.connect or args.bind, reqrep=bool(args.connect),
                          name=args.name or eps.get("stream", "cam"), jpeg=args.jpeg,
                          reply_timeout=args.reply_timeout)
    except zmq.ZMQError as exc:
        sub.close()
        raise CliError(f"imagezmq {args.connect or args.bind}: {exc.strerror}") from None
    try:
        summary = run_bridge(sub, out, frames=args.frames, progress=args.progress,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except ReceiveTimeout as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    print(json.dumps(summary) if args.json else summary_line(summary), flush=True)
    return EXIT_OK


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="serve a live web page: frame, spectrum, stats",
                       description="Subscribe with the latest:1 policy (the broker never "
                                   "waits for the viewer) and serve one page with the live "
                                   "frame, its log-magnitude spectrum and the stream's stats. "
                                   "Ends with a summary on Ctrl-C/SIGTERM.")
    p.add_argument("--broker", type=_endpoint, default=DEFAULT_BROKER,
                   help="the broker's control endpoint (default %(default)s)")
    p.add_argument("--http", type=_http_address, default=("127.0.0.1", 8080),
                   help="HOST:PORT to serve the page on (default 127.0.0.1:8080)")
    p.add_argument("--max-fps", type=_positive_float, default=15.0,
                   help="frames rendered and streamed per second at most (default %(default)s)")
    p.add_argument("--scale", type=_positive_float, default=1.0,
                   help="size of the streamed image relative to the frame (default %(default)s)")
    p.add_argument("--range", type=_value_range, default=None, dest="value_range",
                   help="LO:HI pixel values mapped to black..white (default: auto contrast "
                        "from percentiles; uint8 frames are shown as they are)")
    p.add_argument("--results", type=_endpoint, default=None, metavar="ENDPOINT",
                   help="a sink's --publish endpoint: show the FFT workers' spectra "
                        "(outputs spectrum or magnitude) instead of computing one")
    p.add_argument("--quality", type=_positive_int, default=80, choices=range(1, 101),
                   metavar="1-100", help="JPEG quality of the stream (default %(default)s)")
    p.add_argument("--nice", type=_nonneg_int, default=10,
                   help="lower the viewer's CPU priority by this much, so on a busy host the "
                        "broker wins the CPU (default %(default)s; 0 = unchanged)")
    p.add_argument("--insecure", action="store_true",
                   help="allow serving the page (and --metrics) on a non-loopback address")
    _add_security_args(p)
    _add_metrics(p)
    p.set_defaults(func=cmd_view)


def cmd_view(args: argparse.Namespace) -> int:
    from .view import View, ViewConfig, ViewError, summary_line

    host, port = args.http
    try:
        check_page_exposure(host, port, args.insecure, warn=_warn(args))
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    _check_metrics(args)
    view = View(ViewConfig(broker=args.broker, host=host, port=port, max_fps=args.max_fps,
                           scale=args.scale, value_range=args.value_range,
                           quality=args.quality, results=args.results,
                           security=_security(args, binds=False, connects=True)))
    try:
        url = view.bind()
    except ViewError as exc:
        raise CliError(str(exc)) from None
    exporter = _expose(args, lambda: _metrics_of("view")(view))
    os.nice(args.nice)
    view.log(f"serving {url} for the broker at {args.broker}")
    try:
        summary = view.run()  # SIGTERM, SIGHUP and Ctrl-C end it, with the summary
    finally:
        if exporter is not None:
            exporter.close()
    print(f"framebroker view: {summary_line(summary)}", flush=True)
    return EXIT_OK


def _add_simple(sub: argparse._SubParsersAction, name: str, help_: str,
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    _add_client_args(p)
    p.set_defaults(func=func)
    return p


def _add_status(sub: argparse._SubParsersAction) -> None:
    _add_json(_add_simple(sub, "status", "show the broker's status", cmd_status),
              "the full status")


def cmd_status(args: argparse.Namespace) -> int:
    status = _request(args, "status")
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def _request(args: argparse.Namespace, cmd: str,
             security: Security | None = None) -> dict[str, Any]:
    """One control request, after waiting (and saying so) for the broker."""
    security = security or _security(args, binds=False, connects=True)
    _wait_for_broker(args, security)
    ctl = Control(args.broker, timeout=args.timeout, security=security)
    try:
        return ctl.request(cmd)
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    finally:
        ctl.close()


def _add_control_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_ in (("stop", "end the stream: the broker sends end-of-stream and exits"),
                        ("pause", "pause capture"), ("resume", "resume capture")):
        _add_json(_add_simple(sub, name, help_, cmd_simple), "the broker's reply")


def cmd_simple(args: argparse.Namespace) -> int:
    reply = _request(args, args.command)
    reply.pop("ok", None)
    print(json.dumps(reply) if args.json else f"framebroker {args.command}: "
                                              f"{format_reply(args.command, reply)}")
    return EXIT_OK


def _add_snapshot(sub: argparse._SubParsersAction) -> None:
    p = _add_simple(sub, "snapshot", "save the broker's latest frame", cmd_snapshot)
    _add_out(p, "output file, .png (OpenCV) or .npy (required)", required=True)
    _add_json(p, "what was saved")


def cmd_snapshot(args: argparse.Namespace) -> int:
    out = _checked_output(args.out, args.overwrite, (".png", ".npy"))
    security = _security(args, binds=False, connects=True)
    _wait_for_broker(args, security)
    ctl = Control(args.broker, timeout=args.timeout, security=security)
    try:
        frame = ctl.snapshot()
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    except (RuntimeError, proto.ProtocolError) as exc:
        raise CliError(str(exc)) from None
    finally:
        ctl.close()
    try:
        if out.suffix.lower() == ".npy":
            np.save(out, frame.array)
        else:
            _write_png(out, frame.array)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    summary = {"frame_id": frame.frame_id, "shape": list(frame.array.shape),
               "dtype": str(frame.array.dtype), "out": str(out)}
    print(json.dumps(summary) if args.json else
          f"snapshot: frame {frame.frame_id} ({format_shape(frame.array.shape)} "
          f"{frame.array.dtype}) -> {out}")
    return EXIT_OK


def _write_png(out: Path, array: np.ndarray) -> None:
    from .sources import _cv2

    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
        raise CliError(f"PNG holds 2-D/3-D uint8 or uint16 frames, this is {array.shape} "
                       f"{array.dtype}: use .npy", EXIT_USAGE)
    if not _cv2().imwrite(str(out), array):
        raise CliError(f"cannot write {out} (does the directory exist?)")


def _add_fft_args(p: argparse.ArgumentParser) -> None:
    """FFT worker flags, shared by ``worker`` and ``run``."""
    from .choices import BACKENDS, COLORS, OUTPUTS, PLANNERS

    p.add_argument("--fft-output", dest="output", choices=OUTPUTS, default="peak",
                   help="what is sent back per frame (default %(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="pyfftw",
                   help="FFT library; auto: the fastest for the frame, measured once and "
                        "kept with the wisdom")
    p.add_argument("--color", choices=COLORS, default="gray",
                   help="BGR frames: to gray, or each channel (default %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="FFT threads per worker (default 1: prefer more workers)")
    p.add_argument("--planner", choices=list(PLANNERS), default="measure",
                   help="FFTW planning effort (default %(default)s, kept as wisdom)")
    p.add_argument("--wisdom", default=None,
                   help="wisdom directory (default: the user cache dir)")
    p.add_argument("--window", type=_positive_int, default=4,
                   help="frames a worker may hold at once (its credit, default %(default)s)")


def _add_part_args(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int],
                   keep_running: bool) -> None:
    """Flags every pipeline part (worker, sink, recorder) shares: it waits longer for
    its broker than a one-shot client, and ends with a summary."""
    _add_client_args(p)
    p.set_defaults(func=func)
    if keep_running:
        p.add_argument("--keep-running", action="store_true",
                       help="stay up after end-of-stream and serve the next session")
    _add_json(p)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="FFT worker: frames from the broker, results to the sink",
                       description="Join the broker's FFT work group: plan a 2-D real FFT once, "
                                   "transform every frame it is given, send a result per frame "
                                   "to the sink.")
    _add_worker_flags(p, cmd_worker)
    p.add_argument("--id", type=_nonneg_int, default=0, help="worker id (default: the pid)")


def _add_worker_flags(p: argparse.ArgumentParser,
                      func: Callable[[argparse.Namespace], int]) -> None:
    """Flags of one FFT worker, shared by ``worker`` and ``workers``."""
    _add_part_args(p, func, keep_running=True)
    p.add_argument("--work", type=_endpoint, default=None,
                   help="work endpoint (overrides --broker)")
    p.add_argument("--results", type=_endpoint, default=None,
                   help="sink's results endpoint (overrides --broker)")
    _add_fft_args(p)
    from .choices import OUTPUTS
    _deprecated(p, "--output", "--fft-output", "output", choices=OUTPUTS)
    p.add_argument("--no-sink", action="store_true",
                   help="count only: send no results, acknowledge frames directly")
    _add_no_shm(p)
    _add_metrics(p)


def _add_workers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workers", help="start N FFT workers: processes here, or Ray actors",
                       description="Start --count FFT workers (each as 'framebroker worker' "
                                   "would), as spawned processes on this host or, with "
                                   "--ray, as Ray actors that Ray restarts when they die.")
    _add_worker_flags(p, cmd_workers)
    p.add_argument("--count", type=_positive_int, default=2,
                   help="how many workers (default %(default)s); with --metrics HOST:PORT "
                        "worker k serves on PORT+k")
    _add_ray_flag(p, "the workers")


def _worker_config(args: argparse.Namespace) -> Any:
    from .workers import WorkerConfig

    return WorkerConfig(broker=args.broker, work=args.work, results=args.results,
                        output=args.output, backend=args.backend, color=args.color,
                        threads=args.threads, planner=args.planner, wisdom=args.wisdom,
                        window=args.window, sink=not args.no_sink,
                        worker_id=getattr(args, "id", 0), timeout=args.timeout,
                        keep_running=args.keep_running, shm=not args.no_shm,
                        security=_security(args, binds=False, connects=True),
                        metrics=args.metrics)


def _worker_needs_broker(args: argparse.Namespace) -> bool:
    return not (args.work and (args.results or args.no_sink))


def _check_ray(args: argparse.Namespace) -> None:
    """``--ray`` without Ray installed is a flag error: say so before waiting for a broker."""
    if args.ray:
        from .placement import PlacementError, require_ray

        try:
            require_ray()
        except PlacementError as exc:
            raise CliError(str(exc)) from None


def cmd_workers(args: argparse.Namespace) -> int:
    from .placement import PlacementError, Workers, summary_line

    _check_ray(args)
    _check_metrics(args)
    cfg = _worker_config(args)
    summary = _run_part(args, cfg.security, _worker_needs_broker(args),
                        lambda: Workers(cfg, args.count, args.ray, args.restarts),
                        (BrokerUnavailable, ValueError, PlacementError), summary_line)
    return EXIT_OK if _ended(summary) and not summary["failed"] else EXIT_ERROR


def cmd_worker(args: argparse.Namespace) -> int:
    from .workers import Worker

    _check_metrics(args)
    cfg = _worker_config(args)
    summary = _run_part(
        args, cfg.security, _worker_needs_broker(args),
        lambda: Worker(cfg), (BrokerUnavailable, ValueError),
        lambda s: f"framebroker worker: {s['frames']} frames, {s['fps']} fps"
                  + maybe("compute p50", s["compute_ms_p50"], "ms")
                  + f", rejected {counts(s['rejected'])}" + _stopped_text(s))
    return EXIT_OK if _ended(summary) else EXIT_ERROR


def _ended(summary: dict[str, Any]) -> bool:
    """A part ended as asked: at end-of-stream, or by a stop signal (SIGTERM, SIGHUP,
    SIGINT: its summary says which), with what it had accepted finished."""
    return bool(summary["ended"] or summary.get("stopped_by"))


def _stopped_text(summary: dict[str, Any]) -> str:
    return f"; stopped by {summary['stopped_by']}" if summary.get("stopped_by") else ""


def _run_part(args: argparse.Namespace, security: Security, needs_broker: bool,
              make: Callable[[], Any], errors: tuple[type[Exception], ...],
              line: Callable[[dict[str, Any]], str],
              metrics: str | None = None) -> dict[str, Any]:
    """Wait for the broker (if the part needs it), build a part (worker, sink, recorder),
    serve its ``metrics`` (broker/metrics.py's reader name) with --metrics, run it to
    end-of-stream, always close it, and print its summary once, on stdout; ``errors``
    from building or running become one-line errors."""
    if needs_broker:
        _wait_for_broker(args, security)
    try:
        part = make()
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    except errors as exc:
        raise CliError(str(exc)) from None
    exporter = None
    try:
        if metrics is not None:
            exporter = _expose(args, lambda: _metrics_of(metrics)(part))
        summary = part.run()
    except BrokerUnavailable as exc:
        raise _broker_error(exc) from None
    except errors as exc:
        raise CliError(str(exc)) from None
    finally:
        if exporter is not None:
            exporter.close()
        part.close()
    print(json.dumps(summary) if args.json else line(summary), flush=True)
    return summary


def _add_sink(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sink", help="collect FFT results in frame-id order",
                       description="Bind the results endpoint, put worker results back in "
                                   "frame-id order, drop duplicates, report gaps, and exit "
                                   "with a summary at end-of-stream.")
    _add_part_args(p, cmd_sink, keep_running=True)
    p.add_argument("--results", type=_endpoint, default=None,
                   help="results endpoint to bind (default: what the broker hands out)")
    p.add_argument("--work", type=_endpoint, default=None,
                   help="broker work endpoint, for acknowledgements (overrides --broker)")
    p.add_argument("--reorder", type=_positive_int, default=1024,
                   help="results held back to restore order before a gap is declared "
                        "(default %(default)s; keep it >= the broker's --max-pending)")
    _add_out(p, "write the results to this .npy or .h5 file, as they are acknowledged")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding --results on a non-loopback address without CURVE "
                        "(and --metrics on one)")
    p.add_argument("--publish", type=_endpoint, default=None, metavar="ENDPOINT",
                   help="also publish every result, in order, on a PUB bound here (for "
                        "framebroker view --results)")
    _add_metrics(p)


def cmd_sink(args: argparse.Namespace) -> int:
    from .sink import Sink, SinkConfig, SinkError, summary_line

    if args.out is not None:
        _checked_output(args.out, args.overwrite, (".npy", ".h5"))
    security = _security(args, binds=True, connects=True)
    try:
        check_exposure([args.results] if args.results else [], args.insecure, security.curve,
                       warn=_warn(args))
        check_results_exposure(args.publish, security.curve)
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    _check_metrics(args)
    cfg = SinkConfig(broker=args.broker, results=args.results, work=args.work,
                     reorder=args.reorder, out=str(args.out) if args.out else None,
                     overwrite=args.overwrite, publish=args.publish, timeout=args.timeout,
                     keep_running=args.keep_running, security=security)
    summary = _run_part(args, security, not args.work, lambda: Sink(cfg),
                        (BrokerUnavailable, SinkError, OSError),
                        lambda s: f"framebroker sink: {summary_line(s)}", metrics="sink")
    if summary["total"] is None and not summary.get("stopped_by"):
        return EXIT_ERROR  # neither end-of-stream nor a stop signal: the broker went away
    return EXIT_LOST if summary["gaps"] else EXIT_OK


def _add_record_args(p: argparse.ArgumentParser) -> None:
    """Recorder flags shared by ``record`` and ``run``."""
    from .choices import COMPRESSIONS

    p.add_argument("--mode", choices=("lossless", "live"), default="lossless",
                   help="lossless: credit-based, the source waits for the disk; live: PUB, "
                        "drops are recorded as gaps (default %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="chunk codec (hdf5plugin; default %(default)s)")
    p.add_argument("--level", type=_nonneg_int, default=None, help="codec level")
    p.add_argument("--chunk-frames", type=_positive_int, default=1,
                   help="frames per HDF5 chunk (default %(default)s)")
    p.add_argument("--compress-threads", type=_positive_int, default=2,
                   help="threads compressing chunks (default %(default)s)")
    p.add_argument("--no-space-check", action="store_true",
                   help="start even if the expected size exceeds the free disk space")


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record the stream into HDF5",
                       description="Record frames into a chunked, preallocated HDF5 file "
                                   "with direct chunk writes; lossless by default.")
    p.add_argument("path", nargs="?", default=None, help=argparse.SUPPRESS)  # deprecated
    _add_out(p, "the HDF5 file to write, e.g. run.h5 (required)")
    _add_part_args(p, cmd_record, keep_running=False)
    p.add_argument("--work", type=_endpoint, default=None, help="work endpoint (lossless)")
    p.add_argument("--pub", type=_endpoint, default=None, help="PUB endpoint (live)")
    _add_record_args(p)
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="stop after this many frames (default: at end-of-stream)")
    p.add_argument("--expect-frames", type=_positive_int, default=None,
                   help="expected frame count: preallocate exactly (default: --frames, "
                        "else grow)")
    p.add_argument("--grow-frames", type=_positive_int, default=1024,
                   help="growth step when the count is unknown (default %(default)s)")
    p.add_argument("--window", type=_positive_int, default=None,
                   help="lossless: frames held at once (default: from the frame size and "
                        "disk rate, see broker/record.py)")
    p.add_argument("--queue-frames", type=_positive_int, default=64,
                   help="frames buffered between receive and disk (default %(default)s)")
    p.add_argument("--flush-frames", type=_positive_int, default=64,
                   help="flush at least every N frames (default %(default)s)")
    p.add_argument("--flush-seconds", type=_nonneg_float, default=1.0,
                   help="flush at least every S seconds (default %(default)s)")
    p.add_argument("--no-swmr", action="store_true",
                   help="plain HDF5 (readers cannot open it while recording)")
    p.add_argument("--max-frames-per-file", type=_nonneg_int, default=0,
                   help="rotate to OUT_00001.h5, ... after N frames (0 = never)")
    p.add_argument("--max-bytes-per-file", type=_mib, default=0,
                   help="rotate after this many MiB of frames (0 = never)")
    p.add_argument("--throttle", type=_nonneg_float, default=0.0,
                   help="sleep this many seconds per frame in the writer (simulates a "
                        "slow disk; for tests)")
    _add_no_shm(p)  # live mode always receives payloads: its queue outlives slots
    g = p.add_argument_group("sharding", "several writers, one file each, behind a VDS "
                                         "master PATH (start serve with --wait-recorders N)")
    g.add_argument("--shards", type=_positive_int, default=0, metavar="N",
                   help="start N writer processes here: PATH_shard0.h5 ... and master PATH")
    g.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="be writer K of N (start the others elsewhere with the same PATH)")
    g.add_argument("--shard-block", type=_positive_int, default=None, metavar="B",
                   help="ids per block; block b goes to shard b mod N (default: "
                        "--chunk-frames)")
    _add_ray_flag(p, "the --shards writers")
    _add_metrics(p)


_shard = _checked_by(proto.parse_shard)


def _add_ray_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"start {what} as Ray actors: on the cluster at ADDRESS ('auto': the "
                        f"running one), or without ADDRESS on a local Ray started for this "
                        f"command (pip install 'framebroker[ray]')")
    p.add_argument("--restarts", type=_nonneg_int, default=3,
                   help="--ray: times Ray restarts a dead one (default %(default)s)")


def cmd_record(args: argparse.Namespace) -> int:
    from .record import RecordConfig, Recording
    from .recorder import RecorderError

    out = _record_target(args)
    shard = None
    if args.shards or args.shard or args.ray:
        from .shards import check_flags
        try:
            shard = check_flags(args.mode, args.shards, args.shard,
                                args.shard_block or args.chunk_frames, args.ray,
                                bool(args.max_frames_per_file or args.max_bytes_per_file))
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        _check_ray(args)
        if args.metrics is not None:
            raise CliError("--metrics serves a single recorder; it does not combine with "
                           "--shards, --shard or --ray", EXIT_USAGE)
    _check_metrics(args)
    _checked_output(_own_file(out, shard), args.overwrite)
    security = _security(args, binds=False, connects=True)
    expected = args.expect_frames or args.frames
    needs_broker = not (args.work or args.pub)
    if needs_broker:
        _wait_for_broker(args, security)
        if expected:
            status = _request(args, "status", security)
            frame_bytes = int(np.prod(status["shape"])) * np.dtype(status["dtype"]).itemsize
            _say_size(f"framebroker {args.command}", out, expected * frame_bytes,
                      args.no_space_check)
    cfg = RecordConfig(path=str(out), broker=args.broker, work=args.work, pub=args.pub,
                       mode=args.mode, frames=expected, stop_after=args.frames or 0,
                       window=args.window,
                       queue_frames=max(args.queue_frames, args.window or 0),
                       chunk_frames=args.chunk_frames, grow_frames=args.grow_frames,
                       compression=args.compression, level=args.level, swmr=not args.no_swmr,
                       flush_frames=args.flush_frames, flush_seconds=args.flush_seconds,
                       max_frames_per_file=args.max_frames_per_file,
                       max_bytes_per_file=args.max_bytes_per_file, overwrite=args.overwrite,
                       compress_threads=args.compress_threads, throttle_s=args.throttle,
                       timeout=args.timeout, shm=not args.no_shm, security=security)
    if args.shards or args.shard or args.ray:
        from .placement import PlacementError
        from .shards import ShardedRecording, summary_line
        summary = _run_part(
            args, security, False,
            lambda: ShardedRecording(cfg, shards=args.shards, shard=args.shard,
                                     block=args.shard_block or args.chunk_frames, ray=args.ray,
                                     restarts=args.restarts),
            (RecorderError, BrokerUnavailable, ValueError, PlacementError),
            lambda s: summary_line(s, str(out)))
    else:
        summary = _run_part(
            args, security, False, lambda: Recording(cfg),
            (RecorderError, BrokerUnavailable, ValueError),
            lambda s: f"framebroker record: {s['frames_written']} frames ({s['fps']} fps, "
                      f"{s['mb_per_s']} MB/s) to {', '.join(s['files']) or 'no file'}; missed "
                      f"{s['frames_missed']}, dropped {s['dropped']}", metrics="record")
    if not (_ended(summary) or summary.get("stopped_after")) or summary["session_changed"]:
        return EXIT_ERROR
    return EXIT_LOST if summary["frames_missed"] and args.mode == "lossless" else EXIT_OK


def _own_file(out: Path, shard: proto.Shard | None) -> Path:
    """The file this command must not find already there: ``--out``, or with ``--shard
    K/N`` the shard's own file. The master of ``--shard K/N`` is shared: the writer of
    another shard (another command, maybe on another host) may have written it first,
    and ``start_master`` joins it if it is the same recording (refusing it here made
    the second of two writers started together fail while the first waited for it)."""
    if shard is None:
        return out
    from .vds import shard_path

    return shard_path(out, shard.index)


def _record_target(args: argparse.Namespace) -> Path:
    """--out, or the deprecated positional path of older scripts."""
    if args.path is not None:
        if args.out is not None:
            raise CliError("give the output file once, as --out PATH", EXIT_USAGE)
        print(f"framebroker {args.command}: warning: the positional output path is "
              f"deprecated; use --out {args.path}", file=sys.stderr)
        return Path(args.path)
    if args.out is None:
        raise CliError("--out PATH is required (the HDF5 file to write)", EXIT_USAGE)
    return args.out


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a recording",
                       description="Frames, dtype/shape, duration and rate, missing ids, "
                                   "compression ratio and size of an HDF5 recording.")
    p.add_argument("path", help="recording (.h5)")
    _add_out(p, "also write a contact sheet + interval plot PNG here")
    _deprecated(p, "--png", "--out", "out", type=Path)
    p.add_argument("--follow", action="store_true",
                   help="SWMR: keep showing the frame count while it is recorded")
    _add_progress(p, 0.5)
    _deprecated(p, "--interval", "--progress", "progress", type=_nonneg_float)
    _add_json(p, "the report")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import inspect as insp

    path = Path(args.path)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    if args.out is not None:
        _checked_output(args.out, args.overwrite, (".png",))
    if args.follow and not args.progress:
        raise CliError("--follow needs --progress SECONDS > 0", EXIT_USAGE)
    try:
        if args.follow:
            for count in insp.follow(path, args.progress):
                print(f"inspect: {path}: {count} frames", flush=True)
        info = insp.inspect_file(path)
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(f"{path}: not a framebroker recording ({exc})") from None
    if args.out is not None:
        try:
            insp.contact_sheet(path, args.out)
        except OSError as exc:
            raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    print(json.dumps(info, default=str) if args.json else insp.format_report(info))
    return EXIT_OK


def _add_run(sub: argparse._SubParsersAction) -> None:
    from .run import default_workers

    p = sub.add_parser("run", help="the whole pipeline in one command",
                       description="Start a broker, FFT workers, the sink and optionally a "
                                   "recorder; stream; stop everything in order; print a "
                                   "summary. Flags can also come from --config FILE (TOML).")
    p.add_argument("--config", default=None,
                   help="TOML file of flags (keys as the long flags, - or _); flags override")
    p.add_argument("--frames", type=_nonneg_int, default=None,
                   help="frames to stream (default 1000; 0 with --seconds = unlimited)")
    p.add_argument("--seconds", type=_nonneg_float, default=0.0,
                   help="stop after this many seconds (Ctrl-C also stops cleanly)")
    p.add_argument("--source", type=_source, default="synthetic",
                   help="synthetic | video:PATH | camera:INDEX | h5:FILE[:DATASET]")
    p.add_argument("--shape", type=_shape, default=(480, 640, 3),
                   help="synthetic frame shape (default 480x640x3)")
    p.add_argument("--dtype", type=_dtype, default="uint8", help="synthetic dtype")
    p.add_argument("--loop", action="store_true",
                   help="restart a video file or recording at its end")
    p.add_argument("--fps", type=_nonneg_float, default=None,
                   help="pace the source (0 = as fast as possible; default: a video file's "
                        "own rate, an h5: recording's timestamps, else as fast as possible)")
    p.add_argument("--workers", type=_nonneg_int, default=default_workers(),
                   help="FFT worker processes (default: one per core, %(default)s here)")
    _add_fft_args(p)
    p.add_argument("--reorder", type=_positive_int, default=1024, help="sink reorder window")
    p.add_argument("--record", type=Path, default=None, metavar="PATH",
                   help="also record into this HDF5 file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the --record file if it exists (default: refuse)")
    p.add_argument("--shards", type=_nonneg_int, default=0, metavar="N",
                   help="--record with N writer processes, one file each, behind a VDS "
                        "master (see record --shards)")
    _add_record_args(p)
    p.add_argument("--hwm", type=_positive_int, default=64,
                   help="frames the broker queues per subscriber (default %(default)s)")
    p.add_argument("--max-pending", type=_positive_int, default=64, help="broker --max-pending")
    p.add_argument("--shm", type=_ring_size, default=None,
                   help="broker --shm: workers and the lossless recorder read frames from a "
                        "shared-memory ring of this size ('128slots', '1GiB')")
    p.add_argument("--stream", type=_stream, default="cam", help="stream name")
    for name, port in (("pub", 5555), ("work", 5556), ("control", 5557), ("results", 5558)):
        p.add_argument(f"--{name}", type=_endpoint, default=f"tcp://127.0.0.1:{port}",
                       help=f"{name} endpoint (default %(default)s)")
    _add_progress(p, 1.0)
    _deprecated(p, "--quiet", "--progress 0", "progress", nargs=0, const=0.0)
    _add_json(p)
    g = p.add_argument_group("security")
    g.add_argument("--curve", action="store_true",
                   help="CURVE on every socket, with a fresh server and client key pair made "
                        "for this run in a private temporary directory (deleted at the end)")
    g.add_argument("--curve-keys", type=Path, default=None, metavar="DIR",
                   help="CURVE with the server and client keys of a 'framebroker keys "
                        "generate DIR' directory")
    g.add_argument("--heartbeat", type=_nonneg_float, default=HEARTBEAT_S, metavar="SECONDS",
                   help="ZMTP heartbeat interval for every part (0 = off, default %(default)s)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    if args.curve and args.curve_keys is not None:
        raise CliError("give --curve (fresh keys) or --curve-keys DIR, not both", EXIT_USAGE)
    if not args.curve:
        return _run_pipeline(args, args.curve_keys)
    with tempfile.TemporaryDirectory(prefix="framebroker-keys-") as keys:
        generate_keys(Path(keys), ["server", "client"])
        return _run_pipeline(args, Path(keys))


def _run_pipeline(args: argparse.Namespace, keys: Path | None) -> int:
    """``run`` with CURVE keys from ``keys`` (a ``keys generate`` layout) or without."""
    from .run import (RunError, Runner, exit_code, format_report, plan_from_args,
                      progress_display, refuse_running_broker)

    if keys is None:
        server = client_sec = Security(heartbeat=args.heartbeat)
    else:
        server = from_key_dir(keys, "server", args.heartbeat)
        client_sec = from_key_dir(keys, "client", args.heartbeat)
        try:
            server.check(binds=True, connects=True)
            client_sec.check(binds=False, connects=True)
        except SecurityError as exc:
            raise CliError(f"--curve-keys {keys}: {exc}", EXIT_USAGE) from None
    frames = args.frames if args.frames is not None else (0 if args.seconds else 1000)
    if args.workers == 0 and args.record is None:
        raise CliError("nothing to run: --workers 0 and no --record", EXIT_USAGE)
    if args.shards and (args.record is None or args.mode != "lossless"):
        raise CliError("--shards N shards a lossless --record", EXIT_USAGE)
    if args.record is not None:
        _checked_output(args.record, args.overwrite)
        if frames and args.source.kind == "synthetic":
            _say_size("framebroker run", args.record, frames * int(np.prod(args.shape))
                      * np.dtype(args.dtype).itemsize, args.no_space_check)
    try:
        refuse_running_broker(args.control, client_sec)
    except RunError as exc:
        raise CliError(str(exc)) from None
    plan = plan_from_args(args, server, client_sec, frames)
    progress, finish = progress_display(args, frames)
    runner = Runner(plan, progress, log=lambda m: print(m, file=sys.stderr))
    if not plan.sink:
        runner.parts = [p for p in runner.parts if p.name != "sink"]
    rep: dict[str, Any] = {}
    try:
        runner.run()
        rep = runner.report()
    finally:
        finish(rep)
    print(json.dumps(rep) if args.json else format_report(rep), flush=True)
    return exit_code(rep)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make CURVE key pairs",
                       description="CURVE key management. framebroker keys generate DIR makes "
                                   "DIR/public/NAME.key and DIR/private/NAME.key_secret.")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = keys_sub.add_parser("generate", help="make key pairs (server and client by default)",
                            description="Make CURVE key pairs with zmq.auth: public keys in "
                                        "DIR/public (hand them out; that directory is also the "
                                        "servers' --curve-allow list), secrets in DIR/private "
                                        "(mode 0600). Existing keys are never overwritten.")
    g.add_argument("dir", type=Path, help="directory for the keys (created if absent)")
    g.add_argument("--name", action="append", default=None,
                   help="make only this key pair, e.g. a new client (repeatable)")
    g.set_defaults(func=cmd_keys_generate)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    names = args.name or ["server", "client"]
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise CliError(f"--name {bad[0]!r}: use a plain file name", EXIT_USAGE)
    try:
        made = generate_keys(args.dir, names)
    except (SecurityError, OSError) as exc:
        raise CliError(str(exc)) from None
    for public, secret in made:
        print(f"made {secret} (secret, mode 0600: keep it on its host) and {public} (public)")
    d = args.dir
    clients = [n for n in names if n != "server"]
    print("use:")
    if "server" in names:
        print(f"""  framebroker serve --curve-secret {d}/private/server.key_secret --curve-allow {d}/public
  framebroker sink --curve-secret {d}/private/server.key_secret \\
      --curve-server-key {d}/public/server.key --curve-allow {d}/public""")
    for name in clients:
        print(f"""  framebroker watch --curve-secret {d}/private/{name}.key_secret \\
      --curve-server-key {d}/public/server.key      (worker, record, status, ... the same)""")
    if names == ["server", "client"]:
        print(f"""  framebroker run --curve-keys {d}
A client on another host needs only its own .key_secret and public/server.key; a new
client: framebroker keys generate {d} --name NAME, then restart the servers.""")
    elif clients:
        print(f"restart the servers (serve, sink) so that their --curve-allow {d}/public "
              f"admits {', '.join(clients)}")
    return EXIT_OK


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> None:
    """``run --config FILE``: the file's keys become the defaults, so flags override."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "run" or "--config" not in args:
        return
    i = args.index("--config")
    if i + 1 >= len(args):
        return
    path = Path(args[i + 1])
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"--config {path}: {exc}", EXIT_USAGE) from None
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    known = {opt[2:].replace("-", "_"): a for a in run_parser._actions
             for opt in a.option_strings if opt.startswith("--")}
    defaults = {}
    for key, value in config.items():
        action = known.get(key.replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            raise CliError(f"--config {path}: unknown key {key!r}", EXIT_USAGE)
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value) if not isinstance(value, str) else value)
            except argparse.ArgumentTypeError as exc:
                raise CliError(f"--config {path}: {key}: {exc}", EXIT_USAGE) from None
        if action.choices is not None and value not in action.choices:
            raise CliError(f"--config {path}: {key} must be one of {list(action.choices)}",
                           EXIT_USAGE)
        defaults[action.dest] = value
    run_parser.set_defaults(**defaults)


class _Parser(argparse.ArgumentParser):
    """A usage error is the subcommand's one-line usage plus the error, not every flag;
    unknown flags are reported by the subcommand they were given to."""

    def format_usage(self) -> str:
        names = [a.metavar or a.dest.upper() for a in self._actions
                 if not a.option_strings and a.help is not argparse.SUPPRESS
                 and not isinstance(a, argparse._SubParsersAction)]
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            names.append(subs[0].metavar or "COMMAND")
        return (f"usage: {' '.join([self.prog, *names])} [options]  "
                f"(all of them: {self.prog} --help)\n")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.format_usage()}{self.prog}: error: {message}\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            getattr(ns, "parser", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def _own_parser(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's parser records itself in the namespace (for _Parser.parse_args)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(parser=sub)
                _own_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="framebroker", description="A high-throughput camera frame broker over ZeroMQ: "
                                        "capture, fan out, FFT, record. Every client command "
                                        "takes --broker CONTROL_ENDPOINT.")
    parser.add_argument("--version", action="version", version=f"framebroker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_watch(sub)
    _add_worker(sub)
    _add_workers(sub)
    _add_sink(sub)
    _add_record(sub)
    _add_inspect(sub)
    _add_run(sub)
    add_bench(sub)  # bench and tune live in broker.bench.command
    add_tune(sub)
    _add_keys(sub)
    _add_view(sub)
    _add_bridge(sub)
    _add_status(sub)
    _add_snapshot(sub)
    _add_control_commands(sub)
    _own_parser(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        _apply_config(parser, argv)
    except CliError as exc:
        print(f"framebroker run: error: {exc}", file=sys.stderr)
        return exc.code
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"framebroker {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of our stdout went away (``status | head -1``): end quietly, with the
    status of a process ended by SIGPIPE, and let nothing flush into the closed pipe."""
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
