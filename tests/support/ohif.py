"""OHIF for the viewer tests: the server lives in :mod:`appliance.viewer` (``make demo`` uses it too)."""

from __future__ import annotations

from appliance.viewer import APP_CONFIG, OHIF_DIST, OHIF_VERSION, OhifServer

#: Chromium flags OHIF needs here: WebGL through SwiftShader (docs: shared/notes/viewers.md)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]

__all__ = ["APP_CONFIG", "CHROMIUM_ARGS", "OHIF_DIST", "OHIF_VERSION", "OhifServer"]
