"""Settings owned by the inference package."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ExecutionProvider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class DeviceIdentity(BaseModel):
    """Who made the derived objects; written into every SEG and SR."""

    model_config = ConfigDict(extra="forbid")

    manufacturer: str = "Portico"
    model_name: str = "Portico Appliance"
    serial_number: str = "PORTICO-0001"
    software_version: str = "0.1.0"
    institution_name: str | None = None


class InferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models_dir: str = "models"
    #: tried in order; the first one available is used and recorded per job
    providers: tuple[ExecutionProvider, ...] = (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    #: organisational UID root for every UID we derive (≤ 40 chars leaves room for the suffix)
    uid_root: str = Field(default="1.2.826.0.1.3680043.8.498.", pattern=r"^[0-9]+(\.[0-9]+)*\.$",
                          max_length=40)
    device: DeviceIdentity = DeviceIdentity()
    workers: Annotated[int, Field(ge=1, le=16)] = 1
    intra_op_threads: Annotated[int, Field(ge=0)] = 0
