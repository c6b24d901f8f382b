"""Socket security and liveness: CURVE keys, the ZAP allow-list, ZMTP heartbeats.

Every socket framebroker creates goes through ``configure_socket``, so the options
that decide who may connect and how fast a dead peer is noticed live in one place:

* **CURVE** (optional): a binding process (``serve``, ``sink``) is a CURVE server with
  the server key pair; every connecting process is a CURVE client with its own key
  pair and the server's *public* key. A ZAP handler (one ``ThreadAuthenticator`` per
  binding process) admits only clients whose public key is in the ``--curve-allow``
  directory. Refusals are logged once per peer and all of them are counted.
* **Heartbeats**: ZMTP PING/PONG on client sockets and on the broker's XPUBs, so a
  peer that stopped answering (SIGSTOP, a pulled cable, a frozen host) is
  disconnected after ``HEARTBEAT_TIMEOUTS`` intervals instead of holding a TCP
  connection forever. Server sockets whose receive queue is bounded (REP, ROUTER,
  PULL) use TCP keepalive instead (a dead host is dropped after about as long; a
  stopped process keeps its connection) and the work channel's own HB messages
  (broker/dispatch.py): see ``configure_socket`` for the libzmq bug that rules ZMTP
  heartbeats out there.

The message format is unchanged: CURVE is below ZMTP framing (docs/protocol.md).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import zmq
import zmq.auth

from .subscriptions import parse_monitor_message

HEARTBEAT_S = 1.0  # PING interval; the peer is dropped after HEARTBEAT_TIMEOUTS of silence
HEARTBEAT_TIMEOUTS = 3
# Refused by ZAP; a ZMTP security error (plain client, wrong server key); or a
# handshake the client broke off (a plain client that saw the mechanism mismatch first).
REFUSAL_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
MAX_LOGGED_PEERS = 1000  # refusals of more distinct peers are counted, not logged

Role = Literal["server", "client"]


class SecurityError(ValueError):
    """A key file or allow directory is missing or of the wrong kind (a user error)."""


@dataclass(frozen=True)
class Security:
    """What every socket of one process needs: optional CURVE key files, the heartbeat.

    ``secret``: this process's ``.key_secret`` file (servers: the server's; clients:
    their own, whose public half must be in the server's allow directory).
    ``server_key``: the server's public ``.key`` file (clients). ``allow``: the
    directory of public keys a server admits. ``heartbeat``: seconds between ZMTP
    PINGs (0 = off).
    """

    secret: Path | None = None
    server_key: Path | None = None
    allow: Path | None = None
    heartbeat: float = HEARTBEAT_S

    @property
    def curve(self) -> bool:
        """Any key flag turns CURVE on (then ``check`` says what else is missing), so a
        lone ``--curve-allow`` is an error, never a silently plain server."""
        return any(p is not None for p in (self.secret, self.server_key, self.allow))

    def own_keys(self) -> tuple[bytes, bytes]:
        """(public, secret) from ``secret``; refuses a public-only file."""
        if self.secret is None:
            raise SecurityError("CURVE needs --curve-secret (this process's .key_secret file)")
        public, secret = _load(self.secret, "--curve-secret")
        if secret is None:
            raise SecurityError(f"--curve-secret {self.secret} holds only a public key; give "
                                f"the matching .key_secret file")
        return public, secret

    def server_public(self) -> bytes:
        """The server's public key; refuses a secret file, which must never be handed out."""
        if self.server_key is None:
            raise SecurityError("a CURVE client needs --curve-server-key (the server's public "
                                ".key file)")
        public, secret = _load(self.server_key, "--curve-server-key")
        if secret is not None:
            raise SecurityError(f"--curve-server-key {self.server_key} is a secret key file; "
                                f"clients need only the public .key file (keep the secret on "
                                f"the server)")
        return public

    def allowed_keys(self) -> list[Path]:
        """The public key files in ``allow``; an absent or empty directory is an error
        (it would admit nobody, which is never what was meant)."""
        if self.allow is None:
            raise SecurityError("a CURVE server needs --curve-allow DIR (the public keys of "
                                "the clients it admits)")
        if not self.allow.is_dir():
            raise SecurityError(f"--curve-allow {self.allow}: no such directory")
        keys = sorted(self.allow.glob("*.key"))
        if not keys:
            raise SecurityError(f"--curve-allow {self.allow}: no public key files (*.key) in it,"
                                f" so no client could connect")
        return keys

    def check(self, *, binds: bool, connects: bool) -> None:
        """Load every key this process will need now, so a bad flag fails at start with
        one clear message instead of at the first socket."""
        if not self.curve:
            return
        public, _ = self.own_keys()
        if binds:
            self.allowed_keys()
        if connects:
            server = self.server_public()
            if binds and server != public:
                # workers reach the broker and the sink with one --curve-server-key
                raise SecurityError("a process that binds and connects (the sink) must be "
                                    "the server: --curve-secret must be the secret of "
                                    "--curve-server-key")

    def argv(self) -> list[str]:
        """These settings as CLI flags, for a child process (``framebroker run``)."""
        flags = ["--heartbeat", repr(self.heartbeat)]
        for flag, path in (("--curve-secret", self.secret), ("--curve-server-key",
                           self.server_key), ("--curve-allow", self.allow)):
            if path is not None:
                flags += [flag, str(path)]
        return flags

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server with our key pair (ZAP decides who gets in)."""
        public, secret = self.own_keys()
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def apply_client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client: our key pair, and the server key it must match."""
        public, secret = self.own_keys()
        sock.curve_serverkey = self.server_public()
        sock.curve_secretkey = secret
        sock.curve_publickey = public


