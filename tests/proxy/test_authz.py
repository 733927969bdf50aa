"""proxy.authz: the RBAC evaluator, and Istio YAML -> translate -> compile -> the same decisions Istio makes."""

from __future__ import annotations

import pickle

import pytest

from control.translate import NodeInfo, load_text, translate
from proxy import authz
from proxy.authz import Attrs, evaluate, normalize_path
from proxy.compile import XdsResources, compile_snapshot
from proxy.model import Listener, Snapshot

NODE = NodeInfo(namespace="shop", labels={"app": "ratings"})
SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: ratings, namespace: shop}
spec:
  workloadSelector: {labels: {app: ratings}}
  ingress:
  - port: {number: 9080, name: http}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 3306, name: tcp-db}
    defaultEndpoint: 127.0.0.1:3307
"""
PP = "spiffe://cluster.local/ns/shop/sa/productpage"


def snapshot(*docs: str, node: NodeInfo = NODE) -> Snapshot:
    res = translate(load_text("---\n".join([SIDECAR, *docs])), node)
    return compile_snapshot(XdsResources(res.listeners, res.routes, res.clusters, res.endpoints))


def listener(snap: Snapshot, port: int) -> Listener:
    return next(ls for ls in snap.listeners if ls.port == port)


def policy(action: str, rules: str, name: str = "p", namespace: str = "shop", selector: str = "") -> str:
    sel = f"  selector: {{matchLabels: {{{selector}}}}}\n" if selector else ""
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{sel}  action: {action}\n"
            f"  rules:\n{rules}")


def http(*docs: str) -> authz.HttpPolicy:
    found = listener(snapshot(*docs), 9080).http
    assert found is not None and found.policy is not None
    return found.policy


def request(method: str = "GET", path: str = "/", peer: str = "", ip: str = "10.0.0.5", port: int = 9080,
            headers: dict[str, str] | None = None, host: str = "ratings", metadata: dict | None = None) -> Attrs:
    hdrs = {k.lower().encode(): v.encode() for k, v in (headers or {}).items()}
    hdrs.setdefault(b"host", host.encode())
    return Attrs(method=method.encode(), path=path.encode(), host=host.encode(), headers=hdrs, tls=bool(peer),
                 peer_uris=(peer,) if peer else (), source_ip=ip, dest_port=port,
                 metadata={"envoy.filters.http.jwt_authn": metadata} if metadata else None)


def allowed(p: authz.HttpPolicy, a: Attrs) -> bool:
    return evaluate(p.rbac, a).allowed


# --- the evaluator ------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "path"), [
    (b"/a/b?x=1", b"/a/b"), (b"/./admin", b"/admin"), (b"/x/../admin", b"/admin"), (b"/%61dmin", b"/admin"),
    (b"/a/%2F/b", b"/a/%2F/b"), (b"/../../etc", b"/etc"), (b"/a/.", b"/a/"), (b"/a#frag", b"/a"),
    (b"/%2e%2e/admin", b"/admin"), (b"*", b"*"),
])
def test_paths_are_matched_normalized(target: bytes, path: bytes) -> None:
    assert normalize_path(target) == path


def test_allow_without_policies_denies_and_deny_reports_the_policy() -> None:
    deny = authz.RbacFilter(authz.Action.DENY, (authz.Policy("d", authz.Any_(), authz.Any_()),))
    allow_none = authz.RbacFilter(authz.Action.ALLOW, ())
    log = authz.RbacFilter(authz.Action.LOG, (authz.Policy("a", authz.Any_(), authz.Any_()),))
    assert evaluate([allow_none], Attrs()) == authz.Verdict(False, "")
    assert evaluate([log, deny], Attrs()) == authz.Verdict(False, "d", "a")
    assert evaluate([log], Attrs()) == authz.Verdict(True, "", "a")
    assert evaluate([], Attrs()) is authz.ALLOWED


def test_ors_of_exact_values_become_set_probes() -> None:
    methods = [authz.Header(b":method", authz.StrMatch(authz.StringKind.EXACT, m)) for m in (b"GET", b"HEAD")]
    assert authz.any_of(methods) == authz.HeaderIn(b":method", frozenset({b"GET", b"HEAD"}))
    names = [authz.Authenticated(authz.StrMatch(authz.StringKind.EXACT, n)) for n in ("a", "b")]
    assert authz.any_of(names) == authz.AuthenticatedIn(frozenset({"a", "b"}))


def test_cidrs_v4_v6_and_mapped_addresses() -> None:
    net = authz.SourceIp(authz.Cidr.parse("10.1.0.0", 16))
    assert net.match(Attrs(source_ip="10.1.2.3")) and not net.match(Attrs(source_ip="10.2.0.1"))
    assert net.match(Attrs(source_ip="::ffff:10.1.0.9")) and not net.match(Attrs(source_ip="junk"))
    v6 = authz.SourceIp(authz.Cidr.parse("fd00::", 8))
    assert v6.match(Attrs(source_ip="fd12::1")) and not v6.match(Attrs(source_ip="10.1.2.3"))


def test_compiled_policies_pickle_for_workers() -> None:
    p = http(policy("ALLOW", "  - to: [{operation: {methods: [GET], paths: ['/api/{*}/x']}}]\n"))
    assert pickle.loads(pickle.dumps(p)) == p


# --- Istio semantics, end to end through translate and compile -------------------------------------


def test_the_seed_allow_get_policy() -> None:
    p = http(policy("ALLOW", "  - to:\n    - operation:\n        methods: [\"GET\"]\n", "allow-get", "shop"))
    assert allowed(p, request("GET")) and not allowed(p, request("POST"))


def test_principals_namespaces_and_not_fields() -> None:
    p = http(policy("ALLOW", "  - from:\n    - source: {principals: [cluster.local/ns/shop/sa/productpage]}\n"
                             "    - source: {namespaces: [ops], notPrincipals: ['*/sa/intern']}\n"))
    assert allowed(p, request(peer=PP))
    assert not allowed(p, request(peer="spiffe://cluster.local/ns/shop/sa/reviews"))
    assert not allowed(p, request())  # plaintext: no principal at all
    assert allowed(p, request(peer="spiffe://cluster.local/ns/ops/sa/admin"))
    assert not allowed(p, request(peer="spiffe://cluster.local/ns/ops/sa/intern"))
    assert not allowed(p, request(peer="spiffe://cluster.local/ns/opsx/sa/admin"))


def test_namespace_deny_with_patterns() -> None:
    p = http(policy("DENY", "  - from: [{source: {namespaces: ['test-*']}}]\n"))
    assert not allowed(p, request(peer="spiffe://cluster.local/ns/test-1/sa/x"))
    assert allowed(p, request(peer="spiffe://cluster.local/ns/prod/sa/x"))
    assert evaluate(p.rbac, request(peer="spiffe://cluster.local/ns/test-1/sa/x")).policy == \
        "ns[shop]-policy[p]-rule[0]"


def test_operations_hosts_ports_methods_paths() -> None:
    p = http(policy("ALLOW", "  - to:\n    - operation: {hosts: [ratings.shop.svc.cluster.local, '*.example.com'],"
                             " methods: [GET, HEAD], paths: ['/api/*', '*.css', /exact], notPaths: ['/api/admin*']}\n"
                             "    - operation: {ports: ['9080'], paths: ['/items/{*}/detail', '/files/{**}']}\n"))
    host = "Ratings.Shop.svc.cluster.local:9080"
    assert allowed(p, request("GET", "/api/v1?q=1", host=host))
    assert allowed(p, request("HEAD", "/site.css", host="www.example.com"))
    assert not allowed(p, request("GET", "/api/admin/x", host=host))
    assert not allowed(p, request("GET", "/./api/admin", host=host))
    assert not allowed(p, request("POST", "/api/v1", host=host))
    assert not allowed(p, request("GET", "/api/v1", host="evil.com"))
    assert allowed(p, request("POST", "/items/42/detail", host="x"))
    assert not allowed(p, request("POST", "/items/42/43/detail", host="x"))
    assert allowed(p, request("DELETE", "/files/a/b/c", host="x"))
    assert not allowed(p, request("POST", "/items/42/detail", host="x", port=9999))


def test_when_conditions_headers_ips_and_ports() -> None:
    p = http(policy("ALLOW", "  - when:\n    - {key: 'request.headers[x-user]', values: ['admin-*']}\n"
                             "    - {key: source.ip, notValues: [10.9.0.0/16]}\n"
                             "    - {key: destination.port, values: ['9080']}\n"))
    assert allowed(p, request(headers={"X-User": "admin-bob"}))
    assert not allowed(p, request(headers={"X-User": "bob"}))
    assert not allowed(p, request())  # header absent
    assert not allowed(p, request(headers={"x-user": "admin-bob"}, ip="10.9.1.1"))


def test_remote_ip_comes_from_x_forwarded_for() -> None:
    p = http(policy("DENY", "  - from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]\n"))
    a = request(ip="10.0.0.1")
    a.remote_ip = "203.0.113.9"
    assert not allowed(p, a) and allowed(p, request(ip="10.0.0.1"))


REQUEST_AUTH = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  jwtRules:
  - issuer: https://issuer.example
    jwksUri: http://127.0.0.1:1/jwks
"""


