"""``--metrics HOST:PORT``: the part's counters and hop latencies for Prometheus.

Nothing here runs per frame. The parts keep their counters as they always did, and
their per-hop histograms in ``broker/hops.py``; a custom collector reads them when
Prometheus scrapes (in the HTTP server's thread), from a private registry per process,
so a scrape shows exactly what the part's ``status`` or summary would say at that
moment. Only this module imports ``prometheus-client``, and only the CLI imports this
module, when ``--metrics`` is given (optional extra ``framebroker[metrics]``).

The page has no authentication, so it follows the viewer page's rule: loopback only
unless ``--insecure``; CURVE does not cover HTTP, so it does not lift the rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from . import __version__
from .hops import BOUNDS_S, HOPS, Hop
from .security import check_unauthenticated

try:
    import prometheus_client
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError:  # the extra is not installed: ``require`` says how to install it
    prometheus_client = None  # type: ignore[assignment]
    Collector = object  # type: ignore[assignment,misc]

INSTALL_HINT = ("--metrics needs prometheus-client, which is not installed: "
                "pip install 'framebroker[metrics]'")
SCRAPE_RETRIES = 3  # a scrape that meets a dict the part is changing reads it again


class MetricsError(ValueError):
    """--metrics cannot be served: the library is missing or the address is taken (a
    flag error, reported in one line like the parts' other bad values)."""


def require() -> None:
    """Fail with the install hint, before the part connects to anything."""
    if prometheus_client is None:
        raise MetricsError(INSTALL_HINT)


def check_exposure(host: str, port: int, insecure: bool, warn: Callable[[str], None]) -> None:
    """A non-loopback metrics address needs --insecure, as the viewer page does."""
    check_unauthenticated(
        f"tcp://{host}:{port}", insecure, warn,
        f"refusing to serve --metrics on {host}:{port}: anyone who can reach it could read "
        f"the counters, and HTTP is neither encrypted nor authenticated (CURVE does not "
        f"cover it). Use 127.0.0.1 and let Prometheus scrape through a tunnel or a local "
        f"agent, or pass --insecure to accept that risk",
        f"warning: --insecure: --metrics on {host}:{port} is reachable from the network "
        f"without authentication")


# --- families ------------------------------------------------------------------------

Samples = Mapping[tuple[str, ...], float]


@dataclass(frozen=True)
class Family:
    """One metric as the readers below describe it, before prometheus-client types."""

    kind: str  # counter | gauge
    name: str  # without _total for counters (prometheus-client adds it)
    doc: str
    samples: Samples
    labels: tuple[str, ...] = ()


def _c(name: str, doc: str, value: float | Samples, labels: tuple[str, ...] = ()) -> Family:
    return Family("counter", name, doc, value if isinstance(value, Mapping) else {(): value},
                  labels)


def _g(name: str, doc: str, value: float | Samples, labels: tuple[str, ...] = ()) -> Family:
    return Family("gauge", name, doc, value if isinstance(value, Mapping) else {(): value},
                  labels)


def _by(counts: Mapping[str, int], *prefix: str) -> Samples:
    return {(*prefix, k): v for k, v in counts.items()}


Reading = tuple[list[Family], list[tuple[Hop, dict[str, str]]]]  # counters, histograms


def client_name(sub: Any) -> str:
    """The name a receiving client reports under (a work consumer's READY name)."""
    return getattr(sub, "name", "") or sub.ready.name


def _subscriber_families(sub: Any, dropped: Family | None = None) -> list[Family]:
    """What every receiving client counts (broker/client.py's stream bookkeeping)."""
    return [_c("framebroker_frames", "frames received", sub.received),
            _c("framebroker_bytes", "payload bytes received", sub.bytes),
            _c("framebroker_gaps", "frame ids never received", sub.gaps),
            dropped or _c("framebroker_dropped", "frames discarded by the latest:N policy",
                          getattr(sub, "dropped", 0)),
            _c("framebroker_overwritten", "shm frames whose ring slot was reused first",
               getattr(sub, "overwritten", 0)),
            _c("framebroker_rejects", "malformed messages dropped, by reason",
               _by(dict(sub.rejected)), ("reason",))]


def broker_families(broker: Any) -> Reading:
    s = broker.status(expire=False)  # from the HTTP thread: read, never change
    rejects: dict[tuple[str, ...], int] = {}
    rejects.update(_by(s["control_rejected"], "control"))
    rejects.update(_by(s["work"]["rejected"], "work"))
    for xpub, sub in s["subscriptions"].items():
        rejects.update(_by(sub["rejected"], xpub))
    groups = s["work"]["groups"]
    fams = [
        _c("framebroker_frames", "frames captured and sent", s["frames_sent"]),
        _c("framebroker_bytes", "frame bytes sent", s["bytes_sent"]),
        _c("framebroker_rejects", "requests and messages refused, by channel and reason",
           rejects, ("channel", "reason")),
        _c("framebroker_auth_refused", "CURVE handshakes refused", s["auth_refused"]),
        _c("framebroker_backpressure_waits", "source waits for a work group at --max-pending",
           s["backpressure_waits"]),
        _c("framebroker_pub_waits", "source waits for a lone tcp subscriber", s["pub_waits"]),
        _c("framebroker_shm_stalls", "source waits for a free ring slot",
           (s["shm"] or {}).get("stalls", 0)),
        _c("framebroker_xpub_resets", "XPUB sockets reset after a subscription flood",
           s["xpub_resets"]),
        _c("framebroker_pacer_resyncs", "--fps schedule restarts", s["pacer_resyncs"]),
        _g("framebroker_subscribers", "subscribers now, by transport",
           _by(s["transports"]["subscribers"]), ("transport",)),
        _g("framebroker_work_members", "work-group members now, by transport",
           _by(s["transports"]["workers"]), ("transport",))]
    for key, doc in (("dispatched", "frames sent to group members (re-dispatches included)"),
                     ("acked", "frames acknowledged and released"),
                     ("redispatched", "frames queued again after a member left or died"),
                     ("dead_consumers", "members declared dead")):
        fams.append(_c(f"framebroker_{key}", doc, {(g,): v[key] for g, v in groups.items()},
                       ("group",)))
    for key, doc in (("pending", "unacknowledged frames held for the group now"),
                     ("queued", "pending frames waiting for a member with credit now")):
        fams.append(_g(f"framebroker_{key}_frames", doc,
                       {(g,): v[key] for g, v in groups.items()}, ("group",)))
    consumers = s["consumers"]
    for key, doc in (("received", "frames received, as the subscriber reported"),
                     ("dropped", "frames its latest:N queue discarded, as it reported"),
                     ("gaps", "frame ids it never saw, as it reported")):
        fams.append(_c(f"framebroker_subscriber_{key}", doc,
                       {(c,): v[key] for c, v in consumers.items()}, ("client",)))
    return fams, [(broker.hop, {})]


def worker_families(worker: Any) -> Reading:
    c, st = worker.consumer, worker.stats
    return ([_c("framebroker_frames", "frames transformed", st.frames),
             _c("framebroker_unusable", "frames no FFT takes (acknowledged, not transformed)",
                st.unusable),
             _c("framebroker_gaps", "frame ids skipped between frames received", c.gaps),
             _c("framebroker_rejects", "malformed messages dropped, by reason",
                _by(dict(c.rejected)), ("reason",))],
            [(st.hop, {})])


def sink_families(sink: Any) -> Reading:
    return ([_c("framebroker_frames", "results emitted in frame-id order", sink.emitted),
             _c("framebroker_gaps", "frame ids given up as missing", len(sink.gap_ids)),
             _c("framebroker_duplicates", "results for an id already emitted or buffered",
                sink.duplicates),
             _c("framebroker_late", "results that arrived after their id was a gap",
                sink.late),
             _c("framebroker_rejects", "malformed results dropped, by reason",
                _by(dict(sink.rejected)), ("reason",)),
             _g("framebroker_queue_depth", "results held in the reorder buffer now",
                len(sink.buffer))],
            [(sink.hop, {})])


def record_families(rec: Any) -> Reading:
    w, r = (rec.rec.writer if rec.rec else None), rec.rec
    fams = _subscriber_families(rec.source, _c(
        "framebroker_dropped", "frames the live-mode writer queue had no room for",
        r.dropped if r else 0))
    fams += [_c("framebroker_frames_written", "frames written to the file",
                w.frames_written if w else 0),
             _c("framebroker_bytes_written", "frame bytes written", w.bytes_written if w else 0),
             _c("framebroker_duplicates", "frames received twice (at-least-once delivery)",
                rec.duplicates),
             _g("framebroker_queue_depth", "frames queued for the writer thread now",
                r.queue_depth if r else 0)]
    return fams, [(rec.receive_hop, {"subscriber": client_name(rec.source)}),
                  (rec.disk_hop, {})]


def watch_families(sub: Any, hop: Hop) -> Reading:
    return _subscriber_families(sub), [(hop, {"subscriber": client_name(sub)})]


def view_families(view: Any) -> Reading:
    """The viewer's totals over every subscriber it made (it makes a new one when the
    broker restarts), and the hop of the frames it showed."""
    t = view.totals()
    name = f"view-{view.cfg.host}:{view.cfg.port}"
    return ([_c("framebroker_frames", "frames received", t["received"]),
             _c("framebroker_bytes", "payload bytes received", t["bytes"]),
             _c("framebroker_gaps", "frame ids never received", t["gaps"]),
             _c("framebroker_dropped", "frames discarded by the latest:1 policy", t["dropped"]),
             _c("framebroker_frames_shown", "frames rendered for the page", view.shown)],
            [(view.hop, {"subscriber": name})])


def _prometheus(fam: Family) -> Any:
    cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
    out = cls(fam.name, fam.doc, labels=list(fam.labels))
    for labels, value in fam.samples.items():
        out.add_metric(list(labels), value)
    return out


def _histogram(hop: Hop, labels: dict[str, str]) -> Any:
    out = HistogramMetricFamily(f"framebroker_{hop.name}_seconds",
                                f"{HOPS[hop.name][1]} (seconds)", labels=list(labels))
    counts, total, buckets = list(hop.counts), 0, []
    for bound, n in zip((*BOUNDS_S, float("inf")), counts):
        total += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    out.add_metric(list(labels.values()), buckets, hop.sum_s)
    return out


class _PartCollector(Collector):  # type: ignore[misc,valid-type]
    """Reads the part when scraped; a read that meets a dict the part's own thread is
    changing (RuntimeError, KeyError) is tried again rather than failing the scrape."""

    def __init__(self, role: str, read: Callable[[], Reading]) -> None:
        self.role, self.read = role, read

    def collect(self) -> Iterator[Any]:
        info = GaugeMetricFamily("framebroker_info", "the part serving these metrics",
                                 labels=["role", "version"])
        info.add_metric([self.role, __version__], 1)
        yield info
        for attempt in range(SCRAPE_RETRIES):
            try:
                fams, hops = self.read()
                break
            except (RuntimeError, KeyError):
                if attempt == SCRAPE_RETRIES - 1:
                    raise
        for fam in fams:
            yield _prometheus(fam)
        for hop, labels in hops:
            yield _histogram(hop, labels)


class Exporter:
    """The HTTP server of one part's /metrics, in a daemon thread; ``close`` stops it."""

    def __init__(self, address: tuple[str, int], role: str,
                 read: Callable[[], Reading]) -> None:
        require()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_PartCollector(role, read))
        host, port = address
        try:
            self._server, self._thread = prometheus_client.start_http_server(
                port, host, registry=registry)
        except OSError as exc:
            raise MetricsError(f"--metrics {host}:{port}: cannot bind: "
                               f"{exc.strerror or exc}") from None
        self.url = f"http://{_url_host(host)}:{self._server.server_port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def expose(address: tuple[str, int] | None, role: str, read: Callable[[], Any],
           log: Callable[[str], None]) -> Exporter | None:
    """Start ``role``'s /metrics at ``address`` (None: metrics off) and say where."""
    if address is None:
        return None
    exporter = Exporter(address, role, read)
    log(f"metrics at {exporter.url}")
    return exporter

