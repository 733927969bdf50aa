"""Mutual TLS: the PeerAuthentication mode of a workload's port, and the TLS pieces of xDS.

Owns: which PeerAuthentication applies to a workload (and the problem when
that is ambiguous), the inbound filter chains for each mode, the upstream TLS
transport sockets for DestinationRule `tls` and for auto mTLS, and the names
the proxy and Envoy share for them (SDS secrets "default" and "ROOTCA", as
Istio names them). It builds no listener or cluster itself; `listeners.py`
and `clusters.py` ask it for the pieces.

Rules (Istio's):
- A workload's mode on port P: the PeerAuthentication in its namespace whose
  selector matches its labels (its portLevelMtls entry for P, then its mtls),
  then its namespace's PeerAuthentication without selector, then the one
  without selector in the root namespace (mesh-wide). UNSET defers to the
  next level; when every level defers, the mode is PERMISSIVE. Two
  PeerAuthentications selecting one workload is a problem (Istio would pick
  the oldest; Pillion has no creation times and refuses to guess).
- P is the port the peer connects to: the Sidecar ingress port number.
- Inbound: DISABLE is one plaintext chain; STRICT one "tls" chain that
  requires a client certificate from the mesh (URI SAN in the trust domain);
  PERMISSIVE both, told apart by the TLS inspector.
- ALPN (`alpn`): inbound mesh TLS on HTTP ports offers h2 and http/1.1; a
  cluster's TLS offers h2 when it speaks HTTP/2 (GRPC, HTTP2, GRPC-WEB
  ports, h2UpgradePolicy UPGRADE), http/1.1 otherwise; TCP offers none.
- Outbound ISTIO_MUTUAL: SNI "outbound_.PORT_.SUBSET_.HOST", the mesh
  certificate, and the SPIFFE ids of the cluster's endpoints as accepted SANs
  (any id of the trust domain when the cluster has no endpoints).
- Auto mTLS (no DestinationRule tls): endpoints labelled
  security.istio.io/tlsMode=istio are dialled with ISTIO_MUTUAL, the others in
  plaintext, by transport_socket_matches on endpoint metadata. An endpoint
  whose own PeerAuthentication mode for its port is DISABLE gets plaintext.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from control.translate.errors import Problem
from control.translate.model import (
    ClientTls,
    ConfigSet,
    MtlsMode,
    NodeInfo,
    PeerAuthentication,
    Protocol,
    TlsMode,
    labels_match,
)
from control.translate.protos import ads, packed

CERT_SECRET = "default"  # the workload's certificate and key
ROOTS_SECRET = "ROOTCA"  # the mesh's root certificates
TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER_SOCKET = "envoy.transport_sockets.raw_buffer"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
SOCKET_MATCH_KEY = "envoy.transport_socket_match"
TLS_CHAIN = "tls"
PLAINTEXT_CHAIN = "plaintext"

_SAN = common_pb2.SubjectAltNameMatcher


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The workload identity Istio puts in the URI SAN (service account "default" if unset)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account or 'default'}"


# --- which mode ---------------------------------------------------------------


class PeerPolicies:
    """The PeerAuthentications of a ConfigSet, indexed for mode lookups."""

    def __init__(self, config: ConfigSet) -> None:
        self._root = config.mesh.root_namespace
        self._selecting: dict[str, list[PeerAuthentication]] = {}
        self._wide: dict[str, PeerAuthentication] = {}  # namespace -> the one without selector
        for policy in config.peer_authentications:  # sorted by (namespace, name)
            if policy.selector is None:
                self._wide.setdefault(policy.meta.namespace, policy)
            else:
                self._selecting.setdefault(policy.meta.namespace, []).append(policy)

    def selecting(self, namespace: str, labels: Mapping[str, str]) -> list[PeerAuthentication]:
        """The workload-level policies that select a workload, sorted by name."""
        return [
            policy
            for policy in self._selecting.get(namespace, ())
            if policy.selector is not None and labels_match(policy.selector, labels)
        ]

    def mode(self, namespace: str, labels: Mapping[str, str], port: int) -> MtlsMode:
        """The effective mode of a workload's port (the first selecting policy if several do)."""
        selecting = self.selecting(namespace, labels)
        return self._resolve(selecting[0] if selecting else None, namespace, port)

    def for_node(self, node: NodeInfo, problems: list[Problem]) -> Callable[[int], MtlsMode]:
        """The node's mode per ingress port; reports several selecting policies as problems."""
        selecting = self.selecting(node.namespace, node.labels)
        for extra in selecting[1:]:
            labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
            who = node.name or labels or "(no labels)"
            problems.append(
                Problem(
                    extra.meta.file,
                    extra.meta.resource,
                    "spec.selector",
                    f"several PeerAuthentications select this workload ({who} in "
                    f"{node.namespace}): {selecting[0].meta.resource} and this one; "
                    "Istio would pick the oldest, Pillion refuses to guess",
                )
            )
        policy = selecting[0] if selecting else None
        return lambda port: self._resolve(policy, node.namespace, port)

    def _resolve(self, policy: PeerAuthentication | None, namespace: str, port: int) -> MtlsMode:
        levels: list[MtlsMode] = []
        if policy is not None:
            levels += [policy.port_modes.get(port, MtlsMode.UNSET), policy.mode]
        for owner in (namespace, self._root):
            wide = self._wide.get(owner)
            if wide is not None:
                levels.append(wide.mode)
        return next((mode for mode in levels if mode is not MtlsMode.UNSET), MtlsMode.PERMISSIVE)


