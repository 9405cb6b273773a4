"""The ``fl`` section of the appliance settings (composed into ``appliance.settings.Settings``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LabelSource(StrEnum):
    """Which SEGs may label a cohort's series."""

    #: SEGs stored alongside the study (received from the PACS); where a series has none, approved ones
    ANY = "any"
    #: only SEGs the appliance made whose job a reviewer approved
    APPROVED = "approved"
    #: only SEGs stored alongside the study (received from the PACS)
    IMPORTED = "imported"


class CohortRule(BaseModel):
    """Which stored series form a training cohort. Data only: matched against DICOM headers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str = Field(default="CT", pattern=r"^[A-Z]{2,4}$")
    #: BodyPartExamined values accepted (case-insensitive); empty accepts any
    body_parts: tuple[str, ...] = ()
    #: regular expression a SeriesDescription must match (``re.search``); None accepts any
    series_description: str | None = None
    min_slices: Annotated[int, Field(ge=1)] = 1
    #: at most this many series (oldest first by study UID order); None: all
    max_series: Annotated[int, Field(ge=1)] | None = None
    #: fraction of studies held out for local validation (assigned by a hash of the study UID)
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    #: which SEGs label a series; rejected or unreviewed SEGs the appliance made never do
    labels: LabelSource = LabelSource.ANY


class PrivacySettings(BaseModel):
    """The site's privacy floor: applied to every job and every outgoing result; no job can lower it.

    Clipping and noise are applied to the round's weight update (the difference between the weights
    trained here and the global weights received) by a site result filter before it leaves; the
    Gaussian mechanism is accounted per project (RDP, Opacus) against ``epsilon``/``delta``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: variable names (regular expressions) never sent; e.g. a site-specific head
    exclude_vars: tuple[str, ...] = ()
    #: share only the weight differences above this percentile (NVFlare PercentilePrivacy); None: off
    percentile: Annotated[float, Field(gt=0.0, lt=100.0)] | None = None
    #: clip of the shared differences (PercentilePrivacy ``gamma``)
    gamma: Annotated[float, Field(gt=0.0)] = 0.01
    #: the site trains only on a cohort with at least this many training series ...
    min_series: Annotated[int, Field(ge=1)] = 20
    #: ... from at least this many patients
    min_patients: Annotated[int, Field(ge=1)] = 10
    #: a round trains on at least this many examples (job's steps x batch_size)
    min_examples_per_round: Annotated[int, Field(ge=1)] = 64
    #: L2 norm the round's weight update is clipped to
    clip_norm: Annotated[float, Field(gt=0.0)] = 1.0
    #: Gaussian noise std = noise_multiplier x clip_norm, per coordinate; 0 turns DP off (epsilon must be None)
    noise_multiplier: Annotated[float, Field(ge=0.0)] = 1.0
    #: privacy budget per federated project (accounted across rounds and jobs); None only without noise
    epsilon: Annotated[float, Field(gt=0.0)] | None = 10.0
    delta: Annotated[float, Field(gt=0.0, lt=0.01)] = 1e-5

    @model_validator(mode="after")
    def _budget_needs_noise(self) -> PrivacySettings:
        if self.noise_multiplier == 0 and self.epsilon is not None:
            raise ValueError("fl.privacy: epsilon needs noise (noise_multiplier > 0); "
                             "set epsilon: null to run without differential privacy")
        if self.noise_multiplier > 0 and self.epsilon is None:
            raise ValueError("fl.privacy: noise_multiplier > 0 needs a budget (epsilon)")
        return self


class FLSettings(BaseModel):
    """Federated learning (NVFlare client) on this appliance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: start the NVFlare client with ``portico serve`` (once enrolled)
    enabled: bool = False
    #: folder for the kit, NVFlare's workspace and FL state; relative to the appliance data folder
    workspace: str = "fl"
    #: Python interpreter that runs NVFlare (a separate venv if needed); None: the appliance's own
    python: str | None = None
    #: the unprivileged OS user NVFlare and its job processes run as when Portico runs as root (it owns
    #: the FL folder and nothing else; the installer creates it). A root Portico refuses to start NVFlare
    #: when the user does not exist; None runs NVFlare as root, explicitly (not recommended)
    run_as: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] | None = "portico-fl"
    #: first restart delay after the client process dies; doubles per quick failure up to the maximum
    restart_backoff_s: Annotated[float, Field(gt=0)] = 2.0
    restart_backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    #: a run this long resets the backoff
    healthy_after_s: Annotated[float, Field(gt=0)] = 60.0
    #: SIGTERM, then SIGKILL after this many seconds
    stop_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: model packages whose architecture researchers may train here (allow-list)
    allowed_models: tuple[str, ...] = ("ct-body-composition",)
    #: named cohorts a job may ask for (the job names a cohort, never a path)
    cohorts: dict[str, CohortRule] = Field(default_factory=lambda: {"default": CohortRule()})
    privacy: PrivacySettings = PrivacySettings()
    #: ``auto`` uses a GPU when torch sees one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: torch threads per training process
    train_threads: Annotated[int, Field(ge=1)] = 1
    #: address-space cap of every NVFlare process (RLIMIT_AS), MiB; None: no cap
    memory_limit_mib: Annotated[int, Field(ge=512)] | None = 8192
    #: export the global model to a candidate package when a job ends
    auto_export: bool = True
