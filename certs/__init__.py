"""Pillion identity library: mesh CA, workload certificates, SPIFFE IDs (no Pillion imports)."""