# --- inbound --------------------------------------------------------------------


def alpn(protocol: Protocol, *, h2: bool = False, server: bool = False, downstream: bool = False) -> list[str]:
    """The ALPN protocols of a mesh TLS context: none for TCP; a server (inbound) offers
    "h2" and "http/1.1" on HTTP ports; a client offers "h2" to a cluster that speaks
    HTTP/2, "http/1.1" otherwise, and both when the cluster uses the downstream protocol."""
    if protocol is not Protocol.HTTP:
        return []
    if server or downstream:
        return ["h2", "http/1.1"]
    return ["h2"] if h2 else ["http/1.1"]


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads())


def _uri(*, exact: str = "", prefix: str = "") -> common_pb2.SubjectAltNameMatcher:
    matcher = (
        string_pb2.StringMatcher(prefix=prefix) if prefix else string_pb2.StringMatcher(exact=exact)
    )
    return _SAN(san_type=_SAN.URI, matcher=matcher)


def _mesh_context(
    alpn_protocols: Sequence[str], sans: Iterable[common_pb2.SubjectAltNameMatcher]
) -> tls_pb2.CommonTlsContext:
    """The mesh certificate (SDS "default"), peers checked against SDS "ROOTCA" and `sans`."""
    combined = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(
            match_typed_subject_alt_names=list(sans)
        ),
        validation_context_sds_secret_config=_sds(ROOTS_SECRET),
    )
    return tls_pb2.CommonTlsContext(
        alpn_protocols=alpn_protocols,
        tls_certificate_sds_secret_configs=[_sds(CERT_SECRET)],
        combined_validation_context=combined,
    )


def tls_inspector() -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(
        name=TLS_INSPECTOR, typed_config=packed(tls_inspector_pb2.TlsInspector())
    )


def inbound_chains(
    mode: MtlsMode,
    network_filter: listener_components_pb2.Filter | Sequence[listener_components_pb2.Filter],
    protocol: Protocol,
    trust_domain: str,
) -> tuple[list[listener_components_pb2.ListenerFilter], list[listener_components_pb2.FilterChain]]:
    """(listener filters, filter chains) of an inbound listener in `mode` (UNSET means PERMISSIVE).

    `network_filter`: the chain's network filter, or its filters in order (a network
    RBAC filter before tcp_proxy)."""
    filters = (
        [network_filter]
        if isinstance(network_filter, listener_components_pb2.Filter)
        else list(network_filter)
    )
    if mode is MtlsMode.DISABLE:
        return [], [listener_components_pb2.FilterChain(filters=filters)]
    server = tls_pb2.DownstreamTlsContext(
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
        common_tls_context=_mesh_context(
            alpn(protocol, server=True), [_uri(prefix=f"spiffe://{trust_domain}/")]
        ),
    )
    chains = [
        listener_components_pb2.FilterChain(
            name=TLS_CHAIN,
            filter_chain_match=listener_components_pb2.FilterChainMatch(transport_protocol="tls"),
            transport_socket=base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=packed(server)),
            filters=filters,
        )
    ]
    if mode is not MtlsMode.STRICT:
        chains.append(
            listener_components_pb2.FilterChain(
                name=PLAINTEXT_CHAIN,
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    transport_protocol="raw_buffer"
                ),
                filters=filters,
            )
        )
    return [tls_inspector()], chains


