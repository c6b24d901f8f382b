"""Argument types for the CLI: a bad value fails at parse time, naming what is accepted.

Each type turns the text of one flag into its value or raises ArgumentTypeError, which
argparse prints as the subcommand's usage error. ``_Deprecated`` keeps an old spelling
of a flag working while it warns with the new one. The names keep their leading
underscore: they are the CLI's parsing details, not the package's API.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

import numpy as np

from . import protocol as proto
from .client import parse_policy
from .shm import parse_size


def _positive_int(text: str) -> int:
    value = _nonneg_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def _endpoint(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise argparse.ArgumentTypeError(f"endpoint {text!r} must look like "
                                         f"tcp://127.0.0.1:5555 or ipc:///tmp/fb.sock")
    return text


def _shape(text: str) -> tuple[int, ...]:
    from .sources import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dtype(text: str) -> str:
    try:
        proto.dtype_code(np.dtype(text))
    except (TypeError, proto.ProtocolError):
        raise argparse.ArgumentTypeError(f"dtype {text!r} is not one of "
                                         f"{', '.join(str(d) for d in proto.DTYPES.values())}"
                                         ) from None
    return np.dtype(text).name


def _source(text: str):
    from .sources import SourceSpec

    try:
        return SourceSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stream(text: str) -> str:
    if not 1 <= len(text.encode()) <= proto.MAX_NAME:
        raise argparse.ArgumentTypeError(f"stream name must be 1-{proto.MAX_NAME} bytes")
    return text


def _client_name(text: str) -> str:
    if not len(text) <= proto.MAX_CLIENT_NAME or not text.isprintable():
        raise argparse.ArgumentTypeError(f"name must be at most {proto.MAX_CLIENT_NAME} "
                                         f"printable characters")
    return text


def _checked_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that checks the text with ``parse`` (its ValueError becomes the
    usage error) and keeps the text, for the part that parses it again later."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


_policy = _checked_by(parse_policy)
_ring_size = _checked_by(parse_size)


def _mib(text: str) -> int:
    return int(_nonneg_float(text) * 1024 * 1024)


def _http_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"HTTP address {text!r} must look like "
                                         f"127.0.0.1:8080")
    return host, int(port)


def _value_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    try:
        bounds = float(lo), float(hi)
    except ValueError:
        bounds = ()
    if not sep or len(bounds) != 2 or not bounds[0] < bounds[1] < float("inf"):
        raise argparse.ArgumentTypeError(f"range {text!r} must be LO:HI with LO < HI, "
                                         f"e.g. 0:4095")
    return bounds


def _comma_list(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argument type for ``--only a,b``: names from ``allowed``, at least one."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(allowed)}; "
                                             f"got {text!r}")
        return names
    return parse


# --- the shared vocabulary: old spellings kept for scripts ----------------------------

class _Deprecated(argparse.Action):
    """An old spelling kept for scripts: it does what the new flag does, and says so."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _deprecated(p: argparse.ArgumentParser, old: str, new: str, dest: str,
                **kw: Any) -> None:
    """Keep ``old`` working (hidden from --help) as a spelling of ``new``."""
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS, **kw)
