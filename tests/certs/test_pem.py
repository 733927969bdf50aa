"""certs.pem: parse/serialize, file modes 0600/0644 whatever the umask, atomic replace."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from certs import pem
from certs.ca import CertificateAuthority
from certs.csr import generate_key
from certs.errors import InvalidPem
from tests.certs.factory import der, issue


@pytest.fixture(params=[0o022, 0o077, 0o000])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_modes_whatever_the_umask(tmp_path, umask: int, root_ca: CertificateAuthority) -> None:
    pem.write_private_key(tmp_path / "key.pem", root_ca.key)
    pem.write_certs(tmp_path / "cert.pem", [root_ca.cert])
    assert mode(tmp_path / "key.pem") == 0o600
    assert mode(tmp_path / "cert.pem") == 0o644


def test_replacing_a_wide_key_file_narrows_it(tmp_path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("old")
    os.chmod(path, 0o666)
    pem.write_private_key(path, generate_key())
    assert mode(path) == 0o600


def test_atomic_replace(tmp_path, root_ca: CertificateAuthority) -> None:
    path = tmp_path / "cert-chain.pem"
    pem.write_certs(path, [root_ca.cert])
    with open(path, "rb") as reader:  # a reader that opened the old file keeps it whole
        old_inode = os.fstat(reader.fileno()).st_ino
        chain, _ = issue(root_ca)
        pem.write_certs(path, chain)
        assert pem.parse_certs(reader.read()) == [root_ca.cert]
    assert os.stat(path).st_ino != old_inode
    assert pem.read_certs(path) == chain
    assert sorted(os.listdir(tmp_path)) == ["cert-chain.pem"]  # no temporary left behind


def test_failed_write_leaves_target_untouched(tmp_path, monkeypatch, root_ca: CertificateAuthority) -> None:
    path = tmp_path / "cert.pem"
    pem.write_certs(path, [root_ca.cert])
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(pem.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        pem.write_certs(path, issue(root_ca)[0])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cert.pem"]


def test_temp_file_never_follows_symlinks(tmp_path, monkeypatch) -> None:
    # O_EXCL: if the temporary name exists (even as a symlink), the write fails instead of following it
    victim = tmp_path / "victim"
    victim.write_text("keep")
    monkeypatch.setattr(pem.secrets, "token_hex", lambda n: "fixed")
    os.symlink(victim, tmp_path / ".key.pem.fixed.tmp")
    with pytest.raises(FileExistsError):
        pem.write_private_key(tmp_path / "key.pem", generate_key())
    assert victim.read_text() == "keep"


def test_round_trips(tmp_path, intermediate_ca: CertificateAuthority) -> None:
    chain, key = issue(intermediate_ca)
    data = pem.certs_to_pem(chain)
    assert data.count(b"BEGIN CERTIFICATE") == 3
    assert pem.parse_certs(data) == chain
    assert pem.parse_certs(der(chain[0])) == chain[:1]
    loaded = pem.parse_private_key(pem.key_to_pem(key))
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    pem.write_private_key(tmp_path / "k.pem", key)
    assert pem.read_private_key(tmp_path / "k.pem").public_key() == key.public_key()


def test_bad_input() -> None:
    for data in (b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(InvalidPem) as info:
            pem.parse_certs(data)
        assert info.value.reason == "bad_pem"
    with pytest.raises(InvalidPem):
        pem.parse_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InvalidPem, match="unsupported key type"):
        pem.parse_private_key(ed)
