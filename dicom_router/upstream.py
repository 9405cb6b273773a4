"""The pynetdicom version our overrides were written against, and the upstream code they replace.

:mod:`dicom_router.reactor` and the edge (:mod:`dicom_router.edge`, :mod:`dicom_router.edge_socket`)
re-implement or extend private pynetdicom routines. Their correctness depends on what those routines
do, not only on their names, so pyproject.toml pins pynetdicom exactly and :data:`OVERRIDDEN` records
the SHA-256 of each overridden routine's source as of :data:`PINNED_PYNETDICOM`.
``tests/unit/dicom_router/test_pynetdicom_guard.py`` fails when one differs; :func:`changed_overrides`
tells the same at run time.

To move to another pynetdicom: install it, run the guard test, re-read each routine it names against
the override that replaces it, adapt the override, then update :data:`PINNED_PYNETDICOM`, the pin in
pyproject.toml and the digests here (:func:`source_sha256` prints them).

An entry may name a routine that pynetdicom inherits (``AssociationServer.verify_request`` comes from
:class:`socketserver.BaseServer`): its digest is of the routine the name resolves to, so the guard also
notices pynetdicom starting to define one of its own.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import textwrap

#: the exact pynetdicom release the overrides were written and checked against
PINNED_PYNETDICOM = "3.0.4"

#: overridden upstream routine (dotted name, as resolved by attribute look-up) -> SHA-256 of its
#: dedented ``inspect.getsource()`` text in :data:`PINNED_PYNETDICOM`
OVERRIDDEN: dict[str, str] = {
    # dicom_router.reactor: EventDrivenAssociation
    "pynetdicom.association.Association.__init__":
        "37cd0192fe87ffd120497ba255bb6c6126cdc76a9d7d5377ca4ceb17f8db2df2",
    "pynetdicom.association.Association.kill":
        "531f3ec8d4df979aef30bc15ff2fa0df3ee439c1a8fdccbd77476eae7d1b7ba5",
    "pynetdicom.association.Association._run_reactor":
        "cbf8d3c3eb37093aa702f646a200a8166ea574542d1c83dcebb779ef22053ecc",
    # dicom_router.reactor: _EventDrivenDUL
    "pynetdicom.dul.DULServiceProvider.__init__":
        "6ba6c0a89a5ab52aeedde7f6589d8ab3b826f82f1822c9ae28d730acb460a42d",
    "pynetdicom.dul.DULServiceProvider.run_reactor":
        "780cd7ed323ef3bb42f5df9daab4bc44099e55b686f1993e433c04f2a31adbf7",
    "pynetdicom.dul.DULServiceProvider._is_transport_event":
        "6868c3eee650bc3fbde4941019ec1d90ae2ef05a42dbb6be9be1690bc62b4fd8",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data":
        "4679cb00a659ff5f49fc7e51131d51d1b21f1d1ccd00d36e0ae90850b0ac578e",
    # dicom_router.reactor: EventDrivenRequestHandler and request_association; dicom_router.edge's
    # EdgeRequestHandler re-implements _create_association too
    "pynetdicom.transport.RequestHandler._create_association":
        "4ad65038b9aedd3656fbd79714c57c5d257256b888e6a633818d1b7904a60be3",
    "pynetdicom.ae.ApplicationEntity.associate":
        "789cbef05f7f28a38b370d8c62e2c1496f442db18dd069e3cfd1c33560d5cbf8",
    # dicom_router.edge_socket: EdgeAssociationSocket
    "pynetdicom.transport.AssociationSocket.__init__":
        "bdf9c81c82dd508f68dcac8ae6ff36d0a2be68f9fd7d1be757ec8b2c7f5078b1",
    "pynetdicom.transport.AssociationSocket.ready":
        "245230e31ef3ad5194231c9ae5a25a8d14bab025364606139100a0cc8cb7bba4",
    "pynetdicom.transport.AssociationSocket.recv":
        "0c5fbc85ac69f1b2b3ee39596cb8228caddb8debba10f3b4393d5715cf230c19",
    # dicom_router.edge: EdgeServer (the association server's socketserver hooks), EdgeRequestHandler
    "pynetdicom.transport.AssociationServer.__init__":
        "c8e7a80c8793ae783321dd49e8fcb51dfe5841d3b5a130e744b55150a9b811ee",
    "pynetdicom.transport.AssociationServer.get_request":
        "94f13a70081c532264d9402ae1c44c05b05a71f1c8c5ea58ccadd45e8427b44b",
    "pynetdicom.transport.AssociationServer.verify_request":
        "dd7d8d5896deb31a4acb5a8d9b984ffc480abf72340eefae9c625b3c7e0586a5",
    "pynetdicom.transport.ThreadedAssociationServer.process_request_thread":
        "dcccbc61de08d727373bd12cff41b027d44681c8c00367675a9b9180140acbde",
    "pynetdicom.transport.AssociationServer.service_actions":
        "32e767c375e99fcbb587ac806965e6594dc03cfd9f3f81f80afe176ee9d0679a",
    "pynetdicom.transport.RequestHandler.handle":
        "049e60ec3c8c25f60e8acd8bc7635fe532180c5c9e70c1d22defa0fe5749e898",
}


def resolve(name: str) -> object:
    """The object a dotted name refers to: the longest importable module prefix, then attributes.

    A property resolves to its getter. Raises ``ImportError`` or ``AttributeError`` when it is gone.
    """
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        if isinstance(obj, property) and obj.fget is not None:
            obj = obj.fget
        return obj
    raise ImportError(f"no module in {name!r} can be imported")


def source_sha256(name: str) -> str | None:
    """SHA-256 of the dedented source of ``name``; ``None`` when it is gone or has no source."""
    try:
        source = inspect.getsource(resolve(name))  # type: ignore[arg-type]
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    return hashlib.sha256(textwrap.dedent(source).encode("utf-8")).hexdigest()


def changed_overrides() -> list[str]:
    """The names in :data:`OVERRIDDEN` whose installed source differs from the recorded digest.

    A routine that is gone, or whose source cannot be read, counts as changed.
    """
    return [name for name, digest in OVERRIDDEN.items() if source_sha256(name) != digest]
