"""gRPC through the proxy: a real grpcio server behind it, a real grpcio client in front.

The proxy is configured from standalone Istio YAML: a ServiceEntry port with
``protocol: GRPC`` (HTTP/2 to the upstream) and a Sidecar egress listener for
it. The server's methods take and return raw bytes (no serializers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.config import service_entry, sidecar, write
from tests.helpers.net import free_port, standalone_proxy

HOST = "greeter.default.svc.cluster.local"
OTHER = "nowhere.default.svc.cluster.local"


class App:
    """The upstream gRPC application."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.never = asyncio.Event()

    def _count(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._count("Echo")
        md = dict(context.invocation_metadata() or ())
        context.set_trailing_metadata((("x-trail", "t-" + str(md.get("x-tag", ""))),))
        return b"echo:" + request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._count("Fail")
        context.set_trailing_metadata((("x-why", "asked"),))
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        return b""

    async def flaky(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self._count("Flaky") == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok"

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._count("Hang")
        await self.never.wait()  # until the call is cancelled
        return b""

    async def chat(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self._count("Chat")
        async for msg in requests:
            yield b"re:" + msg

    async def count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("test.Svc", {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
        })


def grpc_yaml(listen: int, app_port: int, extra: str = "") -> str:
    docs = [service_entry("greeter", HOST, [("grpc", listen, "GRPC")], [("127.0.0.1", {"grpc": app_port}, {})]),
            sidecar([(listen, "GRPC")])]
    if extra:
        docs.append(extra)
    return "---\n".join(docs)


@contextlib.asynccontextmanager
async def grpc_mesh(tmp_path: Path, extra: str = "", authority: str = HOST) -> AsyncIterator[tuple[App, grpc.aio.Channel]]:
    app = App()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((app.handler(),))
    app_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        listen = free_port()
        write(tmp_path, grpc_yaml(listen, app_port, extra))
        async with standalone_proxy(tmp_path, drain_seconds=0.5):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{listen}", options=[
                ("grpc.default_authority", authority), ("grpc.enable_retries", 0)])
            try:
                yield app, channel
            finally:
                await channel.close()
    finally:
        await server.stop(0)


def unary(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return ch.unary_unary(f"/test.Svc/{method}")


async def test_unary_call_with_metadata_and_trailers(tmp_path):
    async with grpc_mesh(tmp_path) as (app, ch):
        call = unary(ch, "Echo")(b"hi", metadata=(("x-tag", "7"),), timeout=10)
        assert await call == b"echo:hi"
        assert await call.code() == grpc.StatusCode.OK
        assert ("x-trail", "t-7") in tuple(await call.trailing_metadata())
        assert app.calls["Echo"] == 1


async def test_status_codes_and_trailing_metadata_are_preserved(tmp_path):
    async with grpc_mesh(tmp_path) as (_, ch):
        call = unary(ch, "Fail")(b"widget", timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == "no such thing: widget"
        assert ("x-why", "asked") in tuple(e.value.trailing_metadata())


async def test_streaming_calls(tmp_path):
    async with grpc_mesh(tmp_path) as (_, ch):
        got = [m async for m in ch.unary_stream("/test.Svc/Count")(b"50", timeout=10)]
        assert got == [b"%d" % i for i in range(50)]

        async def msgs() -> AsyncIterator[bytes]:
            for i in range(20):
                yield b"m%d" % i
        got = [m async for m in ch.stream_stream("/test.Svc/Chat")(msgs(), timeout=10)]
        assert got == [b"re:m%d" % i for i in range(20)]


async def test_many_concurrent_calls(tmp_path):
    async with grpc_mesh(tmp_path) as (app, ch):
        echo = unary(ch, "Echo")
        got = await asyncio.gather(*(echo(b"%d" % i, timeout=20) for i in range(300)))
        assert got == [b"echo:%d" % i for i in range(300)]
        assert app.calls["Echo"] == 300


async def test_no_route_is_unimplemented_trailers_only(tmp_path):
    async with grpc_mesh(tmp_path, authority=OTHER) as (app, ch):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unary(ch, "Echo")(b"x", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert ("x-pillion-flags", "NR") in tuple(e.value.trailing_metadata())
        assert app.calls == {}


async def test_grpc_timeout_is_a_deadline_exceeded(tmp_path):
    async with grpc_mesh(tmp_path) as (app, ch):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unary(ch, "Hang")(b"x", timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert app.calls["Hang"] == 1


async def test_retry_on_unavailable(tmp_path):
    vs = ("apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
          "metadata: {name: greeter, namespace: default}\n"
          f"spec:\n  hosts: [{HOST}]\n  http:\n  - route: [{{destination: {{host: {HOST}}}}}]\n"
          "    retries: {attempts: 2, retryOn: unavailable}\n")
    async with grpc_mesh(tmp_path, extra=vs) as (app, ch):
        assert await unary(ch, "Flaky")(b"x", timeout=10) == b"ok"
        assert app.calls["Flaky"] == 2
