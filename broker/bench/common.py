"""What every benchmark module shares: where its output goes, and how it starts the CLI.

Outputs never land in the package or the repository unasked: a benchmark writes to
``--out PATH`` (default: ``NAME.json`` in a new timestamped directory under the
current directory), refuses to replace an existing file unless ``--overwrite``, and
says where it wrote. Refreshing the committed ``bench/results/`` is a choice:
``python bench/transport.py --out bench/results/transport.json --overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import broker

#: the directory that holds the ``broker`` package: site-packages, or a clone's root
PACKAGE_PARENT = Path(broker.__file__).resolve().parent.parent


def stamped_dir(base: Path | None = None) -> Path:
    """A new directory ``bench-YYYYmmdd-HHMMSS[-N]`` under ``base`` (default: the cwd)."""
    base = Path.cwd() if base is None else base
    stamp = time.strftime("bench-%Y%m%d-%H%M%S")
    for n in range(1000):
        path = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free {stamp}-N directory under {base}")


def add_out_args(ap: argparse.ArgumentParser, name: str) -> None:
    """``--out`` and ``--overwrite``, the same for every benchmark script."""
    ap.add_argument("--out", type=Path, default=None,
                    help=f"the JSON file to write (default: bench-TIMESTAMP/{name}.json under "
                         f"the current directory)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it exists (default: refuse)")


def out_path(out: Path | None, name: str, overwrite: bool) -> Path:
    """Where the result goes, checked before anything is measured: an existing file is
    an error unless ``overwrite`` (a long run should not fail at its last step)."""
    path = out if out is not None else stamped_dir() / f"{name}.json"
    if path.exists() and not overwrite:
        raise SystemExit(f"{path} exists: pass --overwrite to replace it, or another --out")
    return path


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")
    print(f"wrote {path}", flush=True)


def child_env() -> dict[str, str]:
    """The environment for ``python -m broker.cli`` children: this very ``broker``
    package first on their path, whether it is installed, editable or a clone."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_PARENT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def cli(*args: str, **kwargs: Any) -> subprocess.Popen:
    """``python -m broker.cli ARGS`` as a child process with pipes, text mode."""
    return subprocess.Popen([sys.executable, "-m", "broker.cli", *args], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


@dataclass(frozen=True)
class FrameSpec:
    """The frames a benchmark measures: the user's ``--source`` (as ``serve`` takes it)
    or the synthetic scene at ``--shape``/``--dtype``. Recordings and videos loop and
    are read as fast as they go: a benchmark measures the pipeline, not the file's pace."""

    source: str = "synthetic"
    shape: tuple[int, ...] = (480, 640, 3)
    dtype: str = "uint8"

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def open(self):
        """A fresh :class:`broker.sources.Source` for a broker."""
        from ..sources import SourceSpec, open_source

        return open_source(SourceSpec.parse(self.source), shape=self.shape, dtype=self.dtype,
                           loop=True, timed=False)

    def resolved(self) -> "FrameSpec":
        """The same spec with the source's real shape and dtype (opened once to see)."""
        if self.synthetic:
            return FrameSpec(self.source, tuple(self.shape), np.dtype(self.dtype).name)
        src = self.open()
        try:
            return FrameSpec(self.source, tuple(src.shape), src.dtype.name)
        finally:
            src.close()

    def frames(self, n: int) -> list[np.ndarray]:
        """``n`` distinct frames (the source's first ``n``, repeated if it has fewer)."""
        if self.synthetic:
            from ..sources import synthetic_frame

            return [synthetic_frame(self.shape, self.dtype, i) for i in range(n)]
        src = self.open()
        try:
            out = []
            for _ in range(n):
                frame = np.empty(src.shape, src.dtype)
                if not src.read_into(frame):
                    break
                out.append(frame)
        finally:
            src.close()
        return [out[i % len(out)] for i in range(n)]

    @property
    def label(self) -> str:
        """``640x480x3 u8`` (width first, as the benchmarks' tables name sizes)."""
        h, w, *c = self.shape
        size = "x".join(str(d) for d in (w, h, *c)) + f" {self.dtype.replace('uint', 'u')}"
        return size if self.synthetic else f"{size} ({self.source})"

    def run_flags(self) -> list[str]:
        """The flags that make ``framebroker run``/``serve`` stream these frames, unpaced."""
        flags = ["--source", self.source, "--shape", "x".join(map(str, self.shape)),
                 "--dtype", self.dtype]
        if self.source.startswith(("h5:", "video:")):
            flags += ["--loop", "--fps", str(UNPACED_FPS)]
        return flags


#: ``--fps`` for a recording replayed as fast as it goes (its own pace is the default)
UNPACED_FPS = 1_000_000


def add_frame_args(ap: argparse.ArgumentParser) -> None:
    """``--source``, ``--shape``, ``--dtype``: the user's frames instead of the fixed sizes."""
    ap.add_argument("--source", default="synthetic",
                    help="synthetic | video:PATH | camera:INDEX | h5:FILE[:DATASET], as serve "
                         "takes it (default synthetic)")
    ap.add_argument("--shape", default=None,
                    help="synthetic frame shape, e.g. 1080x1920x3 (default: the fixed sizes)")
    ap.add_argument("--dtype", default="uint8", help="synthetic frame dtype (default uint8)")


def frame_specs(args: argparse.Namespace, sizes: dict[str, tuple],
                quick: tuple[str, ...] | None = None) -> list[FrameSpec]:
    """The frames to measure: the user's source or shape if given, else the benchmark's
    fixed sizes (``args.sizes`` if it has them, ``quick`` ones with --quick)."""
    from ..sources import parse_shape

    if args.source != "synthetic" or args.shape:
        shape = parse_shape(args.shape) if args.shape else (480, 640, 3)
        return [FrameSpec(args.source, shape, np.dtype(args.dtype).name).resolved()]
    names = getattr(args, "sizes", None) or list(sizes)
    if quick is not None and names == list(sizes):
        names = [n for n in names if n in quick]
    return [FrameSpec("synthetic", tuple(sizes[n][0]), sizes[n][1]) for n in names]


def run_broker(source, cfg, ctx=None) -> None:
    """Run a :class:`broker.broker.Broker` to its end in this process, then wait out its
    linger. Without the wait, the interpreter's exit drops pyzmq's references to the
    frames libzmq is still sending zero-copy (a closed socket lingers), glibc unmaps
    them, and libzmq aborts the process with ``Bad address (src/tcp.cpp:227)``: the
    stray line ``framebroker bench`` used to print (``framebroker serve`` waits too)."""
    import zmq

    from ..broker import Broker

    broker = Broker(source, cfg, log=lambda m: None, ctx=ctx)
    try:
        broker.run()
    finally:
        broker.close()
        if ctx is None:
            zmq.Context.instance().destroy(linger=cfg.linger_ms)
