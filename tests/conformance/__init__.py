"""Conformance: a real Envoy against `pillion control`, and helpers the control tests share."""
