"""``framebroker bench``: every benchmark in one run, then a markdown report with plots.

The transport, FFT and HDF5 benchmarks are the modules of ``broker.bench`` (the
repository's ``bench/*.py`` are their entry points), run in this process with
``--quick`` and ``--out`` passed through, so the command and the scripts can never
disagree about what was measured. The end-to-end
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


from .bench import shards as shards_bench
from .bench.common import FrameSpec, child_env
from .bench.stats import compare, error_bars, figure
from .broker import free_tcp_endpoints
from .choices import BENCH_PARTS

PARTS = BENCH_PARTS
E2E_SHAPE = (480, 640, 3)
E2E_FRAMES = {True: 300, False: 5000}  # by --quick


class BenchError(RuntimeError):
    """A benchmark could not run; the message says why and what to do."""


# --- the benchmark modules (broker.bench) ----------------------------------------------

def load_bench(name: str) -> ModuleType:
    """``broker.bench.NAME``, the same module whether framebroker is installed from a
    wheel, editable, or run from a clone (``bench/NAME.py`` there is its entry point)."""
    return importlib.import_module(f"broker.bench.{name}")


@dataclass(frozen=True)
class BenchOptions:
    out_dir: Path
    parts: tuple[str, ...]
    quick: bool
    seconds: float | None = None  # measured seconds per transport/FFT cell
    repeat: int | None = None     # rounds of every part (default 3; HDF5 5, quick 3)
    frames: int | None = None     # frames per end-to-end run
    overwrite: bool = False       # replace an existing report in out_dir
    spec: FrameSpec | None = None  # the user's --source/--shape/--dtype (None: fixed sizes)
    record_dir: Path | None = None  # the disk to measure (default: out_dir)
    peers: bool = False           # imagezmq columns in the transport table

    @property
    def e2e_frames(self) -> int:
        return self.frames or E2E_FRAMES[self.quick]

    @property
    def rounds(self) -> int:
        return self.repeat or 3

    @property
    def main_spec(self) -> FrameSpec:
        """The frame of the summary table and the end-to-end part."""
        return self.spec or FrameSpec("synthetic", E2E_SHAPE, "uint8")

    @property
    def disk(self) -> Path:
        return self.record_dir or self.out_dir


def script_argv(part: str, opts: BenchOptions) -> list[str]:
    """The flags a benchmark module gets: out file, quick, the user's frames and disk.
    With ``--quick`` the modules measure fewer sizes for shorter times (each says which)
    and the naive HDF5 writer is capped at 1 s, so the whole run stays within about 3
    minutes on two idle cores."""
    argv = ["--out", str(opts.out_dir / f"{part}.json")] + (["--quick"] if opts.quick else [])
    if part == "shards":  # broker/bench/shards.py: its own frame, rounds and disk only
        argv += ["--record-dir", str(opts.disk)]
        return argv + (["--repeat", str(opts.repeat)] if opts.repeat else [])
    argv += ["--overwrite"] if opts.overwrite else []
    if opts.spec is not None:
        argv += ["--source", opts.spec.source, "--shape", "x".join(map(str, opts.spec.shape)),
                 "--dtype", opts.spec.dtype]
    if part == "hdf5":
        argv += ["--naive-seconds", "0.5"] if opts.quick else []
        argv += ["--record-dir", str(opts.disk)]
        return argv + (["--rounds", str(opts.repeat)] if opts.repeat else [])
    argv += ["--peers"] if part == "transport" and opts.peers else []
    argv += ["--seconds", str(opts.seconds)] if opts.seconds else []
    return argv + (["--repeat", str(opts.repeat)] if opts.repeat else [])


def run_script(part: str, opts: BenchOptions) -> dict[str, Any]:
    """Run one benchmark module in this process; its tables go to stderr (stdout is for
    the report's summary) and its JSON is read back from the out dir."""
    argv = script_argv(part, opts)
    print(f"bench: {part}: broker.bench.{part} {' '.join(argv)}", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        code = load_bench(part).main(argv)
    if code:
        raise BenchError(f"broker.bench.{part} exited {code}")
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
                              env=child_env())
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


def _stage(reports: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One stage's figure over the rounds: median fps with min, max and every round."""
    fps = figure([r["stages"][name]["fps"] for r in reports])
    return {"fps": fps["median"], "fps_min": fps["min"], "fps_max": fps["max"],
            "fps_runs": fps["runs"], "frames": [r["stages"][name]["frames"] for r in reports]}


def _lost(report: dict[str, Any], stages: tuple[str, ...]) -> dict[str, int]:
    """Frames published but missing from each measured stage. (``run``'s own "ok" does
    not serve: with --workers 0 it counts every frame as lost to processing.)"""
    published = report["stages"]["published"]["frames"]
    lost = {name: published - report["stages"][name]["frames"] for name in stages}
    return {name: n for name, n in lost.items() if n}


def transport_stage(transport: dict[str, Any] | None, opts: BenchOptions) -> dict[str, Any]:
    """Broker -> one subscriber, framebroker PUB/SUB over tcp, of the main frame: the
    transport benchmark's cell when it ran in this bench run, else that cell now, in
    as many rounds."""
    spec = opts.main_spec
    for row in (transport or {}).get("rows", []):
        if (row["size"], row["transport"], row["method"]) == (spec.label, "tcp", "framebroker"):
            return {"fps": row["fps"], "fps_min": row["fps_min"], "fps_max": row["fps_max"],
                    "fps_runs": row["fps_runs"], "source": "transport rows"}
    seconds = opts.seconds or (0.3 if opts.quick else 2.0)
    cells = [load_bench("transport").run_cell("framebroker", "tcp", spec.shape, spec.dtype,
                                              seconds, 0.15 if opts.quick else 0.5,
                                              source=spec.source)
             for _ in range(opts.rounds)]
    fps = figure([c["fps"] for c in cells])
    return {"fps": fps["median"], "fps_min": fps["min"], "fps_max": fps["max"],
            "fps_runs": fps["runs"], "source": "transport cells"}


def run_e2e(opts: BenchOptions, transport: dict[str, Any] | None) -> dict[str, Any]:
    """The whole pipeline, its FFT and recorder stages alone, in interleaved rounds, then
    the transport stage; efficiency = min(processed, recorded) end to end / the slowest
    stage alone, each a median of the rounds. Recordings go to the disk measured."""
    n, spec = opts.e2e_frames, opts.main_spec
    timeout = 120 + n / 10  # a run slower than 10 fps is broken, not slow
    frames = [*spec.run_flags(), "--frames", str(n)]
    with tempfile.TemporaryDirectory(prefix=".e2e-", dir=opts.disk) as tmp:
        runs = {  # name: (flags, the stages it measures)
            "pipeline": ([*frames, "--record", f"{tmp}/pipeline.h5", "--overwrite"],
                         ("processed", "recorded")),
            "fft alone": (frames, ("processed",)),
            "recorder alone": ([*frames, "--workers", "0", "--record", f"{tmp}/recorder.h5",
                                "--overwrite"], ("recorded",)),
        }
        reports: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for k in range(opts.rounds):
            for name, (flags, _) in runs.items():
                print(f"bench: e2e: round {k + 1} {name}: framebroker run {' '.join(flags)}",
                      file=sys.stderr, flush=True)
                os.sync()  # untimed: no run pays for an earlier one's dirty-page writeback
                reports[name].append(framebroker_run(flags, timeout))
                for recording in Path(tmp).iterdir():  # deleted unwritten pages: no writeback
                    recording.unlink()
    print("bench: e2e: transport stage", file=sys.stderr, flush=True)
    stages = {"transport": transport_stage(transport, opts),
              "fft": _stage(reports["fft alone"], "processed"),
              "recorder": _stage(reports["recorder alone"], "recorded")}
    pipeline = {name: _stage(reports["pipeline"], name) for name in ("processed", "recorded")}
    e2e_runs = [min(a, b) for a, b in zip(pipeline["processed"]["fps_runs"],
                                          pipeline["recorded"]["fps_runs"])]
    e2e = figure(e2e_runs)
    slowest = min(stages, key=lambda k: stages[k]["fps"])
    lost = {}
    for name, (_, measured) in runs.items():
        for report in reports[name]:
            for stage, count in _lost(report, measured).items():
                lost.setdefault(name, {}).setdefault(stage, 0)
                lost[name][stage] += count
    return {"frames": n, "rounds": opts.rounds, "shape": list(spec.shape),
            "dtype": spec.dtype, "source": spec.source, "label": spec.label,
            "workers": len(reports["pipeline"][0]["workers"] or []),
            "pipeline": pipeline, "e2e_fps": e2e["median"], "e2e_fps_min": e2e["min"],
            "e2e_fps_max": e2e["max"], "e2e_fps_runs": e2e["runs"], "stages": stages,
            "slowest": slowest,
            "efficiency": e2e["median"] / stages[slowest]["fps"] if stages[slowest]["fps"]
            else None,
            "noisy": compare(e2e_runs, limit=stages[slowest]["fps_runs"],
                             what="end to end", limit_name=f"{slowest} alone"),
            "lost": lost}


# --- the report -------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "–" if value is None else format(value, fmt)


def _fig(row: dict[str, Any] | None, key: str = "fps", fmt: str = ".0f") -> str:
    """``median (min-max)`` of a figure measured in rounds."""
    if not row or row.get(key) is None:
        return "–"
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    spread = f" ({lo:{fmt}}-{hi:{fmt}})" if lo is not None and hi is not None else ""
    return f"{row[key]:{fmt}}{spread}"


def _runs(row: dict[str, Any] | None, key: str = "fps") -> list[float] | None:
    return None if not row else row.get(f"{key}_runs") or row.get(f"runs_{key}")


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, kind: str,
           key: str = "fps") -> str:
    """a over b, or **noisy** when their rounds cannot carry the ratio (``kind`` is what
    b is to a: "base" to beat or "limit")."""
    if not a or not b or not b.get(key) or a.get(key) is None:
        return "–"
    if compare(_runs(a, key), **{kind: _runs(b, key)}):
        return "**noisy**"
    return f"{a[key] / b[key]:.2f}x"


class Noise:
    """Every noisy reason of a report, listed once under its section."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def add(self, reasons: list[str] | None) -> None:
        self.reasons += [r for r in reasons or [] if r not in self.reasons]

    def text(self) -> str:
        if not self.reasons:
            return ""
        return ("\n\n**Noisy** (shown as noisy above, not as results; rerun on a quieter "
                "machine or with more --repeat):\n" + "\n".join(f"- {r}" for r in self.reasons))


def summary_rows(results: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """framebroker vs the naive way vs the limit of each part at the main frame, each a
    figure of its rounds, with ``noisy`` reasons."""
    rows = []

    def add(part: str, fb, naive, limit, what: str, key: str = "fps",
            names: tuple[str, str] = ("the naive way", "the limit")) -> None:
        reasons = compare(_runs(fb, key), base=_runs(naive, key), limit=_runs(limit, key),
                          what=part, base_name=names[0], limit_name=names[1])
        rows.append({"part": part, "framebroker": fb, "naive": naive, "limit": limit,
                     "key": key, "what": what, "noisy": reasons})

    if "transport" in results:
        by = {(r["transport"], r["method"]): r for r in results["transport"]["rows"]
              if r["size"] == label}
        add("transport tcp, fps", by.get(("tcp", "framebroker")), by.get(("tcp", "pickle")),
            by.get(("tcp", "raw")), "PUB/SUB: pickle send_pyobj / a prebuilt raw pyzmq Frame",
            names=("pickle", "raw pyzmq"))
    if "fft" in results:
        by = {c["method"]: c for c in results["fft"]["cells"] if c["size"] == label}
        add("FFT, fps", by.get("process peak"), by.get("naive fft2"), by.get("pyfftw execute"),
            "FFTProcessor peak: np.fft.fft2 / pyfftw execute alone",
            names=("naive fft2", "pyfftw execute"))
    if "hdf5" in results:
        by = results["hdf5"]["results"].get(label, {})
        add("HDF5 recording, fps", by.get("recorder none"), by.get("naive"),
            by.get("plain write"), "h5py resize + flush per frame / plain write of a new file",
            names=("naive h5py", "plain write"))
    if "e2e" in results:
        e = results["e2e"]
        fb = {"fps": e["e2e_fps"], "fps_min": e["e2e_fps_min"], "fps_max": e["e2e_fps_max"],
              "fps_runs": e["e2e_fps_runs"]}
        add("pipeline FFT + recording, fps", fb, None, e["stages"][e["slowest"]],
            f"– / the slowest stage alone ({e['slowest']}); of limit = pipeline efficiency")
    return rows


def summary_table(results: dict[str, Any], label: str = "640x480x3 u8",
                  noise: Noise | None = None) -> str:
    """The main table: framebroker vs the naive way vs the limit of each part, all from
    this run, each figure a median with its rounds' range. For the pipeline, "of limit"
    is its efficiency."""
    rows = []
    for r in summary_rows(results, label):
        if noise is not None:
            noise.add(r["noisy"])
        fb, naive, limit = r["framebroker"], r["naive"], r["limit"]
        rows.append([r["part"], _fig(fb), _fig(naive), _fig(limit),
                     _ratio(fb, naive, "base"), _ratio(fb, limit, "limit"), r["what"]])
    return _table([label, "framebroker", "naive", "limit", "vs naive", "of limit",
                   "naive / limit"], rows)


def transport_section(data: dict[str, Any], noise: Noise) -> str:
    by = {(r["size"], r["transport"], r["method"]): r for r in data["rows"]}
    peers = list(dict.fromkeys(r["method"] for r in data["rows"]
                               if r["method"].startswith("imagezmq")))
    rows = []
    for r in data["rows"]:
        noise.add(r.get("noisy"))
    for size in dict.fromkeys(r["size"] for r in data["rows"]):
        for transport in dict.fromkeys(r["transport"] for r in data["rows"]):
            p, f, r = (by.get((size, transport, m)) for m in ("pickle", "framebroker", "raw"))
            if p and f and r:
                others = [by.get((size, transport, m)) for m in peers]
                rows.append([size, transport, _fig(p), _fig(f), _fig(r),
                             *(_fig(o) for o in others), _num(f["mb_per_s"]),
                             _ratio(f, p, "base"), _ratio(f, r, "limit"),
                             *(_ratio(f, o, "base") for o in others)])
    peer_text = (" With `--peers`: imagezmq's PUB/SUB mode (`send_image` of the array; "
                 "`imagezmq-jpeg`: `send_jpg` of a quality-95 JPEG, decoded at the "
                 "receiver), in the same rounds." if peers else "")
    return ("## Transport: PUB/SUB, one sender and one receiver\n\n"
            "framebroker (broker + Subscriber, zero-copy) vs pickle `send_pyobj` (naive) vs a "
            "prebuilt raw pyzmq Frame (the limit); median of the rounds (min-max)."
            + peer_text + "\n\n"
            + _table(["frame", "transport", "pickle fps", "framebroker fps", "raw fps",
                      *(f"{m} fps" for m in peers), "framebroker MB/s", "vs pickle",
                      "vs raw", *(f"vs {m}" for m in peers)], rows)
            + "\n\n![transport](transport.png)\n")


#: the FFT table's ratio columns: (title, value method, other method, kind)
FFT_RATIOS = (("process / naive", "process peak", "naive fft2", "base"),
              ("process / execute", "process peak", "pyfftw execute", "limit"),
              ("e2e x1 / execute", "worker e2e x1", "pyfftw execute", "limit"),
              ("2 proc / 1 proc", "2 processes", "1 process", "base"))


def fft_section(data: dict[str, Any], noise: Noise) -> str:
    methods = list(dict.fromkeys(c["method"] for c in data["cells"]))
    by = {(c["size"], c["method"]): c for c in data["cells"]}
    ratios = [r for r in FFT_RATIOS if r[1] in methods and r[2] in methods]
    rows = []
    for c in data["cells"]:
        noise.add(c.get("noisy"))
    for size in dict.fromkeys(c["size"] for c in data["cells"]):
        rows.append([size, *(_fig(by.get((size, m)), fmt=".1f") for m in methods),
                     *(_ratio(by.get((size, a)), by.get((size, b)), kind)
                       for _, a, b, kind in ratios)])
    return ("## FFT: frames/s per size and backend\n\n"
            "`naive fft2` is `np.fft.fft2` on the raw frame; `pyfftw execute` the planned "
            "transform alone (the limit); `process peak` is FFTProcessor (convert + transform "
            "+ peak); `worker e2e` is broker -> workers -> sink over tcp (not in --quick). "
            "Median of the rounds (min-max).\n\n"
            + _table(["frame", *methods, *(r[0] for r in ratios)], rows)
            + "\n\n![fft](fft.png)\n")


HDF5_COLUMNS = ("naive", "h5py slices", "recorder none", "recorder lz4", "recorder bslz4",
                "plain write")


def hdf5_section(data: dict[str, Any], noise: Noise) -> str:
    rows = []
    for size, methods in data["results"].items():
        for m in methods.values():
            noise.add(m.get("noisy"))
        cells = []
        for name in HDF5_COLUMNS:
            r = methods.get(name)
            if r is None:
                cells.append("–")
                continue
            codec = name in ("recorder lz4", "recorder bslz4") and r.get("ratio")
            cells.append(_fig(r) + (f" [{r['ratio']:.2f}x]" if codec else ""))
        rec = methods.get("recorder none")
        rows.append([size, *cells, _ratio(rec, methods.get("plain write"), "limit"),
                     _ratio(rec, methods.get("naive"), "base")])
    return ("## HDF5: recorder vs naive vs a plain write of a new file\n\n"
            f"Frames/s, median of the rounds (min-max), compression ratio in brackets, "
            f"written to {data.get('meta', {}).get('record_dir', 'the record dir')}. `plain "
            f"write` writes the same bytes to a new file: the disk limit here.\n\n"
            + _table(["frame", *(f"{c} fps" for c in HDF5_COLUMNS), "recorder / plain",
                      "recorder / naive"], rows)
            + "\n\n![hdf5](hdf5.png)\n")


def e2e_section(e: dict[str, Any], noise: Noise) -> str:
    st, pl = e["stages"], e["pipeline"]
    noise.add(e.get("noisy"))
    e2e = {"fps": e["e2e_fps"], "fps_min": e["e2e_fps_min"], "fps_max": e["e2e_fps_max"],
           "fps_runs": e["e2e_fps_runs"]}
    efficiency = ("**noisy**" if e["noisy"] else f"**{_num(e['efficiency'], '.2f')}**")
    rows = [["end to end: processed (FFT)", _fig(pl["processed"], fmt=".1f"),
             f"framebroker run, {e['workers']} workers (gray FFT, peak), with --record"],
            ["end to end: recorded", _fig(pl["recorded"], fmt=".1f"), "the same runs"],
            ["**end to end** (min of the two)", f"**{_fig(e2e, fmt='.1f')}**", ""],
            ["transport alone", _fig(st["transport"], fmt=".1f"),
             f"framebroker PUB/SUB tcp, broker -> 1 subscriber ({st['transport']['source']})"],
            ["FFT alone", _fig(st["fft"], fmt=".1f"), "framebroker run without --record"],
            ["recorder alone", _fig(st["recorder"], fmt=".1f"),
             "framebroker run --workers 0 --record"],
            ["**pipeline efficiency**", efficiency,
             f"end to end / slowest stage alone ({e['slowest']})"]]
    lost = f"\n\n**Frames were lost**: {e['lost']}" if e["lost"] else ""
    return (f"## End to end: {e['label']}, FFT and recording, {e['frames']} frames per run, "
            f"{e['rounds']} interleaved rounds\n\n"
            + _table(["what", "frames/s", "how"], rows) + lost + "\n\n![e2e](e2e.png)\n")


SECTIONS: dict[str, Callable[[dict[str, Any], Noise], str]] = {
    "transport": transport_section, "fft": fft_section, "hdf5": hdf5_section,
    "e2e": e2e_section, "shards": lambda data, _noise: shards_bench.section(data)}


def write_report(results: dict[str, Any], opts: BenchOptions, seconds: float) -> Path:
    """``report.md`` in the out dir: the main table first, then one section per part,
    each with its noisy figures listed; and ``bench.json``: every part's results and the
    summary with its noisy reasons."""
    import zmq

    argv = "; ".join(f"{part}: `{' '.join(results[part]['argv'])}`" for part in PARTS
                     if part in results and "argv" in results[part])
    took = ", ".join(f"{part} {results[part]['part_seconds']:.0f} s" for part in PARTS
                     if part in results)
    load = os.getloadavg()
    head = [f"# framebroker benchmarks ({'quick' if opts.quick else 'full'} run)", "",
            f"{time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s; Python "
            f"{platform.python_version()}, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
            f", {platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
            f"{load[0]:.1f}. Every figure is from this one run, a median of interleaved "
            f"rounds with their range: compare the ratios, not the absolute numbers. "
            f"Time per part: {took}.", ""]
    if opts.spec is not None:
        head += [f"Frames: {opts.spec.label} (`--source {opts.spec.source}`).", ""]
    if argv:
        head += [f"Modules ran with {argv}.", ""]
    label = opts.main_spec.label
    noise = Noise()
    summary = summary_table(results, label, noise) + noise.text()
    body = []
    for part in PARTS:
        if part in results:
            section_noise = Noise()
            body.append(SECTIONS[part](results[part], section_noise) + section_noise.text()
                        + "\n")
    path = opts.out_dir / "report.md"
    path.write_text("\n".join([*head, "## Summary", "", summary, "", *body]))
    summary_json = [{**{k: v for k, v in r.items() if k not in ("framebroker", "naive", "limit")},
                     **{k: (r[k] or {}).get("fps") for k in ("framebroker", "naive", "limit")}}
                    for r in summary_rows(results, label)]
    (opts.out_dir / "bench.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "quick": opts.quick, "load_end": load, "frame": label,
         "summary": summary_json, "noisy": bool(noise.reasons), "results": results},
        indent=2) + "\n")
    return path


# --- plots ------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.2):
    """A figure that renders with Agg whatever backend is configured (no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _grouped_bars(ax, groups: list[str], series: dict[str, list[dict[str, Any] | None]],
                  key: str = "fps") -> None:
    """Bars per category (frame sizes are categories, not a scale), the median of the
    rounds with min-max error bars."""
    width = 0.8 / max(len(series), 1)
    for i, (name, figures) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        spread = [{"median": f[key], "min": f.get(f"{key}_min", f[key]),
                   "max": f.get(f"{key}_max", f[key])} if f else None for f in figures]
        ax.bar(xs, [f[key] if f else 0 for f in figures], width, label=name,
               yerr=error_bars(spread), capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(groups)), groups, fontsize=8)


def plot_transport(data: dict[str, Any], path: Path) -> None:
    transports = list(dict.fromkeys(r["transport"] for r in data["rows"]
                                    if r["transport"] != "shm"))
    sizes = list(dict.fromkeys(r["size"] for r in data["rows"]))
    methods = [m for m in ("pickle", "framebroker", "raw", "imagezmq", "imagezmq-jpeg")
               if any(r["method"] == m for r in data["rows"])]
    labels = {"pickle": "pickle (naive)", "raw": "raw Frame (limit)"}
    by = {(r["transport"], r["method"], r["size"]): r for r in data["rows"]}
    fig = _figure(4.5 * max(len(transports), 1), 4.2)
    axes = fig.subplots(1, max(len(transports), 1), squeeze=False)[0]
    for ax, transport in zip(axes, transports):
        _grouped_bars(ax, sizes, {labels.get(m, m): [by.get((transport, m, s)) for s in sizes]
                                  for m in methods})
        ax.set(title=f"PUB/SUB over {transport}", ylabel="frames/s (log; bars: min-max)",
               yscale="log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path)


def plot_fft(data: dict[str, Any], path: Path) -> None:
    sizes = list(dict.fromkeys(c["size"] for c in data["cells"]))
    methods = list(dict.fromkeys(c["method"] for c in data["cells"]))
    by = {(c["size"], c["method"]): c for c in data["cells"]}
    fig = _figure(9.0, 4.5)
    ax = fig.subplots()
    _grouped_bars(ax, sizes, {m: [by.get((s, m)) for s in sizes] for m in methods})
    ax.set(title="FFT frames/s per backend and method (naive fft2 is the naive way, pyfftw "
                 "execute the limit; bars: min-max of the rounds)", ylabel="frames/s (log)",
           yscale="log")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path)


def plot_hdf5(data: dict[str, Any], path: Path) -> None:
    sizes = list(data["results"])
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    _grouped_bars(ax, sizes, {name: [data["results"][s].get(name) for s in sizes]
                              for name in ("naive", "recorder none", "recorder lz4",
                                           "recorder bslz4", "plain write")})
    ax.set(title="HDF5 recording frames/s: recorder vs naive h5py vs plain write (the disk "
                 "limit); bars: min-max of the rounds", ylabel="frames/s (log)", yscale="log")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_e2e(e: dict[str, Any], path: Path) -> None:
    names = ["transport alone", "FFT alone", "recorder alone", "end to end"]
    figures = [e["stages"]["transport"], e["stages"]["fft"], e["stages"]["recorder"],
               {"fps": e["e2e_fps"], "fps_min": e["e2e_fps_min"], "fps_max": e["e2e_fps_max"]}]
    spread = [{"median": f["fps"], "min": f["fps_min"], "max": f["fps_max"]} for f in figures]
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    bars = ax.bar(names, [f["fps"] for f in figures], color=["C0", "C0", "C0", "C3"],
                  yerr=error_bars(spread), capsize=3)
    ax.bar_label(bars, fmt="%.0f")
    eff = "noisy" if e["noisy"] else _num(e["efficiency"], ".2f")
    ax.set(title=f"{e['label']} pipeline: efficiency {eff} (end to end / slowest stage "
                 f"alone); bars: min-max of {e['rounds']} rounds", ylabel="frames/s")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "transport": plot_transport, "fft": plot_fft, "hdf5": plot_hdf5, "e2e": plot_e2e,
    "shards": shards_bench.plot}


