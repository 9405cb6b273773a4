"""The source's patient and study attributes made conformant for the objects we derive from it.

highdicom copies the Patient, General Study and Patient Study modules of a source image into every
SEG, SR and Secondary Capture, and refuses (or warns about, quoting the value) what does not
conform: a birth date written ``1980-07-14`` fails the whole job, ``female`` for PatientSex as well.
A study must still get its results, so the reference dataset handed to highdicom is a copy whose
attributes of those modules are normalised per value representation:

- DA: ``YYYYMMDD``; separators (``-``, ``.``, ``/``) are dropped; an impossible date becomes blank.
- TM: ``HHMMSS.FFFFFF`` (or a prefix); colons are dropped; an impossible time becomes blank.
- DT: kept when it is a valid DICOM date-time, blank otherwise.
- PatientSex: ``M``, ``F`` or ``O`` from any case and the English words; anything else blank.
- PN: at most 3 component groups of at most 5 components, each group at most 64 characters;
  control characters become spaces. A one-component name is left as it is (it conforms).
- LO, SH, LT, ST, UC, UT: control characters (other than those the VR allows) become spaces, cut to the
  VR's maximum length. Identifiers (PatientID, AccessionNumber, StudyID) are cut too: a value past
  the limit does not conform, and the prefix keeps more of it than a blank would.
- CS: upper case; blank unless it is made of A-Z, 0-9, space and underscore, at most 16 long.
- AS: ``nnnD|W|M|Y`` (``45y`` becomes ``045Y``); anything else blank.
- DS, IS: a number within the VR's form (``72,5`` becomes ``72.5``); anything else blank.

Where an attribute allows one value only, a multi-valued one keeps its first value. The source
files themselves are never changed. Values are read without pydicom's validation, so normalising
never makes pydicom warn (its warnings quote the values).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

#: top-level attributes of the Patient, General Study, Patient Study and Clinical Trial Subject/Study
#: modules (sequences aside): what highdicom copies from the source into a derived object
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainStockNumber",
    "StrainAdditionalInformation", "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson", "ResponsiblePersonRole",
    "ResponsibleOrganization", "PatientIdentityRemoved", "DeidentificationMethod",
    # General Study
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "ConsultingPhysicianName",
    # Patient Study
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "PatientBodyMassIndex",
    "MeasuredAPDimension", "MeasuredLateralDimension", "MedicalAlerts", "Allergies", "SmokingStatus",
    "LastMenstrualDate", "AdditionalPatientHistory", "Occupation", "PatientSexNeutered", "AdmissionID",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "PatientState", "ReasonForVisit",
    # Clinical Trial Subject and Study
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
)

#: the longest value (characters) of each text VR
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
              "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UC": 2**32 - 2, "UT": 2**32 - 2}
#: VRs whose values follow the Specific Character Set
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
#: VRs that may hold CR, LF, FF and TAB (text); the others allow no control character but ESC
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
#: characters that reset an ISO 2022 code extension (pydicom's own choice per VR, and the value separator)
_PN_DELIMITERS = {0x5E, 0x3D, 0x5C}
_TEXT_DELIMITERS = {0x0D, 0x0A, 0x09, 0x0C, 0x5C}
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_DATE = re.compile(r"^(\d{4})[-./]?(\d{2})[-./]?(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_DATETIME = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_CS = re.compile(r"^[A-Z0-9 _]*$")
_DS = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_IS = re.compile(r"^[+-]?\d+$")
_NOT_ALLOWED = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # controls but ESC (0x1b), which ISO 2022 needs
_NOT_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")


@dataclass(frozen=True)
class Conformed:
    """A reference dataset for highdicom and the keywords whose values had to change (no values)."""

    dataset: Dataset
    changed: tuple[str, ...]


def normalise_date(value: str) -> str:
    """``YYYYMMDD`` from a date with or without separators; ``""`` when it is no real date."""
    m = _DATE.match(value.strip())
    if not m:
        return ""
    try:
        day = dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return ""
    return day.strftime("%Y%m%d") if day.year >= 1 else ""


def normalise_time(value: str) -> str:
    """``HHMMSS.FFFFFF`` (or a shorter prefix) from a time with or without colons; ``""`` when invalid."""
    m = _TIME.match(value.strip())
    if not m:
        return ""
    hh, mm, ss, frac = m[1], m[2], m[3], m[4]
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        return ""
    return hh + (mm or "") + (ss or "") + (f".{frac}" if frac else "")


def normalise_datetime(value: str) -> str:
    """The value when it is a valid DT, else ``""``."""
    text = value.strip()
    if not _DATETIME.match(text) or len(text) > MAX_LENGTH["DT"]:
        return ""
    date = text.split("+")[0].split("-")[0][:8]
    if len(date) == 8 and not normalise_date(date):
        return ""
    return text


def normalise_sex(value: str) -> str:
    """``M``, ``F`` or ``O`` (any case, or the English word); ``""`` for anything else."""
    return _SEX.get(value.strip().upper(), "")


def normalise_person_name(value: str) -> str:
    """A PN value within the VR's limits: ≤ 3 groups of ≤ 5 components, ≤ 64 characters a group."""
    groups = []
    for group in _NOT_ALLOWED.sub(" ", value).split("=")[:3]:
        components = [c.strip() for c in group.split("^")[:5]]
        while components and not components[-1]:  # trailing empty components say nothing
            components.pop()
        groups.append("^".join(components)[:MAX_LENGTH["PN"]].rstrip("^ "))
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def normalise_age(value: str) -> str:
    """``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``; ``""`` for anything else."""
    m = _AGE.match(value.strip().upper())
    return f"{int(m[1]):03d}{m[2]}" if m else ""


