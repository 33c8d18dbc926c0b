"""Trace files, dataset specs, windows and on-device client data."""
