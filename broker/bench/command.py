"""The ``bench`` and ``tune`` subcommands: their flags and handlers, in one place
(``broker.cli`` only registers them). Both measure the user's own setup: the same
``--source`` as ``serve`` (or synthetic ``--shape``/``--dtype``) and ``--record-dir``,
the disk recordings will go to. Neither writes anything but what it is asked for."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _frame_args(p: argparse.ArgumentParser, default_shape: tuple[int, ...] | None) -> None:
    from .. import argtypes

    p.add_argument("--source", type=argtypes._source, default="synthetic",
                   help="synthetic | video:PATH | camera:INDEX | h5:FILE[:DATASET], as serve "
                        "takes it (recordings and videos loop, as fast as they go)")
    shape_help = ("synthetic frame shape, e.g. 1080x1920x3 (default: "
                  + ("x".join(map(str, default_shape)) if default_shape else
                     "the benchmarks' fixed sizes") + ")")
    p.add_argument("--shape", type=argtypes._shape, default=default_shape, help=shape_help)
    p.add_argument("--dtype", type=argtypes._dtype, default="uint8",
                   help="synthetic frame dtype (default uint8)")
    p.add_argument("--record-dir", "--dir", dest="record_dir", type=Path, default=None,
                   help="the disk to measure: temporary recordings go there (default: "
                        "the current directory)")


def _spec(args: argparse.Namespace, default_shape: tuple[int, ...] | None):
    """The user's frames, or None when bench should measure its fixed sizes."""
    from .. import cli
    from .common import FrameSpec

    source = str(args.source)
    if source == "synthetic" and args.shape is None and default_shape is None:
        return None
    shape = args.shape or default_shape or (480, 640, 3)
    try:
        return FrameSpec(source, tuple(shape), args.dtype).resolved()
    except Exception as exc:  # SourceError, ProtocolError: the source's own message
        raise cli.CliError(f"--source {source}: {exc}") from None


def _record_dir(args: argparse.Namespace) -> Path:
    from .. import cli

    path = args.record_dir if args.record_dir is not None else Path.cwd()
    if not path.is_dir():
        raise cli.CliError(f"--record-dir {path}: no such directory", cli.EXIT_USAGE)
    return path


# --- bench --------------------------------------------------------------------------

def add_bench(sub: argparse._SubParsersAction) -> None:
    from .. import argtypes
    from ..choices import BENCH_PARTS as PARTS

    p = sub.add_parser("bench", help="run every benchmark and write a report with plots",
                       description="Run the transport, FFT and HDF5 benchmarks (broker.bench; "
                                   "bench/*.py in a clone) and an end-to-end pipeline "
                                   "benchmark on your frames and disk; write their JSON, "
                                   "report.md and PNG plots into --out.")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes, short cells, 3 rounds: about 3 minutes on 2 idle cores")
    p.add_argument("--out", "--out-dir", dest="out", type=Path, default=None,
                   help="directory for the JSON, report.md and plots (default: a new "
                        "bench-TIMESTAMP directory under the current directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report in --out (default: refuse)")
    p.add_argument("--parts", "--only", dest="parts", type=argtypes._comma_list(PARTS),
                   default=PARTS,
                   help=f"parts to run, comma-separated (default {','.join(PARTS)})")
    p.add_argument("--peers", action="store_true",
                   help="add imagezmq (raw and JPEG, where installed) to the transport table, "
                        "in the same rounds")
    _frame_args(p, None)
    p.add_argument("--seconds", type=argtypes._nonneg_float, default=None,
                   help="measured seconds per transport and FFT cell (default: the modules')")
    p.add_argument("--repeat", type=argtypes._positive_int, default=None,
                   help="interleaved rounds of every part (default 3; HDF5 5, quick 3)")
    p.add_argument("--frames", type=argtypes._positive_int, default=None,
                   help="frames per end-to-end run (default 400 with --quick, else 5000)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import cli
    from ..benchmark import BenchError, BenchOptions, run_bench, summary_table
    from .common import stamped_dir

    spec = _spec(args, None)
    record_dir = _record_dir(args) if args.record_dir is not None else None
    try:
        out_dir = args.out if args.out is not None else stamped_dir()
        opts = BenchOptions(out_dir=out_dir, parts=args.parts, quick=args.quick,
                            seconds=args.seconds or None, repeat=args.repeat,
                            frames=args.frames, overwrite=args.overwrite, spec=spec,
                            record_dir=record_dir, peers=args.peers)
        report, results = run_bench(opts)
    except BenchError as exc:
        raise cli.CliError(str(exc)) from None
    print(summary_table(results, opts.main_spec.label))
    print(f"report: {report}")
    print(f"wrote {', '.join(sorted(p.name for p in out_dir.iterdir()))} in {out_dir}")
    if "e2e" in results and results["e2e"]["lost"]:
        print(f"framebroker bench: the pipeline lost frames: {results['e2e']['lost']}",
              file=sys.stderr)
        return cli.EXIT_LOST
    return cli.EXIT_OK


# --- tune ---------------------------------------------------------------------------

def add_tune(sub: argparse._SubParsersAction) -> None:
    from .. import argtypes
    from ..choices import TUNE_DIMENSIONS as DIMENSIONS

    p = sub.add_parser("tune", help="measure settings for your frames; recommend run flags",
                       description="Within a time budget, measure transport (tcp, ipc, shm), "
                                   "FFT backend and planner, workers x threads, recorder "
                                   "chunking x compression x threads, and HWM and policy for "
                                   "your frames on this machine, in interleaved rounds; "
                                   "recommend a flag only where its gain beats the spread "
                                   "between rounds.")
    _frame_args(p, (480, 640, 3))
    p.add_argument("--budget", type=argtypes._nonneg_float, default=60.0,
                   help="seconds for the whole sweep (kept to within 10%%); what does not "
                        "fit is skipped and named (default %(default)s)")
    p.add_argument("--only", type=argtypes._comma_list(DIMENSIONS), default=DIMENSIONS,
                   help=f"dimensions to sweep, comma-separated (default {','.join(DIMENSIONS)})")
    p.add_argument("--save", type=Path, default=None,
                   help="write the recommended run flags as TOML here (framebroker run "
                        "--config FILE)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --save or --out file (default: refuse)")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (the table goes to stderr)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from .. import cli
    from ..tune import Tuner, format_result, toml_text

    if not args.budget:
        raise cli.CliError("--budget must be more than 0 seconds", cli.EXIT_USAGE)
    for path in (args.save, args.out):
        if path is not None and path.exists() and not args.overwrite:
            raise cli.CliError(f"{path} exists: pass --overwrite to replace it", cli.EXIT_USAGE)
    record_dir = _record_dir(args)
    tuner = Tuner(_spec(args, (480, 640, 3)), args.budget, record_dir, args.only,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    result = tuner.run()
    text = format_result(result)
    for path, content in ((args.out, json.dumps(result, indent=2) + "\n"),
                          (args.save, toml_text(result))):
        if path is None:
            continue
        try:
            path.write_text(content)
        except OSError as exc:
            raise cli.CliError(f"cannot write {path}: {exc.strerror or exc}") from None
        text += f"\nwrote {path}"
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(result))
    else:
        print(text)
    return cli.EXIT_OK