def test_request_principals_and_claims_read_the_jwt_payload() -> None:
    p = http(REQUEST_AUTH, policy("ALLOW", "  - from: [{source: {requestPrincipals: ['https://issuer.example/alice']}}]\n"
                                           "  - when:\n    - {key: 'request.auth.claims[groups]', values: [admins]}\n"
                                           "    - {key: 'request.auth.claims[org][tier]', values: [gold]}\n"))
    def md(**payload: object) -> dict:
        return {"https://issuer.example": {"iss": "https://issuer.example", **payload}}
    assert allowed(p, request(metadata=md(sub="alice")))
    assert not allowed(p, request(metadata=md(sub="bob")))
    assert not allowed(p, request())
    assert allowed(p, request(metadata=md(sub="bob", groups=["users", "admins"], org={"tier": "gold"})))
    assert not allowed(p, request(metadata=md(sub="bob", groups="admins", org={"tier": "silver"})))


@pytest.mark.parametrize(("pattern", "sub", "ok"), [
    ("*", "anyone", True), ("https://issuer.example/*", "x", True), ("https://issuer.*", "x", True),
    ("*/alice", "alice", True), ("*/alice", "bob", False), ("*e", "alice", True), ("*xample/alice", "alice", True),
    ("https://other.example/*", "alice", False), ("https://issuer.example/al*", "alice", True),
])
def test_request_principal_patterns_split_per_issuer(pattern: str, sub: str, ok: bool) -> None:
    p = http(REQUEST_AUTH, policy("ALLOW", f"  - from: [{{source: {{requestPrincipals: ['{pattern}']}}}}]\n"))
    md = {"https://issuer.example": {"iss": "https://issuer.example", "sub": sub}}
    assert allowed(p, request(metadata=md)) is ok


