"""The shared translator: Istio YAML -> validated objects -> Envoy xDS v3 resources.

Used by the proxy's standalone mode and by the control server. It imports
only the standard library, PyYAML, the xDS protos and `certs`; it does no I/O
except reading the YAML files it is asked to read.

    config = load_dir("mesh/")                      # raises ConfigError (all problems)
    resources = translate(config, NodeInfo(namespace="default", labels={"app": "web"}))

Modules: `errors` (Problem, ConfigError), `documents` (YAML files with line
numbers), `schema` + `specs` (field shapes), `istio` + `kinds` (loading and
building typed objects), `model` (the typed objects), `scope` (what a node
sees), `security` (PeerAuthentication modes and the mutual TLS pieces),
`listeners`, `routes`, `clusters` (xDS builders), `resources` (translate),
`bootstrap` (the same resources as a static Envoy bootstrap).
"""

from control.translate.bootstrap import envoy_bootstrap
from control.translate.errors import ConfigError, Problem
from control.translate.istio import load_dir, load_sources, load_text
from control.translate.model import ConfigSet, MeshConfig, NodeInfo
from control.translate.resources import Resources, translate

__all__ = [
    "ConfigError",
    "ConfigSet",
    "MeshConfig",
    "NodeInfo",
    "Problem",
    "Resources",
    "envoy_bootstrap",
    "load_dir",
    "load_sources",
    "load_text",
    "translate",
]
