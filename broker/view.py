"""``framebroker view``: one web page with the live frame, its spectrum and the stream's stats.

The viewer is a ``latest:1`` subscriber: a background thread keeps only the newest
frame, so however slow the page, the broker's queue for the viewer stays empty and the
broker never waits for it. The render thread takes that frame at most ``max_fps`` times
a second, maps it to 8 bits (auto contrast unless a range is fixed), JPEG-encodes it
for the MJPEG stream and computes the log-magnitude spectrum of what is displayed with
``FFTProcessor``. A monitor thread asks the broker for its status once a second: that
gives the capture rate, and says whether the broker is there at all when no frames come.

Everything is served by the standard library's ``ThreadingHTTPServer`` from one inline
page (no build step, nothing fetched from a CDN): ``/`` the page, ``/stream.mjpg`` and
``/fft.mjpg`` the live images, ``/frame.png`` (``?raw=1``: the received pixels, lossless),
``/frame.jpg``, ``/fft.png`` and ``/stats`` (JSON).

Any web page a browser on this host opens can try to reach the viewer, so it answers
only requests whose ``Host`` header is an IP address, ``localhost`` or the name it was
bound to (403 otherwise: a DNS-rebinding page sends its own name), serves at most
``MAX_CONNECTIONS`` connections at once (more are answered 503 and closed by the
accepting thread, so idle sockets cannot pile up threads), and drops a connection that
sends nothing, or takes nothing, for ``IDLE_TIMEOUT_S``.
"""
from __future__ import annotations

import ipaddress
import json
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
import zmq

from . import protocol as proto
from .client import (DEFAULT_BROKER, BrokerUnavailable, Control, Frame, ReceiveTimeout,
                     Subscriber, resolve)
from .fft import FFTProcessor
from .hops import Hop
from .security import PLAIN, Security, configure_socket
from .signals import Stopped, StopSignals
from .sources import geometry

AUTO_PERCENTILES = (0.5, 99.5)
HIST_BINS = 64
WORKER_SPECTRA = (proto.Output.SPECTRUM, proto.Output.MAGNITUDE)  # outputs shown as images
BOUNDARY = "frame"
MAX_CONNECTIONS = 32  # a page uses 3-4 (the page, two streams, /stats)
IDLE_TIMEOUT_S = 10.0


class ViewError(RuntimeError):
    """The viewer cannot start (its HTTP address cannot be bound)."""


@dataclass(frozen=True)
class ViewConfig:
    broker: str = DEFAULT_BROKER
    host: str = "127.0.0.1"
    port: int = 8080
    max_fps: float = 15.0
    scale: float = 1.0
    value_range: tuple[float, float] | None = None  # None: auto contrast (percentiles)
    quality: int = 80
    stale_s: float = 3.0  # no frame for this long and no status reply: disconnected
    poll_s: float = 1.0
    security: Security = PLAIN  # CURVE client keys when the broker requires them
    results: str | None = None  # a sink's --publish endpoint: show the workers' spectra


# --- pictures -----------------------------------------------------------------------

def as_picture(array: np.ndarray) -> np.ndarray:
    """The frame as an image OpenCV can show: (H, W) gray or (H, W, 3) BGR.

    Frames of any rank are read as (rows, cols, channels) like the synthetic source
    does; 3 channels are BGR, 4 are BGRA (alpha dropped), other counts show channel 0.
    """
    rows, cols, chans = geometry(array.shape)
    pic = array.reshape(rows, cols, chans)
    if chans in (3, 4):
        return pic[:, :, :3]
    return pic[:, :, 0]


def value_range(pic: np.ndarray) -> tuple[float, float]:
    """Auto contrast: the 0.5th and 99.5th percentile of a subsample (all channels
    together, so colours keep their balance); never an empty range."""
    lo, hi = (float(v) for v in np.percentile(pic[::4, ::4], AUTO_PERCENTILES))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1.0


