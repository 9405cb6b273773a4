"""The OHIF v3 web viewer served same-origin with a PACS's DICOMweb (``make demo``, the viewer tests).

Orthanc (1.10) sends no CORS headers, so one small server on a free loopback port serves the OHIF build
(``scripts/fetch-ohif.sh`` puts it under ``var/ohif/<version>/dist``), answers ``/app-config.js`` with a
configuration whose only data source is ``/dicom-web`` on the same origin, and forwards ``/dicom-web``
requests to the PACS. Any other path that is not a file is the single-page app (``index.html``).
It forwards GET only, to the one PACS URL it was given, and listens on loopback: a demo and test aid,
not a production viewer deployment.

``disableConfirmationPrompts`` makes OHIF load what a link puts in the viewport without asking: a SEG
overlay, and a TID 1500 SR's measurements into its tools and measurement panel. Without it, OHIF 3.13.2's
longitudinal mode (``measurementTrackingMode`` defaults to ``standard``) asks "Do you want to continue
tracking measurements for this study?" over the SR and loads nothing until the reader answers Yes; with it,
its tracking context sends ``HYDRATE_SR`` itself once the SR in the active viewport is rehydratable
(extensions/measurement-tracking, TrackedMeasurementsContext), and the viewport turns to the source
images with the outlines as tracked measurements. The SR's own view (outlines with its stored values,
area, volume) is one double-click on its thumbnail away.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(__file__).resolve().parent.parent / "var" / "ohif" / OHIF_VERSION / "dist"

APP_CONFIG = """window.config = {
  routerBasename: null, extensions: [], modes: [], showStudyList: true,
  investigationalUseDialog: { option: 'never' }, showLoadingIndicator: true, disableConfirmationPrompts: true,
  strictZSpacingForVolumeViewport: false, defaultDataSourceName: 'pacs',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'pacs',
    configuration: {
      friendlyName: 'PACS', name: 'pacs', wadoUriRoot: '/wado', qidoRoot: '/dicom-web', wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      omitQuotationForMultipartRequest: true, bulkDataURI: { enabled: true },
    },
  }],
};
"""


class OhifServer:
    """OHIF's files and the PACS's ``/dicom-web`` on one origin (``url``); ``close()`` stops it."""

    def __init__(self, pacs_url: str, dist: Path = OHIF_DIST) -> None:
        upstream = pacs_url.rstrip("/")

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(dist), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str | None) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path.startswith(("/dicom-web/", "/wado")):
                    accept = {"Accept": self.headers["Accept"]} if self.headers.get("Accept") else {}
                    try:
                        with urllib.request.urlopen(urllib.request.Request(upstream + self.path, headers=accept),
                                                    timeout=60) as answer:
                            self._send(answer.status, answer.read(), answer.headers.get("Content-Type"))
                    except urllib.error.HTTPError as exc:
                        self._send(exc.code, exc.read(), exc.headers.get("Content-Type"))
                    return
                if path == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
                    return
                if not (dist / path.lstrip("/")).is_file():
                    self.path = "/index.html"
                super().do_GET()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def viewer_url(self, study_uid: str, series_uid: str) -> str:
        """Opens the study with ``series_uid`` in the viewport (``SeriesInstanceUIDs=`` would hide the source)."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}&initialSeriesInstanceUID={series_uid}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
