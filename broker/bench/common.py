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
from pathlib import Path
from typing import Any

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
