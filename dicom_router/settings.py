"""Settings owned by the DICOM router: our listener, the peers we trust, where results go."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[^\\]*[^\\ ][^\\]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class Peer(BaseModel):
    """A DICOM node allowed to send to us (and, when ``query`` is set, to answer our C-FIND)."""

    model_config = ConfigDict(extra="forbid")

    ae_title: AETitle
    #: addresses the peer may connect from; exact IPs
    hosts: tuple[str, ...] = ("127.0.0.1",)
    #: where the peer's own SCP listens, for C-FIND of NumberOfStudyRelatedInstances
    query_host: str | None = None
    query_port: Port | None = None
    query_ae_title: AETitle | None = None


class StowSender(BaseModel):
    """A DICOMweb client allowed to send studies to us by STOW-RS (``POST /dicom-web/studies``)."""

    model_config = ConfigDict(extra="forbid")

    #: recorded like a calling AE title; use the PACS's AE title, so that a ``peers`` entry of that
    #: name can answer the completeness C-FIND for studies it sent this way
    name: AETitle
    #: its bearer token (``Authorization: Bearer …``); separate from the API's admin token
    token: SecretStr
    #: addresses it may connect from; exact IPs
    hosts: tuple[str, ...] = ("127.0.0.1",)


class RouterSettings(BaseModel):
    """The C-STORE/C-ECHO listener and study assembly."""

    model_config = ConfigDict(extra="forbid")

    ae_title: AETitle = "PORTICO"
    bind_host: str = "127.0.0.1"
    port: Port = 11112
    max_pdu: Annotated[int, Field(ge=0)] = 262144
    #: calling AE titles + addresses allowed to associate; empty means nobody
    peers: tuple[Peer, ...] = ()
    #: a study is complete after this many seconds without a new instance
    quiet_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: how often the assembler looks at open studies
    poll_seconds: Annotated[float, Field(gt=0)] = 0.5
    rules_file: str = "rules.yaml"
    #: DICOMweb senders (STOW-RS, served by the HTTP API when ``api.enabled``); empty means nobody
    stow_senders: tuple[StowSender, ...] = ()
    #: largest STOW-RS request body accepted, MB (a bigger one is answered 413)
    stow_max_request_mb: Annotated[int, Field(ge=1)] = 2048
    #: raise glibc's malloc thresholds when the listener starts (see dicom_router.scp.tune_allocator):
    #: PDU-sized buffers are reused instead of page-faulted anew; process-wide
    tune_allocator: bool = True


class Compression(StrEnum):
    """Lossless compression of results on the way to a destination.

    ``none`` sends every file as stored (uncompressed); safe for any receiver. ``jpeg-ls`` and
    ``rle`` send 8/16-bit SEGs (FRACTIONAL, not the 1-bit BINARY ones) in JPEG-LS Lossless or RLE
    Lossless when the destination accepts that transfer syntax, and the stored file when it does
    not. Only lossless: the pixels and the SOP Instance UID stay the same.
    """

    NONE = "none"
    JPEG_LS = "jpeg-ls"
    RLE = "rle"


class DimseDestination(BaseModel):
    """A C-STORE SCP that receives our results."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dimse"] = "dimse"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None
    max_pdu: Annotated[int, Field(ge=0)] = 262144
    #: also send Secondary Capture key images, for a PACS or viewer that cannot display a SEG
    secondary_capture: bool = False
    #: lossless compression of SEGs offered to it, with the stored (uncompressed) file as fallback
    compression: Compression = Compression.NONE


class StowDestination(BaseModel):
    """A DICOMweb STOW-RS endpoint that receives our results."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["stow"] = "stow"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://")
    #: also send Secondary Capture key images, for a PACS or viewer that cannot display a SEG
    secondary_capture: bool = False
    #: lossless compression of SEGs offered to it, with the stored (uncompressed) file as fallback
    compression: Compression = Compression.NONE


Destination = Annotated[DimseDestination | StowDestination, Field(discriminator="kind")]


class DispatchSettings(BaseModel):
    """Where results go and how hard we try."""

    model_config = ConfigDict(extra="forbid")

    destinations: tuple[Destination, ...] = ()
    retry_initial_seconds: Annotated[float, Field(gt=0)] = 2.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    poll_seconds: Annotated[float, Field(gt=0)] = 0.5

    @field_validator("destinations")
    @classmethod
    def _unique(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return value