PLAIN = Security()


def from_key_dir(directory: Path, name: str, heartbeat: float = HEARTBEAT_S) -> Security:
    """The settings of a process using key pair ``name`` from a ``keys generate``
    directory: its own secret, the server's public key, the public dir as allow-list."""
    return Security(secret=directory / "private" / f"{name}.key_secret",
                    server_key=directory / "public" / "server.key",
                    allow=directory / "public", heartbeat=heartbeat)


def _load(path: Path, flag: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"{flag} {path}: no such file")
    try:
        return zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise SecurityError(f"{flag} {path}: not a ZeroMQ certificate ({exc})") from None


def configure_socket(sock: zmq.Socket, role: Role, security: Security = PLAIN,
                     max_bytes: int | None = None) -> zmq.Socket:
    """Set the options every framebroker socket shares, before bind/connect:
    MAXMSGSIZE (a receiver never allocates more than it validates), dead-peer
    detection, and CURVE for ``role`` when keys are configured.

    Why no ZMTP heartbeats on REP/ROUTER/PULL servers: libzmq 4.3.5 (and master, see
    zeromq/libzmq#4364, #4841) aborts with ``Assertion failed: !_io_error
    (stream_engine_base.cpp:310)`` when a connection's receive queue is full (its
    RCVHWM: the engine stops reading) and the peer then resets the connection (epoll
    reports EPOLLHUP/EPOLLERR, which it reports even with reading stopped): the engine
    marks itself ``_io_error`` and waits for the application to drain the queue; if
    the heartbeat timer fires first, it calls ``out_event``, which asserts. Any peer
    can do that to a server (flood faster than it drains, close with unread replies).
    An XPUB reads its peers' queues itself, eagerly, into its own list of pending
    subscriptions, so with RCVHWM 0 its engines never stop reading and keep their
    heartbeats (the broker bounds what it accepts from them, broker.py).
    """
    if max_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    zmtp_heartbeat = role == "client" or sock.type == zmq.XPUB
    if role == "server" and sock.type == zmq.XPUB:
        sock.setsockopt(zmq.RCVHWM, 0)
    if security.heartbeat > 0 and zmtp_heartbeat:
        ivl = max(1, int(security.heartbeat * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl * HEARTBEAT_TIMEOUTS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, ivl * HEARTBEAT_TIMEOUTS)
    elif security.heartbeat > 0:
        ivl_s = max(1, round(security.heartbeat))  # the kernel counts whole seconds
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, ivl_s)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, ivl_s)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, HEARTBEAT_TIMEOUTS)
    if security.curve:
        (security.apply_server if role == "server" else security.apply_client)(sock)
    return sock


