"""Remote JWKS (RequestAuthentication jwksUri): fetched in the background, cached, refreshed.

Owns: one asyncio task per JWKS URI the current snapshot's jwt_authn
providers name, the HTTP GET that fetches it (http:// or https:// with the
system's roots), and the last good key set per URI, which
``jwt.authenticate`` looks up through ``keys(uri)`` (a dict probe).

Rules: a key set is used from its first successful fetch on; until then
tokens for the provider fail ("Jwks remote fetch is failed", 401). It is
refreshed every ``cache_duration``; a failed fetch (network, status, bad
JSON, no usable key) keeps the last good set and is retried with backoff
(1 s doubling to 30 s, never later than the refresh). A snapshot swap keeps
the sets of URIs still named and stops fetching the others. One fetcher per
worker (each worker process fetches for itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httptools

from proxy.jwt import JwksError, KeySet, RemoteJwks
from proxy.model import Listener, Snapshot

log = logging.getLogger("pillion.jwks")

MAX_JWKS_BYTES = 1 << 20
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class FetchError(Exception):
    """A JWKS fetch that gave no usable key set."""


def _listeners(listeners: tuple[Listener, ...]) -> Iterator[Listener]:
    for listener in listeners:
        yield listener
        capture = getattr(listener, "capture", None)  # interception: each chain is a listener
        if capture is not None:
            yield from _listeners(tuple(capture.by_port.values()))
            if capture.default is not None:
                yield from _listeners((capture.default,))


def remote_jwks_of(snapshot: Snapshot) -> dict[str, RemoteJwks]:
    """Every remote JWKS the snapshot's HTTP listeners verify tokens with, by URI."""
    found: dict[str, RemoteJwks] = {}
    for listener in _listeners(snapshot.listeners):
        policy = listener.http.policy if listener.http is not None else None
        if policy is None or policy.jwt is None:
            continue
        for provider in policy.jwt.providers.values():
            if provider.remote is not None:
                found.setdefault(provider.remote.uri, provider.remote)
    return found


class _Response:
    """httptools callbacks for one response."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_JWKS_BYTES:
            raise FetchError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")

    def on_message_complete(self) -> None:
        self.complete = True


async def http_get(uri: str, timeout: float) -> bytes:
    """The body of a 200 response to GET `uri` (HTTP/1.1, connection: close). Raises FetchError."""
    parts = urlsplit(uri)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context = ssl.create_default_context() if https else None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            try:
                writer.write(
                    f"GET {target} HTTP/1.1\r\nhost: {parts.netloc}\r\naccept: application/json\r\n"
                    "user-agent: pillion-jwks\r\nconnection: close\r\n\r\n".encode()
                )
                response = _Response()
                parser = httptools.HttpResponseParser(response)
                while not response.complete:
                    data = await reader.read(65536)
                    if not data:
                        parser.feed_data(b"")  # a close-delimited body ends here
                        break
                    parser.feed_data(data)
                status = parser.get_status_code()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        raise FetchError(f"no response in {timeout:g}s") from None
    except (OSError, ssl.SSLError, httptools.HttpParserError) as exc:
        raise FetchError(str(exc) or type(exc).__name__) from None
    except httptools.HttpParserCallbackError as exc:
        raise FetchError(str(exc.__context__ or exc)) from None
    if status != 200:
        raise FetchError(f"HTTP status {status}")
    return bytes(response.body)


class JwksFetcher:
    """The remote key sets of one worker, kept fresh by background tasks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._sets: dict[str, KeySet] = {}
        self._specs: dict[str, RemoteJwks] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.fetched: dict[str, int] = {}  # uri -> successful fetches
        self.failed: dict[str, int] = {}  # uri -> failed fetches
        self.errors: dict[str, str] = {}  # uri -> last failure
        self.changed = asyncio.Event()  # set after every fetch attempt (tests wait on it)

    def keys(self, uri: str) -> KeySet | None:
        return self._sets.get(uri)

    def update(self, snapshot: Snapshot) -> None:
        """Fetch what `snapshot` names; stop fetching (and forget) what it no longer names."""
        self.watch(remote_jwks_of(snapshot))

    def watch(self, wanted: dict[str, RemoteJwks]) -> None:
        for uri in list(self._tasks):
            if uri not in wanted:
                self._tasks.pop(uri).cancel()
                self._specs.pop(uri, None)
                self._sets.pop(uri, None)
        for uri, spec in wanted.items():
            if self._specs.get(uri) == spec and uri in self._tasks:
                continue
            old = self._tasks.pop(uri, None)
            if old is not None:
                old.cancel()
            self._specs[uri] = spec
            self._tasks[uri] = self.loop.create_task(self._run(spec), name=f"jwks {uri}")

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def status(self) -> dict[str, Any]:
        return {uri: {"keys": len(s.keys) if (s := self._sets.get(uri)) else 0,
                      "fetched": self.fetched.get(uri, 0), "failed": self.failed.get(uri, 0),
                      "last_error": self.errors.get(uri, "")} for uri in self._specs}

    async def _run(self, spec: RemoteJwks) -> None:
        retry = RETRY_FIRST
        while True:
            try:
                keys = await self.fetch(spec)
            except FetchError as exc:
                self.failed[spec.uri] = self.failed.get(spec.uri, 0) + 1
                self.errors[spec.uri] = str(exc)
                log.warning("JWKS %s: fetch failed (%s); %s", spec.uri, exc,
                            "keeping the last good keys" if spec.uri in self._sets else "tokens fail until it succeeds")
                delay = min(retry, spec.cache_duration)
                retry = min(retry * 2, RETRY_MAX)
            else:
                self._sets[spec.uri] = keys
                self.fetched[spec.uri] = self.fetched.get(spec.uri, 0) + 1
                self.errors.pop(spec.uri, None)
                delay, retry = spec.cache_duration, RETRY_FIRST
            self.changed.set()
            self.changed = asyncio.Event()
            await asyncio.sleep(delay)

    async def fetch(self, spec: RemoteJwks) -> KeySet:
        body = await http_get(spec.uri, spec.timeout)
        try:
            return KeySet(body.decode("utf-8"))
        except (JwksError, UnicodeDecodeError) as exc:
            raise FetchError(str(exc)) from None