def test_selection_root_namespace_selector_and_other_namespaces() -> None:
    mesh = policy("DENY", "  - to: [{operation: {methods: [DELETE]}}]\n", "mesh", "istio-system")
    mine = policy("DENY", "  - to: [{operation: {methods: [PUT]}}]\n", "mine", "shop", selector="app: ratings")
    other_app = policy("DENY", "  - to: [{operation: {methods: [GET]}}]\n", "other", "shop", selector="app: web")
    other_ns = policy("DENY", "  - to: [{operation: {methods: [POST]}}]\n", "elsewhere", "web")
    p = http(mesh, mine, other_app, other_ns)
    assert [m for m in ("DELETE", "PUT", "GET", "POST") if not allowed(p, request(m))] == ["DELETE", "PUT"]


def test_empty_spec_denies_everything_and_no_policy_costs_nothing() -> None:
    empty = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {}\n"
    assert not allowed(http(empty), request())
    bare = listener(snapshot(), 9080)
    assert bare.http is not None and bare.http.policy is None
    assert listener(snapshot(), 3306).tcp.rbac == ()  # type: ignore[union-attr]


def test_tcp_ports_drop_http_allow_rules_and_broaden_http_deny_rules() -> None:
    allow = policy("ALLOW", "  - to: [{operation: {methods: [GET]}}]\n  - to: [{operation: {ports: ['3306']}}]\n", "a")
    deny = policy("DENY", "  - from: [{source: {namespaces: [evil]}}]\n    to: [{operation: {paths: [/admin]}}]\n", "d")
    tcp = listener(snapshot(allow, deny), 3306).tcp
    assert tcp is not None
    rbac = tcp.rbac
    conn = Attrs(http=False, dest_port=3306, tls=True, peer_uris=(PP,))
    assert evaluate(rbac, conn).allowed  # the GET rule is gone, the port rule remains
    evil = Attrs(http=False, dest_port=3306, tls=True, peer_uris=("spiffe://cluster.local/ns/evil/sa/x",))
    assert evaluate(rbac, evil) == authz.Verdict(False, "ns[shop]-policy[d]-rule[0]")  # paths ignored
    only_http = listener(snapshot(policy("ALLOW", "  - to: [{operation: {methods: [GET]}}]\n")), 3306).tcp
    assert only_http is not None and not evaluate(only_http.rbac, conn).allowed
