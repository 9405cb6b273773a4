"""The dashboard's destinations and peers: reachability, TLS, outbox, and pausing a destination.

A **destination** (``dispatch.destinations``) receives our results: its outbox (counts, the last error, the
next retry, when something was last sent), whether an operator paused it, and its TLS set-up with the
certificates involved (subject and expiry; never a key). A **peer** (``router.peers``) sends to us: when it
last did, and, where we query it (``query_port``), whether its SCP answers. C-ECHO is tried on demand only
(:func:`dicom_router.dispatch.echo_result`; a STOW-RS server gets a TCP connection,
:func:`appliance.doctor.stow_reachable`), one at a time per target.

Pausing leaves the destination's items in the outbox, with their attempt counts: :func:`appliance.db.outbox.due`
skips a paused destination, so the dispatcher (in this process or another) sends nothing more to it; an item
already handed to the network when the pause commits still goes. Resuming wakes the dispatcher. Both are
audited as the user who asked.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance.audit import AuditEvent, AuditRecord
from appliance.db import destinations as pauses
from appliance.db import outbox, studies
from appliance.db.outbox import OutboxState
from appliance.doctor import Status, peer_endpoint, stow_reachable
from appliance.settings import Settings
from appliance.store import OUTBOX, Store
from appliance.study_view import ActionRefused
from dicom_router.dispatch import echo_result
from dicom_router.settings import DimseDestination, Peer, StowDestination, TlsMode

__all__ = ["ActionRefused", "Echoes", "destination_outbox", "overview", "pause", "resume"]

#: certificates listed per file at most (a CA bundle may hold the whole system store)
MAX_CERTIFICATES = 8
#: seconds a C-ECHO or TCP connection may take from the dashboard
ECHO_TIMEOUT = 5.0


# ---- certificates --------------------------------------------------------------------------------

def certificates(setting: str, path: str | None, *, first_only: bool = False) -> dict[str, Any] | None:
    """What a PEM file holds: each certificate's subject, issuer and validity (``problem`` when unreadable)."""
    if path is None:
        return None
    out: dict[str, Any] = {"setting": setting, "path": path, "certificates": [], "more": 0, "problem": None}
    try:
        found = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as exc:
        out["problem"] = f"cannot read it ({exc.strerror or type(exc).__name__})"
        return out
    except ValueError:
        out["problem"] = "not a PEM certificate"
        return out
    if first_only:
        found = found[:1]
    now = dt.datetime.now(dt.UTC)
    for cert in found[:MAX_CERTIFICATES]:
        after = cert.not_valid_after_utc
        out["certificates"].append({
            "subject": cert.subject.rfc4514_string() or "(no subject)",
            "issuer": cert.issuer.rfc4514_string() or "(no issuer)",
            "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": after.timestamp(),
            "days_left": (after - now).days,
            "valid_now": cert.not_valid_before_utc <= now <= after,
        })
    out["more"] = max(0, len(found) - MAX_CERTIFICATES)
    return out


