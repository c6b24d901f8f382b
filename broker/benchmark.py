"""``framebroker bench``: every benchmark in one run, then a markdown report with plots.

The transport, FFT and HDF5 benchmarks are the scripts in the repository's ``bench/``
directory, run in this process with ``--quick`` and ``--out`` passed through, so the
command and the scripts can never disagree about what was measured. The end-to-end
benchmark is new here: ``framebroker run`` at 640x480x3 uint8 with FFT and recording,
and each of its stages run alone in the same bench run, because on these shared,
noisy machines only figures from one run compare. Pipeline efficiency is the
end-to-end rate over the slowest stage alone: 1.0 means the stages cost nothing
when they run together.

Every comparison is framebroker vs the naive way vs the limit measured in the same
run; the report says so row by row, and the plots show the same three.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import broker

from .broker import free_tcp_endpoints

PARTS = ("transport", "fft", "hdf5", "e2e")
E2E_SHAPE = (480, 640, 3)
E2E_SIZE = "640x480x3 u8"  # the label the bench scripts give this frame size
E2E_FRAMES = {True: 1000, False: 5000}  # by --quick


class BenchError(RuntimeError):
    """A benchmark could not run; the message says why and what to do."""


# --- the bench/ scripts ---------------------------------------------------------------

def bench_dir() -> Path:
    """``bench/`` next to the ``broker`` package: it exists only in a clone (an editable
    install or a source tree), not in an installed wheel."""
    path = Path(broker.__file__).resolve().parent.parent / "bench"
    if not (path / "transport.py").is_file():
        raise BenchError(f"the benchmark scripts are not installed ({path} does not exist): "
                         f"run from a clone of the repository (pip install -e .)")
    return path


def load_bench(name: str) -> ModuleType:
    """Import ``bench/NAME.py`` as ``bench.NAME``. The transport and FFT benchmarks spawn
    processes that unpickle their targets by module name, so the module must be
    importable from ``sys.path``, which spawn hands on to its children."""
    directory = bench_dir()
    root = str(directory.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(f"bench.{name}")
    if Path(module.__file__).resolve().parent != directory:
        raise BenchError(f"bench.{name} resolves to {module.__file__}, not {directory}: "
                         f"another package named 'bench' shadows the repository's")
    return module


@dataclass(frozen=True)
class BenchOptions:
    out_dir: Path
    parts: tuple[str, ...]
    quick: bool
    seconds: float | None = None  # measured seconds per transport/FFT cell
    repeat: int | None = None     # runs per cell (transport, FFT) or rounds (HDF5)
    frames: int | None = None     # frames per end-to-end run

    @property
    def e2e_frames(self) -> int:
        return self.frames or E2E_FRAMES[self.quick]


def script_argv(part: str, opts: BenchOptions) -> list[str]:
    """The flags a bench script gets. ``hdf5.py --quick`` still runs 5 rounds with a 3 s
    naive writer per round (1.5 minutes); a quick bench run takes 2 rounds with a 1 s
    cap instead, so the whole quick run stays within about 3 minutes."""
    argv = ["--out", str(opts.out_dir / f"{part}.json")] + (["--quick"] if opts.quick else [])
    repeat = opts.repeat
    if part == "hdf5":
        repeat = repeat or (2 if opts.quick else None)
        argv += ["--naive-seconds", "1"] if opts.quick else []
        return argv + (["--rounds", str(repeat)] if repeat else [])
    argv += ["--seconds", str(opts.seconds)] if opts.seconds else []
    argv += ["--peers"] if part == "transport" else []  # imagezmq and the tcp-socket limit
    return argv + (["--repeat", str(repeat)] if repeat else [])


def run_script(part: str, opts: BenchOptions) -> dict[str, Any]:
    """Run one bench script in this process; its tables go to stderr (stdout is for the
    report's summary) and its JSON is read back from the out dir."""
    argv = script_argv(part, opts)
    print(f"bench: {part}: bench/{part}.py {' '.join(argv)}", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        code = load_bench(part).main(argv)
    if code:
        raise BenchError(f"bench/{part}.py exited {code}")
    data = json.loads((opts.out_dir / f"{part}.json").read_text())
    data["argv"] = argv
    return data


# --- end to end -----------------------------------------------------------------------

def free_endpoints() -> list[str]:
    """``--pub/--work/--control/--results`` on four distinct free loopback ports (all
    held open while choosing, so no two are the same)."""
    flags = []
    for name, ep in zip(("pub", "work", "control", "results"), free_tcp_endpoints(4)):
        flags += [f"--{name}", ep]
    return flags


def framebroker_run(flags: list[str], timeout: float) -> dict[str, Any]:
    """``framebroker run --json FLAGS`` as a real process on fresh ports; its report. It
    runs next to this ``broker`` package, so it is the same code whether installed or not."""
    argv = [sys.executable, "-m", "broker.cli", "run", "--json", *free_endpoints(), *flags]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(broker.__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        raise BenchError(f"framebroker run {' '.join(flags)}: no result after {timeout:.0f} s"
                         ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise BenchError(f"framebroker run {' '.join(flags)} exited {proc.returncode} "
                         f"without a report:\n{tail}") from None
    if report["failed"]:
        raise BenchError(f"framebroker run {' '.join(flags)}: {report['failed']}")
    return report


def _stage(report: dict[str, Any], name: str) -> dict[str, Any]:
    st = report["stages"][name]
    return {"frames": st["frames"], "fps": st["fps"], "mb_per_s": st.get("mb_per_s")}


def _lost(report: dict[str, Any], stages: tuple[str, ...]) -> dict[str, int]:
    """Frames published but missing from each measured stage. (``run``'s own "ok" does
    not serve: with --workers 0 it counts every frame as lost to processing.)"""
    published = report["stages"]["published"]["frames"]
    lost = {name: published - report["stages"][name]["frames"] for name in stages}
    return {name: n for name, n in lost.items() if n}


def transport_stage(transport: dict[str, Any] | None, opts: BenchOptions) -> dict[str, Any]:
    """Broker -> one subscriber, framebroker PUB/SUB over tcp at 640x480x3: the
    transport benchmark's cell when it ran in this bench run, else that one cell now."""
    for row in (transport or {}).get("rows", []):
        if (row["size"], row["transport"], row["method"]) == (E2E_SIZE, "tcp", "framebroker"):
            return {"fps": row["fps"], "mb_per_s": row["mb_per_s"], "source": "transport rows"}
    seconds = opts.seconds or (0.5 if opts.quick else 2.0)
    cell = load_bench("transport").run_cell("framebroker", "tcp", E2E_SHAPE, "uint8", seconds,
                                            0.2 if opts.quick else 0.5)
    return {"fps": cell["fps"], "mb_per_s": cell["mb_per_s"], "source": "one transport cell"}


def run_e2e(opts: BenchOptions, transport: dict[str, Any] | None) -> dict[str, Any]:
    """The whole pipeline, then its FFT and recorder stages alone, then the transport
    stage; efficiency = min(processed, recorded) end to end / the slowest stage alone."""
    n = opts.e2e_frames
    timeout = 120 + n / 10  # a run slower than 10 fps is broken, not slow
    shape = ["--shape", "x".join(map(str, E2E_SHAPE)), "--dtype", "uint8", "--frames", str(n)]
    with tempfile.TemporaryDirectory(prefix="e2e-", dir=opts.out_dir) as tmp:
        runs = {  # name: (flags, the stages it measures)
            "pipeline": ([*shape, "--record", f"{tmp}/pipeline.h5", "--overwrite"],
                         ("processed", "recorded")),
            "fft alone": (shape, ("processed",)),
            "recorder alone": ([*shape, "--workers", "0", "--record", f"{tmp}/recorder.h5",
                                "--overwrite"], ("recorded",)),
        }
        reports = {}
        for name, (flags, _) in runs.items():
            print(f"bench: e2e: {name}: framebroker run {' '.join(flags)}", file=sys.stderr,
                  flush=True)
            os.sync()  # untimed: no run pays for an earlier one's dirty-page writeback
            reports[name] = framebroker_run(flags, timeout)
            for recording in Path(tmp).iterdir():  # deleted unwritten pages need no writeback
                recording.unlink()
    print("bench: e2e: transport stage", file=sys.stderr, flush=True)
    stages = {"transport": transport_stage(transport, opts),
              "fft": _stage(reports["fft alone"], "processed"),
              "recorder": _stage(reports["recorder alone"], "recorded")}
    pipeline = {name: _stage(reports["pipeline"], name) for name in ("processed", "recorded")}
    e2e_fps = min(pipeline["processed"]["fps"], pipeline["recorded"]["fps"])
    slowest = min(stages, key=lambda k: stages[k]["fps"])
    return {"frames": n, "shape": list(E2E_SHAPE), "dtype": "uint8",
            "workers": len(reports["pipeline"]["workers"] or []),
            "pipeline": pipeline, "e2e_fps": e2e_fps, "stages": stages, "slowest": slowest,
            "efficiency": e2e_fps / stages[slowest]["fps"] if stages[slowest]["fps"] else None,
            "lost": {name: lost for name, (_, measured) in runs.items()
                     if (lost := _lost(reports[name], measured))}}


# --- the report -------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "–" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def _summary_row(part: str, fb: float | None, naive: float | None, limit: float | None,
                 what: str) -> list[str]:
    return [part, _num(fb), _num(naive), _num(limit), _ratio(fb, naive), _ratio(fb, limit),
            what]


def summary_table(results: dict[str, Any]) -> str:
    """The main table: at 640x480x3 uint8, framebroker vs the naive way vs the limit of
    each part, all from this run. For the pipeline, "of limit" is its efficiency."""
    rows = []
    if "transport" in results:
        by = {(r["transport"], r["method"]): r["fps"] for r in results["transport"]["rows"]
              if r["size"] == E2E_SIZE}
        # the limit is what the fastest other way delivered in this run (peers rows:
        # imagezmq, raw PUB, a plain TCP socket), not a raw PUB, which lockstep imagezmq beats
        peers = [r["fps"] for r in results["transport"].get("peers", [])
                 if r["size"] == E2E_SIZE and not r["method"].startswith("framebroker")]
        rows.append(_summary_row("transport tcp, fps", by.get(("tcp", "framebroker")),
                                 by.get(("tcp", "pickle")),
                                 max(peers) if peers else by.get(("tcp", "raw")),
                                 "PUB/SUB: pickle send_pyobj / " + (
                                     "the fastest peer (imagezmq, raw PUB, plain socket)"
                                     if peers else "a prebuilt raw pyzmq Frame")))
    if "fft" in results:
        by = {c["method"]: c["fps"] for c in results["fft"]["cells"] if c["size"] == E2E_SIZE}
        rows.append(_summary_row("FFT per channel, fps", by.get("process peak"),
                                 by.get("naive fft2"), by.get("pyfftw execute"),
                                 "FFTProcessor peak: np.fft.fft2 / pyfftw execute alone"))
    if "hdf5" in results:
        mb = {name: r["mb_s"] for name, r in results["hdf5"]["results"].get(E2E_SIZE, {}).items()}
        rows.append(_summary_row("HDF5 recording, MB/s", mb.get("recorder none"),
                                 mb.get("naive"), mb.get("plain write"),
                                 "h5py resize + flush per frame / plain write of a new file"))
    if "e2e" in results:
        e = results["e2e"]
        rows.append(_summary_row("pipeline FFT + recording, fps", e["e2e_fps"], None,
                                 e["stages"][e["slowest"]]["fps"],
                                 f"– / the slowest stage alone ({e['slowest']}); of limit = "
                                 f"pipeline efficiency"))
    return _table(["640x480x3 uint8", "framebroker", "naive", "limit", "vs naive", "of limit",
                   "naive / limit"], rows)


def transport_section(data: dict[str, Any]) -> str:
    by = {(r["size"], r["transport"], r["method"]): r for r in data["rows"]}
    rows = []
    for size in dict.fromkeys(r["size"] for r in data["rows"]):
        for transport in dict.fromkeys(r["transport"] for r in data["rows"]):
            p, f, r = (by.get((size, transport, m)) for m in ("pickle", "framebroker", "raw"))
            if p and f and r:
                rows.append([size, transport, _num(p["fps"]), _num(f["fps"]), _num(r["fps"]),
                             _num(f["mb_per_s"]), _ratio(f["fps"], p["fps"]),
                             _ratio(f["fps"], r["fps"])])
    return ("## Transport: PUB/SUB, one sender and one receiver\n\n"
            "framebroker (broker + Subscriber, zero-copy) vs pickle `send_pyobj` (naive) vs a "
            "prebuilt raw pyzmq Frame (the limit); median of the runs per cell.\n\n"
            + _table(["frame", "transport", "pickle fps", "framebroker fps", "raw fps",
                      "framebroker MB/s", "vs pickle", "vs raw"], rows)
            + "\n\n![transport](transport.png)\n")


def fft_section(data: dict[str, Any]) -> str:
    methods = list(dict.fromkeys(c["method"] for c in data["cells"]))
    by = {(c["size"], c["method"]): c["fps"] for c in data["cells"]}
    rows = []
    for size in dict.fromkeys(c["size"] for c in data["cells"]):
        get = lambda m: by.get((size, m))  # noqa: E731
        rows.append([size, *(_num(get(m), ".1f") for m in methods),
                     _ratio(get("process peak"), get("naive fft2")),
                     _ratio(get("process peak"), get("pyfftw execute")),
                     _ratio(get("worker e2e x1"), get("pyfftw execute")),
                     _ratio(get("2 processes"), get("1 process"))])
    return ("## FFT: frames/s per size and backend\n\n"
            "`naive fft2` is `np.fft.fft2` on the raw frame; `pyfftw execute` the planned "
            "transform alone (the limit); `process peak` is FFTProcessor (convert + transform "
            "+ peak); `worker e2e` is broker -> workers -> sink over tcp.\n\n"
            + _table(["frame", *(f"{m}" for m in methods), "process / naive",
                      "process / execute", "e2e x1 / execute", "2 proc / 1 proc"], rows)
            + "\n\n![fft](fft.png)\n")


HDF5_COLUMNS = ("naive", "h5py slices", "recorder none", "recorder lz4", "recorder bslz4",
                "plain write")


def hdf5_section(data: dict[str, Any]) -> str:
    rows = []
    for size, methods in data["results"].items():
        cells = []
        for name in HDF5_COLUMNS:
            r = methods.get(name)
            if r is None:
                cells.append("–")
                continue
            codec = name in ("recorder lz4", "recorder bslz4") and r.get("ratio")
            cells.append(f"{r['mb_s']:.0f}" + (f" ({r['ratio']:.2f}x)" if codec else ""))
        rec, plain = methods.get("recorder none", {}), methods.get("plain write", {})
        rows.append([size, _num(rec.get("fps")), *cells,
                     _ratio(rec.get("fps"), plain.get("fps")),
                     _ratio(rec.get("best_fps"), plain.get("best_fps")),
                     _ratio(rec.get("fps"), methods.get("naive", {}).get("fps"))])
    return ("## HDF5: recorder vs naive vs a plain write of a new file\n\n"
            "MB/s, median round (compression ratio in brackets). `plain write` writes the same "
            "bytes to a new file: the disk limit here.\n\n"
            + _table(["frame", "recorder fps", *(f"{c} MB/s" for c in HDF5_COLUMNS),
                      "recorder / plain", "same, best rounds", "recorder / naive"], rows)
            + "\n\n![hdf5](hdf5.png)\n")


def e2e_section(e: dict[str, Any]) -> str:
    st, pl = e["stages"], e["pipeline"]
    rows = [["end to end: processed (FFT)", _num(pl["processed"]["fps"], ".1f"),
             f"framebroker run, {e['workers']} workers (gray FFT, peak), with --record"],
            ["end to end: recorded", _num(pl["recorded"]["fps"], ".1f"), "the same run"],
            ["**end to end** (min of the two)", f"**{e['e2e_fps']:.1f}**", ""],
            ["transport alone", _num(st["transport"]["fps"], ".1f"),
             f"framebroker PUB/SUB tcp, broker -> 1 subscriber ({st['transport']['source']})"],
            ["FFT alone", _num(st["fft"]["fps"], ".1f"), "framebroker run without --record"],
            ["recorder alone", _num(st["recorder"]["fps"], ".1f"),
             "framebroker run --workers 0 --record"],
            ["**pipeline efficiency**", f"**{_num(e['efficiency'], '.2f')}**",
             f"end to end / slowest stage alone ({e['slowest']})"]]
    lost = f"\n\n**Frames were lost**: {e['lost']}" if e["lost"] else ""
    return (f"## End to end: 640x480x3 uint8, FFT and recording, {e['frames']} frames per run\n\n"
            + _table(["what", "frames/s", "how"], rows) + lost + "\n\n![e2e](e2e.png)\n")


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "transport": transport_section, "fft": fft_section, "hdf5": hdf5_section, "e2e": e2e_section}


def write_report(results: dict[str, Any], opts: BenchOptions, seconds: float) -> Path:
    """``report.md`` in the out dir: the main table first, then one section per part."""
    import zmq

    argv = "; ".join(f"{part}: `{' '.join(results[part]['argv'])}`" for part in PARTS
                     if part in results and "argv" in results[part])
    head = [f"# framebroker benchmarks ({'quick' if opts.quick else 'full'} run)", "",
            f"{time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s; Python "
            f"{platform.python_version()}, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
            f", {platform.machine()}, {os.cpu_count()} CPUs. Every figure is from this one run: "
            f"compare the ratios, not the absolute numbers.", ""]
    if argv:
        head += [f"Scripts ran with {argv}.", ""]
    body = [SECTIONS[part](results[part]) for part in PARTS if part in results]
    path = opts.out_dir / "report.md"
    path.write_text("\n".join([*head, "## Summary", "", summary_table(results), "", *body]))
    return path


# --- plots ------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.2):
    """A figure that renders with Agg whatever backend is configured (no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v or 0 for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), groups)


def plot_transport(data: dict[str, Any], path: Path) -> None:
    transports = [t for t in ("tcp", "ipc") if any(r["transport"] == t for r in data["rows"])]
    mb = {r["size"]: r["mb_per_s"] / r["fps"] for r in data["rows"] if r["fps"]}  # MB/frame
    sizes = sorted(mb, key=mb.get)
    fig = _figure(4.5 * max(len(transports), 1), 4.2)
    axes = fig.subplots(1, max(len(transports), 1), squeeze=False)[0]
    labels = {"pickle": "pickle (naive)", "framebroker": "framebroker", "raw": "raw Frame (limit)"}
    by = {(r["transport"], r["method"], r["size"]): r["mb_per_s"] for r in data["rows"]}
    for ax, transport in zip(axes, transports):
        for method, label in labels.items():
            ax.plot(range(len(sizes)), [by.get((transport, method, s)) for s in sizes],
                    marker="o", label=label)
        ax.set_xticks(range(len(sizes)), [f"{s}\n{mb[s]:.1f} MB" for s in sizes], fontsize=8)
        ax.set(title=f"PUB/SUB over {transport}", xlabel="frame size",
               ylabel="throughput (MB/s)", ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)


def plot_fft(data: dict[str, Any], path: Path) -> None:
    sizes = list(dict.fromkeys(c["size"] for c in data["cells"]))
    methods = list(dict.fromkeys(c["method"] for c in data["cells"]))
    by = {(c["size"], c["method"]): c["fps"] for c in data["cells"]}
    fig = _figure(9.0, 4.5)
    ax = fig.subplots()
    _grouped_bars(ax, sizes, {m: [by.get((s, m)) for s in sizes] for m in methods})
    ax.set(title="FFT frames/s per backend and method (naive fft2 is the naive way, pyfftw "
                 "execute the limit)", ylabel="frames/s (log)", yscale="log")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path)


def plot_hdf5(data: dict[str, Any], path: Path) -> None:
    sizes = list(data["results"])
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    _grouped_bars(ax, sizes, {name: [data["results"][s].get(name, {}).get("mb_s") for s in sizes]
                              for name in ("naive", "recorder none", "recorder lz4",
                                           "recorder bslz4", "plain write")})
    ax.set(title="HDF5 recording MB/s: recorder vs naive h5py vs plain write (the disk limit)",
           ylabel="MB/s (log)", yscale="log")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_e2e(e: dict[str, Any], path: Path) -> None:
    names = ["transport alone", "FFT alone", "recorder alone", "end to end"]
    values = [e["stages"]["transport"]["fps"], e["stages"]["fft"]["fps"],
              e["stages"]["recorder"]["fps"], e["e2e_fps"]]
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    bars = ax.bar(names, values, color=["C0", "C0", "C0", "C3"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set(title=f"640x480x3 pipeline: efficiency {_num(e['efficiency'], '.2f')} "
                 f"(end to end / slowest stage alone)", ylabel="frames/s")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "transport": plot_transport, "fft": plot_fft, "hdf5": plot_hdf5, "e2e": plot_e2e}


# --- the command ------------------------------------------------------------------------

def run_bench(opts: BenchOptions) -> tuple[Path, dict[str, Any]]:
    """Every selected part in order, then the plots and the report; returns the report's
    path and the results by part."""
    bench_dir()  # fail before measuring anything when the scripts are not there
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for part in PARTS:
        if part not in opts.parts:
            continue
        results[part] = (run_e2e(opts, results.get("transport")) if part == "e2e"
                         else run_script(part, opts))
    if "e2e" in results:  # the scripts write their own JSON; this is the e2e part's
        (opts.out_dir / "e2e.json").write_text(json.dumps(results["e2e"], indent=2))
    for part, data in results.items():
        PLOTS[part](data, opts.out_dir / f"{part}.png")
    return write_report(results, opts, time.monotonic() - t0), results
