"""``/rules``: the active routing rules file, its lines, validation and warnings (read-only).

The tester on the dashboard's Rules page asks ``GET /studies/{uid}/routing``: a dry run, no job created.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from appliance.api.context import ApiContext
from appliance.rules_view import rules_file


class ProblemOut(BaseModel):
    #: the 1-based line the problem is on, when known
    line: int | None
    message: str


class RuleOut(BaseModel):
    name: str
    model: str
    model_version: str | None
    #: one line, as ``portico rules check`` prints it
    describe: str


class RulesOut(BaseModel):
    path: str
    exists: bool
    lines: list[str]
    truncated: bool
    valid: bool
    problems: list[ProblemOut]
    rules: list[RuleOut]
    #: rules that can route a modality their model does not accept, or name a model not installed
    warnings: list[str]


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/rules")
    def rules() -> RulesOut:
        """The rules file the appliance routes with (``router.rules_file``), checked as ``portico rules check``."""
        found: dict[str, Any] = rules_file(ctx.settings, ctx.registry)
        return RulesOut.model_validate(found)

    return router
