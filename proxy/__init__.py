"""Pillion data plane: the sidecar proxy."""
