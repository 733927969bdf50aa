"""Pillion control plane: config store, registry, translation to xDS, ADS and CA services."""
