"""Pillion identity library: mesh CA, workload certificates, SPIFFE IDs (no Pillion imports).

A library with no I/O beyond the files it is told to read or write, and no clock:
every time-dependent call takes ``now``. Modules, lowest first:

- ``errors``    the CertError tree; each class has a ``reason`` used as a metrics label
- ``spiffe``    SpiffeId parse/format/validate
- ``pem``       PEM encode/decode; atomic writes, keys 0600 and certs 0644
- ``csr``       workload key + CSR; CSR checks on the CA side
- ``verify``    peer chain -> trust bundle -> SpiffeId (cryptography's verifier + SPIFFE rules)
- ``ca``        root/intermediate CA: create, load, sign a CSR into a chain
- ``rotation``  renew_at(): half-life with jitter
- ``cli``       ``pillion certs init|issue|inspect`` (also ``python -m certs``)
"""
