"""DestinationRule client TLS: each mode, subset and port-level precedence, problems."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from control.translate import ConfigError, load_text, translate
from tests.control.test_translate_security import (
    CLIENT,
    DNS,
    HOST,
    IDENTITIES,
    REGISTRY,
    URI,
    join,
    sans,
    upstream,
)


def rule(traffic_policy: str = "", subsets: str = "") -> str:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: ratings, namespace: shop}\nspec:\n  host: ratings.shop.svc.cluster.local\n"
    )
    if traffic_policy:
        text += "  trafficPolicy:\n" + _indent(traffic_policy, 4)
    if subsets:
        text += "  subsets:\n" + _indent(subsets, 2)
    return text


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.strip("\n").splitlines())


def clusters(*docs: str) -> dict[str, cluster_pb2.Cluster]:
    resources = translate(load_text(join(REGISTRY, *docs)), CLIENT)
    return {c.name: c for c in resources.clusters}


def tls_of(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext | None:
    assert len(cluster.transport_socket_matches) == 0
    if not cluster.HasField("transport_socket"):
        return None
    return upstream(cluster.transport_socket)


def name(port: int = 9080, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{HOST}"


def problems(*docs: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_text(join(REGISTRY, *docs), "dr.yaml")
    return [(p.field, p.message) for p in caught.value.problems]


# --- modes -----------------------------------------------------------------------------


def test_istio_mutual() -> None:
    subsets = "- name: v1\n  labels: {version: v1}\n"
    found = clusters(rule("tls: {mode: ISTIO_MUTUAL}", subsets))
    context = tls_of(found[name()])
    assert context is not None
    assert context.sni == f"outbound_.9080_._.{HOST}"
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["http/1.1"]
    (cert,) = common.tls_certificate_sds_secret_configs
    assert (cert.name, cert.sds_config.HasField("ads")) == ("default", True)
    roots = common.combined_validation_context.validation_context_sds_secret_config
    assert (roots.name, roots.sds_config.HasField("ads")) == ("ROOTCA", True)
    assert sans(common) == [(URI, "exact", identity) for identity in IDENTITIES]
    # the subset cluster: its own SNI, and only its endpoints' identities (ratings-a, ratings-c)
    v1 = tls_of(found[name(subset="v1")])
    assert v1 is not None and v1.sni == f"outbound_.9080_.v1_.{HOST}"
    assert sans(v1.common_tls_context) == [
        (URI, "exact", "spiffe://cluster.local/ns/shop/sa/default"),
        (URI, "exact", "spiffe://cluster.local/ns/shop/sa/ratings"),
    ]
    tcp = tls_of(found[name(3306)])
    assert tcp is not None and list(tcp.common_tls_context.alpn_protocols) == []
    # an explicit rule turns auto mTLS off: no socket-match metadata on endpoints
    resources = translate(load_text(join(REGISTRY, rule("tls: {mode: ISTIO_MUTUAL}"))), CLIENT)
    for assignment in resources.endpoints:
        for endpoint in assignment.endpoints[0].lb_endpoints:
            assert "envoy.transport_socket_match" not in endpoint.metadata.filter_metadata


def test_istio_mutual_identities_use_the_workload_namespace_and_trust_domain() -> None:
    inline = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: billing, namespace: pay}
spec:
  hosts: [billing.pay.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8443, name: tcp}]
  endpoints:
  - {address: 10.2.0.1, serviceAccount: billing}
  - {address: 10.2.0.2, serviceAccount: billing}
  - {address: 10.2.0.3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: billing, namespace: pay}
spec:
  host: billing.pay.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
---
kind: MeshConfig
spec: {trustDomain: corp.example}
"""
    resources = translate(load_text(inline), CLIENT)
    (cluster,) = resources.clusters
    context = tls_of(cluster)
    assert context is not None
    assert sans(context.common_tls_context) == [
        (URI, "exact", "spiffe://corp.example/ns/pay/sa/billing"),
        (URI, "exact", "spiffe://corp.example/ns/pay/sa/default"),
    ]


def test_istio_mutual_without_endpoints_accepts_the_trust_domain() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [legacy.internal]
  ports: [{number: 8443, name: tcp}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: passthrough, namespace: shop}
