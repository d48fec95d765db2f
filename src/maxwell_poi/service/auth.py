"""Who is calling: Maxwell's admin by bearer token; agents and nodes by a signed, timestamped request.

No passwords. An agent (or node) signs, with its enrolled Ed25519 key,

    maxwell-poi/request/v1 \\n METHOD \\n PATH?QUERY \\n TIMESTAMP \\n sha256(BODY)

and sends `X-Poi-Principal: agent:<id>` (or `node:<id>`), `X-Poi-Timestamp` (unix seconds) and
`X-Poi-Signature` (hex). The server accepts a timestamp within `skew_s` of its own clock, so a
captured request is dead after that window; inside it a replay is harmless because every write is
idempotent (a bid by its bid id, a dispute by its lease, intake by its lease).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping

from securesystemslib.signer import Signature, SSlibKey

from ..protocol.errors import UnknownAgentError
from ..protocol.keys import AgentKey, Keyring
from .errors import ApiError

PRINCIPAL = "x-poi-principal"
TIMESTAMP = "x-poi-timestamp"
SIGNATURE = "x-poi-signature"
DOMAIN = b"maxwell-poi/request/v1"
ROLES = ("agent", "node")


def request_message(method: str, path: str, timestamp: str, body: bytes) -> bytes:
    return b"\n".join(
        [
            DOMAIN,
            method.upper().encode(),
            path.encode(),
            timestamp.encode(),
            hashlib.sha256(body).hexdigest().encode(),
        ]
    )


def sign_request(
    key: AgentKey, principal: str, method: str, path: str, body: bytes = b"", now: float | None = None
) -> dict[str, str]:
    """The headers that make a request from `principal` ("agent:alice"); `path` includes the query."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    signature = key.signer.sign(request_message(method, path, timestamp, body))
    return {PRINCIPAL: principal, TIMESTAMP: timestamp, SIGNATURE: signature.signature}


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    keyrings: Mapping[str, Keyring],
    skew_s: float,
    now: Callable[[], float] = time.time,
) -> tuple[str, str]:
    """(role, id) of a correctly signed request, or an ApiError (401) saying what was wrong."""
    principal = headers.get(PRINCIPAL, "")
    role, _, ident = principal.partition(":")
    if role not in keyrings or not ident:
        raise ApiError(401, f"header {PRINCIPAL} of the form agent:<id> or node:<id>", repr(principal[:80]))
    try:
        key: SSlibKey = keyrings[role].key_for(ident)
    except UnknownAgentError:
        raise ApiError(401, f"an enrolled {role}", f"{role} {ident[:80]!r} is not enrolled") from None
    stamp = headers.get(TIMESTAMP, "")
    try:
        sent = float(stamp)
        if not math.isfinite(sent):
            raise ValueError(stamp)
    except ValueError:
        raise ApiError(401, f"header {TIMESTAMP} in unix seconds", repr(stamp[:40])) from None
    drift = sent - now()
    if abs(drift) > skew_s:
        raise ApiError(401, f"a timestamp within {skew_s:g} s of the server's clock", f"{drift:+.1f} s off")
    signature = headers.get(SIGNATURE, "")
    try:
        key.verify_signature(Signature(key.keyid, signature), request_message(method, path, stamp, body))
    except Exception:  # securesystemslib raises several types for a bad or malformed signature
        raise ApiError(
            401, f"{SIGNATURE}: a signature by {role} {ident!r}'s enrolled key", "one that does not verify"
        ) from None
    return role, ident


def check_admin(authorization: str | None, token: str) -> None:
    """Bearer token, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "Authorization: Bearer <the admin token>", "no or a wrong token")
