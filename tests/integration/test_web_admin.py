"""The dashboard's Destinations, Models and Rules pages in a real headless Chromium (Debian's), at 1366×768.

A real ``portico serve`` API (uvicorn) over a store seeded with studies (:mod:`tests.support.studies`) and one
real CT series; a real Verification SCP (pynetdicom) as one destination and as a peer's query SCP, a closed
port as another destination (over TLS, with real certificates); two real model packages, one with a model card
that tries to inject HTML. An admin checks, pauses and resumes a destination by keyboard; a model admin
promotes and disables versions after a confirmation and reads the card as text; the rules page shows the file
with its line numbers and tests a stored study without making a job. A viewer sees the pages without the
actions, and the API refuses them. Screenshots are saved and checked not blank; no request leaves the
appliance's origin; nothing overflows a 1366-pixel screen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

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
from tests.support.certs import Pki, make_pki
from tests.support.net import free_port
from tests.support.packages import make_package
from tests.support.web import press, shot, watched_page

pytestmark = pytest.mark.slow

ADMIN = "ada.admin"
MODEL_ADMIN = "mo.models"
VIEWER = "victor.viewer"
PASSWORD = "admin pages passphrase"
HOSTILE_CARD = ("# Tiny model\n\nSegments **fat** on `CT`. <script>window.pwned = 1</script>\n"
                "<img src=\"https://example.invalid/x.png\" onerror=\"window.pwned = 2\">\n\n"
                "## Limits\n\n- adults only\n- not for diagnosis\n\n```\nno <b>html</b> here\n```\n")


@dataclass
class Site:
    url: str
    store: Store
    pki: Pki
    #: a real CT study (routing reads its headers)
    ct_study: str


@pytest.fixture(scope="module")
def echo_scp() -> Iterator[int]:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def store_ct_study(store: Store, tmp_path: Path) -> str:
    phantom = make_phantom((4, 32, 32), spacing=(2.5, 1.4, 1.4), seed=5)
    ct = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "ct", seed=21)
    for path in ct.paths:
        ds = pydicom.dcmread(path)
        store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                     str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), "CT_SCANNER",
                                     "127.0.0.1", path.read_bytes()))
    return ct.study_instance_uid


@pytest.fixture
def site(tmp_path: Path, echo_scp: int) -> Iterator[Site]:
    pki = make_pki(tmp_path / "pki")
    models = tmp_path / "models"
    make_package(models / "tiny-1.0.0", card=HOSTILE_CARD)
    make_package(models / "tiny-1.1.0", version="1.1.0")
    settings = Settings.model_validate({
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(models)},
        "api": {"enabled": True, "port": free_port()},
        "review": {"models": ["held-model"]},
        "router": {"rules_file": str(REPO / "config" / "rules.yaml"),
                   "tls": {"certificate": str(pki.client("portico").cert),
                           "private_key": str(pki.client("portico").key), "ca_bundle": str(pki.ca.cert)},
                   "peers": [{"ae_title": "CT_SCANNER", "query_port": echo_scp, "query_ae_title": "PACS"},
                             {"ae_title": "MR_SCANNER"}]},
        "dispatch": {"destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": echo_scp},
            {"kind": "dimse", "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": free_port(),
             "tls": "required", "server_hostname": "localhost"}]},
    })
    store = Store(settings.data_dir, fsync=False)
    accounts = Accounts(store, settings.api)
    accounts.add(ADMIN, PASSWORD, [Role.ADMIN], actor="cli:test")
    accounts.add(MODEL_ADMIN, PASSWORD, [Role.MODEL_ADMIN], actor="cli:test")
    accounts.add(VIEWER, PASSWORD, [Role.VIEWER], actor="cli:test")
    seeded.seed(store, settings)
    study = store_ct_study(store, tmp_path)
    server = ApiServer(settings, create_app(settings, store))
    server.start()
    try:
        yield Site(f"http://127.0.0.1:{server.port}", store, pki, study)
    finally:
        server.stop()
        store.close()


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    with watched_page(browser, site.url) as page:
        yield page


def sign_in(page: Page, url: str, user: str) -> None:
    web.sign_in(page, url, user, PASSWORD)


def events(site: Site, *names: str) -> list[dict[str, object]]:
    return [e for e in site.store.audit_events() if e["event"] in names]


def test_an_admin_checks_pauses_and_resumes_a_destination_by_keyboard(site: Site, page: Page) -> None:
    sign_in(page, site.url, ADMIN)
    press(page, "Destinations")
    table = page.locator("#destinations-table")
    pacs = table.locator("tbody tr[data-destination='pacs']")
    archive = table.locator("tbody tr[data-destination='archive']")
    expect(pacs).to_contain_text("sending")
    expect(pacs).to_contain_text("1 sent")
    expect(archive).to_contain_text("required (certificates valid")
    expect(pacs).to_contain_text("not checked")

    press(page, "Check pacs")
    expect(pacs).to_contain_text("✓ C-ECHO: answered C-ECHO with success")
    press(page, "Check archive")
    expect(archive).to_contain_text("✗ C-ECHO")
    press(page, "Check peer CT_SCANNER")
    peers = page.locator("#peers-table")
    expect(peers.locator("tbody tr", has_text="CT_SCANNER")).to_contain_text("✓ C-ECHO")
    expect(peers.locator("tbody tr", has_text="MR_SCANNER")).to_contain_text("sends to us only")

    press(page, "Outbox of archive")
    expect(page.locator("#dest-detail-title")).to_be_focused()
    certs = page.locator("#dest-certs")
    expect(certs).to_contain_text(site.pki.client("portico").subject)
    expect(certs).to_contain_text(site.pki.ca.subject)
    expect(page.locator("#dest-tls-summary")).to_contain_text("its certificate must name localhost")
    press(page, "Outbox of pacs")
    outbox = page.locator("#dest-outbox")
    expect(outbox.locator("tbody tr")).to_have_count(3)
    expect(outbox).to_contain_text("SENT")
    page.get_by_label("Outbox items").select_option("HELD")
    press(page, "Show outbox")
    expect(outbox.locator("tbody tr")).to_have_count(1)
    expect(outbox).to_contain_text("…" + seeded.HELD[-12:])
    shot(page, "destinations")

    press(page, "Pause pacs")
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-reason")).to_be_focused()
    press(dialog, "Pause pacs")  # no reason: refused in the dialog, nothing sent
    expect(page.locator("#confirm-reason")).to_have_attribute("aria-invalid", "true")
    shot(page, "destinations-pause-dialog")
    page.keyboard.type("PACS upgrade tonight")
    press(dialog, "Pause pacs")
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("status")).to_contain_text("Destination pacs paused")
    expect(pacs).to_contain_text(f"paused by {ADMIN}: PACS upgrade tonight")
    (paused,) = events(site, "destination_paused")
    assert (paused["actor"], paused["detail"]) == (ADMIN, {"destination": "pacs", "reason": "PACS upgrade tonight",
                                                            "waiting": 0, "via": "api"})

    press(page, "Resume pacs")
    expect(dialog).to_be_visible()
    press(dialog, "Cancel")
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("button", name="Resume pacs")).to_be_focused()  # focus back where it was
    assert events(site, "destination_resumed") == []
    press(page, "Resume pacs")
    press(dialog, "Resume pacs")
    expect(pacs).to_contain_text("sending")
    (resumed,) = events(site, "destination_resumed")
    assert resumed["actor"] == ADMIN


def test_a_model_admin_promotes_and_disables_after_a_confirmation_and_reads_the_card_as_text(site: Site,
                                                                                            page: Page) -> None:
    sign_in(page, site.url, MODEL_ADMIN)
    press(page, "Models")
    table = page.locator("#models-table")
    old = table.locator("tbody tr[data-model='tiny@1.0.0']")
    new = table.locator("tbody tr[data-model='tiny@1.1.0']")
    expect(old).to_contain_text("candidate")
    expect(new).to_contain_text("active (default)")
    expect(old).to_contain_text("unsigned")
    expect(old).to_contain_text("CT; axial; ≥ 1 slices")
    expect(old).to_contain_text("Fat")

    press(page, "Model card of tiny@1.0.0")
    expect(page.locator("#model-card-title")).to_be_focused()
    card = page.locator("#model-card")
    expect(card.locator("h4")).to_have_text("Tiny model")
    expect(card.locator("li")).to_have_count(2)
    expect(card.locator("strong")).to_have_text("fat")
    expect(card).to_contain_text("<script>window.pwned = 1</script>")  # shown as text, not run
    expect(card.locator("pre")).to_have_text("no <b>html</b> here")
    assert card.locator("script, img, b").count() == 0
    assert page.evaluate("window.pwned === undefined")
    expect(page.locator("#model-card-note")).to_contain_text("as signed for in the package's manifest")
    shot(page, "models")

    press(page, "Promote tiny@1.0.0")
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text("becomes the active version")
    expect(page.locator("#confirm-cancel")).to_be_focused()  # Enter alone does not change anything
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert events(site, "model_promoted") == []
    press(page, "Promote tiny@1.0.0")
    press(dialog, "Promote")
    expect(page.get_by_role("status")).to_have_text("tiny@1.0.0 is active; 1.1.0 is a candidate now.")
    expect(old).to_contain_text("active")
    expect(new).to_contain_text("candidate")
    (promoted,) = events(site, "model_promoted")
    assert (promoted["actor"], promoted["detail"]["version"]) == (MODEL_ADMIN, "1.0.0")

    press(page, "Disable tiny@1.1.0")
    press(dialog, "Disable")
    expect(page.get_by_role("status")).to_have_text("tiny@1.1.0 is disabled.")
    expect(new.get_by_role("button", name="Enable tiny@1.1.0")).to_be_visible()
    (disabled,) = events(site, "model_disabled")
    assert (disabled["actor"], disabled["detail"]["version"]) == (MODEL_ADMIN, "1.1.0")
    # a model admin does not pause destinations
    press(page, "Destinations")
    expect(page.get_by_role("button", name="Pause pacs")).to_have_count(0)
    assert page.evaluate("""async () => (await fetch("/destinations/pacs/pause", {method: "POST",
        credentials: "same-origin", headers: {"X-Requested-With": "portico", "Content-Type": "application/json"},
        body: JSON.stringify({reason: "x"})})).status""") == 403


def test_the_rules_page_numbers_the_file_and_tests_a_stored_study_without_a_job(site: Site, page: Page) -> None:
    sign_in(page, site.url, VIEWER)
    press(page, "Rules")
    lines = (REPO / "config" / "rules.yaml").read_text().splitlines()
    expect(page.locator("#rules-verdict")).to_have_text("Valid: 1 rule(s), 1 warning(s).")
    expect(page.locator("#rules-warnings")).to_contain_text("ct-body-composition is not installed")
    rows = page.locator("#rules-lines tbody tr")
    expect(rows).to_have_count(len(lines))
    expect(rows.nth(2).locator("th")).to_have_text("3")
    expect(rows.nth(2).locator("td")).to_have_text(lines[2])
    jobs_before = len(site.store.jobs())
    page.get_by_label("Stored study", exact=True).select_option(site.ct_study)
    press(page, "Test the rules")
    expect(page.locator("#rules-test-summary")).to_contain_text("1 rule(s) would fire: ct-body-composition")
    expect(page.locator("#rules-test")).to_contain_text("fires: runs the model")
    expect(page.locator("#rules-test")).to_contain_text("CT")
    shot(page, "rules")
    assert len(site.store.jobs()) == jobs_before  # a dry run


def test_a_viewer_sees_destinations_and_models_without_actions_and_the_api_refuses_them(site: Site,
                                                                                      page: Page) -> None:
    sign_in(page, site.url, VIEWER)
    press(page, "Destinations")
    expect(page.locator("#destinations-read-only")).to_be_visible()
    expect(page.get_by_role("button", name="Pause pacs")).to_have_count(0)
    press(page, "Check pacs")  # a check changes nothing: status readers may
    expect(page.locator("#destinations-table tbody tr[data-destination='pacs']")).to_contain_text("✓ C-ECHO")
    press(page, "Models")
    expect(page.locator("#models-read-only")).to_be_visible()
    expect(page.get_by_role("button", name="Promote tiny@1.0.0")).to_have_count(0)
    expect(page.get_by_role("button", name="Disable tiny@1.1.0")).to_have_count(0)
    press(page, "Model card of tiny@1.1.0")
    expect(page.locator("#model-card")).to_contain_text("Tiny")
    answers = page.evaluate("""async () => {
        const post = async (path, body) => (await fetch(path, {method: "POST", credentials: "same-origin",
            headers: {"X-Requested-With": "portico", "Content-Type": "application/json"},
            body: JSON.stringify(body)})).status;
        return [await post("/destinations/pacs/pause", {reason: "x"}), await post("/destinations/pacs/resume", {}),
                await post("/models/tiny/1.0.0/promote", {}), await post("/models/tiny/1.1.0/disable", {})];
    }""")
    assert answers == [403, 403, 403, 403]
    assert events(site, "destination_paused", "model_promoted", "model_disabled") == []