spec:
  host: legacy.internal
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"""
    (cluster,) = translate(load_text(text), CLIENT).clusters
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    context = tls_of(cluster)
    assert context is not None and context.sni == "outbound_.8443_._.legacy.internal"
    assert sans(context.common_tls_context) == [(URI, "prefix", "spiffe://cluster.local/")]


def test_identity_problems() -> None:
    text = join(
        REGISTRY.replace("serviceAccount: ratings-v2", "serviceAccount: ratings/v2"),
        "kind: MeshConfig\nspec: {trustDomain: Corp.Example}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_text(text)
    assert [(p.field, p.message) for p in caught.value.problems] == [
        (
            "spec.trustDomain",
            "trust domain 'Corp.Example' may contain only lowercase letters, digits, '.', '-' "
            "and '_'",
        ),
        (
            "spec.serviceAccount",
            "service account 'ratings/v2' may contain only letters, digits, '.', '-' and '_' "
            "(it names the workload's SPIFFE identity)",
        ),
    ]


def test_istio_mutual_with_custom_sni_and_names() -> None:
    tls = "tls: {mode: ISTIO_MUTUAL, sni: ratings.internal, subjectAltNames: [spiffe://cluster.local/ns/shop/sa/x]}"
    context = tls_of(clusters(rule(tls))[name()])
    assert context is not None and context.sni == "ratings.internal"
    assert sans(context.common_tls_context) == [
        (URI, "exact", "spiffe://cluster.local/ns/shop/sa/x")
    ]


def test_simple() -> None:
    tls = (
        "tls:\n  mode: SIMPLE\n  caCertificates: /etc/ca.pem\n"
        "  subjectAltNames: [ratings.example.com, spiffe://other.example/ns/a/sa/b]\n"
    )
    context = tls_of(clusters(rule(tls))[name()])
    assert context is not None
    assert context.sni == HOST
    common = context.common_tls_context
    assert common.WhichOneof("validation_context_type") == "validation_context"
    assert common.validation_context.trusted_ca.filename == "/etc/ca.pem"
    assert sans(common) == [
        (DNS, "exact", "ratings.example.com"),
        (URI, "exact", "spiffe://other.example/ns/a/sa/b"),
    ]
    assert list(common.alpn_protocols) == ["http/1.1"]
    assert len(common.tls_certificates) == 0 and len(common.tls_certificate_sds_secret_configs) == 0


def test_simple_with_sni_and_insecure_skip_verify() -> None:
    tls = "tls: {mode: SIMPLE, sni: api.example.com, insecureSkipVerify: true}"
    context = tls_of(clusters(rule(tls))[name()])
    assert context is not None and context.sni == "api.example.com"
    assert context.common_tls_context.WhichOneof("validation_context_type") is None


def test_mutual() -> None:
    tls = (
        "tls: {mode: MUTUAL, caCertificates: /ca.pem, clientCertificate: /cert.pem, "
        "privateKey: /key.pem}"
    )
    context = tls_of(clusters(rule(tls))[name(3306)])
    assert context is not None
    common = context.common_tls_context
    (cert,) = common.tls_certificates
    assert (cert.certificate_chain.filename, cert.private_key.filename) == ("/cert.pem", "/key.pem")
    assert common.validation_context.trusted_ca.filename == "/ca.pem"
    assert list(common.alpn_protocols) == []


def test_disable_turns_auto_mtls_off() -> None:
    found = clusters(rule("tls: {mode: DISABLE}"))
    assert tls_of(found[name()]) is None
    assert tls_of(found[name(3306)]) is None


def test_subset_and_port_level_precedence() -> None:
    policy = """\
tls: {mode: ISTIO_MUTUAL}
portLevelSettings:
- port: {number: 3306}
  tls: {mode: DISABLE}
"""
    subsets = """\
- name: v1
  labels: {version: v1}
  trafficPolicy:
    tls: {mode: SIMPLE, insecureSkipVerify: true}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    portLevelSettings:
    - port: {number: 9080}
      tls: {mode: SIMPLE, caCertificates: /v2.pem}
- name: v3
  labels: {version: v3}
