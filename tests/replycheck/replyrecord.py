"""Sees every control reply a framebroker ``Control`` receives, with the command it
answered, so that the test suite can validate each one against docs/schemas.

``install(client, record)`` wraps ``Control.request_parts`` (to know the command) and
``protocol.decode_reply`` (to see the reply before ``ok`` is acted on) in the imported
``broker.client`` module; nothing else changes. The test process installs it directly
(conftest); CLI processes started by tests install it from ``sitecustomize`` when
``FRAMEBROKER_REPLY_LOG`` names a file, and append each reply to it as a JSON line,
which conftest validates after every test.
"""
from __future__ import annotations

import importlib.abc
import json
import os
import sys
import threading
from typing import Any, Callable

LOG_ENV = "FRAMEBROKER_REPLY_LOG"
_current = threading.local()  # the command of the request this thread is waiting on


def install(client: Any, record: Callable[[str | None, Any], None]) -> None:
    """Call ``record(cmd, reply)`` for every reply decoded by ``client.Control``."""
    proto, control = client.proto, client.Control
    decode, request_parts = proto.decode_reply, control.request_parts

    def decode_reply(data: bytes) -> dict:
        reply = decode(data)
        record(getattr(_current, "cmd", None), reply)
        return reply

    def traced_request_parts(self, cmd: str, **args: Any):
        _current.cmd = cmd
        try:
            return request_parts(self, cmd, **args)
        finally:
            _current.cmd = None

    wait = control.wait

    def traced_wait(self, *args: Any, **kw: Any):
        _current.cmd = "endpoints"  # Control.wait asks 'endpoints' on a socket of its own
        try:
            return wait(self, *args, **kw)
        finally:
            _current.cmd = None

    proto.decode_reply = decode_reply
    control.request_parts = traced_request_parts
    control.wait = traced_wait


def append_to_log(cmd: str | None, reply: Any) -> None:
    """One JSON line per reply; O_APPEND keeps lines of concurrent processes whole."""
    line = (json.dumps({"cmd": cmd, "reply": reply, "pid": os.getpid()}) + "\n").encode()
    try:
        fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND)
    except OSError:  # the test session that wanted the log is over
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class _OnImport(importlib.abc.MetaPathFinder):
    """Installs the recorder right after ``broker.client`` is executed, so a process
    that never imports it pays nothing."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "broker.client":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        sys.meta_path.remove(self)
        exec_module = spec.loader.exec_module

        def exec_and_install(module: Any) -> None:
            exec_module(module)
            install(module, append_to_log)

        spec.loader.exec_module = exec_and_install
        return spec


def install_on_import() -> None:
    sys.meta_path.insert(0, _OnImport())
