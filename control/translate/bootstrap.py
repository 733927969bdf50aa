"""The translated resources as a static Envoy bootstrap (JSON-able dict).

Owns: the conversion from xDS-shaped `Resources` (RDS listeners, EDS
clusters) to an equivalent bootstrap that a real Envoy can run or validate
without a control server: each HCM's `rds` is replaced by the named
RouteConfiguration inline, and each EDS cluster becomes STATIC with its
ClusterLoadAssignment inline. Used by the conformance test (`envoy --mode
validate`) and by benchmarks that run Envoy with the same config as Pillion.

Mutual TLS resources name their certificates as SDS secrets over ADS
("default", "ROOTCA"), which a bootstrap without a control server cannot
fetch: the caller passes certificate files as `secrets`, they become
`static_resources.secrets`, and every SdsSecretConfig loses its sds_config
(an SdsSecretConfig with only a name refers to a static secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import json_format

from control.translate.resources import Resources

M = TypeVar("M", listener_pb2.Listener, cluster_pb2.Cluster)
# A secret's files: (certificate chain, private key) for a certificate, a CA bundle for roots.
SecretFiles = str | tuple[str, str]


def envoy_bootstrap(
    resources: Resources,
    admin_port: int,
    *,
    admin_address: str = "127.0.0.1",
    node_id: str = "pillion-bootstrap",
    node_cluster: str = "pillion",
    secrets: Mapping[str, SecretFiles] | None = None,
) -> dict[str, Any]:
    """A bootstrap dict (json.dumps-able) with the same listeners, routes and endpoints, all static.

    `secrets` gives the files of the SDS secrets the resources name, such as
    {"default": (cert_chain_pem_path, key_pem_path), "ROOTCA": ca_pem_path}.
    Raises ValueError if a listener names a route table that `resources`
    lacks, or if the resources use an SDS secret that `secrets` lacks.
    """
    routes = {table.name: table for table in resources.routes}
    assignments = {cla.cluster_name: cla for cla in resources.endpoints}
    used: set[str] = set()
    listeners = [_static_sds(_inline_routes(item, routes), used) for item in resources.listeners]
    clusters = [_static_sds(_static(item, assignments), used) for item in resources.clusters]
    static: dict[str, Any] = {
        "listeners": [_to_dict(listener) for listener in listeners],
        "clusters": [_to_dict(cluster) for cluster in clusters],
    }
    if used:
        missing = sorted(used - set(secrets or {}))
        if missing:
            raise ValueError(
                f"the resources use SDS secrets {', '.join(sorted(used))}, and a static "
                f"bootstrap cannot fetch them; pass secrets= with files for {', '.join(missing)}"
            )
        assert secrets is not None
        static["secrets"] = [_to_dict(_secret(name, secrets[name])) for name in sorted(used)]
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {
            "address": {"socket_address": {"address": admin_address, "port_value": admin_port}}
        },
        "static_resources": static,
    }


def _secret(name: str, files: SecretFiles) -> secret_pb2.Secret:
    if isinstance(files, str):
        return secret_pb2.Secret(
            name=name,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=files)
            ),
        )
    chain, key = files
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(filename=chain),
            private_key=base_pb2.DataSource(filename=key),
        ),
    )


def _static_sds(message: M, used: set[str]) -> M:
    """`message` (a Listener or Cluster, already a copy) with its SDS references made static."""
    sockets: list[base_pb2.TransportSocket]
    if isinstance(message, listener_pb2.Listener):
        sockets = [chain.transport_socket for chain in message.filter_chains]
    else:
        sockets = [message.transport_socket]
        sockets += [match.transport_socket for match in message.transport_socket_matches]
    for socket in sockets:
        context: tls_pb2.DownstreamTlsContext | tls_pb2.UpstreamTlsContext
        if socket.typed_config.Is(tls_pb2.DownstreamTlsContext.DESCRIPTOR):
            context = tls_pb2.DownstreamTlsContext()
        elif socket.typed_config.Is(tls_pb2.UpstreamTlsContext.DESCRIPTOR):
            context = tls_pb2.UpstreamTlsContext()
        else:
            continue
        socket.typed_config.Unpack(context)
        common: tls_pb2.CommonTlsContext = context.common_tls_context
        configs = [
            *common.tls_certificate_sds_secret_configs,
            common.validation_context_sds_secret_config,
            common.combined_validation_context.validation_context_sds_secret_config,
        ]
        for config in configs:
            if config.name:
                used.add(config.name)
                config.ClearField("sds_config")
        socket.typed_config.Pack(context)
    return message


def _to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _inline_routes(
    listener: listener_pb2.Listener, routes: Mapping[str, route_pb2.RouteConfiguration]
) -> listener_pb2.Listener:
    result = listener_pb2.Listener()
    result.CopyFrom(listener)
    for chain in result.filter_chains:
        for network_filter in chain.filters:
            if not network_filter.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                continue
            manager = hcm.HttpConnectionManager()
            network_filter.typed_config.Unpack(manager)
            if not manager.HasField("rds"):
                continue
            name = manager.rds.route_config_name
            if name not in routes:
                raise ValueError(
                    f"listener {listener.name} uses route table {name!r}, which is missing"
                )
            manager.route_config.CopyFrom(routes[name])  # replaces the rds oneof member
            network_filter.typed_config.Pack(manager)
    return result


def _static(
    cluster: cluster_pb2.Cluster, assignments: Mapping[str, endpoint_pb2.ClusterLoadAssignment]
) -> cluster_pb2.Cluster:
    result = cluster_pb2.Cluster()
    result.CopyFrom(cluster)
    if result.type != cluster_pb2.Cluster.EDS:
        return result
    result.type = cluster_pb2.Cluster.STATIC
    result.ClearField("eds_cluster_config")
    assignment = assignments.get(cluster.name) or endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster.name
    )
    result.load_assignment.CopyFrom(assignment)
    return result
