"""TLS parts of xDS -> model: transport sockets, TLS contexts, SDS secrets.

A helper of ``compile.py`` (same rules: accept exactly what is implemented,
refuse the rest with the field's path). Certificates are referenced by SDS
secret name ("default" for the workload's certificate, "ROOTCA" for the
mesh roots, as Istio names them) and resolved at run time from the
snapshot's secrets, so a rotation is a new secret, not a new listener.
"""

from __future__ import annotations

from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf.message import Message

from proxy import model
from proxy.errors import InvalidResource

TLS_SOCKET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
DOWNSTREAM_TLS = TLS_SOCKET_TYPE + ".DownstreamTlsContext"
UPSTREAM_TLS = TLS_SOCKET_TYPE + ".UpstreamTlsContext"
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
SOCKET_MATCH_KEY = "envoy.transport_socket_match"


class Failer(Protocol):
    def fail(self, path: str, message: str) -> InvalidResource: ...


def _only(ctx: Failer, msg: Message, allowed: set[str], path: str) -> None:
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise ctx.fail(f"{path}.{fd.name}", "field is not supported by this proxy")


def _sds_name(ctx: Failer, cfg: secret_pb2.SdsSecretConfig, path: str) -> str:
    _only(ctx, cfg, {"name", "sds_config"}, path)
    if cfg.HasField("sds_config") and cfg.sds_config.WhichOneof("config_source_specifier") != "ads":
        raise ctx.fail(f"{path}.sds_config", "only ads (or static) secrets are supported")
    if not cfg.name:
        raise ctx.fail(f"{path}.name", "required")
    return cfg.name


def _sans(ctx: Failer, vc: common_pb2.CertificateValidationContext, path: str) -> tuple[model.SanMatch, ...]:
    out = []
    for i, m in enumerate(vc.match_typed_subject_alt_names):
        p = f"{path}.match_typed_subject_alt_names[{i}]"
        _only(ctx, m, {"san_type", "matcher"}, p)
        kind = common_pb2.SubjectAltNameMatcher.SanType.Name(m.san_type)
        if kind not in ("URI", "DNS"):
            raise ctx.fail(f"{p}.san_type", f"{kind} is not supported (URI and DNS are)")
        which = m.matcher.WhichOneof("match_pattern")
        _only(ctx, m.matcher, {"exact", "prefix"}, f"{p}.matcher")
        if which == "exact":
            out.append(model.SanMatch(kind, m.matcher.exact))
        elif which == "prefix":
            out.append(model.SanMatch(kind, m.matcher.prefix, prefix=True))
        else:
            raise ctx.fail(f"{p}.matcher", "exact or prefix is required")
    return tuple(out)


def _validation(ctx: Failer, c: tls_pb2.CommonTlsContext, path: str) -> tuple[str, tuple[model.SanMatch, ...], str]:
    """(roots secret name, accepted peer SANs, CA file) of a CommonTlsContext."""
    which = c.WhichOneof("validation_context_type")
    if which == "combined_validation_context":
        cv = c.combined_validation_context
        p = f"{path}.combined_validation_context"
        _only(ctx, cv, {"default_validation_context", "validation_context_sds_secret_config"}, p)
        _only(ctx, cv.default_validation_context, {"match_typed_subject_alt_names"}, f"{p}.default_validation_context")
        roots = _sds_name(ctx, cv.validation_context_sds_secret_config, f"{p}.validation_context_sds_secret_config")
        return roots, _sans(ctx, cv.default_validation_context, f"{p}.default_validation_context"), ""
    if which == "validation_context_sds_secret_config":
        return _sds_name(ctx, c.validation_context_sds_secret_config, f"{path}.validation_context_sds_secret_config"), (), ""
    if which == "validation_context":
        vc = c.validation_context
        p = f"{path}.validation_context"
        _only(ctx, vc, {"trusted_ca", "match_typed_subject_alt_names"}, p)
        ca = ""
        if vc.HasField("trusted_ca"):
            if vc.trusted_ca.WhichOneof("specifier") != "filename":
                raise ctx.fail(f"{p}.trusted_ca", "only filename data sources are supported here")
            ca = vc.trusted_ca.filename
        return "", _sans(ctx, vc, p), ca
    return "", (), ""


def _common(ctx: Failer, c: tls_pb2.CommonTlsContext, path: str) -> dict[str, Any]:
    _only(ctx, c, {"alpn_protocols", "tls_certificate_sds_secret_configs", "tls_certificates",
                   "combined_validation_context", "validation_context_sds_secret_config", "validation_context"}, path)
    if len(c.tls_certificate_sds_secret_configs) > 1 or len(c.tls_certificates) > 1:
        raise ctx.fail(path, "at most one certificate is supported")
    cert_secret = ""
    if c.tls_certificate_sds_secret_configs:
        cert_secret = _sds_name(ctx, c.tls_certificate_sds_secret_configs[0], f"{path}.tls_certificate_sds_secret_configs[0]")
    cert_file = key_file = ""
    if c.tls_certificates:
        tc = c.tls_certificates[0]
        p = f"{path}.tls_certificates[0]"
        _only(ctx, tc, {"certificate_chain", "private_key"}, p)
        if tc.certificate_chain.WhichOneof("specifier") != "filename" or tc.private_key.WhichOneof("specifier") != "filename":
            raise ctx.fail(p, "certificate_chain and private_key must be filename data sources")
        cert_file, key_file = tc.certificate_chain.filename, tc.private_key.filename
    roots, sans, ca_file = _validation(ctx, c, path)
    return {"cert_secret": cert_secret, "cert_file": cert_file, "key_file": key_file, "roots_secret": roots,
            "peer_sans": sans, "ca_file": ca_file, "alpn": tuple(c.alpn_protocols)}


