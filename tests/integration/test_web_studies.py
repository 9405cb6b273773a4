"""The dashboard's Overview, Studies and Audit pages in a real headless Chromium (Debian's), at 1366×768.

Studies at every stage (:mod:`tests.support.studies`) and one real CT series whose job failed. An admin
finds the failed study by keyboard, reads why, retries the job and sends a study's results again (both
audited as the admin); the overview updates by itself; the audit is searched and exported. A viewer
sees the studies and the overview without the actions, and the API refuses them; a reviewer gets no
Audit page and the API refuses the search. Every page's screenshot is saved and checked not blank; no
request leaves the appliance's origin; nothing overflows the width of a 1366-pixel screen; the first load
stays under the page-weight budget (300 KB).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect

from appliance.api.app import create_app
from appliance.api_server import ApiServer
from appliance.demo_study import write_ct_series
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts
from dicom_router.ports import ReceivedInstance
from inference.phantom import make_phantom
from tests.conftest import REPO
from tests.support import studies as seeded
from tests.support import web
from tests.support.net import free_port
from tests.support.web import TIMEOUT_MS, press, shot, watched_page

pytestmark = pytest.mark.slow

ADMIN = "ada.admin"
VIEWER = "victor.viewer"
REVIEWER = "rita.reviewer"
PASSWORD = "studies dashboard passphrase"


@dataclass
class Site:
    url: str
    store: Store
    #: the real CT study whose job failed
    study: str
    job: int


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    with watched_page(browser, site.url, downloads=True) as page:
        yield page


def sign_in(page: Page, url: str, user: str) -> None:
    web.sign_in(page, url, user, PASSWORD)


def failed_ct_study(store: Store, tmp_path: Path) -> tuple[str, int]:
    """A real CT series (routing reads its headers), handed off, routed, and its job failed."""
    phantom = make_phantom((4, 32, 32), spacing=(2.5, 1.4, 1.4), seed=5)
    ct = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "ct", seed=21)
    for path in ct.paths:
        ds = pydicom.dcmread(path)
        store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                     str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), "CT_SCANNER",
                                     "127.0.0.1", path.read_bytes()))
    run = store.hand_off(ct.study_instance_uid, "quiet")
    assert run is not None
    (job_id,) = store.record_routes(run, [("ct-body-composition", "ct-body-composition", None,
                                           ct.series_instance_uid, "k")])
    job = store.claim_job()
    assert job is not None and job.id == job_id
    store.fail_job(job, "fewer slices than the model needs", "series_unusable", None)
    return ct.study_instance_uid, job_id


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = Settings.model_validate({
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True, "port": free_port()},
        "review": {"models": ["held-model"]},
        "router": {"rules_file": str(REPO / "config" / "rules.yaml")},
        "dispatch": {"destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]},
    })
    store = Store(settings.data_dir, fsync=False)
    accounts = Accounts(store, settings.api)
    accounts.add(ADMIN, PASSWORD, [Role.ADMIN], actor="cli:test")
    accounts.add(VIEWER, PASSWORD, [Role.VIEWER], actor="cli:test")
    accounts.add(REVIEWER, PASSWORD, [Role.REVIEWER], actor="cli:test")
    seeded.seed(store, settings)
    study, job = failed_ct_study(store, tmp_path)
    server = ApiServer(settings, create_app(settings, store))
    server.start()
    try:
        yield Site(f"http://127.0.0.1:{server.port}", store, study, job)
    finally:
        server.stop()
        store.close()


def test_an_admin_finds_a_failed_study_by_keyboard_retries_its_job_and_resends_results(site: Site,
                                                                                      page: Page) -> None:
    sign_in(page, site.url, ADMIN)
    press(page, "Studies")
    table = page.locator("#studies-table")
    expect(table.locator("tbody tr")).to_have_count(6)
    expect(page.locator("#studies-range")).to_have_text("1–6 of 6")
    page.get_by_label("Failed only").check()
    press(page, "Show studies")
    expect(table.locator("tbody tr")).to_have_count(2)
    short = "…" + site.study[-12:]
    row = table.locator("tbody tr", has_text=short)
    expect(row).to_contain_text("failed")
    expect(row).to_contain_text("✗ inferred")
    shot(page, "studies-list")

    press(page, f"Open study {short}")
    expect(page.locator("#study-title")).to_have_text(f"Study {short}")
    expect(page.locator("#study-title")).to_be_focused()
    expect(page.locator("#study-uid")).to_have_text(site.study)
    expect(page.locator("#study-stages")).to_contain_text("inferred: failed")
    jobs = page.locator("#study-jobs")
    expect(jobs).to_contain_text("series_unusable: fewer slices than the model needs")
    expect(page.locator("#study-series")).to_contain_text("CT")  # modality, from the routing explanation
    expect(page.locator("#study-routing")).to_contain_text("ct-body-composition")
    expect(page.locator("#study-routing")).to_contain_text("runs the model")
    shot(page, "study-detail")

    press(page, f"Retry job {site.job}")
    expect(page.get_by_role("status")).to_have_text(f"Job {site.job} is back in the queue.")
    expect(jobs).to_contain_text("PENDING")
    expect(jobs.get_by_role("button", name=f"Retry job {site.job}")).to_have_count(0)
    retried = [e for e in site.store.audit_events() if e["event"] == "job_retried"]
    assert [(e["actor"], e["job_id"], e["detail"]["via"]) for e in retried] == [(ADMIN, site.job, "api")]

    press(page, "Back to the list")
    expect(page.locator("#studies-list")).to_be_visible()
    page.get_by_label("Failed only").uncheck()
    page.get_by_label("State").select_option("sent")
    press(page, "Show studies")
    expect(table.locator("tbody tr")).to_have_count(0 + 1)
    expect(table).to_contain_text("No study matches.")
    page.get_by_label("State").select_option("")
    page.get_by_label("Sender AE").select_option("MR_SCANNER")
    press(page, "Show studies")
    expect(table.locator("tbody tr")).to_have_count(1)
    expect(table).to_contain_text("no match")
    page.get_by_label("Sender AE").select_option("")
    press(page, "Show studies")

    sent = "…" + seeded.SENT[-12:]
    press(page, f"Open study {sent}")
    outbox = page.locator("#study-outbox")
    expect(outbox).to_contain_text("SENT")
    page.get_by_label("Send the results again to").select_option("pacs")
    press(page, "Send again")
    expect(page.get_by_role("status")).to_have_text("Queued again: 1 to pacs.")
    expect(outbox).to_contain_text("PENDING")
    resent = [e for e in site.store.audit_events() if e["event"] == "results_resent"]
    assert [(e["actor"], e["study_uid"], e["detail"]["items"]) for e in resent] == [(ADMIN, seeded.SENT, {"pacs": 1})]


def test_the_overview_updates_by_itself(site: Site, page: Page) -> None:
    sign_in(page, site.url, VIEWER)
    press(page, "Overview")
    expect(page.locator("#ov-instances")).to_have_text(str(3 + 4 + 1 + 2 + 2 + 4))
    expect(page.locator("#ov-studies")).to_have_text("6")
    expect(page.locator("#ov-chart rect.bar")).to_have_count(24)
    expect(page.locator("#ov-chart-summary")).to_contain_text("so far this hour")
    outbox = page.locator("#ov-outbox")
    expect(outbox.locator("tbody tr", has_text="pacs")).to_contain_text("1")  # the held result
    expect(page.locator("#ov-disk")).to_contain_text("B")
    jobs = page.locator("#ov-jobs")
    expect(jobs).to_contain_text("FAILED")
    expect(jobs).not_to_contain_text("PENDING")
    shot(page, "overview")
    # a new job, made while the page is open: the next poll shows it without a click
    seeded.receive(site.store, f"{seeded.ROOT}.5199", [f"{seeded.ROOT}.5199.1"], 1, "CT_SCANNER")
    run = site.store.hand_off(f"{seeded.ROOT}.5199", "quiet")
    assert run is not None
    site.store.record_routes(run, [("liver", "liver-seg", None, f"{seeded.ROOT}.5199.1", "k")])
    expect(jobs.locator("tbody tr", has_text="PENDING")).to_contain_text("1", timeout=TIMEOUT_MS)
    press(page, "Pause updates")
    expect(page.get_by_role("button", name="Resume updates")).to_have_attribute("aria-pressed", "true")


def test_a_viewer_sees_studies_without_actions_and_the_api_refuses_them(site: Site, page: Page) -> None:
    sign_in(page, site.url, VIEWER)
    expect(page.get_by_role("button", name="Audit", exact=True)).to_have_count(0)
    press(page, "Studies")
    press(page, "Open study …" + site.study[-12:])
    expect(page.locator("#study-jobs")).to_contain_text("FAILED")
    expect(page.get_by_role("button", name=f"Retry job {site.job}")).to_have_count(0)
    expect(page.locator("#resend-form")).to_be_hidden()
    expect(page.locator("#study-read-only")).to_be_visible()
    answers = page.evaluate("""async ([job, study]) => {
        const post = async (path, body) => (await fetch(path, {method: "POST", credentials: "same-origin",
            headers: {"X-Requested-With": "portico", "Content-Type": "application/json"},
            body: JSON.stringify(body)})).status;
        return [await post("/jobs/" + job + "/retry", {}), await post("/studies/" + study + "/resend", {}),
                (await fetch("/audit/search", {credentials: "same-origin"})).status];
    }""", [site.job, seeded.SENT])
    assert answers == [403, 403, 403]
    assert not [e for e in site.store.audit_events() if e["event"] in ("job_retried", "results_resent")]


def test_an_admin_searches_and_exports_the_audit_and_a_reviewer_cannot(site: Site, page: Page,
                                                                         browser: Browser) -> None:
    sign_in(page, site.url, ADMIN)
    rows = len(site.store.audit_events())  # fewer than a page (100): all shown, no older rows to ask for
    press(page, "Audit")
    table = page.locator("#audit-table")
    expect(table.locator("tbody tr")).to_have_count(rows)
    expect(table.locator("tbody tr").first).to_contain_text("signed in")
    expect(page.get_by_role("button", name="Older rows")).to_be_hidden()
    page.get_by_label("Actor").fill("rita")
    press(page, "Search")
    expect(table.locator("tbody tr")).to_have_count(1)
    expect(table).to_contain_text("reviewed")
    expect(table).to_contain_text("wrong organ")
    page.get_by_label("Actor").fill("")
    page.get_by_label("Event").select_option("no_match")
    page.get_by_label("Study (end of UID)").fill(seeded.NO_MATCH[-6:])
    press(page, "Search")
    expect(table.locator("tbody tr")).to_have_count(1)
    expect(table).to_contain_text("…" + seeded.NO_MATCH[-12:])
    shot(page, "audit")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export these rows as CSV").click()
    text = Path(download.value.path()).read_text()
    lines = text.splitlines()
    assert lines[0] == "id,time,ts,event,study_uid,job_id,actor,detail,prev_hash,hash"
    assert len(lines) == 2 and ",no_match," in lines[1] and seeded.NO_MATCH in lines[1]
    exported = [e for e in site.store.audit_events() if e["event"] == "audit_exported"]
    assert [(e["actor"], e["detail"]["rows"], e["detail"]["filters"]["event"]) for e in exported] == \
        [(ADMIN, 1, "no_match")]

    other = browser.new_context(viewport={"width": 1366, "height": 768})
    try:
        reviewer = other.new_page()
        reviewer.set_default_timeout(TIMEOUT_MS)
        sign_in(reviewer, site.url, REVIEWER)
        expect(reviewer.get_by_role("button", name="Audit", exact=True)).to_have_count(0)
        assert reviewer.evaluate("""async () => [(await fetch("/audit/search", {credentials: "same-origin"})).status,
            (await fetch("/audit/export", {credentials: "same-origin"})).status]""") == [403, 403]
    finally:
        other.close()


def test_the_first_load_stays_under_the_page_weight_budget(site: Site, page: Page) -> None:
    """The sign-in page and everything it loads, then the first view after signing in: under 300 KB, all here."""
    sizes: dict[str, int] = {}
    page.on("response", lambda response: sizes.__setitem__(response.url, len(response.body())))
    sign_in(page, site.url, ADMIN)
    expect(page.get_by_role("heading", name="Status")).to_be_visible()
    assert {url.removeprefix(site.url) for url in sizes} >= {"/ui/", "/ui/app.js", "/ui/app.css", "/ui/overview.js",
                                                             "/ui/studies.js", "/ui/audit.js", "/ui/destinations.js",
                                                             "/ui/models.js", "/ui/rules.js", "/auth/login"}
    assert sum(sizes.values()) < 300 * 1024, sizes
