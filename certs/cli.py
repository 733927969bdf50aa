"""``pillion certs``: make a mesh CA, issue a workload cert, inspect certificate files.

Owns: argument parsing, the output text, the file names written in ``--out`` and the
exit codes (0 ok, 1 a certificate or file problem, 2 bad usage). It is the only
module of ``certs`` that reads the clock.

Must not: hold any certificate logic. Each command is a few calls into ``ca``,
``csr``, ``pem`` and ``verify``; ``proxy/cli.py`` dispatches ``pillion certs ...`` here
and ``python -m certs ...`` runs the same ``main``.

Commands::

    pillion certs init --trust-domain TD --out DIR [--intermediate] [--days 3650]
    pillion certs issue --ca-dir DIR --spiffe-id ID --out DIR [--hours 24]
    pillion certs inspect FILE
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from certs import ca as ca_mod
from certs._time import as_utc, utc_now
from certs.csr import build_csr, generate_key
from certs.errors import CertError, IdentityMismatch, MalformedCert
from certs.pem import read_certs, write_certs, write_private_key
from certs.spiffe import SpiffeId
from certs.verify import ca_trust_domain, is_signed_by, spiffe_id_of

WORKLOAD_KEY_FILE = "key.pem"
WORKLOAD_CHAIN_FILE = "cert-chain.pem"


def build_parser(prog: str = "pillion certs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Mesh CA and workload certificates.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create the mesh root CA (and an intermediate)")
    init.add_argument("--trust-domain", required=True, help="e.g. cluster.local")
    init.add_argument("--out", required=True, help="directory for the PEM files (created if missing)")
    init.add_argument("--intermediate", action="store_true",
                      help="also create an intermediate CA (Istio plug-in CA files)")
    init.add_argument("--days", type=int, default=3650, help="root validity in days (default 3650)")
    init.add_argument("--intermediate-days", type=int, default=730,
                      help="intermediate validity in days, capped at the root's (default 730)")
    init.add_argument("--key-type", choices=["ec", "rsa"], default="ec",
                      help="ec: ECDSA P-256 (default); rsa: RSA 2048")
    init.add_argument("--force", action="store_true", help="replace existing CA files in --out")

    issue = commands.add_parser("issue", help="issue a workload key and cert chain (tests, demos)")
    issue.add_argument("--ca-dir", required=True, help="a directory written by `certs init`")
    issue.add_argument("--spiffe-id", required=True, help="spiffe://<td>/ns/<ns>/sa/<sa>")
    issue.add_argument("--out", required=True, help="directory for key.pem, cert-chain.pem, root-cert.pem")
    issue.add_argument("--hours", type=float, default=24.0, help="validity in hours (default 24)")

    inspect = commands.add_parser("inspect", help="show the certificates in a PEM file")
    inspect.add_argument("file", help="a PEM file with one or more certificates (a chain: leaf first)")
    inspect.add_argument("--now", type=_iso_time, default=None,
                         help="evaluate validity at this ISO 8601 time instead of the clock")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "pillion certs") -> int:
    """Run one ``pillion certs`` command; return the process exit code."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "init":
            return _init(args, sys.stdout)
        if args.command == "issue":
            return _issue(args, sys.stdout)
        return _inspect(args, sys.stdout)
    except (CertError, OSError, ValueError) as exc:
        sys.stderr.write(f"{prog} {args.command}: error: {exc}\n")
        return 1


def _init(args: argparse.Namespace, out: TextIO) -> int:
    if args.days <= 0 or args.intermediate_days <= 0:
        raise ValueError("--days and --intermediate-days must be positive")
    names = [ca_mod.ROOT_CERT_FILE, ca_mod.ROOT_KEY_FILE]
    if args.intermediate:
        names += [ca_mod.CA_CERT_FILE, ca_mod.CA_KEY_FILE, ca_mod.CERT_CHAIN_FILE]
    paths = {name: os.path.join(args.out, name) for name in names}
    existing = [path for path in paths.values() if os.path.exists(path)]
    if existing and not args.force:
        raise ValueError(f"refusing to replace {', '.join(existing)} (use --force)")
    now = utc_now()
    root = ca_mod.create_root_ca(
        args.trust_domain, now=now, ttl=dt.timedelta(days=args.days),
        key_type=args.key_type, path_length=1 if args.intermediate else 0,
    )
    os.makedirs(args.out, exist_ok=True)
    write_private_key(paths[ca_mod.ROOT_KEY_FILE], root.key)
    write_certs(paths[ca_mod.ROOT_CERT_FILE], [root.cert])
    signer = root
    if args.intermediate:
        signer = ca_mod.create_intermediate_ca(
            root, now=now, ttl=dt.timedelta(days=args.intermediate_days), key_type=args.key_type
        )
        write_private_key(paths[ca_mod.CA_KEY_FILE], signer.key)
        write_certs(paths[ca_mod.CA_CERT_FILE], [signer.cert])
        write_certs(paths[ca_mod.CERT_CHAIN_FILE], signer.chain)
    out.write(f"trust domain {args.trust_domain}: signing CA {_subject(signer.cert)}, "
              f"valid until {_when(signer.cert.not_valid_after_utc)}\n")
    for path in paths.values():
        out.write(f"  wrote {path}\n")
    return 0