def downstream_tls(ctx: Failer, ts: base_pb2.TransportSocket, path: str) -> model.TlsServer:
    _only(ctx, ts, {"name", "typed_config"}, path)
    if ts.typed_config.type_url != DOWNSTREAM_TLS:
        raise ctx.fail(f"{path}.typed_config", f"unsupported transport socket {ts.typed_config.type_url!r}")
    d = tls_pb2.DownstreamTlsContext()
    ts.typed_config.Unpack(d)
    p = f"{path}.typed_config"
    _only(ctx, d, {"common_tls_context", "require_client_certificate"}, p)
    c = _common(ctx, d.common_tls_context, f"{p}.common_tls_context")
    if not c["cert_secret"]:
        raise ctx.fail(f"{p}.common_tls_context.tls_certificate_sds_secret_configs", "a server certificate secret is required")
    require = d.require_client_certificate.value
    if require and not c["roots_secret"]:
        raise ctx.fail(f"{p}.common_tls_context", "client certificates are required but no validation context names the roots")
    return model.TlsServer(c["cert_secret"], c["roots_secret"], require, c["peer_sans"], c["alpn"])


def upstream_tls(ctx: Failer, ts: base_pb2.TransportSocket, path: str) -> model.TlsClient | None:
    """None for raw_buffer (plaintext)."""
    _only(ctx, ts, {"name", "typed_config"}, path)
    url = ts.typed_config.type_url
    if url == RAW_BUFFER or (not url and ts.name == "envoy.transport_sockets.raw_buffer"):
        return None
    if url != UPSTREAM_TLS:
        raise ctx.fail(f"{path}.typed_config", f"unsupported transport socket {url!r}")
    u = tls_pb2.UpstreamTlsContext()
    ts.typed_config.Unpack(u)
    p = f"{path}.typed_config"
    _only(ctx, u, {"common_tls_context", "sni"}, p)
    c = _common(ctx, u.common_tls_context, f"{p}.common_tls_context")
    verify = bool(c["roots_secret"] or c["ca_file"])
    return model.TlsClient(c["cert_secret"], c["roots_secret"], u.sni, c["peer_sans"], c["alpn"],
                           c["ca_file"], c["cert_file"], c["key_file"], verify)


def secret(msg: secret_pb2.Secret) -> model.Secret:
    class _C:
        def fail(self, path: str, message: str) -> InvalidResource:
            return InvalidResource("Secret", msg.name, path, message)

    ctx = _C()
    _only(ctx, msg, {"name", "tls_certificate", "validation_context"}, "")
    if not msg.name:
        raise ctx.fail("name", "required")
    if msg.HasField("tls_certificate"):
        tc = msg.tls_certificate
        _only(ctx, tc, {"certificate_chain", "private_key"}, "tls_certificate")
        chain, key = tc.certificate_chain, tc.private_key
        if chain.WhichOneof("specifier") != "inline_bytes" or key.WhichOneof("specifier") != "inline_bytes":
            raise ctx.fail("tls_certificate", "certificate_chain and private_key must be inline_bytes")
        _check_pair(ctx, chain.inline_bytes, key.inline_bytes)
        return model.Secret(msg.name, cert_chain=chain.inline_bytes, key=key.inline_bytes)
    if msg.HasField("validation_context"):
        vc = msg.validation_context
        _only(ctx, vc, {"trusted_ca"}, "validation_context")
        if vc.trusted_ca.WhichOneof("specifier") != "inline_bytes":
            raise ctx.fail("validation_context.trusted_ca", "must be inline_bytes")
        return model.Secret(msg.name, roots=vc.trusted_ca.inline_bytes)
    raise ctx.fail("", "tls_certificate or validation_context is required")


def _check_pair(ctx: Failer, chain_pem: bytes, key_pem: bytes) -> None:
    """The key must belong to the chain's first certificate: a half-written rotation (new
    chain, old key) is refused here, so the old secret keeps serving."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, IndexError, TypeError) as e:
        raise ctx.fail("tls_certificate", f"unreadable certificate or key: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ctx.fail("tls_certificate.private_key", "does not match the certificate chain's leaf")


def socket_matches(ctx: Failer, matches: Any, path: str) -> list[tuple[dict[str, str], model.TlsClient | None]]:
    """TransportSocketMatch list -> [(match criteria, tls)] in order (first match wins)."""
    out = []
    for i, m in enumerate(matches):
        p = f"{path}[{i}]"
        _only(ctx, m, {"name", "match", "transport_socket"}, p)
        crit = {k: v.string_value for k, v in m.match.fields.items()}
        out.append((crit, upstream_tls(ctx, m.transport_socket, f"{p}.transport_socket")))
    return out


def endpoint_match_labels(lbe: Any) -> dict[str, str]:
    md = lbe.metadata.filter_metadata.get(SOCKET_MATCH_KEY) if lbe.HasField("metadata") else None
    return {k: v.string_value for k, v in md.fields.items()} if md is not None else {}


def pick_socket(matches: list[tuple[dict[str, str], model.TlsClient | None]], labels: dict[str, str]) -> model.TlsClient | None:
    for crit, tls in matches:
        if all(labels.get(k) == v for k, v in crit.items()):
            return tls
    return None