def to_uint8(pic: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (rounded, clipped). Huge or non-finite values
    (a float frame may hold anything) overflow quietly and end up at 0 or 255."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = (pic.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    np.nan_to_num(out, copy=False)
    np.clip(out, 0.0, 255.0, out=out)
    return (out + 0.5).astype(np.uint8)


def display_image(array: np.ndarray, fixed: tuple[float, float] | None
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """The 8-bit picture shown for a frame and the value range mapped to 0..255.

    uint8 frames are shown as they are (so the page shows the camera's own pixels)
    unless a range is fixed; every other dtype is scaled, by percentiles by default.
    """
    pic = as_picture(array)
    if pic.dtype == np.uint8 and fixed is None:
        return np.ascontiguousarray(pic), (0.0, 255.0)
    lo, hi = fixed if fixed is not None else value_range(pic)
    return to_uint8(pic, lo, hi), (lo, hi)


def resize(pic: np.ndarray, scale: float) -> np.ndarray:
    """Scale for the stream: area averaging when shrinking, nearest pixels when growing."""
    if scale == 1.0:
        return pic
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_NEAREST
    return cv2.resize(pic, None, fx=scale, fy=scale, interpolation=interp)


def full_spectrum(half: np.ndarray, width: int) -> np.ndarray:
    """The centred (H, W) spectrum from the (H, W//2+1) half of a real FFT: the missing
    columns are the mirror image |X(-r, -c)| = |X(r, c)| of the ones computed."""
    rows = half.shape[0]
    mirror = half[(-np.arange(rows)) % rows][:, width - np.arange(width // 2 + 1, width)]
    return np.fft.fftshift(np.concatenate([half, mirror], axis=1))


def spectrum_image(log_mag: np.ndarray, width: int) -> np.ndarray:
    """Colour picture of a log-magnitude half spectrum, contrast from its percentiles
    (the DC term alone would otherwise set the scale)."""
    full = full_spectrum(log_mag, width)
    lo, hi = (float(v) for v in np.percentile(full[::2, ::2], (1.0, 99.9)))
    return cv2.applyColorMap(to_uint8(full, lo, hi if hi > lo else lo + 1.0),
                             cv2.COLORMAP_INFERNO)


def histogram(pic: np.ndarray) -> list[list[int]]:
    """HIST_BINS-bin histogram of the displayed 8-bit values, one list per channel
    (B, G, R or gray), from every other pixel: a picture of the exposure, not a count."""
    sub = pic[::2, ::2]
    planes = [sub] if sub.ndim == 2 else [sub[:, :, c] for c in range(sub.shape[2])]
    shift = 8 - (HIST_BINS.bit_length() - 1)
    return [np.bincount((p.ravel() >> shift), minlength=HIST_BINS).tolist() for p in planes]


def encode(ext: str, pic: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, pic, list(params))
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pic.shape} {pic.dtype} image as {ext}")
    return buf.tobytes()


@dataclass(frozen=True)
class Shot:
    """What the page shows now: one frame, rendered. Replaced whole, never modified."""

    seq: int
    frame: Frame  # holds the received message (raw pixels for /frame.png?raw=1)
    display: np.ndarray  # 8-bit, full resolution
    jpeg: bytes  # display at --scale
    fft_jpeg: bytes | None
    fft: np.ndarray | None
    value_range: tuple[float, float]
    histogram: list[list[int]]
    latency_ms: float
    fft_source: str  # who computed the spectrum shown, for the page's caption


# --- the viewer -----------------------------------------------------------------------

class View:
    """Subscriber + renderer + status monitor + HTTP server. ``bind`` then ``run``."""

    def __init__(self, cfg: ViewConfig, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda m: print(f"framebroker view: {m}", file=sys.stderr, flush=True))
        self.stop = threading.Event()  # set by request_stop()
        self._wake = socket.socketpair()  # wakes the HTTP thread when stopping
        self.server: ThreadingHTTPServer | None = None
        self.sub: Subscriber | None = None
        self._resubscribe = threading.Event()
        self._cond = threading.Condition()
        self._shot: Shot | None = None
        self._ffts: dict[tuple[int, ...], FFTProcessor] = {}
        self._result: tuple[float, proto.Header, np.ndarray] | None = None  # workers' newest
        self.results_received = 0
        self.hop = Hop("capture_to_receive")  # of the frames shown (latest:1, --max-fps)
        self._past: Counter[str] = Counter()  # counts of subscribers already replaced
        self.shown = 0
        self.last_frame_t = 0.0
        self.status: dict[str, Any] | None = None  # the broker's, None when it did not answer
        self.rates = {"delivered_fps": 0.0, "shown_fps": 0.0, "mb_per_s": 0.0}
        self.t_start = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------
    def bind(self) -> str:
        """Listen on the HTTP address (first, so a busy port fails before anything else
        starts); returns the page's URL."""
        try:
            self.server = _BoundedServer((self.cfg.host, self.cfg.port), _handler(self),
                                         MAX_CONNECTIONS)
        except OSError as exc:
            raise ViewError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: "
                            f"{exc.strerror or exc}") from None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def run(self) -> dict[str, Any]:
        """Serve until ``stop`` is set; returns the summary."""
        assert self.server is not None, "bind() first"
        threads = [threading.Thread(target=self._serve_http, name="view-http", daemon=True),
                   threading.Thread(target=self._monitor, name="view-monitor", daemon=True)]
        if self.cfg.results:
            threads.append(threading.Thread(target=self._results_loop, name="view-results",
                                            daemon=True))
        for t in threads:
            t.start()
        signals = StopSignals()  # in the main thread: SIGTERM, SIGHUP, Ctrl-C end it
        signals.install()
        try:
            with signals.raising():
                self._render_loop()
        except Stopped:
            pass
        finally:
            signals.restore()
            self.request_stop()
            with self._cond:
                self._cond.notify_all()  # streams end; their threads are not waited for
            for t in threads:
                t.join()
            self.server.server_close()
            for end in self._wake:
                end.close()
            if self.sub is not None:
                self._fold(self.sub)
                self.sub = None
        return self.summary()

    def request_stop(self) -> None:
        """End ``run`` (from any thread): the HTTP thread wakes at once."""
        self.stop.set()
        try:
            self._wake[1].send(b"x")
        except OSError:
            pass  # already woken: its buffer is full

    def _serve_http(self) -> None:
        """Accept connections until stopped. It waits on the listening socket and on
        ``_wake`` together, so it ends the moment it is asked to (``serve_forever``
        notices a shutdown only at its next poll interval)."""
        assert self.server is not None
        self.server.timeout = 0  # handle_request: only ever called when one is waiting
        with selectors.DefaultSelector() as sel:
            sel.register(self.server.socket, selectors.EVENT_READ)
            sel.register(self._wake[0], selectors.EVENT_READ)
            while not self.stop.is_set():
                if any(key.fileobj is self.server.socket for key, _ in sel.select()):
                    self.server.handle_request()

    # --- frames ----------------------------------------------------------------------
    def _subscribe(self) -> Subscriber | None:
        """A latest:1 subscription to whatever the broker serves now; None while it is
        absent (the caller retries, the page says disconnected)."""
        try:
            endpoint, eps = resolve(self.cfg.broker, None, "pub", wait_s=1.0,
                                    security=self.cfg.security)
        except BrokerUnavailable:
            return None
        self.log(f"subscribed to {eps['stream']!r} at {endpoint}")
        return Subscriber(endpoint, topics=(eps["stream"],), policy="latest:1",
                          name=f"view-{self.cfg.host}:{self.cfg.port}",
                          security=self.cfg.security)

    def _fold(self, sub: Subscriber) -> None:
        """Keep a replaced subscriber's counts in the totals."""
        sub.close()
        self._past.update({k: sub.stats()[k] for k in ("received", "bytes", "gaps", "sessions")})
        self._past["dropped"] += sub.dropped

    def _render_loop(self) -> None:
        period = 1.0 / self.cfg.max_fps
        next_t = time.monotonic()
        while not self.stop.is_set():
            if self._resubscribe.is_set() and self.sub is not None:
                self._resubscribe.clear()
                self._fold(self.sub)
                self.sub = None
            if self.sub is None:
                self.sub = self._subscribe()
                continue
            try:
                frame = self.sub.recv(timeout=0.25)
            except ReceiveTimeout:
                continue
            if frame is None:
                continue  # END: the socket stays connected for the broker's next session
            self.last_frame_t = time.monotonic()
            self._show(frame)
            next_t = max(next_t + period, time.monotonic())
            self.stop.wait(next_t - time.monotonic())

    def _fft_of(self, pic: np.ndarray) -> np.ndarray | None:
        """Log-magnitude spectrum of the displayed picture (planned once per shape)."""
        if pic.shape[0] < 2 or pic.shape[1] < 2:
            return None
        proc = self._ffts.get(pic.shape)
        if proc is None:
            proc = self._ffts[pic.shape] = FFTProcessor(pic.shape, np.uint8, color="gray",
                                                        output="magnitude")
        return spectrum_image(proc.process(pic), pic.shape[1])

    def _results_loop(self) -> None:
        """Keep the newest spectrum the FFT workers computed (from a sink's --publish PUB);
        only what is shown gets turned into a picture, at the display rate."""
        sock = configure_socket(zmq.Context.instance().socket(zmq.SUB), "client",
                                self.cfg.security, proto.DEFAULT_MAX_BYTES + 4096)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.cfg.results)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake[0], zmq.POLLIN)  # readable once stopping
        try:
            while not self.stop.is_set():
                if sock not in dict(poller.poll()):
                    continue
                try:
                    header, array = proto.decode_topic(sock.recv_multipart(copy=False))
                except proto.ProtocolError:
                    continue  # not for us to count: the frame stream's stats are the page's
                if header.kind == proto.Kind.RESULT and header.output in WORKER_SPECTRA:
                    self._result = (time.monotonic(), header, array)
                    self.results_received += 1
        finally:
            sock.close(linger=0)

    def _workers_spectrum(self, width: int) -> tuple[np.ndarray, str] | None:
        """The workers' newest log-magnitude spectrum as a picture, if one is fresh."""
        res = self._result
        if res is None or time.monotonic() - res[0] > self.cfg.stale_s:
            return None
        _, header, array = res
        plane = array if array.ndim == 2 else array[0]
        log_mag = np.log1p(np.abs(plane)) if header.output == proto.Output.SPECTRUM else plane
        if log_mag.shape[1] != width // 2 + 1:
            width = 2 * (log_mag.shape[1] - 1)  # the spectrum of a frame of another size
        return (spectrum_image(log_mag, width),
                f"of frame #{header.frame_id}, from FFT worker {header.worker_id}")

    def _show(self, frame: Frame) -> None:
        latency = (time.time_ns() - frame.timestamp_ns) / 1e6
        self.hop.observe(latency / 1e3)
        display, rng = display_image(frame.array, self.cfg.value_range)
        scaled = np.ascontiguousarray(resize(display, self.cfg.scale))
        workers = self._workers_spectrum(display.shape[1])
        if workers is not None:
            fft, source = workers
        else:
            fft, source = self._fft_of(scaled), "of the displayed frame (computed by the viewer)"
        shot = Shot(self.shown + 1, frame, display,
                    encode(".jpg", scaled, (cv2.IMWRITE_JPEG_QUALITY, self.cfg.quality)),
                    None if fft is None else encode(".jpg", fft, (cv2.IMWRITE_JPEG_QUALITY, 90)),
                    fft, rng, histogram(display), latency, source)
        with self._cond:
            self._shot = shot
            self.shown += 1
            self._cond.notify_all()

    def latest(self) -> Shot | None:
        return self._shot

    def wait_newer(self, seq: int, timeout: float) -> Shot | None:
        """The shot after ``seq``, or None after ``timeout`` (or when stopping)."""
        with self._cond:
            self._cond.wait_for(lambda: self.stop.is_set() or (
                self._shot is not None and self._shot.seq > seq), timeout)
            shot = self._shot
        return shot if shot is not None and shot.seq > seq and not self.stop.is_set() else None

    # --- the broker's side -----------------------------------------------------------
    def _monitor(self) -> None:
        """Once per ``poll_s``: the broker's status (capture rate, is it there, did it
        move) and the viewer's own rates."""
        ctl = Control(self.cfg.broker, timeout=self.cfg.poll_s, security=self.cfg.security)
        prev = (time.monotonic(), *self._counts())
        was_connected: bool | None = None
        try:
            while not self.stop.wait(self.cfg.poll_s):
                try:
                    self.status = ctl.status()
                except (BrokerUnavailable, RuntimeError):
                    self.status = None
                if self.connected != was_connected:
                    was_connected = self.connected
                    self.log(f"broker at {self.cfg.broker}: "
                             + ("connected" if was_connected else "disconnected, retrying"))
                sub = self.sub
                if self.status is not None and sub is not None and (
                        self.status["endpoints"]["pub"] != sub.endpoint):
                    self._resubscribe.set()  # a new broker behind the same control endpoint
                now = (time.monotonic(), *self._counts())
                dt = now[0] - prev[0]
                self.rates = {"delivered_fps": round((now[1] - prev[1]) / dt, 2),
                              "mb_per_s": round((now[2] - prev[2]) / dt / 1e6, 2),
                              "shown_fps": round((now[3] - prev[3]) / dt, 2)}
                prev = now
        finally:
            ctl.close()

    def _counts(self) -> tuple[int, int, int]:
        """(received, bytes, shown) so far, over every subscriber."""
        t = self.totals()
        return t["received"], t["bytes"], self.shown

    def totals(self) -> Counter[str]:
        totals = Counter(self._past)
        sub = self.sub
        if sub is not None:
            totals.update({k: sub.stats()[k] for k in ("received", "bytes", "gaps", "sessions")})
            totals["dropped"] += sub.dropped
        return totals

    @property
    def connected(self) -> bool:
        """Frames within ``stale_s``, or the broker answers (a paused broker is there)."""
        recent = self.last_frame_t and time.monotonic() - self.last_frame_t < self.cfg.stale_s
        return bool(recent) or self.status is not None

    def stats(self) -> dict[str, Any]:
        """What /stats serves: the page's panel, and what tests read."""
        shot, status, totals = self._shot, self.status, self.totals()
        header = shot.frame.header if shot is not None else None
        return {"connected": self.connected, "broker": self.cfg.broker,
                "state": status["state"] if status else "unreachable",
                "capture_fps": status["rate_fps"] if status else None,
                **self.rates, "received": totals["received"], "shown": self.shown,
                "dropped": totals["dropped"], "gaps": totals["gaps"],
                "sessions": totals["sessions"],
                "frame_id": header.frame_id if header else None,
                "shape": list(shot.frame.array.shape) if shot else None,
                "dtype": str(shot.frame.array.dtype) if shot else None,
                "latency_ms": round(shot.latency_ms, 2) if shot else None,
                "range": list(shot.value_range) if shot else None,
                "range_mode": self._range_mode(shot),
                "histogram": shot.histogram if shot else None,
                "fft_source": shot.fft_source if shot else None,
                "results_received": self.results_received,
                "seconds_since_frame": (round(time.monotonic() - self.last_frame_t, 2)
                                        if self.last_frame_t else None)}

    def _range_mode(self, shot: Shot | None) -> str | None:
        """How the shown range was chosen: "fixed" (--range), "auto" (percentiles) or
        "as received" (uint8 shown as it is)."""
        if shot is None:
            return None
        if self.cfg.value_range is not None:
            return "fixed"
        return "as received" if as_picture(shot.frame.array).dtype == np.uint8 else "auto"

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t_start
        totals = self.totals()
        return {"shown": self.shown, "seconds": round(elapsed, 2),
                "shown_fps": round(self.shown / elapsed, 2) if elapsed > 0 else 0.0,
                "received": totals["received"], "dropped": totals["dropped"],
                "gaps": totals["gaps"], "sessions": totals["sessions"],
                "hops": {self.hop.name: self.hop.summary()}}


