"""The web dashboard in a real headless Chromium (Debian's) against the API served by uvicorn on a free port.

A reviewer signs in with their user name and password, sees two held jobs with their measurements,
rejects one with a reason and approves the other; the store then holds the decisions (recorded as the
signed-in user, never a typed name), the audit rows and the outbox changes. A viewer sees the queue
without decision buttons and the API refuses their decision. A wrong password shows the API's error
and no data, and repeated ones the lockout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from appliance.api.app import create_app
from appliance.api_server import ApiServer
from appliance.demo_study import write_ct_series
from appliance.review import Reviews, ReviewState
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import ResultFile, Store
from appliance.users import Accounts
from dicom_router.ports import ReceivedInstance
from inference.phantom import make_phantom
from tests.conftest import REPO
from tests.support.net import free_port

pytestmark = pytest.mark.slow

REVIEWER = "rita.reviewer"
VIEWER = "victor.viewer"
PASSWORD = "dashboard passphrase for tests"
STUDY = "1.2.826.0.1.3680043.8.498.4242"
PATIENT = "Doe^Jane"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
#: per held job: (series, segment name, volume ml, mean HU)
HELD = [(f"{STUDY}.1", "Liver", 1520.34, 55.21), (f"{STUDY}.2", "Spleen", 210.06, 48.77)]
TIMEOUT_MS = 15_000


@dataclass
class Dashboard:
    url: str
    store: Store
    settings: Settings
    jobs: list[int]


def seed(store: Store, settings: Settings) -> list[int]:
    """Two series of one study (a patient name in the bytes), each a finished ``held-model`` job held for review."""
    for series, *_ in HELD:
        for i in range(2):
            store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{series}.{i}", STUDY, series,
                                         "1.2.840.10008.1.2.1", "PACS", "127.0.0.1",
                                         b"DICM" + PATIENT.encode() + bytes([i]) * 64))
    run = store.hand_off(STUDY, "quiet")
    assert run is not None
    ids = store.record_routes(run, [(f"r{n}", "held-model", "2.0.0", series, f"k{n}")
                                    for n, (series, *_) in enumerate(HELD)])
    reviews = Reviews(store, settings.review)
    for n, (_, segment, volume, mean) in enumerate(HELD):
        job = store.claim_job()
        assert job is not None
        folder = store.results_dir / f"job-{job.id}"
        folder.mkdir(parents=True)
        measurement = {"label": 1, "name": segment, "voxel_count": 1000 + n, "volume_ml": volume, "mean": mean,
                       "stddev": 3.0, "min": 1.0, "max": 90.0}
        results = [ResultFile(f"9.{n}.1", "seg", SEG_CLASS, folder / "seg.dcm", {"model": "held-model@2.0.0"}),
                   ResultFile(f"9.{n}.2", "sr", SR_CLASS, folder / "sr.dcm",
                              {"model": "held-model@2.0.0", "measurements": [measurement]})]
        for r in results:
            r.path.write_bytes(b"DICM")
        store.complete_job(job, results, ["pacs"], "CPUExecutionProvider", "abc", {}, hold=reviews.hold_for(job))
    return ids


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    settings = Settings.model_validate({
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True, "port": free_port()},
        "review": {"models": ["held-model"]},
        "router": {"rules_file": str(REPO / "config" / "rules.yaml")},
    })
    store = Store(settings.data_dir, fsync=False)
    accounts = Accounts(store, settings.api)  # as `portico users add` would
    accounts.add(REVIEWER, PASSWORD, [Role.REVIEWER], actor="cli:test")
    accounts.add(VIEWER, PASSWORD, [Role.VIEWER], actor="cli:test")
    jobs = seed(store, settings)
    server = ApiServer(settings, create_app(settings, store))
    server.start()
    try:
        yield Dashboard(f"http://127.0.0.1:{server.port}", store, settings, jobs)
    finally:
        server.stop()
        store.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(message: ConsoleMessage) -> None:
        # the browser logs each refused API call (401, 409); those are the tests' point, not problems
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"console {message.type}: {message.text}")

    page.on("console", on_console)
    yield page
    context.close()
    assert problems == []  # no script errors, nothing the CSP had to block


def sign_in(page: Page, url: str, user: str = REVIEWER, password: str = PASSWORD) -> None:
    page.goto(url + "/")
    expect(page).to_have_url(url + "/ui/")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_a_reviewer_signs_in_rejects_one_held_job_and_approves_another(
        dashboard: Dashboard, page: Page, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rejected, approved = dashboard.jobs
    sign_in(page, dashboard.url)

    expect(page.get_by_role("heading", name="Status")).to_be_visible()
    expect(page.locator("#who")).to_contain_text(f"Signed in as {REVIEWER}")
    expect(page.locator("#who-roles")).to_have_text("(reviewer)")
    expect(page.locator("header.bar")).to_have_css("background-color", "rgb(0, 94, 184)")  # app.css under the CSP
    expect(page.locator("#instances")).to_have_text("4")
    expect(page.locator("#jobs-by-state")).to_contain_text("DONE")
    expect(page.locator("#outbox-by-state")).to_contain_text("HELD")
    expect(page.locator("#recent-jobs tbody tr")).to_have_count(2)
    expect(page.locator("#recent-jobs")).to_contain_text("CPUExecutionProvider")
    # the session is an HttpOnly, SameSite=Strict cookie the page's script cannot read; nothing in web storage
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
    assert page.evaluate("() => document.cookie") == ""
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == \
        ("portico_session", True, "Strict", "/")
    assert PASSWORD not in page.url and cookie["value"] not in page.url

    page.get_by_role("button", name="Review queue").click()
    items = page.locator("article.item")
    expect(items).to_have_count(2)
    for job_id, (_, segment, volume, mean) in zip(dashboard.jobs, HELD, strict=True):
        item = page.locator(f"#review-{job_id}")
        expect(item.get_by_role("heading")).to_have_text(f"Job {job_id}: held-model@2.0.0")
        expect(item.locator(".study")).to_have_text("…" + STUDY[-12:])
        expect(item.locator(".outbox")).to_have_text("2 HELD")
        row = item.locator(".measurements tbody tr")
        expect(row.locator("th")).to_have_text(segment)
        expect(row.locator("td").nth(0)).to_have_text(f"{volume:.1f}")
        expect(row.locator("td").nth(1)).to_have_text(f"{mean:.1f}")
    expect(page.locator("table.measurements th", has_text="Volume (ml)").first).to_be_visible()
    assert PATIENT not in page.content()

    to_reject = page.locator(f"#review-{rejected}")
    to_reject.get_by_role("button", name=f"Reject job {rejected}").click()
    expect(page.get_by_role("alert")).to_contain_text("a reason is required")
    expect(items).to_have_count(2)
    to_reject.get_by_label("Reason").fill("wrong organ outlined")
    to_reject.get_by_role("button", name=f"Reject job {rejected}").click()
    expect(page.get_by_role("status")).to_have_text(
        f"Job {rejected} rejected: 2 result(s) cancelled; nothing was sent.")
    expect(page.locator(f"#review-{rejected}")).to_have_count(0)
    expect(page.get_by_role("alert")).to_be_hidden()

    page.locator(f"#review-{approved}").get_by_role("button", name=f"Approve job {approved}").click()
    expect(page.get_by_role("status")).to_have_text(f"Job {approved} approved: 2 result(s) released to PACS.")
    expect(items).to_have_count(0)
    expect(page.get_by_text("No results are waiting for review.")).to_be_visible()

    page.get_by_role("button", name="Reviewed").click()
    rows = page.locator("#reviewed-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.filter(has_text="REJECTED")).to_contain_text("wrong organ outlined")
    expect(rows.filter(has_text="REJECTED")).to_contain_text(REVIEWER)
    expect(rows.filter(has_text="APPROVED")).to_contain_text(REVIEWER)

    page.reload()  # still signed in (same tab), and the decisions stuck
    page.get_by_role("button", name="Review queue").click()
    expect(page.get_by_text("No results are waiting for review.")).to_be_visible()
    expect(items).to_have_count(0)

    reviews = Reviews(dashboard.store, dashboard.settings.review)
    no = reviews.get(rejected)
    yes = reviews.get(approved)
    assert (no.state, no.reviewer, no.reason, no.via) == (ReviewState.REJECTED, REVIEWER, "wrong organ outlined", "api")
    assert (yes.state, yes.reviewer, yes.via) == (ReviewState.APPROVED, REVIEWER, "api")
    assert no.outbox == {"CANCELLED": 2} and yes.outbox == {"PENDING": 2}
    audit = [e for e in dashboard.store.audit_events() if e["event"] == "reviewed"]
    assert [(e["job_id"], e["actor"], e["detail"]["via"]) for e in audit] == [(rejected, REVIEWER, "api"),
                                                                              (approved, REVIEWER, "api")]
    assert audit[0]["detail"]["reason"] == "wrong organ outlined"
    assert PATIENT not in caplog.text and PASSWORD not in caplog.text and cookie["value"] not in caplog.text
    assert PASSWORD not in str(dashboard.store.audit_events())
    signed_in = [e for e in dashboard.store.audit_events() if e["event"] == "signed_in"]
    assert [(e["actor"], e["detail"]["address"]) for e in signed_in] == [(REVIEWER, "127.0.0.1")]

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("status")).to_have_text("Signed out.")
    assert page.context.cookies() == []
    page.reload()  # the session ended on the server: nothing comes back
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("navigation", name="Views")).to_be_hidden()


def test_a_decision_on_a_job_decided_elsewhere_shows_the_api_error(dashboard: Dashboard, page: Page) -> None:
    job_id = dashboard.jobs[0]
    sign_in(page, dashboard.url)
    page.get_by_role("button", name="Review queue").click()
    expect(page.locator("article.item")).to_have_count(2)
    Reviews(dashboard.store, dashboard.settings.review).approve(job_id, "Dr Elsewhere", "", via="cli")
    page.locator(f"#review-{job_id}").get_by_role("button", name=f"Approve job {job_id}").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Error (conflict)")
    expect(alert).to_contain_text("Request id")
    expect(page.locator(f"#review-{job_id}")).to_be_visible()
    expect(page.get_by_role("status")).to_be_hidden()


def test_a_viewer_sees_the_queue_without_decision_buttons_and_the_api_refuses_a_decision(
        dashboard: Dashboard, page: Page) -> None:
    job_id = dashboard.jobs[0]
    sign_in(page, dashboard.url, VIEWER)
    expect(page.locator("#who-roles")).to_have_text("(viewer)")
    page.get_by_role("button", name="Review queue").click()
    item = page.locator(f"#review-{job_id}")
    expect(item.locator(".measurements tbody tr")).to_have_count(1)
    expect(item.get_by_role("button", name=f"Approve job {job_id}")).to_have_count(0)
    expect(item.get_by_role("button", name=f"Reject job {job_id}")).to_have_count(0)
    expect(item.get_by_text("Your role may look at results but not approve or reject them.")).to_be_visible()
    # the page hides the button; the API refuses anyway, with the viewer's own session
    answer = page.evaluate("""async (jobId) => {
        const r = await fetch("/review/" + jobId + "/approve", {method: "POST", credentials: "same-origin",
            headers: {"X-Requested-With": "portico", "Content-Type": "application/json"}, body: "{}"});
        return [r.status, (await r.json()).code];
    }""", job_id)
    assert answer == [403, "forbidden"]
    assert Reviews(dashboard.store, dashboard.settings.review).get(job_id).state is ReviewState.HELD


def test_a_wrong_password_shows_the_error_and_no_data_and_repeated_ones_lock_the_name(
        dashboard: Dashboard, page: Page) -> None:
    sign_in(page, dashboard.url, REVIEWER, "not the passphrase")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Error (sign_in_failed)")
    expect(alert).to_contain_text("the user name or password is wrong")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_label("Password")).to_have_value("")
    expect(page.locator("#view-status")).to_be_hidden()
    expect(page.locator("#view-queue")).to_be_hidden()
    expect(page.get_by_role("navigation", name="Views")).to_be_hidden()
    assert page.locator("#instances").text_content() == ""
    assert page.locator("article.item").count() == 0
    assert page.evaluate("() => sessionStorage.length + localStorage.length") == 0
    assert page.context.cookies() == []

    for _ in range(4):  # five failures in all, each answered before the next is sent
        page.get_by_label("Password").fill("still not the passphrase")
        with page.expect_response("**/auth/login") as answered:
            page.get_by_role("button", name="Sign in").click()
        assert answered.value.status == 401
    page.get_by_label("Password").fill(PASSWORD)  # even the right one now waits
    with page.expect_response("**/auth/login") as answered:
        page.get_by_role("button", name="Sign in").click()
    assert answered.value.status == 429 and answered.value.headers["retry-after"] == "30"
    expect(alert).to_contain_text("Error (locked): too many failed sign-ins; try again in 30 s")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.context.cookies() == []
    failed = [e for e in dashboard.store.audit_events() if e["event"] == "sign_in_failed"]
    assert len(failed) == 5 and {e["actor"] for e in failed} == {REVIEWER}
    assert [e["detail"]["kind"] for e in dashboard.store.audit_events() if e["event"] == "sign_in_locked"] == ["user"]


def test_the_status_view_explains_why_a_study_was_routed_or_not(dashboard: Dashboard, page: Page,
                                                                  tmp_path: Path) -> None:
    """`portico rules explain` in the dashboard: a CT series runs the model, an MR of the same study does not."""
    ct = write_ct_series(*_phantom(), tmp_path / "ct", seed=11)
    mr = write_ct_series(*_phantom(), tmp_path / "mr", study_instance_uid=ct.study_instance_uid,
                         series_description="not a CT", seed=12)
    for path in [*ct.paths, *mr.paths]:
        ds = pydicom.dcmread(path)
        if path in mr.paths:
            ds.Modality = "MR"
            ds.save_as(path)
        dashboard.store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                               str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                                               "PACS", "127.0.0.1", path.read_bytes()))
    sign_in(page, dashboard.url, VIEWER)
    page.get_by_role("button", name="Status").click()
    page.get_by_label("Study Instance UID").fill(ct.study_instance_uid)
    page.get_by_role("button", name="Explain routing").click()
    table = page.locator("#routing-table")
    expect(table).to_be_visible()
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table).to_contain_text("runs the model")
    expect(table).to_contain_text("no match: Modality not in")
    # an unknown study: the API's error, no table
    page.get_by_label("Study Instance UID").fill("1.2.3.4.5")
    page.get_by_role("button", name="Explain routing").click()
    expect(page.get_by_role("alert")).to_contain_text("not_found")
    expect(table).to_be_hidden()


def _phantom() -> tuple[NDArray[np.floating], tuple[float, float, float]]:
    phantom = make_phantom((4, 32, 32), spacing=(2.5, 1.4, 1.4), seed=3)
    return phantom.hu, phantom.spacing
