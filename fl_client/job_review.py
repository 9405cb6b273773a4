"""What a job will do at this site, from its content, and the hash an approval binds.

The site administrator reviews a job folder (the one the researchers submit): the trainer arguments,
the model and cohort, the rounds, the privacy floor that will apply, and the sha256 of the client
app's content. The approval binds that hash; when the job is deployed here the gate hashes the app it
received the same way and refuses to start one whose content differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_client.errors import PolicyError
from fl_client.layout import SiteLayout
from fl_client.policy import TRAINER_CLASS, floor_of_privacy
from fl_client.privacy_budget import projected_epsilon
from fl_client.settings import FLSettings

#: files NVFlare adds to a job or app when it signs or deploys it; not part of what was reviewed
_IGNORED_PREFIXES = ("__nvfl",)
TRAINER_DEFAULTS: dict[str, Any] = {"cohort": "default", "steps": 20, "lr": 1e-3, "batch_size": 8, "image_size": 64,
                                    "spacing_mm": 8.0, "seed": 0}


def content_hash(folder: Path) -> str:
    """sha256 over every file (relative path and content; JSON canonicalised) below ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name.startswith(_IGNORED_PREFIXES) or "__pycache__" in path.parts:
            continue
        raw = path.read_bytes()
        if path.suffix == ".json":
            with contextlib.suppress(ValueError):
                raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        digest.update(rel.encode() + b"\0" + str(len(raw)).encode() + b"\0" + raw)
    return digest.hexdigest()


@dataclass(frozen=True)
class JobReview:
    """The approval screen of a job."""

    name: str
    client_app: str
    client_app_sha256: str
    job_sha256: str
    trainer: dict[str, Any]
    rounds: int | None
    server: dict[str, Any]
    privacy: dict[str, Any]
    #: why this site's floor or policy would refuse the job (empty: it may run)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def trainer_of(client_config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The trainer arguments of a client app config (with defaults filled in) and any problems."""
    problems: list[str] = []
    trainer: dict[str, Any] = {}
    for entry in client_config.get("executors", []) or []:
        executor = entry.get("executor", {}) if isinstance(entry, dict) else {}
        path = str(executor.get("path", ""))
        if path != TRAINER_CLASS:
            problems.append(f"executor {path!r} is not Portico's trainer")
            continue
        trainer = {**TRAINER_DEFAULTS, **(executor.get("args") or {})}
    if not trainer and not problems:
        problems.append("the client app names no trainer")
    for key in ("components", "task_data_filters", "task_result_filters"):
        if client_config.get(key):
            problems.append(f"the client app declares {key} (the site's own filters apply regardless)")
    return trainer, problems


def review_trainer(trainer: dict[str, Any], settings: FLSettings) -> list[str]:
    problems = []
    floor = settings.privacy
    if trainer:
        if trainer.get("model") not in settings.allowed_models:
            problems.append(f"model {trainer.get('model')!r} is not allowed at this site")
        if trainer.get("cohort") not in settings.cohorts:
            problems.append(f"cohort {trainer.get('cohort')!r} is not defined at this site")
        examples = int(trainer.get("steps", 0)) * int(trainer.get("batch_size", 0))
        if examples < floor.min_examples_per_round:
            problems.append(f"{examples} examples per round (steps x batch_size) is below the site's minimum "
                            f"of {floor.min_examples_per_round}")
    return problems


def review_job(folder: Path, settings: FLSettings, site: str | None = None, *,
               layout: SiteLayout | None = None, project: str | None = None) -> JobReview:
    """Review the job folder ``folder`` (``meta.json``, ``app_*``) for this site.

    Raises
    ------
    PolicyError
        When the folder is not an NVFlare job.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{folder}: no readable meta.json (not an NVFlare job folder)") from exc
    deploy_map: dict[str, list[str]] = meta.get("deploy_map", {}) or {}
    client_app = next((app for app, sites in deploy_map.items()
                       if site is not None and site in sites), None)
    if client_app is None:
        client_app = next((app for app, sites in deploy_map.items() if "server" not in sites), "app_client")
    app_dir = folder / client_app
    problems: list[str] = []
    try:
        client_config = json.loads((app_dir / "config" / "config_fed_client.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        client_config = {}
        problems.append(f"{client_app}/config/config_fed_client.json is missing or unreadable")
    trainer, found = trainer_of(client_config)
    problems += found
    if (app_dir / "custom").exists():
        problems.append(f"{client_app}/custom/ carries code (never run at this site)")
    problems += review_trainer(trainer, settings)
    server: dict[str, Any] = {}
    rounds: int | None = None
    server_app = next((app for app, sites in deploy_map.items() if "server" in sites), None)
    if server_app is not None:
        try:
            server_config = json.loads((folder / server_app / "config" / "config_fed_server.json").read_text(
                encoding="utf-8"))
            workflow = (server_config.get("workflows") or [{}])[0]
            server = {"workflow": workflow.get("path"), **(workflow.get("args") or {})}
            rounds = int(server["num_rounds"]) if "num_rounds" in server else None
        except (OSError, ValueError, TypeError):
            problems.append(f"{server_app}/config/config_fed_server.json is missing or unreadable")
    privacy = floor_of_privacy(settings.privacy)
    floor = settings.privacy
    if layout is not None and project and rounds is not None and floor.noise_multiplier > 0:
        now, after = projected_epsilon(layout, project, floor.noise_multiplier, rounds, floor.delta)
        privacy.update(epsilon_spent_so_far=round(now, 4), epsilon_after_this_job=round(after, 4))
        if floor.epsilon is not None and after > floor.epsilon:
            privacy["note"] = (f"the budget (epsilon {floor.epsilon:g}) runs out during this job: "
                               "the site stops contributing when it is spent")
    return JobReview(name=str(meta.get("name", folder.name)), client_app=client_app,
                     client_app_sha256=content_hash(app_dir) if app_dir.is_dir() else "",
                     job_sha256=content_hash(folder), trainer=trainer, rounds=rounds, server=server,
                     privacy=privacy, problems=problems)


def review_deployed(app_dir: Path) -> dict[str, Any]:
    """The hash and trainer arguments of an app as deployed at this site (what will actually run)."""
    try:
        client_config = json.loads((app_dir / "config" / "config_fed_client.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        client_config = {}
    trainer, problems = trainer_of(client_config)
    return {"client_app_sha256": content_hash(app_dir), "trainer": trainer, "problems": problems}


def save_review(layout: SiteLayout, job_id: str, review: JobReview) -> None:
    """Keep ``review`` as the content waiting job ``job_id`` asks to run (``portico fl inspect --for``),
    so the dashboard and the API show it and an approval can bind its hash."""
    from fl_client.layout import write_json

    layout.job_dir(job_id)  # validates the id: it names a file
    write_json(layout.control / "reviews" / f"{job_id}.json", review.to_json())


def saved_review(layout: SiteLayout, job_id: str) -> dict[str, Any] | None:
    """The review kept for job ``job_id``, or None."""
    from fl_client.layout import read_json

    layout.job_dir(job_id)
    found = read_json(layout.control / "reviews" / f"{job_id}.json")
    return found if isinstance(found, dict) else None