"""
    found = clusters(rule(policy, subsets))

    def mode(cluster: str) -> str:
        context = tls_of(found[cluster])
        if context is None:
            return "DISABLE"
        if context.common_tls_context.tls_certificate_sds_secret_configs:
            return "ISTIO_MUTUAL"
        return "SIMPLE"

    assert {c: mode(c) for c in sorted(found)} == {
        name(3306): "DISABLE",  # rule port level beats the rule
        name(3306, "v1"): "SIMPLE",  # the subset beats the rule's port level
        name(3306, "v2"): "DISABLE",  # the subset's port level is for 9080 only
        name(3306, "v3"): "DISABLE",  # no subset policy: the rule's port level
        name(9080): "ISTIO_MUTUAL",
        name(9080, "v1"): "SIMPLE",
        name(9080, "v2"): "SIMPLE",  # the subset's port level
        name(9080, "v3"): "ISTIO_MUTUAL",
    }
    v2 = tls_of(found[name(9080, "v2")])
    assert (
        v2 is not None and v2.common_tls_context.validation_context.trusted_ca.filename == "/v2.pem"
    )


def test_load_balancer_still_accepted_beside_tls() -> None:
    found = clusters(rule("loadBalancer: {simple: ROUND_ROBIN}\ntls: {mode: ISTIO_MUTUAL}"))
    assert tls_of(found[name()]) is not None


# --- problems ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "tls: {mode: SIMPLE, credentialName: ratings-cert}",
            [("spec.trafficPolicy.tls.credentialName", "not supported yet")],
        ),
        (
            "tls: {mode: SIMPLE}",
            [
                (
                    "spec.trafficPolicy.tls.caCertificates",
                    "SIMPLE TLS needs caCertificates (no system trust store is used)",
                )
            ],
        ),
        (
            "tls: {mode: MUTUAL, caCertificates: /ca.pem, privateKey: /key.pem}",
            [
                (
                    "spec.trafficPolicy.tls.clientCertificate",
                    "MUTUAL TLS needs clientCertificate and privateKey",
                )
            ],
        ),
        (
            "tls: {mode: SIMPLE, caCertificates: /ca.pem, clientCertificate: /c.pem}",
            [("spec.trafficPolicy.tls.clientCertificate", "only used with mode MUTUAL")],
        ),
        (
            "tls: {mode: ISTIO_MUTUAL, caCertificates: /ca.pem}",
            [
                (
                    "spec.trafficPolicy.tls.caCertificates",
                    "ISTIO_MUTUAL uses the mesh's certificates; use mode MUTUAL for certificate files",
                )
            ],
        ),
        (
            "tls: {mode: ISTIO_MUTUAL, insecureSkipVerify: true}",
            [("spec.trafficPolicy.tls.insecureSkipVerify", "not allowed with ISTIO_MUTUAL")],
        ),
        (
            "tls: {sni: x.example}",
            [("spec.trafficPolicy.tls.sni", "only used with mode SIMPLE, MUTUAL or ISTIO_MUTUAL")],
        ),
        (
            "tls: {mode: SIMPLE, insecureSkipVerify: true, caCertificates: /ca.pem}",
            [
                (
                    "spec.trafficPolicy.tls.caCertificates",
                    "insecureSkipVerify turns this check off; set one or the other",
                )
            ],
        ),
        (
            "tls: {mode: TLS}",
            [
                (
                    "spec.trafficPolicy.tls.mode",
                    "'TLS' is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL",
                )
            ],
        ),
        (
            "portLevelSettings:\n- port: {number: 9080}\n  loadBalancer: {simple: PASSTHROUGH}",
            [("spec.trafficPolicy.portLevelSettings[0].loadBalancer.simple", "PASSTHROUGH is not supported yet")],
        ),
        (
            "portLevelSettings:\n- port: {number: 9090}\n  tls: {mode: ISTIO_MUTUAL}",
            [
                (
                    "spec.trafficPolicy.portLevelSettings[0].port.number",
                    f"host {HOST} has no port 9090",
                )
            ],
        ),
        (
            "portLevelSettings:\n- port: {number: 9080}\n  tls: {mode: DISABLE}\n"
            "- port: {number: 9080}\n  tls: {mode: ISTIO_MUTUAL}",
            [("spec.trafficPolicy.portLevelSettings[1].port.number", "port 9080 is listed twice")],
        ),
        (
            "portLevelSettings:\n- tls: {mode: DISABLE}",
            [("spec.trafficPolicy.portLevelSettings[0].port", "required field is missing")],
        ),
        (
            "tls: {mode: SIMPLE, caCertificates: /ca.pem, subjectAltNames: ['']}",
            [("spec.trafficPolicy.tls.subjectAltNames[0]", "must not be empty")],
        ),
    ],
)
def test_client_tls_problems(policy: str, expected: list[tuple[str, str]]) -> None:
    assert problems(rule(policy)) == expected


def test_subset_tls_problems_name_the_subset() -> None:
    subsets = "- name: v1\n  trafficPolicy:\n    tls: {mode: SIMPLE}\n"
    assert problems(rule(subsets=subsets)) == [
        (
            "spec.subsets[0].trafficPolicy.tls.caCertificates",
            "SIMPLE TLS needs caCertificates (no system trust store is used)",
        )
    ]
