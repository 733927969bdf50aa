"""The CA's wire format: CSR in, certificate chain out (Istio's IstioCertificateService shape).

Message and method names follow Istio's ``istio.v1.auth.IstioCertificateService/
CreateCertificate`` so the API is the one people know; the messages are
built from a descriptor at import time, so no generated code is needed. No
I/O here: the gRPC server lives in ``control.ca_service`` and the client in
the proxy.

    IstioCertificateRequest  { string csr = 1; int64 validity_duration = 3; Struct metadata = 4; }
    IstioCertificateResponse { repeated string cert_chain = 1; }   // leaf first, root last, PEM each

The caller proves which workload it is with a bootstrap token sent as gRPC
metadata ``authorization: Bearer <token>`` (see ``certs.tokens``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"
DEFAULT_VALIDITY_SECONDS = 24 * 3600

_FILE = "pillion/certs/istio_ca.proto"


def _build() -> tuple[Any, Any]:
    pool = descriptor_pool.Default()
    try:
        fdesc = pool.FindFileByName(_FILE)
    except KeyError:
        struct_pb2.Struct()  # make sure google/protobuf/struct.proto is in the pool
        fdp = descriptor_pb2.FileDescriptorProto(name=_FILE, package="istio.v1.auth", syntax="proto3",
                                                 dependency=["google/protobuf/struct.proto"])
        req = fdp.message_type.add(name="IstioCertificateRequest")
        req.field.add(name="csr", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        req.field.add(name="validity_duration", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        req.field.add(name="metadata", number=4, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, type_name=".google.protobuf.Struct")
        resp = fdp.message_type.add(name="IstioCertificateResponse")
        resp.field.add(name="cert_chain", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
        pool.Add(fdp)
        fdesc = pool.FindFileByName(_FILE)
    return (message_factory.GetMessageClass(fdesc.message_types_by_name["IstioCertificateRequest"]),
            message_factory.GetMessageClass(fdesc.message_types_by_name["IstioCertificateResponse"]))


CertificateRequest, CertificateResponse = _build()
