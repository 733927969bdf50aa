"""The field tables of the Istio resources Pillion reads, written with `schema.py`.

Owns: which fields each kind's `spec` may have, their types, which are
required, and which are Istio's but not implemented yet ("not supported yet").
It must not build objects or check anything that spans fields or documents;
`istio.py` does that.

Strategy: one constant per Istio message, named after it, composed the way the
Istio API composes them, so a reader can hold this file next to Istio's
reference pages. Parts that are refused by a builder rather than here
(Telemetry `metrics`) are described in full too, so their shape is checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from control.translate.schema import (
    Bool,
    Duration,
    Enum,
    Int,
    ListOf,
    MapOf,
    Number,
    Obj,
    PortMapOf,
    Spec,
    Str,
)

STR = Str()
BOOL = Bool()
UINT = Int()
PORT = Int(1, 65535)
STRS = ListOf(STR)
LABELS = MapOf(STR, STR)
PERCENT = Number(0.0, 100.0)
INT32 = Int(0, 2**31 - 1)
DURATION = Duration()

METADATA = Obj(
    {"name": STR, "namespace": STR, "labels": LABELS, "annotations": LABELS},
    required=("name",),
)
WORKLOAD_SELECTOR = Obj({"labels": LABELS})
LABEL_SELECTOR = Obj({"matchLabels": LABELS})
CAPTURE_MODE = Enum(("DEFAULT", "NONE"), ("IPTABLES",))
OUTBOUND_TRAFFIC_POLICY = Obj(
    {"mode": Enum(("REGISTRY_ONLY", "ALLOW_ANY"))}, unsupported=("egressProxy",)
)

# --- registry ---------------------------------------------------------------

WORKLOAD_ENTRY: Mapping[str, Spec] = {
    "address": STR,
    "ports": MapOf(STR, PORT),
    "labels": LABELS,
    "network": STR,
    "locality": STR,
    "weight": UINT,
    "serviceAccount": STR,
}
SERVICE_PORT = Obj(
    {"number": PORT, "protocol": STR, "name": STR, "targetPort": PORT},
    required=("number", "name"),
)
SERVICE_ENTRY = Obj(
    {
        "hosts": STRS,
        "addresses": STRS,
        "ports": ListOf(SERVICE_PORT),
        "location": Enum(("MESH_EXTERNAL", "MESH_INTERNAL")),
        "resolution": Enum(("NONE", "STATIC"), ("DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")),
        "endpoints": ListOf(Obj(WORKLOAD_ENTRY, required=("address",))),
        "workloadSelector": WORKLOAD_SELECTOR,
        "exportTo": STRS,
    },
    required=("hosts",),
    unsupported=("subjectAltNames",),
)
WORKLOAD_ENTRY_SPEC = Obj(WORKLOAD_ENTRY)

READINESS_PROBE = Obj(
    {
        "initialDelaySeconds": UINT,
        "timeoutSeconds": UINT,
        "periodSeconds": UINT,
        "successThreshold": UINT,
        "failureThreshold": UINT,
        "httpGet": Obj(
            {
                "path": STR,
                "port": PORT,
                "host": STR,
                "scheme": STR,
                "httpHeaders": ListOf(Obj({"name": STR, "value": STR})),
            },
            required=("port",),
        ),
        "tcpSocket": Obj({"host": STR, "port": PORT}, required=("port",)),
        "exec": Obj({"command": STRS}),
        "grpc": Obj({"port": PORT, "service": STR}, required=("port",)),
    }
)
WORKLOAD_GROUP = Obj(
    {
        "metadata": Obj({"labels": LABELS, "annotations": LABELS}),
        "template": WORKLOAD_ENTRY_SPEC,
        "probe": READINESS_PROBE,
    },
    required=("template",),
)

# --- traffic ----------------------------------------------------------------

SIDECAR_PORT = Obj(
    {"number": PORT, "protocol": STR, "name": STR, "targetPort": PORT}, required=("number",)
)
SIDECAR = Obj(
    {
        "workloadSelector": WORKLOAD_SELECTOR,
        "ingress": ListOf(
            Obj(
                {
                    "port": SIDECAR_PORT,
                    "bind": STR,
                    "captureMode": CAPTURE_MODE,
                    "defaultEndpoint": STR,
                },
                required=("port",),
                unsupported=("tls", "connectionPool"),
            )
        ),
        "egress": ListOf(
            Obj(
                {"port": SIDECAR_PORT, "bind": STR, "captureMode": CAPTURE_MODE, "hosts": STRS},
                required=("hosts",),
            )
        ),
        "outboundTrafficPolicy": OUTBOUND_TRAFFIC_POLICY,
    },
    unsupported=("inboundConnectionPool",),
)

STRING_MATCH = Obj({"exact": STR, "prefix": STR, "regex": STR}, one_of=("exact", "prefix", "regex"))
PERCENTAGE = Obj({"value": PERCENT})  # Istio's Percent message
HTTP_MATCH_REQUEST = Obj(
    {
        "name": STR,
        "uri": STRING_MATCH,
        "headers": MapOf(STR, STRING_MATCH),
        "scheme": STRING_MATCH,
        "method": STRING_MATCH,
        "authority": STRING_MATCH,
        "port": PORT,
        "ignoreUriCase": BOOL,
        "withoutHeaders": MapOf(STR, STRING_MATCH),
        "queryParams": MapOf(STR, STRING_MATCH),
        "sourceLabels": LABELS,
        "sourceNamespace": STR,
    },
    unsupported=("gateways", "statPrefix"),
)
DESTINATION = Obj(
    {"host": STR, "subset": STR, "port": Obj({"number": PORT}, required=("number",))},
    required=("host",),
)
HTTP_ROUTE_DESTINATION = Obj(
    {"destination": DESTINATION, "weight": Int(0, 100)},
    required=("destination",),
    unsupported=("headers",),
)
HEADER_OPERATIONS = Obj({"set": MapOf(STR, STR), "add": MapOf(STR, STR), "remove": STRS})
HTTP_REWRITE = Obj(
    {
        "uri": STR,
        "authority": STR,
        "uriRegexRewrite": Obj({"match": STR, "rewrite": STR}, required=("match", "rewrite")),
    }
)
HTTP_REDIRECT = Obj(
    {"uri": STR, "authority": STR, "port": PORT, "scheme": STR, "redirectCode": UINT,
     "derivePort": Enum((), ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))}
)  # fmt: skip
HTTP_DIRECT_RESPONSE = Obj(
    {"status": UINT, "body": Obj({"string": STR, "bytes": STR}, one_of=("string", "bytes"))},
    required=("status",),
)
HTTP_FAULT = Obj(
    {
        "delay": Obj(
            {"fixedDelay": DURATION, "percentage": PERCENTAGE, "percent": Int(0, 100)},
            unsupported=("exponentialDelay",),
        ),
        "abort": Obj(
            {"httpStatus": UINT, "grpcStatus": STR, "percentage": PERCENTAGE},
            unsupported=("http2Error",),
        ),
    }
)
HTTP_RETRY = Obj(
    {"attempts": INT32, "perTryTimeout": DURATION, "retryOn": STR, "retryRemoteLocalities": BOOL}
)
HTTP_ROUTE = Obj(
    {
        "name": STR,
        "match": ListOf(HTTP_MATCH_REQUEST),
        "route": ListOf(HTTP_ROUTE_DESTINATION),
        "timeout": DURATION,
        "redirect": HTTP_REDIRECT,
        "directResponse": HTTP_DIRECT_RESPONSE,
        "rewrite": HTTP_REWRITE,
        "headers": Obj({"request": HEADER_OPERATIONS, "response": HEADER_OPERATIONS}),
        "mirror": DESTINATION,
        "mirrorPercentage": PERCENTAGE,
        "mirrorPercent": Int(0, 100),
        "mirror_percent": Int(0, 100),
        "mirrors": ListOf(Obj({"destination": DESTINATION, "percentage": PERCENTAGE}, required=("destination",))),
        "fault": HTTP_FAULT,
        "retries": HTTP_RETRY,
    },
    unsupported=("delegate", "corsPolicy"),
)
TCP_ROUTE = Obj(
    {
        "match": ListOf(
            Obj(
                {"port": PORT},
                unsupported=("destinationSubnets", "sourceLabels", "gateways", "sourceNamespace"),
            )
        ),
        "route": ListOf(
            Obj({"destination": DESTINATION, "weight": Int(0, 100)}, required=("destination",))
        ),
    },
    required=("route",),
)
VIRTUAL_SERVICE = Obj(
    {
        "hosts": STRS,
        "gateways": STRS,
        "exportTo": STRS,
        "http": ListOf(HTTP_ROUTE),
        "tcp": ListOf(TCP_ROUTE),
    },
    required=("hosts",),
    unsupported=("tls",),
)

HTTP_COOKIE = Obj({"name": STR, "path": STR, "ttl": DURATION}, required=("name",))
CONSISTENT_HASH = Obj(
    {
        "httpHeaderName": STR,
        "httpCookie": HTTP_COOKIE,
        "useSourceIp": BOOL,
        "httpQueryParameterName": STR,
        "minimumRingSize": UINT,
        "ringHash": Obj({"minimumRingSize": UINT}),
    },
    unsupported=("maglev",),
    one_of=("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
)
LOAD_BALANCER = Obj(
    {
        "simple": Enum(
            ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "LEAST_CONN", "UNSPECIFIED"),
            ("PASSTHROUGH",),
        ),
        "consistentHash": CONSISTENT_HASH,
    },
    unsupported=("localityLbSetting", "warmupDurationSecs", "warmup"),
    one_of=("simple", "consistentHash"),
)
CLIENT_TLS_SETTINGS = Obj(
    {
        "mode": Enum(("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")),
        "clientCertificate": STR,
        "privateKey": STR,
        "caCertificates": STR,
        "subjectAltNames": STRS,
        "sni": STR,
        "insecureSkipVerify": BOOL,
    },
    unsupported=("credentialName", "caCrl"),
)
CONNECTION_POOL = Obj(
    {
        "tcp": Obj(
            {"maxConnections": INT32, "connectTimeout": DURATION},
            unsupported=("tcpKeepalive", "maxConnectionDuration", "idleTimeout"),
        ),
        "http": Obj(
            {
                "http1MaxPendingRequests": INT32,
                "http2MaxRequests": INT32,
                "maxRequestsPerConnection": INT32,
                "maxRetries": INT32,
                "idleTimeout": DURATION,
                "h2UpgradePolicy": Enum(("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")),
                "useClientProtocol": BOOL,
                "maxConcurrentStreams": INT32,
            }
        ),
    }
)
OUTLIER_DETECTION = Obj(
    {
        "consecutive5xxErrors": UINT,
        "consecutiveGatewayErrors": UINT,
        "interval": DURATION,
        "baseEjectionTime": DURATION,
        "maxEjectionPercent": Int(0, 100),
        "minHealthPercent": Int(0, 100),
        "splitExternalLocalOriginErrors": BOOL,
    },
    unsupported=("consecutiveLocalOriginFailures", "consecutiveErrors"),
)
PORT_TRAFFIC_POLICY = Obj(
    {
        "port": Obj({"number": PORT}, required=("number",)),
        "tls": CLIENT_TLS_SETTINGS,
        "loadBalancer": LOAD_BALANCER,
        "connectionPool": CONNECTION_POOL,
        "outlierDetection": OUTLIER_DETECTION,
    },
    required=("port",),
)
TRAFFIC_POLICY = Obj(
    {
        "loadBalancer": LOAD_BALANCER,
        "tls": CLIENT_TLS_SETTINGS,
        "portLevelSettings": ListOf(PORT_TRAFFIC_POLICY),
        "connectionPool": CONNECTION_POOL,
        "outlierDetection": OUTLIER_DETECTION,
    },
    unsupported=(
        "tunnel",
        "proxyProtocol",
        "retryBudget",
    ),
)
DESTINATION_RULE = Obj(
    {
        "host": STR,
        "subsets": ListOf(
            Obj(
                {"name": STR, "labels": LABELS, "trafficPolicy": TRAFFIC_POLICY},
                required=("name",),
            )
        ),
        "trafficPolicy": TRAFFIC_POLICY,
        "exportTo": STRS,
    },
    required=("host",),
    unsupported=("workloadSelector",),
)

# --- security and telemetry -------------------------------------------------
# PeerAuthentication, AuthorizationPolicy, RequestAuthentication and Telemetry are enforced.

# Sidecars are selected by labels; targetRef(s) name gateways and waypoints, which Pillion has not.
_SELECTOR_ONLY: Mapping[str, Spec] = {"selector": LABEL_SELECTOR}
_TARGET_REFS = ("targetRef", "targetRefs")
AUTHORIZATION_POLICY = Obj(
    {
        **_SELECTOR_ONLY,
        "action": Enum(("ALLOW", "DENY", "AUDIT", "CUSTOM")),
        "provider": Obj({"name": STR}),
        "rules": ListOf(
            Obj(
                {
                    "from": ListOf(
                        Obj(
                            {
                                "source": Obj(
                                    {
                                        name: STRS
                                        for name in (
                                            "principals",
                                            "notPrincipals",
                                            "requestPrincipals",
                                            "notRequestPrincipals",
                                            "namespaces",
                                            "notNamespaces",
                                            "ipBlocks",
                                            "notIpBlocks",
                                            "remoteIpBlocks",
                                            "notRemoteIpBlocks",
                                        )
                                    },
                                    unsupported=("serviceAccounts", "notServiceAccounts"),
                                )
                            }
                        )
                    ),
                    "to": ListOf(
                        Obj(
                            {
                                "operation": Obj(
                                    {
                                        name: STRS
                                        for name in (
                                            "hosts",
                                            "notHosts",
                                            "ports",
                                            "notPorts",
                                            "methods",
                                            "notMethods",
                                            "paths",
                                            "notPaths",
                                        )
                                    }
                                )
                            }
                        )
                    ),
                    "when": ListOf(
                        Obj({"key": STR, "values": STRS, "notValues": STRS}, required=("key",))
                    ),
                }
            )
        ),
    },
    unsupported=_TARGET_REFS,
)
MTLS_MODE = Obj({"mode": Enum(("UNSET", "DISABLE", "PERMISSIVE", "STRICT"))})
PEER_AUTHENTICATION = Obj(
    {"selector": LABEL_SELECTOR, "mtls": MTLS_MODE, "portLevelMtls": PortMapOf(MTLS_MODE)}
)
JWT_RULE = Obj(
    {
        "issuer": STR,
        "audiences": STRS,
        "jwksUri": STR,
        "jwks": STR,
        "fromHeaders": ListOf(Obj({"name": STR, "prefix": STR}, required=("name",))),
        "fromParams": STRS,
        "fromCookies": STRS,
        "outputPayloadToHeader": STR,
        "forwardOriginalToken": BOOL,
        "outputClaimToHeaders": ListOf(Obj({"header": STR, "claim": STR})),
        "timeout": DURATION,
    },
    required=("issuer",),
)
REQUEST_AUTHENTICATION = Obj(
    {**_SELECTOR_ONLY, "jwtRules": ListOf(JWT_RULE)}, unsupported=_TARGET_REFS
)
PROVIDERS = ListOf(Obj({"name": STR}, required=("name",)))
WORKLOAD_MODE = Obj({"mode": Enum(("CLIENT_AND_SERVER", "CLIENT", "SERVER"))})
TELEMETRY = Obj(
    {
        **_SELECTOR_ONLY,
        "tracing": ListOf(
            Obj(
                {
                    "match": WORKLOAD_MODE,
                    "providers": PROVIDERS,
                    "randomSamplingPercentage": PERCENT,
                    "disableSpanReporting": BOOL,
                    "useRequestIdForTraceSampling": BOOL,
                },
                unsupported=("customTags",),
            )
        ),
        # Shape-checked, then refused unless empty by telemetry.py (standard metrics are always on).
        "metrics": ListOf(
            Obj(
                {
                    "providers": PROVIDERS,
                    "reportingInterval": DURATION,
                    "overrides": ListOf(
                        Obj(
                            {
                                "match": Obj({"metric": STR, "mode": STR, "customMetric": STR}),
                                "disabled": BOOL,
                                "tagOverrides": MapOf(
                                    STR,
                                    Obj({"operation": Enum(("UPSERT", "REMOVE")), "value": STR}),
                                ),
                            }
                        )
                    ),
                }
            )
        ),
        "accessLogging": ListOf(
            Obj(
                {
                    "match": WORKLOAD_MODE,
                    "providers": PROVIDERS,
                    "disabled": BOOL,
                    "filter": Obj({}, unsupported=("expression",)),
                }
            )
        ),
    },
    unsupported=_TARGET_REFS,
)

# --- mesh-wide settings -------------------------------------------------------

# [tracing] MeshConfig tracing
TRACING_UNSUPPORTED = ("zipkin", "lightstep", "datadog", "stackdriver", "openCensusAgent", "custom_tags",
                       "max_path_tag_length", "tlsSettings")
PROXY_CONFIG_UNSUPPORTED = ("concurrency", "proxyMetadata", "holdApplicationUntilProxyStarts", "drainDuration",
                            "terminationDrainDuration", "discoveryAddress", "proxyStatsMatcher", "image")
EXTENSION_PROVIDER = Obj(
    {
        "name": STR,
        "opentelemetry": Obj(
            {"service": STR, "port": PORT},
            required=("service", "port"),
            unsupported=("maxTagLength", "http", "grpc", "resourceDetectors", "dynatraceSampler"),
        ),
        # [telemetry] a file access logger Telemetry accessLogging may name (telemetry.py checks logFormat)
        "envoyFileAccessLog": Obj(
            {"path": STR, "logFormat": Obj({"text": STR, "labels": MapOf(STR, STR)}, unsupported=("omitEmptyValues",))},
        ),
    },
    required=("name",),
    unsupported=("zipkin", "lightstep", "datadog", "stackdriver", "skywalking", "prometheus",
                 "envoyOtelAls", "envoyHttpAls", "envoyTcpAls",
                 "envoyExtAuthzHttp", "envoyExtAuthzGrpc", "sds"),
)
# [tracing] end

MESH_CONFIG = Obj(
    {
        "trustDomain": STR,
        "rootNamespace": STR,
        "outboundTrafficPolicy": Obj({"mode": Enum(("REGISTRY_ONLY", "ALLOW_ANY"))}),
        "enableAutoMtls": BOOL,
        # [accesslog]
        "accessLogFile": STR,
        "accessLogEncoding": Enum(("TEXT", "JSON")),
        "accessLogFormat": STR,
        # [accesslog] end
        # [tracing] Istio's shape: an opentelemetry extension provider named by defaultProviders.tracing
        "enableTracing": BOOL,
        "defaultConfig": Obj(
            {"tracing": Obj({"sampling": PERCENT}, unsupported=TRACING_UNSUPPORTED)},
            unsupported=PROXY_CONFIG_UNSUPPORTED,
        ),
        "extensionProviders": ListOf(EXTENSION_PROVIDER),
        "defaultProviders": Obj({"tracing": STRS}, unsupported=("metrics", "accessLogging")),
        # [tracing] end
    },
    unsupported=(
        "trustDomainAliases",
        "caCertificates",
    ),
)

# kind -> (API groups it may come from, spec table). MeshConfig is Pillion's own
# document and takes any apiVersion; see istio.py.
NETWORKING = ("networking.istio.io",)
SECURITY = ("security.istio.io",)
TELEMETRY_GROUP = ("telemetry.istio.io",)
KINDS: Mapping[str, tuple[tuple[str, ...], Obj]] = {
    "ServiceEntry": (NETWORKING, SERVICE_ENTRY),
    "WorkloadEntry": (NETWORKING, WORKLOAD_ENTRY_SPEC),
    "WorkloadGroup": (NETWORKING, WORKLOAD_GROUP),
    "Sidecar": (NETWORKING, SIDECAR),
    "VirtualService": (NETWORKING, VIRTUAL_SERVICE),
    "DestinationRule": (NETWORKING, DESTINATION_RULE),
    "AuthorizationPolicy": (SECURITY, AUTHORIZATION_POLICY),
    "PeerAuthentication": (SECURITY, PEER_AUTHENTICATION),
    "RequestAuthentication": (SECURITY, REQUEST_AUTHENTICATION),
    "Telemetry": (TELEMETRY_GROUP, TELEMETRY),
    "MeshConfig": ((), MESH_CONFIG),
}
API_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "networking.istio.io": ("v1alpha3", "v1beta1", "v1"),
    "security.istio.io": ("v1beta1", "v1"),
    "telemetry.istio.io": ("v1alpha1", "v1"),
}
UNENFORCED_KINDS: frozenset[str] = frozenset()  # every kind read is enforced