# --- the command ------------------------------------------------------------------------

def check_out_dir(opts: BenchOptions) -> None:
    """Before measuring anything: the report and the parts' JSON must not exist there
    (unless --overwrite), so a long run cannot end by replacing someone's results."""
    names = ["report.md", "bench.json", *(f"{p}.json" for p in opts.parts),
             *(f"{p}.png" for p in opts.parts)]
    taken = [n for n in names if (opts.out_dir / n).exists()]
    if taken and not opts.overwrite:
        raise BenchError(f"{opts.out_dir} already holds {', '.join(taken)}: pass --overwrite "
                         f"to replace them, or another --out")


def run_bench(opts: BenchOptions) -> tuple[Path, dict[str, Any]]:
    """Every selected part in order, then the plots and the report; returns the report's
    path and the results by part."""
    check_out_dir(opts)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for part in PARTS:
        if part not in opts.parts:
            continue
        t_part = time.monotonic()
        results[part] = (run_e2e(opts, results.get("transport")) if part == "e2e"
                         else run_script(part, opts))
        results[part]["part_seconds"] = round(time.monotonic() - t_part, 1)
        print(f"bench: {part}: {results[part]['part_seconds']} s", file=sys.stderr, flush=True)
    if "e2e" in results:  # the modules write their own JSON; this is the e2e part's
        (opts.out_dir / "e2e.json").write_text(json.dumps(results["e2e"], indent=2))
    for part, data in results.items():
        PLOTS[part](data, opts.out_dir / f"{part}.png")
    return write_report(results, opts, time.monotonic() - t0), results
