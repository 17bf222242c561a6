"""Workarounds for third-party libraries, one module per library (each imports only `hfsqueeze.core`)."""
