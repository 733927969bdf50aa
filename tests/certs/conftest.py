"""Fixtures for the certs tests: CAs made once per module at a fixed ``NOW``."""

from __future__ import annotations

import pytest

from certs.ca import CertificateAuthority, create_intermediate_ca, create_root_ca
from certs.spiffe import SpiffeId
from tests.certs.factory import NOW, TD, WEB


@pytest.fixture(scope="module")
def root_ca() -> CertificateAuthority:
    """A root that signs workloads itself (path length 0)."""
    return create_root_ca(TD, now=NOW)


@pytest.fixture(scope="module")
def mesh_root() -> CertificateAuthority:
    """A root made to sign one intermediate (path length 1)."""
    return create_root_ca(TD, now=NOW, path_length=1)


@pytest.fixture(scope="module")
def intermediate_ca(mesh_root: CertificateAuthority) -> CertificateAuthority:
    return create_intermediate_ca(mesh_root, now=NOW)


@pytest.fixture
def web_id() -> SpiffeId:
    return SpiffeId.parse(WEB)

