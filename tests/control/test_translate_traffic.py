"""Traffic management -> xDS: Istio's task configs, every http[] field, connectionPool,
outlierDetection, HTTP/2 ports and ALPN, weighted TCP routes, and the precise problems of bad input."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from envoy.type.v3 import percent_pb2

from control.translate import NodeInfo, Resources, load_text, translate
from tests.control.traffic_fixtures import (
    EVERYTHING,
    GRPC,
    HTTPBIN,
    PRODUCTPAGE,
    RATINGS,
    REVIEWS,
    TASKS,
    TCP_ECHO,
    everything,
    task_resources,
)
from tests.control.translate_fixtures import only_problem, problems_of

MILLION = percent_pb2.FractionalPercent.MILLION
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def routes_of(resources: Resources, table: str, vhost: str) -> dict[str, rc.Route]:
    (found,) = [t for t in resources.routes if t.name == table]
    (host,) = [v for v in found.virtual_hosts if v.name == vhost]
    return {r.name: r for r in host.routes}


def cluster(resources: Resources, name: str) -> cluster_pb2.Cluster:
    (found,) = [c for c in resources.clusters if c.name == name]
    return found


def protocol_options(c: cluster_pb2.Cluster) -> hpo.HttpProtocolOptions:
    options = hpo.HttpProtocolOptions()
    assert c.typed_extension_protocol_options[HPO].Unpack(options)
    return options


def fault_of(route: rc.Route) -> fault_pb2.HTTPFault:
    config = fault_pb2.HTTPFault()
    assert route.typed_per_filter_config["envoy.filters.http.fault"].Unpack(config)
    return config


def upstream_alpn(c: cluster_pb2.Cluster) -> list[str]:
    context = tls_pb2.UpstreamTlsContext()
    socket = c.transport_socket_matches[0].transport_socket if c.transport_socket_matches else c.transport_socket
    assert socket.typed_config.Unpack(context)
    return list(context.common_tls_context.alpn_protocols)


# --- Istio's tasks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("intercept", [False, True])
def test_every_task_fixture_translates(name: str, intercept: bool) -> None:
    resources = task_resources(name, intercept=intercept)
    assert resources.clusters


def test_request_routing_gets_istios_default_retry_policy_and_grpc_timeout() -> None:
    routes = routes_of(task_resources("tasks-request-routing.yaml"), "9080", f"{REVIEWS}:9080")
    jason = routes["reviews.0"]
    assert jason.route.cluster == f"outbound|9080|v2|{REVIEWS}"
    policy = jason.route.retry_policy
    assert policy.retry_on == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    assert policy.num_retries.value == 2
    assert list(policy.retriable_status_codes) == [503]
    assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert policy.host_selection_retry_max_attempts == 5
    # an HTTP port: RouteAction.timeout alone (Envoy ignores it on routes with max_stream_duration)
    assert not jason.route.HasField("max_stream_duration")


def test_a_service_without_virtual_service_gets_the_default_retry_policy_too() -> None:
    routes = routes_of(task_resources("tasks-request-routing.yaml"), "9080", f"{RATINGS}:9080")
    assert routes["default"].route.retry_policy.num_retries.value == 2


def test_fault_delay_task() -> None:
    resources = task_resources("tasks-fault-delay.yaml")
    routes = routes_of(resources, "9080", f"{RATINGS}:9080")
    delay = fault_of(routes["ratings.0"]).delay
    assert delay.fixed_delay.seconds == 7
    assert (delay.percentage.numerator, delay.percentage.denominator) == (1_000_000, MILLION)
    assert not routes["ratings.1"].typed_per_filter_config
    # The outbound HCM carries the (empty) fault filter before the router, as Istio's does.
    (listener,) = [ln for ln in resources.listeners if ln.name == "127.0.0.1_9080"]
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    empty = fault_pb2.HTTPFault()
    assert manager.http_filters[0].typed_config.Unpack(empty) and empty == fault_pb2.HTTPFault()


def test_fault_abort_task() -> None:
    routes = routes_of(task_resources("tasks-fault-abort.yaml"), "9080", f"{RATINGS}:9080")
    abort = fault_of(routes["ratings.0"]).abort
    assert abort.http_status == 500
    assert abort.percentage.numerator == 1_000_000


def test_request_timeouts_task() -> None:
    resources = task_resources("tasks-request-timeouts.yaml")
    reviews = routes_of(resources, "9080", f"{REVIEWS}:9080")["reviews.0"]
    assert reviews.route.timeout.ToTimedelta().total_seconds() == 0.5
    assert not reviews.route.HasField("max_stream_duration")
    ratings = routes_of(resources, "9080", f"{RATINGS}:9080")["ratings.0"]
    assert fault_of(ratings).delay.fixed_delay.seconds == 2


def test_traffic_shifting_task() -> None:
    routes = routes_of(task_resources("tasks-traffic-shifting.yaml"), "9080", f"{REVIEWS}:9080")
    weights = [(c.name, c.weight.value) for c in routes["reviews.0"].route.weighted_clusters.clusters]
    assert weights == [(f"outbound|9080|v1|{REVIEWS}", 50), (f"outbound|9080|v3|{REVIEWS}", 50)]


def test_circuit_breaking_task() -> None:
    c = cluster(task_resources("tasks-circuit-breaking.yaml"), f"outbound|8000||{HTTPBIN}")
    (threshold,) = c.circuit_breakers.thresholds
    assert threshold.priority == base_pb2.DEFAULT
    assert threshold.max_connections.value == 1
    assert threshold.max_pending_requests.value == 1
    assert threshold.max_requests.value == 4294967295
    assert not threshold.HasField("max_retries")  # Pillion: a retry budget instead of Istio's unlimited retries
    assert threshold.retry_budget.budget_percent.value == 20.0
    assert threshold.retry_budget.min_retry_concurrency.value == 3
    options = protocol_options(c)
    assert options.common_http_protocol_options.max_requests_per_connection.value == 1
    assert options.explicit_http_config.HasField("http_protocol_options")
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (1, 100)
    assert od.interval.seconds == 1 and od.base_ejection_time.seconds == 180
    assert od.max_ejection_percent.value == 100
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert not od.HasField("consecutive_gateway_failure")
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0


def test_default_circuit_breakers_everywhere() -> None:
    resources = task_resources("tasks-request-routing.yaml", intercept=True)
    for c in resources.clusters:
        if c.name == "BlackHoleCluster":
            continue
        (threshold,) = c.circuit_breakers.thresholds
        assert threshold.max_connections.value == 4294967295, c.name
        assert threshold.HasField("retry_budget"), c.name
        assert not c.HasField("outlier_detection")
        assert HPO not in c.typed_extension_protocol_options  # HTTP/1.1 by default


def test_mirroring_task() -> None:
    resources = task_resources("tasks-mirroring.yaml")
    route = routes_of(resources, "8000", f"{HTTPBIN}:8000")["httpbin.0"]
    assert route.route.cluster == f"outbound|8000|v1|{HTTPBIN}"
    (mirror,) = route.route.request_mirror_policies
    assert mirror.cluster == f"outbound|8000|v2|{HTTPBIN}"
    fraction = mirror.runtime_fraction.default_value
    assert (fraction.numerator, fraction.denominator) == (1_000_000, MILLION)
    assert cluster(resources, mirror.cluster)  # the mirror's cluster is there


@pytest.mark.parametrize("intercept", [False, True])
def test_tcp_traffic_shifting_task(intercept: bool) -> None:
    resources = task_resources("tasks-tcp-traffic-shifting.yaml", intercept=intercept)
    name = "0.0.0.0_9000" if intercept else "127.0.0.1_9000"
    (listener,) = [ln for ln in resources.listeners if ln.name == name]
    proxy = tcp_proxy_pb2.TcpProxy()
    listener.filter_chains[0].filters[-1].typed_config.Unpack(proxy)
    assert not proxy.cluster
    weights = [(c.name, c.weight) for c in proxy.weighted_clusters.clusters]
    assert weights == [(f"outbound|9000|v1|{TCP_ECHO}", 80), (f"outbound|9000|v2|{TCP_ECHO}", 20)]
    for weighted, _ in weights:
        assert cluster(resources, weighted)


# --- every http[] field --------------------------------------------------------------------


def test_redirect_and_direct_response() -> None:
    routes = routes_of(everything(), "9080", f"{REVIEWS}:9080")
    moved = routes["reviews.moved"]
    assert moved.WhichOneof("action") == "redirect"
    assert moved.redirect.path_redirect == "/new" and moved.redirect.host_redirect == "reviews.example"
    assert moved.redirect.response_code == rc.RedirectAction.FOUND
    assert [(h.name, h.string_match.exact) for h in moved.match.headers] == [(":method", "GET")]
    teapot = routes["reviews.teapot"]
    assert teapot.direct_response.status == 418
    assert teapot.direct_response.body.inline_string == "short and stout"
    assert [(h.header.key, h.header.value) for h in teapot.response_headers_to_add] == [("x-teapot", "yes")]


def test_match_rewrite_headers_and_retries() -> None:
    api = routes_of(everything(), "9080", f"{REVIEWS}:9080")["reviews.api"]
    match = api.match
    assert match.safe_regex.regex == "(?i)/api/v[0-9]+/.*" and match.case_sensitive.value is False
    assert [(h.name, h.invert_match) for h in match.headers] == [
        (":authority", False), (":scheme", False), ("x-skip", True)]
    (debug, user) = match.query_parameters
    assert debug.name == "debug" and debug.present_match
    assert user.name == "user" and user.string_match.prefix == "a"
    action = api.route
    assert action.regex_rewrite.pattern.regex == "^/api/(v[0-9]+)/(.*)$"
    assert action.regex_rewrite.substitution == "/\\2?version=\\1"
    assert action.host_rewrite_literal == "reviews.internal"
    added = [(h.header.key, h.header.value, h.append_action) for h in api.request_headers_to_add]
    assert added == [("x-a", "1", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
                     ("x-b", "2", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)]
    assert list(api.request_headers_to_remove) == ["x-c"]
    assert list(api.response_headers_to_remove) == ["x-powered-by"]
    policy = action.retry_policy
    assert policy.retry_on == "5xx,reset,retriable-status-codes"
    assert list(policy.retriable_status_codes) == [409]
    assert policy.num_retries.value == 3 and policy.per_try_timeout.seconds == 1


def test_mirrors_fault_grpc_status_and_retries_off() -> None:
    resources = everything()
    shadow = routes_of(resources, "9080", f"{REVIEWS}:9080")["reviews.shadow"]
    assert shadow.route.prefix_rewrite == "/"
    assert not shadow.route.HasField("retry_policy")  # attempts: 0
    (mirror,) = shadow.route.request_mirror_policies
    assert mirror.cluster == f"outbound|9080|v2|{REVIEWS}"
    assert mirror.runtime_fraction.default_value.numerator == 250_000
    abort = fault_of(shadow).abort
    assert abort.grpc_status == 14 and abort.percentage.numerator == 100_000
    grpc = routes_of(resources, "7070", f"{GRPC}:7070")["grpc.0"]
    delay = fault_of(grpc).delay
    assert delay.fixed_delay.nanos == 100_000_000 and delay.percentage.numerator == 50_000  # percent: 5


def test_source_and_port_conditions_leave_routes_out() -> None:
    routes = routes_of(everything(), "9080", f"{REVIEWS}:9080")
    assert "reviews.elsewhere" not in routes  # for namespace "other", and for port 9081
    assert "reviews.shadow" in routes  # sourceLabels app=productpage: this node
    other = translate(load_text(EVERYTHING.replace("{app: productpage}}]", "{app: ratings}}]")), PRODUCTPAGE)
    assert "reviews.shadow" not in routes_of(other, "9080", f"{REVIEWS}:9080")


# --- clusters: connectionPool, outlierDetection, HTTP/2, ALPN ------------------------------


def test_connection_pool_outlier_and_h2_upgrade() -> None:
    resources = everything()
    v1 = cluster(resources, f"outbound|9080|v1|{REVIEWS}")
    (threshold,) = v1.circuit_breakers.thresholds
    assert (threshold.max_connections.value, threshold.max_requests.value) == (100, 50)
    assert threshold.max_pending_requests.value == 4294967295
    assert threshold.max_retries.value == 4 and not threshold.HasField("retry_budget")
    assert v1.connect_timeout.seconds == 2
    options = protocol_options(v1)
    assert options.common_http_protocol_options.idle_timeout.seconds == 30
    assert options.explicit_http_config.http2_protocol_options.max_concurrent_streams.value == 10
    assert upstream_alpn(v1) == ["h2"]
    od = v1.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (0, 0)
    assert (od.consecutive_gateway_failure.value, od.enforcing_consecutive_gateway_failure.value) == (3, 100)
    assert od.interval.seconds == 5


def test_subset_connection_pool_replaces_the_rules_and_use_client_protocol() -> None:
    v2 = cluster(everything(), f"outbound|9080|v2|{REVIEWS}")
    (threshold,) = v2.circuit_breakers.thresholds
    assert threshold.max_connections.value == 4294967295  # the subset's pool replaced the rule's
    options = protocol_options(v2)
    assert options.use_downstream_protocol_config.HasField("http_protocol_options")
    assert options.use_downstream_protocol_config.HasField("http2_protocol_options")
    assert options.common_http_protocol_options.max_requests_per_connection.value == 10
    assert upstream_alpn(v2) == ["h2", "http/1.1"]
    assert v2.HasField("outlier_detection")  # the rule's outlierDetection still applies


def test_grpc_ports_speak_http2_outbound_and_inbound() -> None:
    resources = everything()
    grpc = cluster(resources, f"outbound|7070||{GRPC}")
    assert protocol_options(grpc).explicit_http_config.HasField("http2_protocol_options")
    assert upstream_alpn(grpc) == ["h2"]
    inbound = cluster(resources, "inbound|7071||")
    assert protocol_options(inbound).explicit_http_config.HasField("http2_protocol_options")
    assert HPO not in cluster(resources, "inbound|9090||").typed_extension_protocol_options
    # The egress listener of a GRPC port is HTTP (routed by RDS).
    assert any(t.name == "7070" for t in resources.routes)


def test_inbound_mesh_tls_offers_h2_and_http11_on_http_ports_only() -> None:
    text = EVERYTHING + (
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict}\n"
        "spec: {mtls: {mode: STRICT}}\n"
    )
    resources = translate(load_text(text), PRODUCTPAGE)
    for listener in resources.listeners:
        if listener.traffic_direction != base_pb2.INBOUND:
            continue
        context = tls_pb2.DownstreamTlsContext()
        listener.filter_chains[0].transport_socket.typed_config.Unpack(context)
        assert list(context.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]


def test_port_level_connection_pool_wins_over_the_rules() -> None:
    text = EVERYTHING.replace(
        "    outlierDetection: {consecutive5xxErrors: 0",
        "    portLevelSettings:\n    - port: {number: 9080}\n      connectionPool: {tcp: {maxConnections: 7}}\n"
        "      outlierDetection: {consecutive5xxErrors: 9}\n"
        "    outlierDetection: {consecutive5xxErrors: 0",
    )
    v1 = cluster(translate(load_text(text), PRODUCTPAGE), f"outbound|9080|v1|{REVIEWS}")
    assert v1.circuit_breakers.thresholds[0].max_connections.value == 7
    assert v1.outlier_detection.consecutive_5xx.value == 9
    assert HPO not in v1.typed_extension_protocol_options  # the port's pool has no h2UpgradePolicy


def test_tcp_clusters_get_breakers_but_no_http_options() -> None:
    c = cluster(task_resources("tasks-tcp-traffic-shifting.yaml"), f"outbound|9000|v1|{TCP_ECHO}")
    assert c.circuit_breakers.thresholds
    assert HPO not in c.typed_extension_protocol_options


def test_route_table_is_still_a_route_configuration() -> None:
    assert all(isinstance(t, route_pb2.RouteConfiguration) for t in everything().routes)


# --- bad input -------------------------------------------------------------------------------

VS_HEAD = (
    "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
    "spec:\n  hosts: [reviews]\n  http:\n"
)
REGISTRY = EVERYTHING.split("---\napiVersion: networking.istio.io/v1\nkind: VirtualService")[0]


def vs_problem(http: str) -> tuple[str, str]:
    problem = only_problem(REGISTRY + VS_HEAD + http)
    assert (problem.file, problem.resource) == ("mesh.yaml", "VirtualService default/reviews")
    return problem.field, problem.message


ROUTE = "    route: [{destination: {host: reviews, subset: v1}}]\n"


def test_unknown_retry_on_value() -> None:
    field, message = vs_problem("  - retries: {attempts: 2, retryOn: '5xx,sometimes'}\n" + ROUTE)
    assert field == "spec.http[0].retries.retryOn"
    assert message.startswith("unknown retry condition 'sometimes'; one of 5xx,")


def test_retry_on_envoy_conditions_not_implemented_yet() -> None:
    field, message = vs_problem("  - retries: {attempts: 2, retryOn: 'retriable-headers'}\n" + ROUTE)
    assert (field, message) == ("spec.http[0].retries.retryOn", "retriable-headers is not supported yet")


def test_retry_on_status_out_of_range() -> None:
    field, message = vs_problem("  - retries: {attempts: 2, retryOn: '5xx,700'}\n" + ROUTE)
    assert (field, message) == ("spec.http[0].retries.retryOn", "700 is not an HTTP status (100-599)")


def test_negative_attempts() -> None:
    field, message = vs_problem("  - retries: {attempts: -1}\n" + ROUTE)
    assert field == "spec.http[0].retries.attempts"
    assert message.startswith("-1 is out of range [0,")


def test_invalid_grpc_status_name() -> None:
    field, message = vs_problem("  - fault: {abort: {grpcStatus: NOT_A_CODE}}\n" + ROUTE)
    assert field == "spec.http[0].fault.abort.grpcStatus"
    assert message.startswith("unknown gRPC status 'NOT_A_CODE'; one of CANCELLED,")


@pytest.mark.parametrize(
    ("yaml", "field"),
    [
        ("fault: {abort: {httpStatus: 503, percentage: {value: 100.5}}}", "fault.abort.percentage.value"),
        ("fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}", "fault.delay.percentage.value"),
        ("mirror: {host: reviews}\n    mirrorPercentage: {value: 150}", "mirrorPercentage.value"),
    ],
)
def test_percentage_above_100(yaml: str, field: str) -> None:
    found, message = vs_problem(f"  - {yaml}\n" + ROUTE)
    assert found == f"spec.http[0].{field}"
    assert "is out of range [0.0, 100.0]" in message


@pytest.mark.parametrize(
    ("yaml", "field", "message"),
    [
        ("fault: {abort: {httpStatus: 42}}", "fault.abort.httpStatus", "42 is not an HTTP status Envoy sends (200-599)"),
        ("fault: {abort: {httpStatus: 500, grpcStatus: INTERNAL}}", "fault.abort",
         "exactly one of httpStatus, grpcStatus must be set"),
        ("fault: {delay: {percentage: {value: 5}}}", "fault.delay.fixedDelay", "required field is missing"),
        ("fault: {}", "fault", "set delay, abort or both"),
        ("mirror: {host: reviews}\n    mirrors: [{destination: {host: reviews}}]", "mirrors",
         "mirror and mirrors cannot both be set"),
        ("mirrorPercentage: {value: 5}", "mirrorPercentage", "only used with mirror"),
        ("rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}", "rewrite",
         "uri and uriRegexRewrite cannot both be set"),
        ("rewrite: {uriRegexRewrite: {match: '^/(a)$', rewrite: '/\\2'}}", "rewrite.uriRegexRewrite.rewrite",
         "\\2 names a group the match does not have (it has 1)"),
        ("retries: {attempts: 2, perTryTimeout: 0s}", "retries.perTryTimeout", "must be positive"),
        ("headers: {request: {set: {':path': /x}}}", 'headers.request.set[":path"]',
         ":path cannot be changed here (pseudo-headers and Host; use rewrite.authority)"),
        ("headers: {request: {remove: [Host]}}", "headers.request.remove[0]",
         "Host cannot be changed here (pseudo-headers and Host; use rewrite.authority)"),
    ],
)
def test_bad_http_route_fields(yaml: str, field: str, message: str) -> None:
    assert vs_problem(f"  - {yaml}\n" + ROUTE) == (f"spec.http[0].{field}", message)


@pytest.mark.parametrize(
    ("http", "field", "message"),
    [
        ("  - redirect: {uri: /x}\n" + ROUTE, "spec.http[0].route",
         "not used with redirect (the request is answered locally)"),
        ("  - redirect: {uri: /x, redirectCode: 305}\n", "spec.http[0].redirect.redirectCode",
         "305 is not a redirect code Envoy sends (301, 302, 303, 307, 308)"),
        ("  - directResponse: {status: 99}\n", "spec.http[0].directResponse.status",
         "99 is not an HTTP status Envoy sends (200-599)"),
        ("  - directResponse: {status: 200, body: {bytes: '***'}}\n", "spec.http[0].directResponse.body.bytes",
         "must be base64"),
        ("  - timeout: 1s\n", "spec.http[0].route", "required field is missing (or set redirect or directResponse)"),
        ("  - mirror: {host: reviews, subset: v9}\n" + ROUTE, "spec.http[0].mirror.subset",
         "no DestinationRule for host reviews.default.svc.cluster.local defines subset 'v9'"),
    ],
)
def test_bad_route_actions(http: str, field: str, message: str) -> None:
    assert vs_problem(http) == (field, message)


DR_HEAD = (
    "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: grpc}\n"
    "spec:\n  host: grpc\n  trafficPolicy:\n"
)
GRPC_SE = EVERYTHING.split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")[0]


@pytest.mark.parametrize(
    ("policy", "field", "message"),
    [
        ("    connectionPool: {tcp: {tcpKeepalive: {time: 7200s}}}", "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
         "not supported yet"),
        ("    connectionPool: {tcp: {maxConnectionDuration: 1h}}",
         "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration", "not supported yet"),
        ("    connectionPool: {tcp: {idleTimeout: 1h}}", "spec.trafficPolicy.connectionPool.tcp.idleTimeout",
         "not supported yet"),
        ("    connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}",
         "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
         "'SOMETIMES' is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE"),
        ("    connectionPool: {tcp: {maxConnections: -1}}", "spec.trafficPolicy.connectionPool.tcp.maxConnections",
         "-1 is out of range [0, 2147483647]"),
        ("    connectionPool: {}", "spec.trafficPolicy.connectionPool", "set tcp or http settings"),
        ("    outlierDetection: {minHealthPercent: 50}", "spec.trafficPolicy.outlierDetection.minHealthPercent",
         "only 0 is supported yet (no panic mode)"),
        ("    outlierDetection: {splitExternalLocalOriginErrors: true}",
         "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
         "true is not supported yet (no local-origin detector)"),
        ("    outlierDetection: {consecutiveLocalOriginFailures: 3}",
         "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures", "not supported yet"),
        ("    outlierDetection: {interval: 0s}", "spec.trafficPolicy.outlierDetection.interval", "must be positive"),
    ],
)
def test_bad_traffic_policy(policy: str, field: str, message: str) -> None:
    problem = only_problem(GRPC_SE + DR_HEAD + policy + "\n")
    assert (problem.resource, problem.field, problem.message) == ("DestinationRule default/grpc", field, message)


def test_several_problems_are_all_reported() -> None:
    found = problems_of(REGISTRY + VS_HEAD + "  - retries: {attempts: 1, retryOn: nope}\n"
                        "    fault: {abort: {grpcStatus: NOPE}}\n" + ROUTE)
    assert sorted(p.field for p in found) == ["spec.http[0].fault.abort.grpcStatus", "spec.http[0].retries.retryOn"]


def test_grpc_ports_honour_grpc_timeout_capped_by_the_route_timeout() -> None:
    text = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: greeter, namespace: default}
spec:
  hosts: [greeter.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7070, name: grpc, protocol: GRPC}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: greeter, namespace: default}
spec:
  hosts: [greeter]
  http:
  - timeout: 2s
    route: [{destination: {host: greeter}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: client, namespace: default}
spec:
  workloadSelector: {labels: {app: client}}
  egress:
  - port: {number: 7070, name: grpc, protocol: GRPC}
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"""
    resources = translate(load_text(text), NodeInfo(namespace="default", labels={"app": "client"}))
    (rc_,) = [r for r in resources.routes if r.name == "7070"]
    (route,) = rc_.virtual_hosts[0].routes
    msd = route.route.max_stream_duration
    assert msd.max_stream_duration.ToTimedelta().total_seconds() == 2
    assert msd.grpc_timeout_header_max.ToTimedelta().total_seconds() == 2
