"""The typed failures of the data plane, and what each becomes on the wire.

Each class carries the HTTP status of its local reply, the Envoy-style
response flag, and the gRPC code used when the caller speaks gRPC (the h2
``error_code``-as-class-attribute pattern). Raised in the pure tiers,
turned into a response in exactly one place: ``hcm.HttpConnection``'s
local-reply path. Nothing here does I/O.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of everything the proxy turns into a local reply."""

    status: int = 500
    flag: str = ""
    grpc_status: int = 13  # INTERNAL
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra response headers (a redirect's location)


class DownstreamProtocolError(ProxyError):
    """The client sent bytes that are not valid HTTP/1.1 (its fault)."""

    status = 400
    flag = "DPE"
    grpc_status = 13
    body = b"Bad Request"


class HeadersTooLargeError(DownstreamProtocolError):
    """Request line plus headers exceeded the listener's limit (RFC 6585 431)."""

    status = 431
    body = b"Request Header Fields Too Large"


class NotImplementedCodingError(DownstreamProtocolError):
    """A Transfer-Encoding other than ``chunked`` (RFC 9112 section 6.1: 501)."""

    status = 501
    body = b"Not Implemented"


class NoRouteError(ProxyError):
    """No virtual host or route matched the request (Envoy NR)."""

    status = 404
    flag = "NR"
    grpc_status = 12  # UNIMPLEMENTED
    body = b""


class NoHealthyUpstreamError(ProxyError):
    """The cluster has no endpoints to pick from (Envoy UH)."""

    status = 503
    flag = "UH"
    grpc_status = 14  # UNAVAILABLE
    body = b"no healthy upstream"


class ClusterNotFoundError(ProxyError):
    """The route names a cluster the snapshot does not have (Envoy NC)."""

    status = 503
    flag = "NC"
    grpc_status = 14
    body = b"cluster not found"


class ConnectError(ProxyError):
    """The upstream refused or failed the TCP connect (Envoy UF)."""

    status = 503
    flag = "UF"
    grpc_status = 14
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"


class ConnectTimeoutError(ConnectError):
    """The TCP connect did not finish within the cluster's connect timeout (UF)."""

    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection timeout"


class TlsError(ConnectError):
    """The TLS handshake with the upstream failed or it is not an expected identity (UF)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.body = b"upstream connect error or disconnect/reset before headers. reset reason: " \
                    b"connection failure, transport failure reason: TLS error: " + reason.encode()


class UpstreamResetError(ProxyError):
    """The upstream closed or broke the connection before a full response head (UR)."""

    status = 503
    flag = "UR"
    grpc_status = 14
    body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"


class UpstreamProtocolError(UpstreamResetError):
    """The upstream answered with bytes that are not HTTP/1.1 (Envoy UPE, reported as 503)."""

    flag = "UPE"
    body = b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"


class RequestTimeoutError(ProxyError):
    """The route timeout expired before the response completed (UT)."""

    status = 504
    flag = "UT"
    grpc_status = 4  # DEADLINE_EXCEEDED
    body = b"upstream request timeout"


class PerTryTimeoutError(RequestTimeoutError):
    """A retry policy's per_try_timeout expired and no retry was left (UT)."""


class RefusedStreamError(UpstreamResetError):
    """The HTTP/2 upstream refused the stream (REFUSED_STREAM): nothing was processed (UR)."""

    body = b"upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"


class LocalAnswer(ProxyError):
    """A route that answers by itself: a direct response or a redirect (no response flag)."""

    def __init__(self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers
        self.grpc_status = 0 if status < 400 else 2


class FaultAbortError(ProxyError):
    """envoy.filters.http.fault aborted the request (FI): an HTTP status, or a gRPC status."""

    flag = "FI"
    body = b"fault filter abort"

    def __init__(self, status: int, grpc_status: int | None = None) -> None:
        super().__init__(status)
        self.status = status or 200  # a gRPC abort answers 200 with grpc-status, as Envoy does
        self.grpc_status = grpc_status if grpc_status is not None else _grpc_of_http(status)


def _grpc_of_http(status: int) -> int:
    """The gRPC status for an HTTP status (the gRPC HTTP-to-gRPC status mapping)."""
    return {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}.get(status, 2)


class UpstreamOverflowError(ProxyError):
    """A circuit-breaker limit was hit (UO)."""

    status = 503
    flag = "UO"
    grpc_status = 14
    body = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


class InvalidResource(Exception):
    """An xDS resource the proxy cannot compile: becomes a NACK's error_detail.

    ``type_name`` is the short xDS type (Listener, Cluster, ...), ``name`` the
    resource name and ``field`` the dotted path of the offending field.
    """

    def __init__(self, type_name: str, name: str, field: str, message: str) -> None:
        super().__init__(f"{type_name} {name!r}: {field}: {message}")
        self.type_name = type_name
        self.name = name
        self.field = field
        self.message = message


class PolicyDeniedError(ProxyError):
    """An RBAC filter (AuthorizationPolicy) refused the request (Envoy's 403, flag RBAC).

    ``policy``: the DENY policy that matched, or "" when no ALLOW policy did.
    """

    status = 403
    flag = "RBAC"
    grpc_status = 7  # PERMISSION_DENIED
    body = b"RBAC: access denied"

    def __init__(self, policy: str = "") -> None:
        super().__init__(policy)
        self.policy = policy


class JwtAuthError(ProxyError):
    """The request carried a JWT that the jwt_authn filter refused (RequestAuthentication), or
    none where one is required: 401 (403 for a wrong audience) with Envoy's text for why (the
    flag JWT is Pillion's own)."""

    status = 401
    flag = "JWT"
    grpc_status = 16  # UNAUTHENTICATED
    body = b"Jwt verification fails"

    def __init__(self, reason: str = "Jwt verification fails", status: int = 401) -> None:
        super().__init__(reason)
        self.body = reason.encode()
        if status == 403:  # Envoy answers an audience that is not allowed with 403
            self.status = 403
            self.grpc_status = 7  # PERMISSION_DENIED
