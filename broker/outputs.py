"""Output files: never replace one unasked, never start what the disk cannot hold.

Every command that writes a file (record, run --record, sink --out, snapshot --out,
inspect --out) runs these checks before it connects to anything, so a wrong path
costs nothing and an existing file is never replaced without the caller saying so.
The errors carry the path and the numbers; the Python API's wording names its
parameters (``overwrite=True``), the CLI words the same facts with its flags.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence


class OutputError(ValueError):
    """An output path that cannot be written (no such directory, not writable...)."""


class BadSuffix(OutputError):
    """An output name whose suffix says a format this command does not write."""


class OutputExists(OutputError, FileExistsError):
    """The output file exists and replacing it was not asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} exists; pass overwrite=True to replace it")


class NotEnoughSpace(OutputError):
    """The target filesystem cannot hold the expected output."""

    def __init__(self, path: Path, need: int, free: int) -> None:
        self.path, self.need, self.free = path, need, free
        super().__init__(f"{path}: needs about {format_bytes(need)} but its filesystem has "
                         f"{format_bytes(free)} free")


def format_bytes(n: float) -> str:
    """4600000000 -> '4.6 GB' (decimal units, as df -H and disk labels use)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_output(path: str | Path, overwrite: bool,
                 suffixes: Sequence[str] | None = None) -> Path:
    """The path, if it may be written: its directory exists and is writable, it is not a
    directory, it has one of ``suffixes`` (if given), and it does not exist unless
    ``overwrite``. Raises OutputExists or OutputError otherwise."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise BadSuffix(f"{path}: use a {' or '.join(suffixes)} file name")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: directory {parent} does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputExists(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {parent} is not writable")
    return path


def check_space(path: str | Path, need: int) -> int:
    """Refuse (NotEnoughSpace) if ``path``'s filesystem has less than ``need`` bytes
    free, counting a file that would be replaced as free; returns the free bytes."""
    path = Path(path)
    free = shutil.disk_usage(path.parent).free
    if path.is_file():
        free += path.stat().st_size
    if need > free:
        raise NotEnoughSpace(path, need, free)
    return free
