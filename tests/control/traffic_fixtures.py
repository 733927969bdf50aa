"""Shared YAML for the traffic-management tests: Istio's task fixtures and one config using every field."""

from __future__ import annotations

from control.translate import ConfigSet, NodeInfo, Resources, load_sources, load_text, translate
from tests.control.translate_fixtures import DATA

PRODUCTPAGE = NodeInfo(namespace="default", labels={"app": "productpage"}, name="productpage-1")
FORTIO = NodeInfo(namespace="default", labels={"app": "fortio"})
SLEEP = NodeInfo(namespace="default", labels={"app": "sleep"})
REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
HTTPBIN = "httpbin.default.svc.cluster.local"
TCP_ECHO = "tcp-echo.default.svc.cluster.local"
GRPC = "grpc.default.svc.cluster.local"

# task file -> (the registry it is loaded with, the client node)
TASKS = {
    "tasks-request-routing.yaml": ("tasks-registry-bookinfo.yaml", PRODUCTPAGE),
    "tasks-traffic-shifting.yaml": ("tasks-registry-bookinfo.yaml", PRODUCTPAGE),
    "tasks-fault-delay.yaml": ("tasks-registry-bookinfo.yaml", PRODUCTPAGE),
    "tasks-fault-abort.yaml": ("tasks-registry-bookinfo.yaml", PRODUCTPAGE),
    "tasks-request-timeouts.yaml": ("tasks-registry-bookinfo.yaml", PRODUCTPAGE),
    "tasks-circuit-breaking.yaml": ("tasks-registry-httpbin.yaml", FORTIO),
    "tasks-mirroring.yaml": ("tasks-registry-httpbin.yaml", FORTIO),
    "tasks-tcp-traffic-shifting.yaml": ("", SLEEP),
}


def task_config(name: str) -> ConfigSet:
    registry, _ = TASKS[name]
    files = [registry, name] if registry else [name]
    return load_sources([(file, (DATA / file).read_text()) for file in files])


def task_resources(name: str, *, intercept: bool = False) -> Resources:
    _, node = TASKS[name]
    return translate(task_config(name), NodeInfo(node.namespace, node.labels, node.name, intercept))


# Every traffic-management field Pillion translates, in one mesh (the productpage's view).
EVERYTHING = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1, security.istio.io/tlsMode: istio}, serviceAccount: reviews}
  - {address: 10.0.0.2, labels: {version: v2, security.istio.io/tlsMode: istio}, serviceAccount: reviews}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: grpc}
spec:
  hosts: [grpc.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 7070, name: api, protocol: GRPC}]
  endpoints:
  - {address: 10.0.3.1, labels: {security.istio.io/tlsMode: istio}, serviceAccount: grpc}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s}
      http: {http2MaxRequests: 50, maxRetries: 4, idleTimeout: 30s, h2UpgradePolicy: UPGRADE,
             maxConcurrentStreams: 10}
    outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 3, interval: 5s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {http: {useClientProtocol: true, maxRequestsPerConnection: 10}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: moved
    match: [{uri: {prefix: /old}, method: {exact: GET}}]
    redirect: {uri: /new, authority: reviews.example, redirectCode: 302}
  - name: teapot
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
    headers: {response: {set: {x-teapot: "yes"}}}
  - name: api
    match:
    - uri: {regex: "/api/v[0-9]+/.*"}
      ignoreUriCase: true
      queryParams: {debug: {exact: ""}, user: {prefix: a}}
      withoutHeaders: {x-skip: {exact: "1"}}
      authority: {prefix: reviews}
      scheme: {exact: http}
    rewrite:
      uriRegexRewrite: {match: "^/api/(v[0-9]+)/(.*)$", rewrite: "/\\\\2?version=\\\\1"}
      authority: reviews.internal
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {set: {x-d: "4"}, remove: [x-powered-by]}
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,reset,409"}
    timeout: 5s
    route: [{destination: {host: reviews, subset: v1}}]
  - name: shadow
    match: [{uri: {prefix: /p}, sourceLabels: {app: productpage}}]
    rewrite: {uri: /}
    mirrors: [{destination: {host: reviews, subset: v2}, percentage: {value: 25}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}}
    retries: {attempts: 0}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: elsewhere
    match: [{uri: {prefix: /x}, sourceNamespace: other}, {uri: {prefix: /y}, port: 9081}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc}
spec:
  hosts: [grpc]
  http:
  - retries: {attempts: 2, retryOn: "unavailable,cancelled,deadline-exceeded"}
    fault: {delay: {fixedDelay: 100ms, percent: 5}}
    route: [{destination: {host: grpc}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: productpage}
spec:
  workloadSelector: {labels: {app: productpage}}
  ingress:
  - port: {number: 9090, name: http-web}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 7071, name: grpc-api}
    defaultEndpoint: 127.0.0.1:8081
  egress:
  - port: {number: 9080, name: http}
    hosts: ["./*"]
  - port: {number: 7070, name: grpc, protocol: GRPC}
    hosts: ["./*"]
"""


def everything() -> Resources:
    return translate(load_text(EVERYTHING), PRODUCTPAGE)
