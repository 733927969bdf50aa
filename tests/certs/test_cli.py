"""``pillion certs`` init / issue / inspect, through main() and through ``python -m certs``."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority
from certs.cli import main
from certs.pem import read_certs, read_private_key
from certs.spiffe import SpiffeId
from certs.verify import TrustBundle, verify_peer
from tests.certs.factory import WEB

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def now() -> dt.datetime:
    # the CLI reads the real clock, so checks of its output use the real clock too
    return dt.datetime.now(dt.UTC)


def test_init_root_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ca"
    assert main(["init", "--trust-domain", "cluster.local", "--out", str(out), "--days", "30"]) == 0
    assert sorted(os.listdir(out)) == ["root-cert.pem", "root-key.pem"]
    assert mode(out / "root-key.pem") == 0o600 and mode(out / "root-cert.pem") == 0o644
    root = read_certs(out / "root-cert.pem")[0]
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert life == dt.timedelta(days=30, seconds=60)
    assert "wrote" in capsys.readouterr().out
    wl = tmp_path / "wl"
    assert main(["issue", "--ca-dir", str(out), "--spiffe-id", WEB, "--out", str(wl)]) == 0
    chain = read_certs(wl / "cert-chain.pem")
    assert chain[1:] == [root] and read_certs(wl / "root-cert.pem") == [root]
    assert chain[0].not_valid_after_utc - chain[0].not_valid_before_utc == dt.timedelta(hours=24, seconds=60)
    assert verify_peer(chain, [root], now=now()) == SpiffeId.parse(WEB)


def test_init_intermediate_issue_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, wl_dir = tmp_path / "ca", tmp_path / "web"
    assert main(["init", "--trust-domain", "cluster.local", "--out", str(ca_dir), "--intermediate"]) == 0
    assert sorted(os.listdir(ca_dir)) == [
        "ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "root-key.pem",
    ]
    for key in ("root-key.pem", "ca-key.pem"):
        assert mode(ca_dir / key) == 0o600
    for cert in ("root-cert.pem", "ca-cert.pem", "cert-chain.pem"):
        assert mode(ca_dir / cert) == 0o644
    ca = CertificateAuthority.load_dir(ca_dir)
    assert ca.chain[-1] == read_certs(ca_dir / "root-cert.pem")[0]
    assert read_certs(ca_dir / "cert-chain.pem") == list(ca.chain)

    assert main(["issue", "--ca-dir", str(ca_dir), "--spiffe-id", WEB, "--out", str(wl_dir), "--hours", "2"]) == 0
    assert mode(wl_dir / "key.pem") == 0o600 and mode(wl_dir / "cert-chain.pem") == 0o644
    chain = read_certs(wl_dir / "cert-chain.pem")
    assert len(chain) == 3 and chain[1:] == list(ca.chain)
    assert read_private_key(wl_dir / "key.pem").public_key() == chain[0].public_key()
    assert chain[0].not_valid_after_utc - chain[0].not_valid_before_utc == dt.timedelta(hours=2, seconds=60)
    bundle = TrustBundle.from_roots(read_certs(wl_dir / "root-cert.pem"))
    assert verify_peer(chain[:2], bundle, now=now()) == SpiffeId.parse(WEB)

    capsys.readouterr()
    assert main(["inspect", str(wl_dir / "cert-chain.pem")]) == 0
    text = capsys.readouterr().out
    assert "3 certificates" in text
    assert text.count("signed by next: yes") == 2 and "self-signed:    yes" in text
    assert f"spiffe id:      {WEB}" in text
    assert "spiffe://cluster.local (trust domain)" in text
    assert "is CA:          no" in text and "yes (path length 0)" in text and "yes (path length 1)" in text
    assert text.count("key:            EC P-256") == 3
    assert "sha256:" in text and "left)" in text
    assert "CN=Pillion Intermediate CA,O=cluster.local" in text


def test_inspect_at_another_time_and_broken_chains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, wl_dir = tmp_path / "ca", tmp_path / "wl"
    assert main(["init", "--trust-domain", "td", "--out", str(ca_dir), "--intermediate"]) == 0
    assert main(["issue", "--ca-dir", str(ca_dir), "--spiffe-id", "spiffe://td/ns/a/sa/b", "--out", str(wl_dir)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(wl_dir / "cert-chain.pem"), "--now", "2999-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr().out.count("EXPIRED") == 3
    assert main(["inspect", str(wl_dir / "cert-chain.pem"), "--now", "2000-01-01T00:00:00+00:00"]) == 0
    assert "not yet valid" in capsys.readouterr().out
    # leaf followed directly by the root: the leaf is not signed by the next cert
    chain = read_certs(wl_dir / "cert-chain.pem")
    broken = tmp_path / "broken.pem"
    broken.write_bytes((wl_dir / "cert-chain.pem").read_bytes().split(b"-----END CERTIFICATE-----\n")[0]
                       + b"-----END CERTIFICATE-----\n" + (ca_dir / "root-cert.pem").read_bytes())
    assert read_certs(broken) == [chain[0], chain[2]]
    assert main(["inspect", str(broken)]) == 0
    assert "signed by next: NO" in capsys.readouterr().out


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["init", "--trust-domain", "cluster.local", "--out", str(ca_dir)]) == 0
    key_before = (ca_dir / "root-key.pem").read_bytes()
    capsys.readouterr()
    assert main(["init", "--trust-domain", "cluster.local", "--out", str(ca_dir)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (ca_dir / "root-key.pem").read_bytes() == key_before
    assert main(["init", "--trust-domain", "cluster.local", "--out", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "root-key.pem").read_bytes() != key_before
    capsys.readouterr()

    wl = str(tmp_path / "wl")
    assert main(["issue", "--ca-dir", str(ca_dir), "--spiffe-id", "spiffe://other.td/ns/a/sa/b", "--out", wl]) == 1
    assert "trust domain" in capsys.readouterr().err
    assert main(["issue", "--ca-dir", str(ca_dir), "--spiffe-id", "spiffe://cluster.local/ns/a", "--out", wl]) == 1
    assert "path must be" in capsys.readouterr().err
    assert main(["issue", "--ca-dir", str(ca_dir), "--spiffe-id", WEB, "--out", str(ca_dir)]) == 1
    assert "CA directory" in capsys.readouterr().err
    assert main(["issue", "--ca-dir", str(tmp_path / "nope"), "--spiffe-id", WEB, "--out", wl]) == 1
    assert main(["init", "--trust-domain", "Bad_Domain", "--out", str(tmp_path / "x")]) == 1
    assert "lowercase" in capsys.readouterr().err
    assert main(["inspect", str(ca_dir / "root-key.pem")]) == 1
    assert "no PEM or DER certificate" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.pem")]) == 1

    assert main([]) == 2
    assert main(["init", "--out", str(tmp_path)]) == 2
    assert main(["inspect", "f", "--now", "2030-01-01T00:00:00"]) == 2  # no timezone
    assert main(["--help"]) == 0
    assert "init" in capsys.readouterr().out


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "certs", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )


def test_python_dash_m(tmp_path: Path) -> None:
    ca_dir, wl_dir = tmp_path / "ca", tmp_path / "wl"
    done = run_module("init", "--trust-domain", "cluster.local", "--out", str(ca_dir), "--intermediate",
                      "--key-type", "rsa")
    assert done.returncode == 0, done.stderr
    assert mode(ca_dir / "ca-key.pem") == 0o600
    done = run_module("issue", "--ca-dir", str(ca_dir), "--spiffe-id", WEB, "--out", str(wl_dir))
    assert done.returncode == 0, done.stderr
    assert WEB in done.stdout
    done = run_module("inspect", str(wl_dir / "cert-chain.pem"))
    assert done.returncode == 0, done.stderr
    assert "RSA 2048" in done.stdout and "EC P-256" in done.stdout and WEB in done.stdout
    done = run_module("inspect")
    assert done.returncode == 2 and "usage" in done.stderr
