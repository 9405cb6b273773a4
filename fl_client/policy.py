"""The site policy Portico writes into the kit's ``local/`` folder: deny by default.

- ``authorization.json``: no custom code from jobs (``byoc: none``) and no remote shell commands, for
  every role.
- ``resources.json``: only Portico's pre-installed trainer and a few privacy filters may be built
  from a job (``class_allow_list`` in ``enforce`` mode); the approval gate and the status writer are
  site components; NVFlare's log streaming to the server is off.
- ``privacy.json``: one default scope on every job: the global weights a task brings are kept
  (:class:`fl_client.privacy.GlobalModelKeeper`); every outgoing result passes the site's privacy
  floor (:class:`fl_client.privacy.PrivacyFloor`: trainable variables only, clipped and noised update,
  budget), percentile privacy when configured, and always the ledger of what left the site.
- ``<control>/site.json``: what the trainer may use (allowed models, cohort index files, device).

Rewritten on every start, so a hand edit of ``local/`` does not survive.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from fl_client.kit import enrolment
from fl_client.layout import SiteLayout, write_json
from fl_client.settings import FLSettings, PrivacySettings

log = logging.getLogger(__name__)

TRAINER_CLASS = "fl_client.executor.PorticoTrainer"
#: what a job may instantiate at this site (no BYOC, so nothing else can run)
CLASS_ALLOW_LIST = (
    TRAINER_CLASS,
    "nvflare.app_common.filters.exclude_vars.ExcludeVars",
    "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
    "nvflare.app_common.filters.svt_privacy.SVTPrivacy",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
)
GATE_CLASS = "fl_client.site_components.SiteJobGate"
LAUNCHER_CLASS = "fl_client.site_components.ApprovedContentLauncher"
STATUS_CLASS = "fl_client.site_components.SiteStatusWriter"
LEDGER_CLASS = "fl_client.site_components.OutgoingLedger"
FLOOR_CLASS = "fl_client.privacy.PrivacyFloor"
KEEPER_CLASS = "fl_client.privacy.GlobalModelKeeper"
PRIVACY_SCOPE = "portico"
#: the only files in the site's ``local/``
LOCAL_FILES = frozenset({"authorization.json", "resources.json", "privacy.json", "log_config.json"})

_ROLE_RIGHTS = {
    "project_admin": {"submit_job": "any", "clone_job": "any", "manage_job": "any", "download_job": "any",
                      "view": "any", "operate": "o:site"},
    "org_admin": {"submit_job": "none", "clone_job": "none", "manage_job": "o:submitter",
                  "download_job": "o:submitter", "view": "any", "operate": "o:site"},
    "lead": {"submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter",
             "download_job": "n:submitter", "view": "any", "operate": "o:site"},
}


def authorization() -> dict[str, Any]:
    permissions: dict[str, Any] = {
        role: {**rights, "shell_commands": "none", "byoc": "none", "server-predeployed-flwr": "none"}
        for role, rights in _ROLE_RIGHTS.items()}
    permissions["member"] = {"view": "any", "shell_commands": "none", "byoc": "none"}
    return {"format_version": "1.0", "permissions": permissions}


def resources(layout: SiteLayout) -> dict[str, Any]:
    control = str(layout.control)
    return {
        "format_version": 2,
        "class_list_enforcement_mode": "enforce",
        "class_allow_list": list(CLASS_ALLOW_LIST),
        # site logs stay at the site
        "allow_log_streaming": False,
        "client": {"retry_timeout": 30, "compression": "Gzip"},
        "components": [
            {"id": "resource_manager",
             "path": "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager",
             "args": {"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0, "expiration_period": 300}},
            {"id": "resource_consumer",
             "path": "nvflare.app_common.resource_consumers.gpu_resource_consumer.GPUResourceConsumer",
             "args": {}},
            {"id": "process_launcher", "path": LAUNCHER_CLASS, "args": {"control_dir": control}},
            {"id": "portico_job_gate", "path": GATE_CLASS, "args": {"control_dir": control}},
            {"id": "portico_status", "path": STATUS_CLASS, "args": {"control_dir": control}},
        ],
    }


def privacy(settings: FLSettings, layout: SiteLayout, project: str = "") -> dict[str, Any]:
    """The one privacy scope of this site: the floor on every outgoing result, then the ledger."""
    floor = settings.privacy
    filters: list[dict[str, Any]] = [{"path": FLOOR_CLASS, "args": {
        "control_dir": str(layout.control), "project": project or "unknown", "clip_norm": floor.clip_norm,
        "noise_multiplier": floor.noise_multiplier, "epsilon": floor.epsilon, "delta": floor.delta,
        "exclude_vars": list(floor.exclude_vars)}}]
    if floor.percentile is not None:
        # after the floor: sparsifying a noised update is post-processing (the guarantee holds)
        filters.append({"path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                        "args": {"percentile": floor.percentile, "gamma": floor.gamma}})
    # last of the site's filters: records exactly what the privacy filters let through
    filters.append({"path": LEDGER_CLASS, "args": {"control_dir": str(layout.control)}})
    return {"scopes": [{"name": PRIVACY_SCOPE, "properties": {}, "task_result_filters": filters,
                        "task_data_filters": [{"path": KEEPER_CLASS, "args": {}}]}],
            "default_scope": PRIVACY_SCOPE}


def floor_config(settings: FLSettings) -> dict[str, Any]:
    """The floor as the trainer and the approval screen see it."""
    return floor_of_privacy(settings.privacy)


def floor_of_privacy(p: PrivacySettings) -> dict[str, Any]:
    return {"min_series": p.min_series, "min_patients": p.min_patients,
            "min_examples_per_round": p.min_examples_per_round, "clip_norm": p.clip_norm,
            "noise_multiplier": p.noise_multiplier, "noise_std": p.noise_multiplier * p.clip_norm,
            "epsilon": p.epsilon, "delta": p.delta, "exclude_vars": list(p.exclude_vars),
            "percentile": p.percentile, "normalisation_statistics": "kept at the site (never sent)"}


def site_config(settings: FLSettings, layout: SiteLayout, models_dir: Path) -> dict[str, Any]:
    return {
        "allowed_models": list(settings.allowed_models),
        "models_dir": str(models_dir),
        "cohorts": {name: str(layout.cohorts / f"{name}.json") for name in settings.cohorts},
        "device": settings.device,
        "threads": settings.train_threads,
        "privacy": floor_config(settings),
    }


def log_config() -> dict[str, Any]:
    """NVFlare's own default logging configuration, from the installed NVFlare (never from a kit)."""
    import nvflare.lighter.templates as templates

    master = yaml.safe_load((Path(templates.__file__).parent / "master_template.yml").read_text(encoding="utf-8"))
    config: dict[str, Any] = json.loads(master["log_config"])
    return config


def write_policy(settings: FLSettings, layout: SiteLayout, models_dir: Path) -> None:
    """(Re)write every site-managed policy file."""
    local = layout.site / "local"
    local.mkdir(parents=True, exist_ok=True)
    for stray in sorted(local.iterdir()):
        # nothing but Portico's files: a folder such as custom/ would be imported by every NVFlare process
        if stray.name not in LOCAL_FILES:
            log.warning("removing %s from the site's local/ (not a Portico policy file)", stray.name)
            shutil.rmtree(stray) if stray.is_dir() and not stray.is_symlink() else stray.unlink()
    write_json(local / "authorization.json", authorization())
    write_json(local / "log_config.json", log_config())
    write_json(local / "resources.json", resources(layout))
    info = enrolment(layout)
    scope = privacy(settings, layout, info.project if info else "")
    write_json(local / "privacy.json", scope)
    write_json(layout.site_config, site_config(settings, layout, models_dir))
    log.info("site policy written: byoc none, shell none, %d allow-listed classes, %d result filters",
             len(CLASS_ALLOW_LIST), len(scope["scopes"][0]["task_result_filters"]))
