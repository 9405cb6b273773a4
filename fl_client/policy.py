"""The site policy Portico writes into the kit's ``local/`` folder: deny by default.

- ``authorization.json``: no custom code from jobs (``byoc: none``) and no remote shell commands, for
  every role.
- ``resources.json``: only Portico's pre-installed trainer and a few privacy filters may be built
  from a job (``class_allow_list`` in ``enforce`` mode); the approval gate and the status writer are
  site components; NVFlare's log streaming to the server is off.
- ``privacy.json``: one default scope whose result filters run on every outgoing result: the site's
  exclusions and percentile privacy when configured, and always the ledger of what left the site.
- ``<control>/site.json``: what the trainer may use (allowed models, cohort index files, device).

Rewritten on every start, so a hand edit of ``local/`` does not survive.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fl_client.layout import SiteLayout, write_json
from fl_client.settings import FLSettings

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
STATUS_CLASS = "fl_client.site_components.SiteStatusWriter"
LEDGER_CLASS = "fl_client.site_components.OutgoingLedger"
PRIVACY_SCOPE = "portico"

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
            {"id": "process_launcher",
             "path": "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher",
             "args": {}},
            {"id": "portico_job_gate", "path": GATE_CLASS, "args": {"control_dir": control}},
            {"id": "portico_status", "path": STATUS_CLASS, "args": {"control_dir": control}},
        ],
    }


def privacy(settings: FLSettings, layout: SiteLayout) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if settings.privacy.exclude_vars:
        filters.append({"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars",
                        "args": {"exclude_vars": "|".join(f"(?:{v})" for v in settings.privacy.exclude_vars)}})
    if settings.privacy.percentile is not None:
        filters.append({"path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                        "args": {"percentile": settings.privacy.percentile, "gamma": settings.privacy.gamma}})
    # last of the site's filters: records exactly what the privacy filters let through
    filters.append({"path": LEDGER_CLASS, "args": {"control_dir": str(layout.control)}})
    return {"scopes": [{"name": PRIVACY_SCOPE, "properties": {}, "task_result_filters": filters,
                        "task_data_filters": []}],
            "default_scope": PRIVACY_SCOPE}


def site_config(settings: FLSettings, layout: SiteLayout, models_dir: Path) -> dict[str, Any]:
    return {
        "allowed_models": list(settings.allowed_models),
        "models_dir": str(models_dir),
        "cohorts": {name: str(layout.cohorts / f"{name}.json") for name in settings.cohorts},
        "device": settings.device,
        "threads": settings.train_threads,
    }


def write_policy(settings: FLSettings, layout: SiteLayout, models_dir: Path) -> None:
    """(Re)write every site-managed policy file."""
    local = layout.site / "local"
    local.mkdir(parents=True, exist_ok=True)
    write_json(local / "authorization.json", authorization())
    write_json(local / "resources.json", resources(layout))
    write_json(local / "privacy.json", privacy(settings, layout))
    write_json(layout.site_config, site_config(settings, layout, models_dir))
    log.info("site policy written: byoc none, shell none, %d allow-listed classes, %d result filters",
             len(CLASS_ALLOW_LIST), len(privacy(settings, layout)["scopes"][0]["task_result_filters"]))
