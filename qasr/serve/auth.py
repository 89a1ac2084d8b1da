"""The API key: where a client offers it, and the one comparison with --api-key.

HTTP clients (the openai SDK, curl) send 'Authorization: Bearer KEY'. A browser cannot set headers
on a WebSocket, so the page offers the key as an `openai-insecure-api-key.KEY` subprotocol, as
OpenAI's own Realtime clients do; WebSocket SDKs send the header. Every route that needs the key
(HTTP and WebSocket alike) checks it here.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from qasr.serve.openai_api import ApiError

KEY_PROTOCOL = "openai-insecure-api-key."


def check_key(expected: str | None, given: str | None) -> None:
    """Constant-time comparison of the client's key with --api-key (when one is set)."""
    if not expected:
        return
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


def offered_key(headers: Mapping[str, str], subprotocols: Iterable[str] = ()) -> str | None:
    """The key from 'Authorization: Bearer', else from the openai-insecure-api-key subprotocol."""
    header = headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    for protocol in subprotocols:
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL):]
    return None