def summary_line(s: dict[str, Any]) -> str:
    return (f"{s['shown']} frames shown in {s['seconds']} s ({s['shown_fps']} fps); "
            f"received {s['received']}, dropped {s['dropped']} (latest:1), gaps {s['gaps']}, "
            f"broker sessions {s['sessions']}")


# --- HTTP -------------------------------------------------------------------------------

def page() -> bytes:
    return resources.files("broker").joinpath("view_page.html").read_bytes()


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, but at most ``limit`` of them: a connection beyond that
    is answered 503 and closed at once by the accepting thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 limit: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(limit)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            except OSError:
                pass  # gone already, or its buffer is full: closing is all it gets
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread was started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def host_allowed(host_header: str | None, bound: str) -> bool:
    """True for a Host header that cannot come from a DNS-rebinding page: none at all
    (not a browser), an IP address, ``localhost``, or the host name the viewer was
    bound to. A rebinding page reaches us under its own name, which is none of these."""
    if host_header is None:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", bound.lower()):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _handler(view: View) -> type[BaseHTTPRequestHandler]:
    """The request handler class, bound to ``view``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "framebroker-view"
        timeout = IDLE_TIMEOUT_S  # socket timeout: an idle or stuck client is dropped

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: a page polling /stats twice a second would flood the terminal."""

        def do_GET(self) -> None:
            if not host_allowed(self.headers.get("Host"), view.cfg.host):
                self.send_error(HTTPStatus.FORBIDDEN, "Host header not allowed")
                return
            url = urlsplit(self.path)
            routes = {"/": self._page, "/stats": self._stats,
                      "/stream.mjpg": lambda: self._stream(lambda s: s.jpeg),
                      "/fft.mjpg": lambda: self._stream(lambda s: s.fft_jpeg),
                      "/frame.jpg": lambda: self._image("jpg", lambda s: s.jpeg),
                      "/frame.png": lambda: self._frame_png(parse_qs(url.query)),
                      "/fft.png": lambda: self._image(
                          "png", lambda s: None if s.fft is None else encode(".png", s.fft))}
            route = routes.get(url.path)
            if route is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            try:
                route()
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                self.close_connection = True  # the browser went away or stopped reading

        def _send(self, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _page(self) -> None:
            self._send("text/html; charset=utf-8", page())

        def _stats(self) -> None:
            self._send("application/json", json.dumps(view.stats()).encode())

        def _image(self, kind: str, body: Callable[[Shot], bytes | None]) -> None:
            shot = view.latest()
            data = body(shot) if shot is not None else None
            if data is None:
                self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "no frame yet")
                return
            self._send(f"image/{'jpeg' if kind == 'jpg' else kind}", data,
                       {"X-Frame-Id": str(shot.frame.frame_id)})

        def _frame_png(self, query: dict[str, list[str]]) -> None:
            """The displayed frame at scale 1, lossless; ``?raw=1``: the received pixels
            (uint8 or uint16 only: what PNG holds)."""
            raw = query.get("raw", ["0"])[0] == "1"
            shot = view.latest()
            if raw and shot is not None and shot.frame.array.dtype not in (np.uint8, np.uint16):
                self.send_error(HTTPStatus.UNPROCESSABLE_ENTITY,
                                f"PNG holds uint8/uint16, the frame is {shot.frame.array.dtype}")
                return
            self._image("png", lambda s: encode(".png", as_picture(s.frame.array)
                                                 if raw else s.display))

        def _stream(self, body: Callable[[Shot], bytes | None]) -> None:
            """multipart/x-mixed-replace: one JPEG part per new shot, until either side
            goes away. A disconnected broker just pauses the stream."""
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            # Each part is followed by the next boundary at once: a browser shows a part
            # when it sees the boundary after it, and the next frame may be a while away.
            self.wfile.write(f"--{BOUNDARY}\r\n".encode())
            seq = 0
            while not view.stop.is_set():
                shot = view.wait_newer(seq, timeout=1.0)
                if shot is None:
                    continue
                seq = shot.seq
                data = body(shot)
                if data is None:
                    continue
                self.wfile.write(f"Content-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n"
                                 f"X-Frame-Id: {shot.frame.frame_id}\r\n\r\n".encode()
                                 + data + f"\r\n--{BOUNDARY}\r\n".encode())
                self.wfile.flush()

    return Handler