class Guard:
    """The server side of CURVE for one binding process: the ZAP allow-list and a
    count of refused connections (``refused``, reported in status).

    Refusals are seen two ways: the ZAP handler names the key and address of a
    client with an unknown key; a socket monitor sees handshakes that fail before
    ZAP is asked (a plain client, a wrong server key). The monitor counts both kinds.
    Without CURVE the guard does nothing and ``refused`` stays 0.
    """

    def __init__(self, ctx: zmq.Context, security: Security,
                 log: Callable[[str], None]) -> None:
        self.security, self.log = security, log
        self.refused = 0
        self._logged: set[str] = set()
        self._log_lock = threading.Lock()  # the ZAP thread and the monitor thread both log
        self._monitors: list[tuple[zmq.Socket, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._auth: Any = None  # zap.LoggingAuthenticator: imported only for CURVE
        if not security.curve:
            return
        from .zap import LoggingAuthenticator  # pyzmq's imports asyncio: only when needed

        allowed = security.allowed_keys()
        self._auth = LoggingAuthenticator(ctx, self._refusal)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(security.allow))
        log(f"CURVE on: admitting the {len(allowed)} public key(s) in {security.allow}")

    def watch(self, sock: zmq.Socket, endpoint: str) -> None:
        """Count refused handshakes on ``sock`` (call before it binds ``endpoint``)."""
        if self._auth is not None:
            self._monitors.append((sock.get_monitor_socket(REFUSAL_EVENTS), endpoint))

    def start(self) -> None:
        """Start reading the monitors (after every ``watch``); the thread owns them."""
        if self._monitors:
            self._thread = threading.Thread(target=self._read_monitors, name="fb-guard",
                                            daemon=True)
            self._thread.start()

    def _refusal(self, peer: str, message: str) -> None:
        """Log a peer's first refusal only: a refused client retries, and a log line
        per attempt would let it fill the disk."""
        with self._log_lock:
            if peer in self._logged or len(self._logged) >= MAX_LOGGED_PEERS:
                return
            self._logged.add(peer)
        self.log(message + " (further refusals of this peer are counted, not logged)")

    def _read_monitors(self) -> None:
        poller = zmq.Poller()
        names = {}
        for mon, endpoint in self._monitors:
            poller.register(mon, zmq.POLLIN)
            names[mon] = endpoint
        try:
            while not self._stop.is_set():
                for mon, _ in poller.poll(100):
                    self.on_event(names[mon], parse_monitor_message(mon.recv_multipart()))
        finally:
            for mon, _ in self._monitors:
                mon.close(linger=0)

    def on_event(self, endpoint: str, event: dict) -> None:
        """Count (and log once per peer) a refused handshake seen by a socket monitor;
        also called by the broker for the XPUBs, whose monitors it reads itself."""
        if event["event"] & REFUSAL_EVENTS:
            with self._log_lock:  # the monitor thread and the broker's loop both count
                self.refused += 1
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP said who for
                # AUTH; here only the endpoint and the error are known
                self._refusal(f"{endpoint}:{event['event']}:{event['value']}",
                              _handshake_refusal(endpoint, event["event"], event["value"]))

    def close(self) -> None:
        """Stop the monitor thread and the ZAP handler (before the context ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        else:  # never started (a bind failed): the monitors are still ours to close
            for mon, _ in self._monitors:
                mon.close(linger=0)
        self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def _handshake_refusal(endpoint: str, event: int, value: int) -> str:
    """The log line for a handshake that failed before ZAP could name the client."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # value is an errno
        why = f"the handshake broke off ({os.strerror(value)}; a plain client?)"
    elif value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        why = "security mechanism mismatch (a plain client without CURVE keys?)"
    else:
        why = f"ZMTP handshake error {value:#x} (a client with a wrong --curve-server-key?)"
    return f"refused a client on {endpoint}: {why}"


def generate_keys(directory: Path, names: list[str]) -> list[tuple[Path, Path]]:
    """Key pairs for ``names``: ``DIR/public/NAME.key`` (hand out; the public dir is
    also the server's allow-list) and ``DIR/private/NAME.key_secret`` (mode 0600,
    in a 0700 directory). Existing keys are never overwritten."""
    public_dir, private_dir = directory / "public", directory / "private"
    for name in names:
        for path in (public_dir / f"{name}.key", private_dir / f"{name}.key_secret"):
            if path.exists():
                raise SecurityError(f"{path} exists; not overwriting a key")
    public_dir.mkdir(parents=True, exist_ok=True)
    private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(private_dir, 0o700)
    made = []
    for name in names:
        old_umask = os.umask(0o077)  # the secret file is never readable by others, even briefly
        try:
            public, secret = zmq.auth.create_certificates(private_dir, name)
        finally:
            os.umask(old_umask)
        public = Path(public).replace(public_dir / f"{name}.key")
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
        made.append((public, Path(secret)))
    return made


# --- exposure: what may be bound where ---------------------------------------------------

def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc and tcp on 127.0.0.0/8, ::1 or localhost."""
    import ipaddress

    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: reachable from outside
        return False


def check_exposure(endpoints: Sequence[str], insecure: bool, curve: bool,
                   warn: Callable[[str], None]) -> None:
    """Refuse (SecurityError) to expose frames and control to the network without CURVE
    unless asked (``insecure``); ``warn`` says what is exposed when it is allowed."""
    exposed = [ep for ep in endpoints if not is_loopback(ep)]
    if not exposed:
        return
    where = ", ".join(exposed)
    if curve:
        warn(f"{where} is reachable from the network; allowed because CURVE is on (traffic "
             f"encrypted, only --curve-allow keys admitted)")
        return
    if not insecure:
        raise SecurityError(f"refusing to bind {where}: anyone who can reach it could read "
                            f"every frame and stop the broker, and nothing is encrypted. Turn "
                            f"on CURVE (--curve-secret, --curve-allow; see framebroker keys "
                            f"generate), bind 127.0.0.1 (and tunnel), or pass --insecure to "
                            f"accept that risk")
    warn(f"warning: --insecure: {where} is reachable from the network without encryption "
         f"or authentication")


def check_unauthenticated(endpoint: str, insecure: bool, warn: Callable[[str], None],
                          refusal: str, warning: str) -> None:
    """The rule for what CURVE cannot cover (the viewer's page, --metrics, imagezmq's
    socket): loopback, or ``insecure``, which ``warn`` then says; otherwise
    SecurityError(``refusal``)."""
    if is_loopback(endpoint):
        return
    if not insecure:
        raise SecurityError(refusal)
    warn(warning)


def check_page_exposure(host: str, port: int, insecure: bool,
                        warn: Callable[[str], None]) -> None:
    """The viewer's HTTP page has no authentication: loopback only unless ``insecure``."""
    check_unauthenticated(
        f"tcp://{host}:{port}", insecure, warn,
        f"refusing to serve the page on {host}:{port}: anyone who can reach it could watch "
        f"every frame. Use 127.0.0.1 (and tunnel), or pass --insecure to accept that risk",
        f"warning: --insecure: {host}:{port} is reachable from the network without "
        f"authentication")


def check_results_exposure(endpoint: str | None, curve: bool) -> None:
    """The sink's results PUB: loopback, or CURVE."""
    if endpoint and not is_loopback(endpoint) and not curve:
        raise SecurityError(f"refusing to publish results on {endpoint}: anyone who can "
                            f"reach it could read them. Bind 127.0.0.1, or turn on CURVE")