# --- outbound -------------------------------------------------------------------


def istio_mutual_sni(port: int, subset: str, host: str) -> str:
    return f"outbound_.{port}_.{subset}_.{host}"


def _upstream(context: tls_pb2.UpstreamTlsContext) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=packed(context))


def istio_mutual_socket(
    sni: str, identities: Iterable[str], alpn_protocols: Sequence[str], trust_domain: str
) -> base_pb2.TransportSocket:
    """Mutual TLS with the mesh certificates; the server must present one of `identities`.

    Without identities (a cluster with no endpoints, or an ORIGINAL_DST one) any
    identity of the trust domain is accepted, as the inbound side does.
    """
    sans = [_uri(exact=identity) for identity in sorted(set(identities))]
    if not sans:
        sans = [_uri(prefix=f"spiffe://{trust_domain}/")]
    return _upstream(
        tls_pb2.UpstreamTlsContext(sni=sni, common_tls_context=_mesh_context(alpn_protocols, sans))
    )


def _named_sans(names: Iterable[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        _uri(exact=name)
        if name.startswith("spiffe://")
        else _SAN(san_type=_SAN.DNS, matcher=string_pb2.StringMatcher(exact=name))
        for name in names
    ]


def client_socket(
    tls: ClientTls,
    *,
    port: int,
    subset: str,
    host: str,
    alpn_protocols: Sequence[str],
    identities: Iterable[str],
    trust_domain: str,
) -> base_pb2.TransportSocket | None:
    """The transport socket for a DestinationRule `tls` (None for DISABLE).

    `identities` are the SPIFFE ids ISTIO_MUTUAL accepts unless the rule
    lists subjectAltNames; the loader has already refused inconsistent
    settings (SIMPLE without caCertificates, MUTUAL without a key, ...).
    """
    if tls.mode is TlsMode.DISABLE:
        return None
    if tls.mode is TlsMode.ISTIO_MUTUAL:
        sni = tls.sni or istio_mutual_sni(port, subset, host)
        if not tls.subject_alt_names:
            return istio_mutual_socket(sni, identities, alpn_protocols, trust_domain)
        context = _mesh_context(alpn_protocols, _named_sans(tls.subject_alt_names))
        return _upstream(tls_pb2.UpstreamTlsContext(sni=sni, common_tls_context=context))
    common = tls_pb2.CommonTlsContext(alpn_protocols=alpn_protocols)
    if not tls.insecure_skip_verify:
        validation = common_pb2.CertificateValidationContext(
            match_typed_subject_alt_names=_named_sans(tls.subject_alt_names)
        )
        if tls.ca_certificates:
            validation.trusted_ca.filename = tls.ca_certificates
        common.validation_context.CopyFrom(validation)
    if tls.mode is TlsMode.MUTUAL:
        common.tls_certificates.append(
            common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(filename=tls.client_certificate),
                private_key=base_pb2.DataSource(filename=tls.private_key),
            )
        )
    return _upstream(tls_pb2.UpstreamTlsContext(sni=tls.sni or host, common_tls_context=common))


def _struct(values: dict[str, str]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(values)
    return value


# Built once and only ever copied from (Struct.update is slow, and clusters have many endpoints).
_TLS_MODE_ISTIO = _struct({"tlsMode": "istio"})
_ANYTHING = _struct({})
_RAW_BUFFER = base_pb2.TransportSocket(
    name=RAW_BUFFER_SOCKET, typed_config=packed(raw_buffer_pb2.RawBuffer())
)


def auto_mtls_matches(
    mutual: base_pb2.TransportSocket,
) -> list[cluster_pb2.Cluster.TransportSocketMatch]:
    """Mutual TLS for endpoints whose socket-match metadata says tlsMode=istio, else plaintext."""
    return [
        cluster_pb2.Cluster.TransportSocketMatch(
            name="tlsMode-istio", match=_TLS_MODE_ISTIO, transport_socket=mutual
        ),
        cluster_pb2.Cluster.TransportSocketMatch(
            name="tlsMode-disabled", match=_ANYTHING, transport_socket=_RAW_BUFFER
        ),
    ]


def mark_for_auto_mtls(metadata: base_pb2.Metadata) -> None:
    """Add the endpoint metadata (under SOCKET_MATCH_KEY) that selects the tlsMode-istio socket."""
    metadata.filter_metadata[SOCKET_MATCH_KEY].CopyFrom(_TLS_MODE_ISTIO)
