"""A real Orthanc as the PACS stand-in for the demo and the tests: configure, start, wait, stop.

Orthanc's DICOM server listens on every address (Debian's 1.10 has no bind option); we only ever
send to it on loopback. ``TCP_NODELAY=1`` in its environment avoids a 40x delayed-ACK stall.

With ``tls`` set its DICOM port speaks DICOM TLS only (Orthanc 1.10: ``DicomTlsEnabled`` and friends;
there is no second, plain port), and its own associations to ``modalities`` use TLS when
``tls.modalities`` is set (``UseDicomTls`` in the object form of ``DicomModalities``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TEMPLATE = Path(__file__).resolve().parent.parent / "orthanc" / "orthanc.json"


@dataclass(frozen=True)
class OrthancTls:
    """DICOM TLS for an :class:`OrthancStandIn` (PEM files)."""

    certificate: Path
    private_key: Path
    #: certificates (or their CAs) that a remote must present; Orthanc verifies against these
    trusted: Path
    #: refuse remotes without a certificate (``DicomTlsRemoteCertificateRequired``)
    remote_certificate_required: bool = True
    #: Orthanc's own associations to its modalities use TLS too (``UseDicomTls``)
    modalities: bool = False


@dataclass
class OrthancStandIn:
    """One Orthanc process with its own storage folder and ports."""

    workdir: Path
    http_port: int
    dicom_port: int
    ae_title: str = "ORTHANC"
    #: name → (AE title, host, port) of the nodes Orthanc may send to
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    #: DICOM TLS on Orthanc's DICOM port (TLS only); None: plain, as before
    tls: OrthancTls | None = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads(TEMPLATE.read_text(encoding="utf-8"))
        storage = self.workdir / "db"
        cfg.update({
            "Name": f"PORTICO-PACS-{self.http_port}",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomModalities": {name: list(node) for name, node in self.modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        })
        if self.tls is not None:
            cfg.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.certificate),
                "DicomTlsPrivateKey": str(self.tls.private_key),
                "DicomTlsTrustedCertificates": str(self.tls.trusted),
                "DicomTlsRemoteCertificateRequired": self.tls.remote_certificate_required,
            })
            if self.tls.modalities:
                cfg["DicomModalities"] = {
                    name: {"AET": aet, "Host": host, "Port": port, "UseDicomTls": True}
                    for name, (aet, host, port) in self.modalities.items()}
        return cfg

    def start(self, timeout: float = 60.0) -> None:
        if shutil.which(ORTHANC_BINARY) is None:
            raise FileNotFoundError("Orthanc is not installed (Debian package 'orthanc')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        env = {**os.environ, "TCP_NODELAY": "1"}
        log_file = (self.workdir / "orthanc.log").open("wb")
        self._proc = subprocess.Popen([ORTHANC_BINARY, str(cfg_path)], stdout=log_file, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}; see {self.workdir}/orthanc.log")
            if self.alive():
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f}s")

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def request(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
