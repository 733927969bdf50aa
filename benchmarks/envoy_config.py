"""Envoy's bootstrap for the macro benchmark: translated from the same YAML, or hand-made.

Two sources, tried in this order by ``build_bootstrap(mode="auto")``:

- ``translate``: ``control.translate`` turns the benchmark's Istio YAML into xDS
  resources for the node (namespace ``default``, labels ``app=bench``), and
  ``control.translate.bootstrap.envoy_bootstrap`` wraps them into a static bootstrap.
  This is the config Pillion compiles too, so it is the fair comparison.
- ``fallback``: the equivalent written by hand below, kept for when the translator is
  missing or broken. One HTTP listener (HCM with the router filter only, the service's
  host routed to one STATIC cluster) and one ``tcp_proxy`` listener, both on 127.0.0.1,
  with Istio's effectively-unlimited circuit breakers. It carries none of Istio's
  telemetry filters, so it is the cheapest Envoy can be for this job.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from benchmarks.config import LABELS, NAMESPACE, SERVICE_HOST, BenchPorts

UNLIMITED = 4294967295

HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
DOWNSTREAM_CONNECTIONS_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)


class BootstrapUnavailable(Exception):
    """The translator could not produce a bootstrap; ``str()`` says why."""


def cluster_name(port: int) -> str:
    """Istio's outbound cluster name for the service port."""
    return f"outbound|{port}||{SERVICE_HOST}"


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, upstream_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "circuit_breakers": {"thresholds": [{
            "max_connections": UNLIMITED,
            "max_pending_requests": UNLIMITED,
            "max_requests": UNLIMITED,
            "max_retries": UNLIMITED,
        }]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(upstream_port)}}]}],
        },
    }


def fallback_bootstrap(ports: BenchPorts, admin_port: int) -> dict[str, Any]:
    """The hand-made equivalent of what the translator should produce for the bench YAML."""
    http_cluster = cluster_name(ports.http_listen)
    tcp_cluster = cluster_name(ports.tcp_listen)
    route_config = {
        "name": str(ports.http_listen),
        "virtual_hosts": [{
            "name": f"{SERVICE_HOST}:{ports.http_listen}",
            "domains": [SERVICE_HOST, f"{SERVICE_HOST}:{ports.http_listen}"],
            "routes": [{
                "match": {"prefix": "/"},
                "route": {"cluster": http_cluster, "timeout": "0s"},
            }],
        }],
    }
    http_listener = {
        "name": f"127.0.0.1_{ports.http_listen}",
        "address": _address(ports.http_listen),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": f"outbound_127.0.0.1_{ports.http_listen}",
                "codec_type": "AUTO",
                "route_config": route_config,
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER_TYPE},
                }],
            },
        }]}],
    }
    tcp_listener = {
        "name": f"127.0.0.1_{ports.tcp_listen}",
        "address": _address(ports.tcp_listen),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": TCP_PROXY_TYPE,
                "stat_prefix": tcp_cluster,
                "cluster": tcp_cluster,
            },
        }]}],
    }
    return {
        "node": {
            "id": f"sidecar~127.0.0.1~bench.{NAMESPACE}~{NAMESPACE}.svc.cluster.local",
            "cluster": f"bench.{NAMESPACE}",
            "metadata": {"NAMESPACE": NAMESPACE, "LABELS": dict(LABELS)},
        },
        "admin": {"address": _address(admin_port)},
        "static_resources": {
            "listeners": [http_listener, tcp_listener],
            "clusters": [
                _cluster(http_cluster, ports.http_upstream),
                _cluster(tcp_cluster, ports.tcp_upstream),
            ],
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": DOWNSTREAM_CONNECTIONS_TYPE,
                "max_active_downstream_connections": 2147483647,
            },
        }]},
    }


def translated_bootstrap(config_dir: Path, admin_port: int) -> dict[str, Any]:
    """Bootstrap from ``control.translate``; raises BootstrapUnavailable if it can't."""
    # Looked up at run time: the translator is being written while this runs.
    try:
        translator = importlib.import_module("control.translate")
        bootstrapper = importlib.import_module("control.translate.bootstrap")
        node_info = translator.NodeInfo
        load_dir, translate = translator.load_dir, translator.translate
        envoy_bootstrap = bootstrapper.envoy_bootstrap
    except (ImportError, AttributeError) as exc:
        raise BootstrapUnavailable(f"control.translate is not ready: {exc}") from exc
    try:
        cfg = load_dir(config_dir)
        resources = translate(cfg, node_info(namespace=NAMESPACE, labels=dict(LABELS)))
        bootstrap = envoy_bootstrap(resources, admin_port)
    except Exception as exc:  # the translator is someone else's code under construction
        raise BootstrapUnavailable(f"translation failed: {type(exc).__name__}: {exc}") from exc
    if hasattr(bootstrap, "DESCRIPTOR"):  # a protobuf message rather than a dict
        from google.protobuf.json_format import MessageToDict

        bootstrap = MessageToDict(bootstrap, preserving_proto_field_name=True)
    if not isinstance(bootstrap, dict):
        raise BootstrapUnavailable(f"envoy_bootstrap returned {type(bootstrap).__name__}")
    return bootstrap


def build_bootstrap(
    mode: str, config_dir: Path, ports: BenchPorts, admin_port: int
) -> tuple[dict[str, Any], str]:
    """Return ``(bootstrap, source)``; ``mode`` is ``auto``, ``translate`` or ``fallback``.

    ``source`` says which one was used and, for ``auto``, why the translator was skipped.
    """
    if mode == "fallback":
        return fallback_bootstrap(ports, admin_port), "fallback"
    try:
        return translated_bootstrap(config_dir, admin_port), "translate"
    except BootstrapUnavailable as exc:
        if mode == "translate":
            raise
        return fallback_bootstrap(ports, admin_port), f"fallback ({exc})"
