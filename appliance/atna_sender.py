"""``portico serve``'s audit forwarder: drains the ATNA queue to the collector, anchors the chain in the log.

Delivery is at least once over TCP and TLS: a message is ``sent`` once its connection stayed up for
``confirm_seconds`` after the write, or closed cleanly at stop; a failed connection, or a restart, sends
the unconfirmed ones again (same content and sequence id, so a collector can spot the repeat). Over UDP
a message counts as sent when written, and nothing tells us if it arrived. While the collector is away
messages wait in the queue (bounded, see :mod:`appliance.atna_outbox`); connecting again backs off
from ``backoff_initial`` to ``backoff_max`` seconds.

Received instances and dispatched results are aggregated per drain: the rows of one study from one
sender (or to one destination) that are waiting together become one DICOM Instances Transferred
message with the count per SOP class.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

from appliance import atna_outbox, audit_chain
from appliance.atna_events import SUCCESS, atna_event, outcome
from appliance.atna_message import AuditRow, Source, build, group_key
from appliance.atna_outbox import AtnaState
from appliance.settings import AuditSettings, SyslogTransport, is_loopback
from appliance.store import Store
from appliance.syslog_client import SEVERITY_NOTICE, SEVERITY_WARNING, SyslogConnection, format_message
from dicom_router.errors import TlsConfigError

log = logging.getLogger(__name__)

#: finished queue rows are kept this long (to see what went), then forgotten
KEEP_DONE_SECONDS = 24 * 3600


#: how long the thread sleeps when no collector is configured (it only logs the chain's anchor then)
IDLE_SECONDS = 30.0


class AuditForwarder:
    """Start with :meth:`start`, stop with :meth:`stop`; one thread in between."""

    def __init__(self, store: Store, settings: AuditSettings, ae_title: str, *, confirm_seconds: float = 2.0,
                 poll_seconds: float = 0.5, batch: int = 200, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0) -> None:
        self.store = store
        self.settings = settings
        self.syslog = settings.syslog
        hostname = socket.gethostname()
        self.source = Source(
            source_id=settings.source_id or f"{ae_title}@{hostname}", site_id=settings.site_id,
            app_name=self.syslog.app_name if self.syslog else "portico", ae_title=ae_title, hostname=hostname,
            pid=os.getpid(), audit_log_uri=_audit_log_uri(store, hostname))
        self.confirm_seconds = confirm_seconds
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._conn: SyslogConnection | None = None
        self._connect_timeout = 10.0
        #: when the newest still unconfirmed message was written (None: nothing to confirm)
        self._last_write: float | None = None
        self._backoff = backoff_initial
        self._retry_at = 0.0
        self._last_problem: str | None = None
        self._next_upkeep = 0.0
        self._next_prune = 0.0
        self._anchored: int | None = None
        self._anchored_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue audit rows from now on when a collector is configured; start the thread."""
        syslog = self.syslog
        atna_outbox.set_enabled(self.store, syslog is not None)
        if syslog is not None:
            again = atna_outbox.requeue_written(self.store)
            if again:
                log.info("ATNA: %d message(s) written before the last stop were not confirmed; sending them again",
                         again)
            if syslog.transport is not SyslogTransport.TLS and not is_loopback(syslog.host):
                log.warning("ATNA: audit messages (study UIDs, user names) go to %s in clear text over %s; "
                            "use transport: tls", syslog.host, syslog.transport.upper())
        self._anchor(force=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="atna", daemon=True)
        self._thread.start()

    def stop(self, flush_seconds: float = 5.0) -> None:
        """Stop the thread; send what is queued within ``flush_seconds``, close the connection cleanly."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.syslog is not None:
            try:
                self._flush(flush_seconds)
            except Exception:  # what is left stays queued for the next start
                log.exception("ATNA: the last messages could not be flushed at stop")
        self._anchor(force=True)

    def _flush(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self._retry_at = 0.0  # one more try at stop, whatever the backoff said
        self._connect_timeout = max(0.5, seconds)
        while time.monotonic() < deadline and self._step():
            pass
        if self._conn is not None:
            if self._conn.close(wait=max(0.5, deadline - time.monotonic())):
                atna_outbox.confirm(self.store, time.time())
            self._conn = None
            self._last_write = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                more = self._step()
            except Exception:  # keep forwarding; the error is in the log
                log.exception("ATNA forwarder error")
                more = False
            if not more:  # without a collector only the anchor is kept, every anchor_minutes
                self._stop.wait(self.poll_seconds if self.syslog is not None else IDLE_SECONDS)

    # ---- one step --------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Do what is due; returns whether more is waiting right now."""
        self._anchor()
        syslog = self.syslog
        if syslog is None:
            return False
        now = time.monotonic()
        if now >= self._next_upkeep:
            atna_outbox.enforce_bound(self.store, syslog.queue_max)
            self._next_upkeep = now + 1.0
        if now >= self._next_prune:
            atna_outbox.prune(self.store, time.time() - KEEP_DONE_SECONDS)
            self._next_prune = now + 600.0
        if self._conn is not None:
            if not self._conn.alive():
                self._lost("the collector closed the connection")
            elif self._last_write is not None:
                settled = time.time() - self.confirm_seconds
                atna_outbox.confirm(self.store, settled)
                if self._last_write <= settled:
                    self._last_write = None
        rows = atna_outbox.due(self.store, self.batch)
        if not rows:
            return False
        if self._conn is None and not self._connect():
            return False
        assert self._conn is not None
        messages, written = self._messages(rows)
        if messages:
            try:
                self._conn.send(messages)
            except OSError as exc:
                self._lost(_reason(exc))
                return False
            atna_outbox.mark(self.store, written, AtnaState.WRITTEN if self._conn.confirms else AtnaState.SENT)
            if self._conn.confirms:
                self._last_write = time.time()
        return len(rows) == self.batch

    def _messages(self, rows: Sequence[AuditRow]) -> tuple[list[bytes], list[int]]:
        """The syslog messages for ``rows`` and the ids they carry; unmapped and unbuildable rows are marked."""
        groups: dict[tuple[object, ...], list[AuditRow]] = {}
        skipped: list[int] = []
        for row in rows:
            spec = atna_event(row.event)
            if spec is None:
                skipped.append(row.id)
                continue
            groups.setdefault(group_key(spec, row), []).append(row)
        atna_outbox.mark(self.store, skipped, AtnaState.SKIPPED)
        messages: list[bytes] = []
        written: list[int] = []
        failed: list[int] = []
        assert self.syslog is not None
        for members in groups.values():
            first = members[0]
            spec = atna_event(first.event)
            assert spec is not None
            ids = [r.id for r in members]
            try:
                xml = build(spec, members, self.source)
            except Exception as exc:  # one bad row must not hold up the queue
                log.error("ATNA: no message for audit row %d (%s): %s", first.id, first.event, type(exc).__name__)
                failed.extend(ids)
                continue
            worst = max(outcome(spec, r.event, r.detail) for r in members)
            messages.append(format_message(
                severity=SEVERITY_NOTICE if worst == SUCCESS else SEVERITY_WARNING,
                timestamp=min(r.ts for r in members), hostname=self.source.hostname,
                app_name=self.syslog.app_name, procid=str(self.source.pid),
                structured_data=f'[meta sequenceId="{first.id}"]', message=xml))
            written.extend(ids)
        atna_outbox.mark(self.store, failed, AtnaState.FAILED)
        return messages, written

    # ---- the connection --------------------------------------------------------------------------

    def _connect(self) -> bool:
        assert self.syslog is not None
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._conn = SyslogConnection(self.syslog, timeout=self._connect_timeout)
        except (OSError, TlsConfigError) as exc:
            self._failed(_reason(exc))
            return False
        if self._last_problem is not None:
            log.info("ATNA: the collector %s:%d is reachable again", self.syslog.host, self.syslog.effective_port)
        self._last_problem = None
        self._backoff = self.backoff_initial
        return True

    def _lost(self, reason: str) -> None:
        """The connection failed: close it, and send again what it may have lost."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        atna_outbox.requeue_written(self.store)
        self._last_write = None
        self._failed(reason)

    def _failed(self, reason: str) -> None:
        assert self.syslog is not None
        if reason != self._last_problem:  # once per distinct problem, not at every retry
            unsent = atna_outbox.unsent_count(self.store)
            log.warning("ATNA: collector %s:%d (%s): %s; %d message(s) queued, retrying", self.syslog.host,
                        self.syslog.effective_port, self.syslog.transport, reason, unsent)
        self._last_problem = reason
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)

    # ---- anchors ---------------------------------------------------------------------------------

    def _anchor(self, force: bool = False) -> None:
        """Log the chain's head (id and hash) at start and stop, and every ``anchor_minutes`` when it moved."""
        now = time.monotonic()
        if not force and now - self._anchored_at < self.settings.anchor_minutes * 60:
            return
        with self.store.reading() as tx:
            top = audit_chain.head(tx)
        if top is None:
            return
        last_id, last_hash = top.last_id, top.last_hash
        self._anchored_at = now
        if force or last_id != self._anchored:
            log.info("audit chain anchor: row %d sha256 %s (check with: portico audit verify --anchor %d:%s)",
                     last_id, last_hash, last_id, last_hash)
            self._anchored = last_id


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TlsConfigError):
        return f"TLS configuration: {exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _audit_log_uri(store: Store, hostname: str) -> str:
    """Where the audit trail is kept: the SQLite file, or the PostgreSQL database (no password)."""
    file = store.database_file
    return f"file://{hostname}{file.resolve()}" if file is not None else store.db.describe()
