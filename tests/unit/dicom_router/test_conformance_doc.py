"""``docs/conformance.md`` against the code's own tables: the blocks marked ``checked`` must say what the code does."""

from __future__ import annotations

import inspect
import re

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, AllStoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

import dicom_router.scp as scp
from dicom_router import assembly, dispatch, edge, transcode
from dicom_router.edge_socket import MAX_CONTROL_PDU
from dicom_router.scp import STORAGE_TRANSFER_SYNTAXES, StorageSCP
from dicom_router.settings import DimseDestination, DispatchSettings, EdgeSettings, RouterSettings
from dicom_router.tls import BCP195_CIPHERS
from tests.conftest import REPO

DOC = (REPO / "docs" / "conformance.md").read_text(encoding="utf-8")
UID = re.compile(r"`(\d+(?:\.\d+){4,})`")  # five components or more: not an IPv4 address
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def block(name: str) -> str:
    found = re.search(rf"<!-- checked: {name} -->\n(.*?)<!-- /checked: {name} -->", DOC, re.DOTALL)
    assert found, f"docs/conformance.md has no checked block {name!r}"
    return found.group(1)


def rows(name: str) -> list[list[str]]:
    """The table rows of a block (header and rule left out), cells stripped."""
    lines = [line for line in block(name).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def uids(text: str) -> list[str]:
    return UID.findall(text)


def _scp_ae() -> object:
    return StorageSCP(RouterSettings(), sink=None)._make_ae()  # type: ignore[arg-type]


def test_scp_storage_sop_classes_are_exactly_the_scps() -> None:
    documented = uids(block("scp-sop-classes"))
    assert len(documented) == len(set(documented)), "a SOP class is listed twice"
    assert set(documented) == {str(c.abstract_syntax) for c in AllStoragePresentationContexts}


def test_scp_transfer_syntaxes_are_exactly_the_scps_in_order() -> None:
    assert uids(block("scp-transfer-syntaxes")) == [str(ts) for ts in STORAGE_TRANSFER_SYNTAXES]


def test_the_scps_supported_contexts_are_the_documented_ones() -> None:
    ae = _scp_ae()
    supported = {str(c.abstract_syntax): [str(t) for t in c.transfer_syntax]
                 for c in ae.supported_contexts}  # type: ignore[attr-defined]
    (verification,) = rows("verification")
    assert uids(verification[1]) == [VERIFICATION]
    assert supported.pop(VERIFICATION) == uids(verification[4]) == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert set(supported) == set(uids(block("scp-sop-classes")))
    assert all(ts == uids(block("scp-transfer-syntaxes")) for ts in supported.values())


def test_scp_parameters_are_the_defaults() -> None:
    table = {row[1].strip("`"): row[2] for row in rows("scp-parameters") if row[1] != "fixed"}
    edge_defaults = EdgeSettings()
    expected = {f"router.edge.{name}": f"{getattr(edge_defaults, name):g}" for name in EdgeSettings.model_fields}
    expected["router.max_pdu"] = str(RouterSettings().max_pdu)
    assert table == expected
    fixed = {row[0]: row[2] for row in rows("scp-parameters") if row[1] == "fixed"}
    ae = _scp_ae()
    assert fixed == {
        "ARTIM / ACSE timeout (seconds)": f"{ae.acse_timeout:g}",  # type: ignore[attr-defined]
        "DIMSE timeout (seconds)": f"{ae.dimse_timeout:g}",  # type: ignore[attr-defined]
        "network (idle) timeout (seconds)": f"{ae.network_timeout:g}",  # type: ignore[attr-defined]
        "largest A-ASSOCIATE-RQ or other non-P-DATA PDU (bytes)": str(MAX_CONTROL_PDU),
    }


def test_rejections_are_the_edges() -> None:
    documented = {row[0].strip("`"): row[2] for row in rows("rejections")}
    assert set(documented) == {str(r) for r in edge.Refusal}
    for refusal in edge.Refusal:
        triple = re.findall(r"(\d+) \(", documented[str(refusal)])
        expected = edge._REJECTIONS.get(refusal)
        assert tuple(int(n) for n in triple) == (expected or ()), refusal


def test_store_statuses_are_the_scps() -> None:
    documented = {int(row[0].strip("`"), 16) for row in rows("store-statuses")}
    assert documented == {value for name, value in vars(scp).items() if name.startswith("STATUS_")}


def test_tls_ciphers_are_bcp195_ciphers_in_order() -> None:
    assert re.findall(r"- `([^`]+)`", block("tls-ciphers")) == BCP195_CIPHERS.split(":")


def test_results_sent_are_the_sop_classes_and_transfer_syntaxes_the_code_makes() -> None:
    table = {uids(row[1])[0]: uids(row[3]) for row in rows("scu-sop-classes")}
    assert set(table) == {SegmentationStorage, Comprehensive3DSRStorage, SecondaryCaptureImageStorage,
                          KeyObjectSelectionDocumentStorage}
    source = {name: (REPO / "inference" / "results" / f"{name}.py").read_text() for name in ("seg", "sr", "summary")}
    assert "hd.seg.Segmentation(" in source["seg"] and "hd.sr.Comprehensive3DSR(" in source["sr"]
    assert "hd.sc.SCImage" in source["summary"]
    for name in ("seg", "summary"):
        assert "transfer_syntax_uid=ExplicitVRLittleEndian" in source[name]
    assert table[SegmentationStorage] == [ExplicitVRLittleEndian, *map(str, transcode.TRANSFER_SYNTAX.values())]
    assert table[Comprehensive3DSRStorage] == table[SecondaryCaptureImageStorage] == [ExplicitVRLittleEndian]
    kos = (REPO / "inference" / "results" / "kos.py").read_text()  # rejection notes (portico review withdraw)
    assert "hd.ko.KeyObjectSelectionDocument(" in kos and "transfer_syntax_uid" not in kos  # highdicom's default
    assert table[KeyObjectSelectionDocumentStorage] == [ExplicitVRLittleEndian]
    assert SegmentationStorage in transcode.COMPRESSIBLE_SOP_CLASSES


def test_query_is_the_completeness_c_find() -> None:
    ((_sop_class, uid, level, keys),) = rows("query")
    assert uids(uid) == [StudyRootQueryRetrieveInformationModelFind]
    source = inspect.getsource(assembly.count_study_instances)
    assert f'QueryRetrieveLevel = "{level}"' in source
    for key in re.findall(r"`(\w+)`", keys):
        assert f"query.{key} =" in source


def test_scu_parameters_are_the_defaults() -> None:
    table = {row[0]: row[1:] for row in rows("scu-parameters")}
    storage, c_find, c_echo = table["connection, ACSE, DIMSE and network timeouts (seconds)"]
    assert float(storage) == inspect.signature(dispatch.Dispatcher).parameters["timeout"].default
    assert float(c_echo) == inspect.signature(dispatch.echo).parameters["timeout"].default
    assert f"timeout={float(c_find)}" in (REPO / "appliance" / "handoff.py").read_text()
    max_pdu = DimseDestination.model_fields["max_pdu"].default
    assert table["maximum PDU length received"][0] == f"destination `max_pdu` ({max_pdu})"
    assert inspect.signature(dispatch.Dispatcher).parameters["batch_size"].default == 200
    assert "batch of up to 200 results" in DOC
    defaults = DispatchSettings()
    assert f"`dispatch.retry_initial_seconds` ({defaults.retry_initial_seconds:g})" in DOC
    assert f"`dispatch.retry_max_seconds` ({defaults.retry_max_seconds:g})" in DOC
    warnings = ", ".join(f"`0x{s:04X}`" for s in dispatch._WARNING_STATUSES)
    assert warnings.rsplit(", ", 1)[0] in DOC.replace("\n", " ")


def test_every_uid_in_the_document_is_one_the_code_uses() -> None:
    known = ({str(c.abstract_syntax) for c in AllStoragePresentationContexts} | set(STORAGE_TRANSFER_SYNTAXES)
             | {VERIFICATION, APPLICATION_CONTEXT, PYNETDICOM_IMPLEMENTATION_UID, SegmentationStorage,
                Comprehensive3DSRStorage, SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelFind}
             | set(map(str, transcode.TRANSFER_SYNTAX.values())))
    assert sorted(set(uids(DOC)) - known) == []


def test_implementation_identity_is_pynetdicoms() -> None:
    assert f"`{PYNETDICOM_IMPLEMENTATION_UID}`, `{PYNETDICOM_IMPLEMENTATION_VERSION}`" in DOC


def test_the_document_follows_ps3_2() -> None:
    headings = re.findall(r"^#+ (.+)$", DOC, re.MULTILINE)
    for expected in ("1. Overview", "3. Networking", "3.1.1 Application data flow", "3.2.1 SOP classes",
                     "3.2.2 Association policies", "3.5 Security profiles", "4. Media interchange",
                     "5. Support of character sets", "6. Security"):
        assert expected in headings
