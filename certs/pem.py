"""PEM in and out: certificates, private keys, and files written with safe modes.

Owns: encoding and decoding PEM, and the only file writes in ``certs``. A private key
file is created mode 0600 and a certificate file mode 0644, whatever the umask, and
every write goes to a temporary file in the same directory that then replaces the
target with ``os.replace``: a reader (a sidecar reloading its certs, an operator's
``cat``) sees the old file or the new one, never half of one, and a key never
exists on disk, even for an instant, with a wider mode than 0600.

Must not: read or write a path it was not given, choose file names (its callers do),
or know what the certificates mean.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs.errors import InvalidPem

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""The key types ``certs`` creates and accepts: ECDSA (P-256 by default) and RSA."""

KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644

_PEM_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


def parse_certs(data: bytes, what: str = "input") -> list[x509.Certificate]:
    """Every certificate in ``data`` (PEM, in order; a single DER cert is accepted too)."""
    if _PEM_CERT_MARKER in data:
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise InvalidPem(f"{what}: bad PEM certificate: {exc}") from exc
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise InvalidPem(f"{what}: no PEM or DER certificate found") from exc


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Concatenated PEM blocks, in the order given (leaf first for a chain)."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what Envoy, Istio and Python's ssl load without a password)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_private_key(data: bytes, what: str = "input") -> PrivateKey:
    """Load an unencrypted PEM private key; only EC and RSA keys are accepted."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidPem(f"{what}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidPem(f"{what}: unsupported key type {type(key).__name__} (want EC or RSA)")
    return key


def read_certs(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in the file at ``path``; InvalidPem if there is none."""
    with open(path, "rb") as handle:
        return parse_certs(handle.read(), what=os.fspath(path))


def read_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """The private key in the file at ``path``."""
    with open(path, "rb") as handle:
        return parse_private_key(handle.read(), what=os.fspath(path))


def write_certs(path: str | os.PathLike[str], certs: Iterable[x509.Certificate]) -> None:
    """Atomically write ``certs`` as PEM to ``path`` with mode 0644."""
    atomic_write(path, certs_to_pem(certs), CERT_FILE_MODE)


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Atomically write ``key`` as PKCS#8 PEM to ``path`` with mode 0600."""
    atomic_write(path, key_to_pem(key), KEY_FILE_MODE)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and ``os.replace``.

    The temporary file is created with O_CREAT|O_EXCL and ``mode`` (so it never
    follows a planted symlink and never starts wider than ``mode``), then fchmod'ed
    to exactly ``mode`` (the umask may have narrowed 0644), filled, fsync'ed and
    renamed over the target. On any error the temporary file is removed and the
    target is left as it was.
    """
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; best effort (some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "CERT_FILE_MODE",
    "KEY_FILE_MODE",
    "PrivateKey",
    "atomic_write",
    "certs_to_pem",
    "key_to_pem",
    "parse_certs",
    "parse_private_key",
    "read_certs",
    "read_private_key",
    "write_certs",
    "write_private_key",
]
