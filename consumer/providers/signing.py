"""Signatures on the ``http`` channel's POSTs, so receivers can tell Herald's from anyone's.

``X-Herald-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]`` where each
``v1`` is ``HMAC-SHA256(secret, f"{t}\\n{message_id}\\n".encode() + body)``
over the exact bytes sent, one per configured secret
(``HERALD_HTTP_SIGNING_SECRETS``, newest first). ``message_id`` is the
``Idempotency-Key`` header's value, so a captured request cannot be replayed
under another idempotency key; the timestamp lets receivers refuse old
captures. Newlines separate the parts because neither the timestamp nor a
header value can contain one, so no two (id, body) pairs sign the same bytes.

Key rotation: put the new secret first (Herald then sends a ``v1`` for each),
move receivers to it, then drop the old one. Each attempt is signed afresh,
so a retry carries its own timestamp. Without a configured secret no header
is sent. The README gives receivers a verification recipe;
:func:`verify` is the same recipe, used by the tests.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

SIGNATURE_HEADER = "X-Herald-Signature"

#: How far a receiver should let a signature's timestamp be from its own clock.
DEFAULT_TOLERANCE_S = 300


def signed_bytes(timestamp: int, message_id: str, body: bytes) -> bytes:
    """What each ``v1`` signature is computed over."""
    return f"{timestamp}\n{message_id}\n".encode() + body


def sign(secrets: Sequence[str], message_id: str, body: bytes, timestamp: int) -> str | None:
    """The ``X-Herald-Signature`` value for one POST; None without secrets."""
    if not secrets:
        return None
    payload = signed_bytes(timestamp, message_id, body)
    parts = [f"t={timestamp}"]
    parts += [f"v1={hmac.new(s.encode(), payload, hashlib.sha256).hexdigest()}"
              for s in secrets]
    return ",".join(parts)


def verify(header: str, message_id: str, body: bytes, secrets: Sequence[str], *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True when ``header`` signs ``message_id`` and ``body`` with one of
    ``secrets`` and its timestamp is within ``tolerance_s`` of ``now``."""
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    payload = signed_bytes(timestamp, message_id, body)
    for secret in secrets:
        expected = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates):
            return True
    return False
