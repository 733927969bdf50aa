"""Workload bootstrap tokens: proof of which namespace and service account a caller is.

The control server issues one token per workload and the sidecar presents it
to the CA; the CA signs only the SPIFFE ID the token is bound to. A token is
``v1:<namespace>:<service account>:<expiry unix seconds>:<mac>`` (":" cannot occur in
a SPIFFE path segment), where the
MAC is HMAC-SHA256 over the rest with a key only the control server holds.
(Kubernetes service-account tokens play this role in Istio; this is the
equivalent for meshes of processes and VMs.)

Pure functions: keys and times are passed in; no I/O, no clock reads.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac

from certs.errors import InvalidToken
from certs.spiffe import validate_segment

VERSION = "v1"
KEY_BYTES = 32


def _mac(key: bytes, payload: str) -> str:
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue_token(key: bytes, namespace: str, service_account: str, expires: dt.datetime) -> str:
    """A token for ``namespace``/``service_account`` valid until ``expires`` (timezone-aware)."""
    if len(key) < 16:
        raise ValueError("token key too short")
    validate_segment(namespace, "namespace")
    validate_segment(service_account, "service account")
    payload = f"{VERSION}:{namespace}:{service_account}:{int(expires.timestamp())}"
    return f"{payload}:{_mac(key, payload)}"


def verify_token(key: bytes, token: str, now: dt.datetime) -> tuple[str, str]:
    """(namespace, service account) the token proves; raises InvalidToken."""
    parts = token.strip().split(":")
    if len(parts) != 5 or parts[0] != VERSION:
        raise InvalidToken("malformed token")
    payload, mac = ":".join(parts[:4]), parts[4]
    if not hmac.compare_digest(mac, _mac(key, payload)):
        raise InvalidToken("token signature does not verify")
    try:
        expires = int(parts[3])
    except ValueError:
        raise InvalidToken("malformed token expiry") from None
    if now.timestamp() >= expires:
        raise InvalidToken("token expired")
    return parts[1], parts[2]