def _issue(args: argparse.Namespace, out: TextIO) -> int:
    if args.hours <= 0:
        raise ValueError("--hours must be positive")
    if os.path.realpath(args.out) == os.path.realpath(args.ca_dir):
        raise ValueError("--out must not be the CA directory (cert-chain.pem would be replaced)")
    identity = SpiffeId.parse(args.spiffe_id)
    authority = ca_mod.CertificateAuthority.load_dir(args.ca_dir)
    key = generate_key()
    chain = authority.sign_csr(
        build_csr(key, identity), identity, now=utc_now(), ttl=dt.timedelta(hours=args.hours)
    )
    os.makedirs(args.out, exist_ok=True)
    key_path = os.path.join(args.out, WORKLOAD_KEY_FILE)
    chain_path = os.path.join(args.out, WORKLOAD_CHAIN_FILE)
    root_path = os.path.join(args.out, ca_mod.ROOT_CERT_FILE)
    write_private_key(key_path, key)
    write_certs(chain_path, chain)
    write_certs(root_path, [authority.root])
    out.write(f"issued {identity}, valid until {_when(chain[0].not_valid_after_utc)}\n")
    for path in (key_path, chain_path, root_path):
        out.write(f"  wrote {path}\n")
    return 0


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    certs = read_certs(args.file)
    now = as_utc(args.now) if args.now is not None else utc_now()
    out.write(f"{args.file}: {len(certs)} certificate{'s' if len(certs) != 1 else ''}\n")
    for index, cert in enumerate(certs):
        heading = cert.subject.rfc4514_string() or _spiffe_id(cert)
        out.write(f"\n[{index}] {heading}\n")
        for label, value in _describe(cert, now):
            out.write(f"  {label + ':':<15} {value}\n")
        if index + 1 < len(certs):
            signed = is_signed_by(cert, certs[index + 1])
            out.write(f"  {'signed by next:':<15} {'yes' if signed else 'NO'}\n")
        else:
            out.write(f"  {'self-signed:':<15} {'yes' if is_signed_by(cert, cert) else 'no'}\n")
    return 0


def _describe(cert: x509.Certificate, now: dt.datetime) -> list[tuple[str, str]]:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        remaining = f"not yet valid (starts in {_span(start - now)})"
    elif now > end:
        remaining = f"EXPIRED {_span(now - end)} ago"
    else:
        remaining = f"{_span(end - now)} left"
    return [
        ("subject", _subject(cert)),
        ("issuer", cert.issuer.rfc4514_string() or "(empty)"),
        ("serial", f"{cert.serial_number:x}"),
        ("not before", _when(start)),
        ("not after", f"{_when(end)} ({remaining})"),
        ("spiffe id", _spiffe_id(cert)),
        ("is CA", _ca_flag(cert)),
        ("key", _key_type(cert)),
        ("sha256", cert.fingerprint(hashes.SHA256()).hex(":").upper()),
    ]


def _spiffe_id(cert: x509.Certificate) -> str:
    try:
        return str(spiffe_id_of(cert))
    except MalformedCert as exc:
        return f"(unreadable: {exc})"
    except IdentityMismatch:
        pass
    trust_domain = ca_trust_domain(cert)
    return f"spiffe://{trust_domain} (trust domain)" if trust_domain else "-"


def _ca_flag(cert: x509.Certificate) -> str:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "no (no basicConstraints)"
    if not constraints.ca:
        return "no"
    if constraints.path_length is None:
        return "yes"
    return f"yes (path length {constraints.path_length})"


def _key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty)"


def _when(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def _iso_time(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("--now needs a timezone, e.g. 2030-01-01T00:00:00Z")
    return value
