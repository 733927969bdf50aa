"""Install-time facts the rest of the suite depends on."""

from __future__ import annotations


def test_opentelemetry_protos_are_the_pinned_ones_not_xds_protos_old_copy():
    """xds-protos and opentelemetry-proto write the same files; the Makefile reinstalls the pinned ones last."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert "InstrumentationScope" in common_pb2.DESCRIPTOR.message_types_by_name, (
        "opentelemetry/proto was overwritten by xds-protos' old copy: run `make test` (it reinstalls "
        "opentelemetry-proto last) or `pip install --no-deps --force-reinstall opentelemetry-proto==<pin>`")
