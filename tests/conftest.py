"""Shared test setup: every async test runs on uvloop, like the proxy itself."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import uvloop

# The suite starts processes (fork and exec) while gRPC threads of earlier tests still run. gRPC's
# fork handlers, registered unless this is off, run in every such child before its exec and once
# left a sidecar stuck there (never started, "not ready after 15s"). Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