def _files(*entries: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [e for e in entries if e is not None]


def destination_tls(settings: Settings, d: DimseDestination | StowDestination) -> dict[str, Any]:
    """How the link to ``d`` is secured, and the certificate files it uses."""
    router_tls = settings.router.tls
    if isinstance(d, StowDestination):
        https = d.url.startswith("https://")
        return {"mode": "https" if https else "off",
                "summary": ("HTTPS, the server verified against " + ("ca_bundle" if d.ca_bundle else "the system's CAs")
                            if https else "plain HTTP: not encrypted"),
                "server_name": None, "auth": None if d.auth is None else str(d.auth.kind),
                "files": _files(certificates(f"dispatch.destinations[{d.name}].ca_bundle", d.ca_bundle))}
    if d.tls is not TlsMode.REQUIRED:
        return {"mode": "off", "summary": "plain DICOM: not encrypted", "server_name": None, "auth": None,
                "files": []}
    ca = d.ca_bundle or (router_tls.ca_bundle if router_tls else None)
    ca_setting = f"dispatch.destinations[{d.name}].ca_bundle" if d.ca_bundle else "router.tls.ca_bundle"
    client = router_tls.certificate if router_tls else None
    return {"mode": "required",
            "summary": ("DICOM over TLS, its certificate verified against " + (ca_setting if ca else "the system's CAs")
                        + ("; we present router.tls.certificate" if client else "; we present no certificate")),
            "server_name": d.server_hostname or d.host, "auth": None,
            "files": _files(certificates("router.tls.certificate", client, first_only=True),
                            certificates(ca_setting, ca))}


def peer_tls(settings: Settings, p: Peer) -> dict[str, Any]:
    """How a peer's associations to us (and our C-FIND to it) are secured."""
    if p.tls is not TlsMode.REQUIRED:
        return {"mode": "off", "summary": "plain DICOM accepted from this peer", "binding": None, "files": []}
    router_tls = settings.router.tls
    binding = [f"fingerprint {p.certificate_fingerprint}"] if p.certificate_fingerprint else []
    binding += [f"subject {p.certificate_subject}"] if p.certificate_subject else []
    return {"mode": "required", "summary": "TLS only: plain associations from it are refused",
            "binding": "; ".join(binding) or None,
            "files": _files(certificates("router.tls.certificate", router_tls.certificate if router_tls else None,
                                         first_only=True),
                            certificates("router.tls.ca_bundle", router_tls.ca_bundle if router_tls else None))}


# ---- the page ------------------------------------------------------------------------------------

def _address(d: DimseDestination | StowDestination) -> str:
    return d.url if isinstance(d, StowDestination) else f"{d.ae_title}@{d.host}:{d.port}"


def overview(store: Store, settings: Settings) -> dict[str, Any]:
    """Every configured destination and peer as the page shows it; destinations known only to the outbox too."""
    with store.reading() as tx:
        status = outbox.destination_status(tx)
        sent = outbox.last_sent(tx)
        paused = pauses.paused(tx)
        senders = studies.last_received_by_sender(tx)
    out: list[dict[str, Any]] = []
    configured = {d.name for d in settings.dispatch.destinations}

    def box(name: str) -> dict[str, Any]:
        st = status.get(name, {})
        return {"states": st.get("states", {}), "last_error": st.get("last_error"),
                "next_retry_at": st.get("next_retry_at"), "oldest_pending": st.get("oldest_pending"),
                "last_sent": sent.get(name)}

    for d in settings.dispatch.destinations:
        out.append({"name": d.name, "kind": d.kind, "configured": True, "address": _address(d),
                    "echo": "C-ECHO" if isinstance(d, DimseDestination) else "TCP connect",
                    "paused": paused.get(d.name), "tls": destination_tls(settings, d), "outbox": box(d.name)})
    for name in sorted((set(status) | set(paused)) - configured):  # renamed or removed: their items wait forever
        out.append({"name": name, "kind": "unknown", "configured": False, "address": None, "echo": None,
                    "paused": paused.get(name), "tls": None, "outbox": box(name)})
    peers = []
    for p in settings.router.peers:
        query = None
        if p.query_port is not None:
            q = peer_endpoint(p)
            query = f"{q.ae_title}@{q.host}:{q.port}"
        sender = senders.get(p.ae_title.strip(), {})
        peers.append({"ae_title": p.ae_title, "hosts": list(p.hosts), "query": query,
                      "studies": sender.get("studies", 0), "last_received": sender.get("last_received"),
                      "tls": peer_tls(settings, p)})
    return {"destinations": out, "peers": peers, "calling_ae": settings.router.ae_title}


def destination_outbox(store: Store, name: str, state: str | None, limit: int, offset: int) -> dict[str, Any]:
    """A page of one destination's outbox rows, newest first (``state``: one :class:`OutboxState`, or any)."""
    with store.reading() as tx:
        total, rows = outbox.of_destination(tx, name, OutboxState(state) if state else None, limit, offset)
    return {"destination": name, "total": total, "offset": offset, "limit": limit, "items": rows}


# ---- actions -------------------------------------------------------------------------------------

def _configured(settings: Settings, name: str) -> DimseDestination | StowDestination:
    for d in settings.dispatch.destinations:
        if d.name == name:
            return d
    raise ActionRefused(404, "not_found", f"no destination {name} is configured")


def pause(store: Store, settings: Settings, name: str, actor: str, reason: str, via: str) -> dict[str, Any]:
    """Stop sending to ``name`` until resumed; its items wait in the outbox. Audited as ``actor``."""
    _configured(settings, name)
    now = time.time()
    with store.transaction() as tx:
        if not pauses.pause(tx, name, actor, reason, now):
            raise ActionRefused(409, "already_paused", f"destination {name} is paused already")
        waiting = outbox.destination_status(tx).get(name, {}).get("states", {}).get(OutboxState.PENDING, 0)
        store.audit_in(tx, AuditRecord(AuditEvent.DESTINATION_PAUSED, actor=actor, detail={
            "destination": name, "reason": reason, "waiting": waiting, "via": via}))
    return {"destination": name, "paused": True, "paused_at": now, "actor": actor, "reason": reason,
            "waiting": waiting}


def resume(store: Store, settings: Settings, name: str, actor: str, via: str,
           reason: str | None = None) -> dict[str, Any]:
    """Send to ``name`` again: its waiting items go when due (those overdue at once). Audited as ``actor``."""
    _configured(settings, name)
    with store.transaction() as tx:
        ended = pauses.resume(tx, name)
        if ended is None:
            raise ActionRefused(409, "not_paused", f"destination {name} is not paused")
        waiting = outbox.destination_status(tx).get(name, {}).get("states", {}).get(OutboxState.PENDING, 0)
        store.audit_in(tx, AuditRecord(AuditEvent.DESTINATION_RESUMED, actor=actor, detail={
            "destination": name, "paused_by": ended["actor"], "paused_at": ended["paused_at"],
            "pause_reason": ended["reason"], "reason": reason, "waiting": waiting, "via": via}))
        tx.notify(OUTBOX)  # the dispatcher sleeps until something is due: its items may be due now
    return {"destination": name, "paused": False, "waiting": waiting}


class Echoes:
    """C-ECHO (or a TCP connection) on demand, at most one at a time per target; a second asker is refused."""

    def __init__(self, settings: Settings, timeout: float = ECHO_TIMEOUT) -> None:
        self._settings = settings
        self._timeout = timeout
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def _one(self, key: str) -> Iterator[None]:
        with self._lock:
            if key in self._busy:
                raise ActionRefused(409, "echo_in_progress", "a check of this target is running; wait for it")
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)

    def destination(self, name: str) -> dict[str, Any]:
        """Try ``name`` now: C-ECHO a DIMSE destination, connect to a STOW-RS server."""
        d = _configured(self._settings, name)
        with self._one(f"destination:{name}"):
            return self._try(d)

    def peer(self, ae_title: str) -> dict[str, Any]:
        """C-ECHO the SCP of peer ``ae_title`` that we query (its ``query_port``)."""
        peer = next((p for p in self._settings.router.peers if p.ae_title.strip() == ae_title.strip()), None)
        if peer is None:
            raise ActionRefused(404, "not_found", f"no peer {ae_title} is configured")
        if peer.query_port is None:
            raise ActionRefused(409, "not_queried", f"peer {ae_title} has no query_port: there is nothing of it "
                                                    "to C-ECHO (it sends to us)")
        with self._one(f"peer:{peer.ae_title}"):
            return self._try(peer_endpoint(peer))

    def _try(self, d: DimseDestination | StowDestination) -> dict[str, Any]:
        router = self._settings.router
        started = time.time()
        if isinstance(d, StowDestination):
            finding = stow_reachable(d, self._timeout)
            ok, detail, method = finding.status is Status.OK, finding.message, "TCP connect"
        else:
            result = echo_result(d, d.calling_ae_title or router.ae_title, self._timeout, tls=router.tls,
                                 event_driven=router.event_driven)
            ok, detail, method = result.ok, result.detail, "C-ECHO"
        return {"target": d.name, "method": method, "ok": ok, "detail": detail, "at": started,
                "seconds": round(time.time() - started, 3)}
