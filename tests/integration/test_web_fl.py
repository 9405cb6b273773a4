"""The dashboard's Federated learning page in a real headless Chromium against the API on a free port.

A site with an enrolment, a job waiting for its approval and the review ``portico fl inspect --for``
kept for it: an FL approver sees the site's state, the privacy budget, the trainer arguments, the
privacy settings that will apply (ε now and after) and the content hash, and approves; the approval
binds that hash and is audited as the signed-in user. A viewer sees the same page without the
buttons, and the API refuses their decision.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from appliance.api.app import create_app
from appliance.api_server import ApiServer
from appliance.fl import layout_of
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts
from fl_client.approvals import Approvals
from fl_client.job_review import review_job, save_review
from fl_client.kit import KitInfo
from fl_client.layout import write_json
from tests.conftest import REPO
from tests.integration.fl.harness import job_folder
from tests.support.net import free_port

pytestmark = pytest.mark.slow

APPROVER = "fiona.fl"
VIEWER = "victor.viewer"
PASSWORD = "fl dashboard passphrase for tests"
JOB = "3f1c2b9e-0d4a-4c55-9a57-6f1e2d3c4b5a"
SITE = "site-a"
PROJECT = "ct_bodycomp"
TIMEOUT_MS = 15_000
ARTIFACTS = Path(os.environ.get("PORTICO_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))


@dataclass
class Site:
    url: str
    store: Store
    settings: Settings
    sha256: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = Settings.model_validate({
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True, "port": free_port()},
        "router": {"rules_file": str(REPO / "config" / "rules.yaml")},
    })
    store = Store(settings.data_dir, fsync=False)
    accounts = Accounts(store, settings.api)
    accounts.add(APPROVER, PASSWORD, [Role.FL_APPROVER], actor="cli:test")
    accounts.add(VIEWER, PASSWORD, [Role.VIEWER], actor="cli:test")
    layout = layout_of(settings)
    layout.ensure()
    # enrolled as `portico fl enrol` leaves it (the kit's contents do not matter to this page)
    (layout.site / "startup").mkdir(parents=True)
    (layout.site / "startup" / "fed_client.json").write_text("{}")
    write_json(layout.enrolment_file, KitInfo(SITE, "hospital-a", PROJECT, "fl.example.org:8002", "grpc", "mtls",
                                              "SHA256:AA", "2030-01-01").to_json())
    Approvals(layout).note_pending(JOB, name="ct-body-composition-fedavg", submitter="lead@research.org",
                                   command="check_resources", reason="site policy: waiting for approval",
                                   meta={})
    folder = job_folder(tmp_path, rounds=3, sites=[SITE])
    review = review_job(folder, settings.fl, SITE, layout=layout, project=PROJECT)
    assert not review.problems
    save_review(layout, JOB, review)  # what `portico fl inspect FOLDER --for JOB` does
    server = ApiServer(settings, create_app(settings, store))
    server.start()
    try:
        yield Site(f"http://127.0.0.1:{server.port}", store, settings, review.client_app_sha256)
    finally:
        server.stop()
        store.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"console {message.type}: {message.text}")

    page.on("console", on_console)
    yield page
    context.close()
    assert problems == []  # no script errors, nothing the CSP had to block


def sign_in_to_fl(page: Page, url: str, user: str) -> None:
    page.goto(url + "/ui/")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_contain_text(f"Signed in as {user}")
    page.get_by_role("button", name="Federated learning").click()
    expect(page.get_by_role("heading", name="Federated learning")).to_be_visible()


def test_an_fl_approver_sees_the_job_content_and_hash_and_approves_it(site: Site, page: Page) -> None:
    sign_in_to_fl(page, site.url, APPROVER)
    expect(page.locator("#fl-enrolled")).to_have_text("yes")
    expect(page.locator("#fl-state")).to_have_text("stopped")
    expect(page.locator("#fl-identity")).to_contain_text(f"Site {SITE} of project {PROJECT}")
    expect(page.locator("#fl-budget tbody")).to_contain_text(PROJECT)
    item = page.locator(f"#fl-job-{JOB}")
    expect(item.get_by_role("heading")).to_have_text(f"Job {JOB}: ct-body-composition-fedavg")
    expect(item.locator(".submitter")).to_have_text("lead@research.org")
    expect(item.locator(".hash")).to_have_text(site.sha256)
    trainer = item.locator("table.trainer")
    expect(trainer.locator("tr", has_text="model")).to_contain_text("ct-body-composition")
    expect(trainer.locator("tr", has_text="rounds")).to_contain_text("3")
    expect(trainer.locator("tr", has_text="steps")).to_contain_text("15")
    privacy = item.locator("table.privacy")
    expect(privacy.locator("tr", has_text="ε after this job")).to_be_visible()
    expect(privacy.locator("tr", has_text="clip norm")).to_contain_text("1")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "fl-approval.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 20  # not blank: text, tables, the blue bar

    item.get_by_role("button", name=f"Reject FL job {JOB}").click()
    expect(page.get_by_role("alert")).to_contain_text("a reason is required")
    item.get_by_role("button", name=f"Approve FL job {JOB}").click()
    expect(page.get_by_role("status")).to_have_text(f"FL job {JOB} approved: content sha256 {site.sha256}.")
    expect(item.locator(".decided")).to_contain_text(f"Approved by {APPROVER}")
    expect(item.get_by_role("button", name=f"Approve FL job {JOB}")).to_have_count(0)

    made = Approvals(layout_of(site.settings)).decision(JOB)
    assert made is not None
    assert (made.decision, made.actor, made.client_app_sha256) == ("approved", APPROVER, site.sha256)
    assert made.review.get("trainer", {}).get("model") == "ct-body-composition"
    audit = [e for e in site.store.audit_events() if e["event"] == "fl_job_approved"]
    assert [(e["actor"], e["detail"]["client_app_sha256"]) for e in audit] == [(APPROVER, site.sha256)]


def test_a_viewer_sees_the_job_without_buttons_and_the_api_refuses_their_approval(site: Site, page: Page) -> None:
    sign_in_to_fl(page, site.url, VIEWER)
    item = page.locator(f"#fl-job-{JOB}")
    expect(item.locator(".hash")).to_have_text(site.sha256)
    expect(item.get_by_role("button", name=f"Approve FL job {JOB}")).to_have_count(0)
    expect(item.get_by_role("button", name=f"Reject FL job {JOB}")).to_have_count(0)
    expect(item.get_by_text("Your role may look at federated-learning jobs")).to_be_visible()
    answer = page.evaluate("""async ([jobId, sha]) => {
        const r = await fetch("/fl/jobs/" + jobId + "/approve", {method: "POST", credentials: "same-origin",
            headers: {"X-Requested-With": "portico", "Content-Type": "application/json"},
            body: JSON.stringify({content_sha256: sha})});
        return [r.status, (await r.json()).code];
    }""", [JOB, site.sha256])
    assert answer == [403, "forbidden"]
    assert Approvals(layout_of(site.settings)).decision(JOB) is None