def normalise_decimal(value: str) -> str:
    """A DS value (≤ 16 characters); ``""`` when it is not a finite number."""
    text = value.strip().replace(",", ".")
    if _DS.match(text) and len(text) <= MAX_LENGTH["DS"]:
        return text
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    for digits in range(15, 0, -1):
        out = f"{number:.{digits}g}"
        if len(out) <= MAX_LENGTH["DS"]:
            return out
    return ""


def normalise_integer(value: str) -> str:
    """An IS value (a 32-bit signed integer); ``""`` otherwise."""
    text = value.strip()
    if not _IS.match(text) or not -(2**31) <= int(text) < 2**31:
        return ""
    return str(int(text))


def normalise_code_string(value: str) -> str:
    """An upper-case CS value of A-Z, 0-9, space and underscore, ≤ 16 characters; ``""`` otherwise."""
    text = value.strip().upper()
    return text if _CS.match(text) and len(text) <= MAX_LENGTH["CS"] else ""


def normalise_text(value: str, vr: str) -> str:
    """A text value of ``vr`` without the control characters it forbids, cut to its maximum length."""
    pattern = _NOT_IN_TEXT if vr in _TEXT_VRS else _NOT_ALLOWED
    text = pattern.sub(" ", value)
    # leading spaces are significant in LT, ST and UT only; trailing ones are padding in all
    text = text.rstrip() if vr in _TEXT_VRS else text.strip()
    return text[:MAX_LENGTH.get(vr, len(text))].rstrip()


def normalise_value(value: str, vr: str, keyword: str = "") -> str:
    """One value of ``vr`` made conformant (``keyword`` selects an attribute's own rule)."""
    if keyword == "PatientSex":
        return normalise_sex(value)
    if vr == "DA":
        return normalise_date(value)
    if vr == "TM":
        return normalise_time(value)
    if vr == "DT":
        return normalise_datetime(value)
    if vr == "PN":
        return normalise_person_name(value)
    if vr == "AS":
        return normalise_age(value)
    if vr == "DS":
        return normalise_decimal(value)
    if vr == "IS":
        return normalise_integer(value)
    if vr == "CS":
        return normalise_code_string(value)
    return normalise_text(value, vr)


