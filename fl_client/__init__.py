"""Federated learning client (NVFlare). Filled in by the FL issue."""
