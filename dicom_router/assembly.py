"""Is a study complete? A quiet timer, and when the sending PACS answers C-FIND, its own count.

DICOM has no "end of study" message: a study is taken as complete when as many instances arrived as
the PACS says the study has (``NumberOfStudyRelatedInstances``), or else when nothing new arrived for
``quiet_seconds``.
"""

from __future__ import annotations

import logging
import ssl

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from dicom_router.errors import TlsConfigError
from dicom_router.reactor import request_association
from dicom_router.scp import quiet_pynetdicom, short_uid
from dicom_router.settings import DicomTlsSettings, Peer, TlsMode
from dicom_router.tls import association_failure, client_context, describe_tls_error

LOGGER = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)


def is_complete(received: int, last_received: float, now: float, quiet_seconds: float,
                expected: int | None) -> bool:
    """Whether a study can be handed on.

    Parameters
    ----------
    received
        Instances of the study received so far.
    last_received, now
        Monotonic times of the last instance and of now.
    quiet_seconds
        How long without a new instance counts as complete.
    expected
        The PACS's count of the study's instances, when known.
    """
    if received <= 0:
        return False
    if expected is not None and expected > 0 and received >= expected:
        return True
    return now - last_received >= quiet_seconds


def count_study_instances(peer: Peer, our_ae: str, study_uid: str, timeout: float, *,
                          tls: DicomTlsSettings | None = None,
                          context: ssl.SSLContext | None = None, event_driven: bool = True) -> int | None:
    """Ask ``peer`` (C-FIND, Study Root, STUDY level) how many instances ``study_uid`` has.

    With ``peer.tls`` required the query goes over TLS: ``context`` when given (a caller asking often
    builds it once with :func:`~dicom_router.tls.client_context`), else one built from ``tls``
    (``router.tls``: our client certificate and CAs); the peer's certificate must carry
    ``query_host``. ``event_driven`` is ``router.event_driven`` (false: pynetdicom's own reactor).

    Returns ``None`` when the peer has no query address, refuses, fails, or does not say.
    """
    if peer.query_host is None or peer.query_port is None:
        LOGGER.debug("peer %s has no query address; study %s completes on the quiet timer",
                     peer.ae_title, short_uid(study_uid))
        return None
    tls_args: tuple[ssl.SSLContext, str] | None = None
    if peer.tls is TlsMode.REQUIRED:
        try:
            tls_args = (context or client_context(tls), peer.query_host)
        except TlsConfigError as exc:
            LOGGER.warning("C-FIND to %s not tried, TLS configuration: %s", peer.ae_title, exc)
            return None
    quiet_pynetdicom()
    ae = AE(ae_title=our_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    called = peer.query_ae_title or peer.ae_title
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = None
    try:
        assoc = request_association(ae, peer.query_host, peer.query_port, called, 0, tls=tls_args,
                                    event_driven=event_driven)
    except Exception as exc:  # pynetdicom raises a variety here; every one means "don't know"
        LOGGER.warning("C-FIND to %s@%s:%d failed to associate: %s", called, peer.query_host,
                       peer.query_port, describe_tls_error(exc) if tls_args else exc)
        return None
    if not assoc.is_established:
        LOGGER.warning("C-FIND to %s@%s:%d: %s", called, peer.query_host, peer.query_port,
                       association_failure(assoc, over_tls=tls_args is not None))
        return None
    counts: list[int] = []
    final: int | None = None
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                break  # timeout, abort or invalid response
            code = int(status.Status)
            if code in _PENDING and identifier is not None:
                value = identifier.get("NumberOfStudyRelatedInstances")
                if value not in (None, ""):
                    counts.append(int(value))
            else:
                final = code
    except Exception as exc:
        LOGGER.warning("C-FIND to %s for study %s failed: %s", called, short_uid(study_uid), exc)
        assoc.abort()
        return None
    if assoc.is_established:
        assoc.release()
    if final != 0x0000:
        LOGGER.warning("C-FIND to %s for study %s ended with status %s", called, short_uid(study_uid),
                       "none" if final is None else f"0x{final:04X}")
        return None
    if not counts:
        LOGGER.info("C-FIND to %s: no instance count for study %s", called, short_uid(study_uid))
        return None
    return max(counts)
