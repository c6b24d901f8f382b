"""The ZAP handler of a CURVE server (see broker.security.Guard).

Its own module because pyzmq's ThreadAuthenticator imports asyncio: a process without
CURVE (the default) should not pay for that at start-up.
"""
from __future__ import annotations

from typing import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85


class LoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, saying which key from which address it refused (pyzmq
    itself logs that only at debug level, without the address)."""

    def __init__(self, ctx: zmq.Context, report: Callable[[str, str], None]) -> None:
        super().__init__(ctx)
        self._report = report
        self._peer = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # requests are handled one at a time in the ZAP thread, so _peer is this one's
        self._peer = describe_zap_peer(msg)
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self._report(self._peer, f"refused {self._peer}: "
                                     f"{status_text.decode('utf-8', 'replace')}")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def describe_zap_peer(msg: list[bytes]) -> str:
    """'CURVE client with key K from ADDRESS' from a ZAP request."""
    address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
    mechanism = msg[5].decode("ascii", "replace") if len(msg) > 5 else "?"
    key = msg[6] if len(msg) > 6 else b""
    text = z85.encode(key).decode() if key and len(key) % 4 == 0 else key.hex()
    return f"{mechanism} client with key {text} from {address}"
