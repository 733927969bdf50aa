"""proxy.jwks_fetch: remote JWKS fetched in the background, refreshed, last good set kept."""

from __future__ import annotations

import asyncio

import pytest

from proxy import jwks_fetch
from proxy.jwks_fetch import FetchError, JwksFetcher, http_get
from proxy.jwt import RemoteJwks
from tests.helpers.jwks import Issuer, JwksServer


async def wait(fetcher: JwksFetcher, pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not pred():
            await fetcher.changed.wait()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwks_fetch, "RETRY_FIRST", 0.05)


async def test_fetch_refresh_and_keep_the_last_good_set() -> None:
    idp, rotated = Issuer(kid="old"), Issuer(kid="new")
    async with JwksServer(idp.jwks()) as server:
        fetcher = JwksFetcher(asyncio.get_running_loop())
        assert fetcher.keys(server.uri) is None  # nothing until the first fetch: tokens fail
        fetcher.watch({server.uri: RemoteJwks(server.uri, 1.0, 0.1)})
        await wait(fetcher, lambda: fetcher.keys(server.uri) is not None)
        assert list(fetcher.keys(server.uri).by_kid) == ["old"]  # type: ignore[union-attr]
        server.body = rotated.jwks()  # the provider rotates: picked up at the next refresh
        await wait(fetcher, lambda: "new" in fetcher.keys(server.uri).by_kid)  # type: ignore[union-attr]
        good = fetcher.keys(server.uri)
        server.status = 500  # the provider breaks: the last good keys stay
        await wait(fetcher, lambda: fetcher.failed.get(server.uri, 0) >= 2)
        assert fetcher.keys(server.uri) is good and "HTTP status 500" in fetcher.errors[server.uri]
        server.status, server.body = 200, "{not json"
        await wait(fetcher, lambda: "invalid JWKS JSON" in fetcher.errors.get(server.uri, ""))
        assert fetcher.keys(server.uri) is good
        assert fetcher.status()[server.uri]["keys"] == 1
        fetcher.watch({})  # no longer named by the config: stop and forget
        assert fetcher.keys(server.uri) is None and fetcher.status() == {}
        fetcher.close()


async def test_a_failing_first_fetch_is_retried() -> None:
    idp = Issuer()
    async with JwksServer(idp.jwks(), status=503) as server:
        fetcher = JwksFetcher(asyncio.get_running_loop())
        fetcher.watch({server.uri: RemoteJwks(server.uri, 1.0, 600.0)})
        await wait(fetcher, lambda: fetcher.failed.get(server.uri, 0) >= 1)
        assert fetcher.keys(server.uri) is None
        server.status = 200
        await wait(fetcher, lambda: fetcher.keys(server.uri) is not None)
        fetcher.close()


async def test_http_get_errors_are_fetch_errors() -> None:
    with pytest.raises(FetchError):
        await http_get("http://127.0.0.1:1/jwks", 1.0)  # nothing listens on port 1
    never = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = never.sockets[0].getsockname()[1]
    with pytest.raises(FetchError, match=r"no response in 0\.2s"):
        await http_get(f"http://127.0.0.1:{port}/", 0.2)
    never.close()
