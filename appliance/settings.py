"""One Settings object, composed of each package's own section, from ``portico.yaml`` + ``PORTICO_…`` env.

Environment variables override the file; nested keys use ``__`` (``PORTICO_ROUTER__PORT=11113``).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_router.settings import DispatchSettings, RouterSettings
from fl_client.settings import FLSettings
from inference.settings import InferenceSettings

CONFIG_ENV = "PORTICO_CONFIG"
PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "secret", "password", "admin"}


class Mode(StrEnum):
    PRODUCTION = "production"
    DEV = "dev"


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: everything the appliance writes lives here: instances, results, database, quarantine
    data_dir: str = "var"
    #: refuse new instances (0xA700) when less than this many MB are free
    min_free_mb: Annotated[int, Field(ge=0)] = 512
    #: fsync every received instance before acknowledging it
    fsync: bool = True


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8042
    token: SecretStr = SecretStr("change-me")


class JobSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_seconds: Annotated[float, Field(gt=0)] = 5.0


class ReviewSettings(BaseModel):
    """Which models' results wait for a reviewer before they go to the destinations."""

    model_config = ConfigDict(extra="forbid")

    #: hold every model's results until a reviewer approves them
    required: bool = False
    #: hold only these models' results (model names, as in the rules); used when ``required`` is false
    models: tuple[str, ...] = ()

    def holds(self, model: str) -> bool:
        """Whether a job of ``model`` is held for review."""
        return self.required or model in self.models


class Settings(BaseSettings):
    """The appliance's whole configuration."""

    model_config = SettingsConfigDict(env_prefix="PORTICO_", env_nested_delimiter="__", extra="forbid")

    mode: Mode = Mode.PRODUCTION
    storage: StorageSettings = StorageSettings()
    router: RouterSettings = RouterSettings()
    dispatch: DispatchSettings = DispatchSettings()
    inference: InferenceSettings = InferenceSettings()
    jobs: JobSettings = JobSettings()
    review: ReviewSettings = ReviewSettings()
    api: ApiSettings = ApiSettings()
    fl: FLSettings = FLSettings()

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if (self.mode is Mode.PRODUCTION and self.api.enabled
                and self.api.token.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS):
            raise ValueError("api.token is a placeholder; set a real secret (or mode: dev)")
        for sender in self.router.stow_senders:
            if (self.mode is Mode.PRODUCTION
                    and sender.token.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS):
                raise ValueError(f"router.stow_senders: {sender.name}'s token is a placeholder; set a real secret")
        names = [s.name for s in self.router.stow_senders]
        tokens = [s.token.get_secret_value() for s in self.router.stow_senders]
        if len(set(names)) != len(names) or len(set(tokens)) != len(tokens):
            raise ValueError("router.stow_senders: every sender needs its own name and its own token")
        if self.api.token.get_secret_value() in tokens:
            raise ValueError("router.stow_senders: a sender's token must differ from api.token")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env wins over the YAML file, which arrives as init kwargs
        return env_settings, init_settings

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).resolve()

    @property
    def rules_path(self) -> Path:
        return Path(self.router.rules_file).resolve()

    @property
    def models_dir(self) -> Path:
        return Path(self.inference.models_dir).resolve()


def load_settings(path: Path | None = None) -> Settings:
    """Load ``path`` (or ``$PORTICO_CONFIG``, or ``./portico.yaml`` when present) plus environment.

    Relative paths inside the file are taken relative to the file's folder.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is None and Path("portico.yaml").is_file():
        path = Path("portico.yaml")
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data = _resolve_paths(loaded, path.resolve().parent)
    return Settings(**data)


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the known path settings absolute relative to the config file's folder."""
    for section, key in (("storage", "data_dir"), ("router", "rules_file"), ("inference", "models_dir")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            data[section][key] = str(base / value)
    return data
