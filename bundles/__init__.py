"""Immutable, content-addressed bundles: manifest, store, registry and ledger, demo bundles."""
