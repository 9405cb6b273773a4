"""A real syslog collector for audit tests: Debian's ``rsyslogd`` in the foreground on a loopback port.

It writes every message as received (``%rawmsg%``: the RFC 5424 message without its octet count) to one
file, one line each; :meth:`Rsyslog.records` parses them back. TCP (``imtcp``, RFC 6587 octet counting),
TLS (``imtcp`` + ``gtls``, RFC 5425; needs ``rsyslog-gnutls``) or UDP (``imudp``, RFC 5426).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tests.support.certs import CertFiles
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for

BOM = "\ufeff"
_LINE = re.compile(r"^<(?P<pri>\d{1,3})>(?P<version>\d) (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app_name>\S+) "
                   r"(?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|(?:\[[^\]]*\])+) (?P<msg>.*)$")


def rsyslogd() -> str | None:
    """The daemon's path (``/usr/sbin`` is not on every user's PATH)."""
    return shutil.which("rsyslogd") or next((p for p in ("/usr/sbin/rsyslogd",) if Path(p).is_file()), None)


def rsyslog_missing() -> str | None:
    """Why the collector cannot run here, or ``None``."""
    if rsyslogd() is None:
        return "rsyslogd is not installed: run `make setup` (Debian package rsyslog)"
    return None


def gtls_missing() -> str | None:
    if not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        return "rsyslog's TLS driver is not installed (Debian package rsyslog-gnutls)"
    return None


@dataclass(frozen=True)
class SyslogRecord:
    """One received message, its RFC 5424 header split out."""

    pri: int
    version: str
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    #: the MSG part, BOM removed
    message: str
    bom: bool

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    def xml(self) -> ET.Element:
        return ET.fromstring(self.message.encode("utf-8"))

    @property
    def sequence_id(self) -> int | None:
        found = re.search(r'\[meta [^\]]*sequenceId="(\d+)"', self.structured_data)
        return int(found.group(1)) if found else None


def parse(line: str) -> SyslogRecord:
    found = _LINE.match(line)
    if found is None:
        raise AssertionError(f"not an RFC 5424 message: {line[:120]!r}")
    msg = found["msg"]
    return SyslogRecord(int(found["pri"]), found["version"], found["timestamp"], found["hostname"],
                        found["app_name"], found["procid"], found["msgid"], found["sd"], msg.removeprefix(BOM),
                        msg.startswith(BOM))


class Rsyslog:
    """``rsyslogd -n -f <conf> -i <pidfile>``; :meth:`start` returns once it listens."""

    def __init__(self, folder: Path, transport: str = "tcp", *, server: CertFiles | None = None,
                 ca: CertFiles | None = None, auth_mode: str = "x509/certvalid", port: int | None = None) -> None:
        self.folder = folder
        self.transport = transport
        self.port = port or free_port()
        self.out = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        self.pidfile = folder / "rsyslogd.pid"
        self.log = folder / "rsyslogd.out"
        self._proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config(server, ca, auth_mode), encoding="utf-8")

    def _config(self, server: CertFiles | None, ca: CertFiles | None, auth_mode: str) -> str:
        tls = ""
        if self.transport == "tls":
            assert server is not None and ca is not None
            tls = (f' DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{ca.cert}"'
                   f' DefaultNetstreamDriverCertFile="{server.cert}" DefaultNetstreamDriverKeyFile="{server.key}"')
        lines = [f'global(workDirectory="{self.folder}" maxMessageSize="64k"{tls})']
        if self.transport == "udp":
            lines += ['module(load="imudp")', f'input(type="imudp" port="{self.port}" address="127.0.0.1")']
        elif self.transport == "tls":
            lines += [f'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                      f'StreamDriver.AuthMode="{auth_mode}")',
                      f'input(type="imtcp" port="{self.port}" address="127.0.0.1")']
        else:
            lines += ['module(load="imtcp")', f'input(type="imtcp" port="{self.port}" address="127.0.0.1")']
        lines += ['template(name="raw" type="string" string="%rawmsg%\\n")',
                  f'action(type="omfile" file="{self.out}" template="raw")']
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> None:
        self.pidfile.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([str(rsyslogd()), "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                          stdout=log, stderr=subprocess.STDOUT)
        proc = self._proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {proc.returncode}: {self.log.read_text()[-2000:]}")
            return udp_bound(self.port) if self.transport == "udp" else port_open(self.port)

        wait_for(listening, timeout=timeout, message=f"rsyslogd listening on {self.transport} {self.port}")

    def stop(self) -> None:
        """SIGTERM, as a collector being restarted is stopped."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def lines(self) -> list[str]:
        if not self.out.exists():
            return []
        return [line for line in self.out.read_text(encoding="utf-8").splitlines() if line]

    def records(self) -> list[SyslogRecord]:
        return [parse(line) for line in self.lines()]


def udp_bound(port: int) -> bool:
    """Whether a UDP socket is bound to ``port`` on this machine (``/proc/net/udp``)."""
    for table in (Path("/proc/net/udp"), Path("/proc/net/udp6")):
        if not table.exists():
            continue
        for row in table.read_text().splitlines()[1:]:
            local = row.split()[1]
            if int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False
