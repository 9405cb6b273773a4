"""Shared test support: polling, ports, real data."""