def _single_valued(keyword: str) -> bool:
    try:
        return dictionary_VM(keyword) == "1"
    except KeyError:
        return True


def _values(element: DataElement | RawDataElement, vr: str, encodings: list[str]) -> list[str] | None:
    """The element's values as text, read without pydicom's validation; ``None`` when not text."""
    if isinstance(element, RawDataElement):
        raw = element.value
        if raw is None:
            return []
        if not isinstance(raw, bytes):
            return None
        if vr in _CHARSET_VRS:
            # one decode for the whole value; backslash is the value separator in every encoding we read
            text = decode_bytes(raw, encodings, _PN_DELIMITERS if vr == "PN" else _TEXT_DELIMITERS)
        else:
            text = raw.decode("ascii", errors="replace")
        text = text.rstrip("\x00 ")
        return [] if text == "" else (text.split("\\") if vr not in _TEXT_VRS else [text])
    value = element.value
    if value is None or value == "":
        return []
    items: Iterable[Any] = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, (str, PersonName)):
            out.append(str(item))
        elif isinstance(item, (dt.date, dt.time, int, float)):
            out.append(str(item))  # pydicom's DA/TM/DS/IS keep the original string as their str()
        else:
            return None
    return out


#: Type 2 attributes of the Patient and General Study modules that the writers copy from the source: a source
#: without them (non-conformant) still gives derived objects that have them, empty
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def conform(source: Dataset, keywords: Iterable[str] = PATIENT_STUDY_KEYWORDS) -> Conformed:
    """A copy of ``source`` whose ``keywords`` attributes conform; ``source`` itself is left as it is.

    Missing :data:`TYPE_2_COPIED` attributes are added empty (not counted as changed).

    The copy shares every other element with ``source`` (nothing is decoded or validated that was not
    already), so it is cheap; its file meta is the source's.
    """
    charset = source.get_item(Tag(0x0008, 0x0005))
    encodings = convert_encodings(_charset_terms(charset))
    # keys(), not iteration: iterating a Dataset converts (and validates) every element
    copy = Dataset({tag: source.get_item(tag) for tag in source.keys()})  # noqa: SIM118
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    changed: list[str] = []
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in source:
            continue
        element = source.get_item(tag)
        if element is None:
            continue
        vr = _vr(element, keyword)
        if vr not in MAX_LENGTH:
            continue
        values = _values(element, vr, encodings)
        if values is None:
            continue
        fixed = [normalise_value(v, vr, keyword) for v in values]
        if _single_valued(keyword):
            fixed = fixed[:1]
        fixed = [v for v in fixed if v] if len(fixed) > 1 else fixed
        if fixed == values:
            continue
        copy[BaseTag(tag)] = _element(BaseTag(tag), vr, fixed)
        changed.append(keyword)
    for keyword in TYPE_2_COPIED:
        # Type 2 in the Patient and General Study modules: present, if empty, in every derived object
        tag = tag_for_keyword(keyword)
        if tag is not None and tag not in copy:
            copy[BaseTag(tag)] = DataElement(BaseTag(tag), dictionary_VR(keyword), "")
    return Conformed(copy, tuple(changed))


def _charset_terms(element: DataElement | RawDataElement | None) -> list[str] | str | None:
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        raw = element.value
        if not isinstance(raw, bytes) or not raw:
            return None
        return [t.strip() for t in raw.decode("ascii", errors="replace").split("\\")]
    value = element.value
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return str(value) if value else None


def _vr(element: DataElement | RawDataElement, keyword: str) -> str:
    vr = element.VR
    if vr in (None, "UN"):
        try:
            return str(dictionary_VR(keyword))
        except KeyError:
            return "UN"
    return str(vr)


def _element(tag: BaseTag, vr: str, values: list[str]) -> DataElement:
    value: Any = "" if not values else values[0] if len(values) == 1 else values
    if vr == "PN" and value:
        value = PersonName(value) if isinstance(value, str) else [PersonName(v) for v in value]
    return DataElement(tag, vr, value)
