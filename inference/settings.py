"""Settings owned by the inference package."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.signing import public_key

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
    #: inference workers in this process; ``None`` (the default): sized to the machine
    #: (:mod:`inference.runtime.workers`: one per GPU, else two on CPU with the cores split between them)
    workers: Annotated[int | None, Field(ge=1, le=16)] = None
    #: ONNX Runtime intra-op threads per model session; 0: ONNX Runtime's choice (or the split above)
    intra_op_threads: Annotated[int, Field(ge=0)] = 0
    #: loaded models kept for the next job, least recently used out
    max_sessions: Annotated[int, Field(ge=1, le=64)] = 4
    #: budget for the summed size of the loaded models, MB (the newest one is always kept)
    session_memory_mb: Annotated[int, Field(ge=1)] = 4096
    #: ONNX Runtime's CPU memory arena: ~10 % faster on the CPU, ~2x resident memory (it keeps every
    #: batch's peak); off by default so the demo model stays under 2 GB on a 600-slice CT
    cpu_memory_arena: bool = False
    #: PEM ed25519 public keys (the key text, not a path) trusted to sign model packages
    trusted_keys: tuple[str, ...] = ()
    #: refuse model packages without a signature that verifies with one of ``trusted_keys``
    require_signatures: bool = False

    @field_validator("trusted_keys")
    @classmethod
    def _ed25519_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pem in value:
            public_key(pem)
        return value

    @model_validator(mode="after")
    def _keys_for_signatures(self) -> InferenceSettings:
        if self.require_signatures and not self.trusted_keys:
            raise ValueError("require_signatures needs at least one entry in trusted_keys")
        return self
