"""The review screen shows the segmentation over the source images before Approve can be pressed.

A real job (the shipped demo model on a phantom CT, JobRunner) is held for review; the API serves its
overlay key slices rendered from the job's own SEG; a reviewer in headless Chromium sees them (not
blank, in the segments' colours), an "Open in viewer" link from ``review.viewer_url``, and an Approve
button that was enabled only once the images were shown. Then they withdraw the sent result from the
Reviewed view. Screenshots go to ``var/test-artifacts/`` (``PORTICO_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect

from appliance.api.app import create_app
from appliance.api_server import ApiServer
from appliance.demo_study import write_ct_series
from appliance.jobs import JobRunner
from appliance.models import ModelRegistry
from appliance.review import Reviews, ReviewState
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import JobState, OutboxState, Store
from appliance.users import Accounts
from dicom_router.ports import ReceivedInstance
from inference.phantom import make_phantom
from inference.runtime.onnxruntime import SessionCache
from tests.conftest import REPO
from tests.integration.test_web_dashboard import PASSWORD, REVIEWER, TIMEOUT_MS, sign_in
from tests.support.net import free_port

pytestmark = pytest.mark.slow


ARTIFACTS = Path(os.environ.get("PORTICO_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))
VIEWER = "https://viewer.example/ohif/viewer?StudyInstanceUIDs={study_uid}"
#: records, each time an Approve button becomes enabled, whether its item's overlay images were shown
WATCH_APPROVE = """
window.__approveEnabled = [];
new MutationObserver((changes) => {
  for (const c of changes) {
    const b = c.target;
    if (b.classList && b.classList.contains("approve") && !b.disabled) {
      const imgs = Array.from(b.closest("article").querySelectorAll("img.key-image"));
      window.__approveEnabled.push({count: imgs.length,
        shown: imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0)});
    }
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["disabled"]});
"""
#: mean, spread and pixels in a colour of one <img>, drawn on a canvas
SAMPLE = """([img, rgb]) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d"); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, hits = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += v; sq += v * v;
    if (Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) + Math.abs(d[i + 2] - rgb[2]) < 30) hits++;
  }
  const n = d.length / 4, mean = sum / n;
  return {mean: mean, sd: Math.sqrt(sq / n - mean * mean), hits: hits, width: c.width};
}"""


@dataclass
class Site:
    url: str
    store: Store
    settings: Settings
    job_id: int
    study_uid: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    shutil.copytree(REPO / "models" / "ct-body-composition", tmp_path / "models" / "ct-body-composition")
    settings = Settings.model_validate({
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True, "port": free_port()},
        "dispatch": {"destinations": [{"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                       "port": 104}]},
        "review": {"required": True, "viewer_url": VIEWER},
    })
    store = Store(settings.data_dir, fsync=False)
    Accounts(store, settings.api).add(REVIEWER, PASSWORD, [Role.REVIEWER], actor="cli:test")
    phantom = make_phantom((6, 192, 192), (3.0, 2.0, 2.0), seed=11)
    series = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "ct")
    for path in series.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                     str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), "PACS",
                                     "127.0.0.1", path.read_bytes()))
    study = str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).StudyInstanceUID)
    run = store.hand_off(study, "quiet")
    assert run is not None
    (series_uid,) = store.series_members(study, run.version)
    store.record_routes(run, [("r", "ct-body-composition", None, series_uid, "k")])
    job = JobRunner(settings, store, ModelRegistry.from_settings(settings), SessionCache()).run_next()
    assert job is not None and (done := store.job(job.id)) is not None and done.state is JobState.DONE
    server = ApiServer(settings, create_app(settings, store))
    server.start()
    try:
        yield Site(f"http://127.0.0.1:{server.port}", store, settings, job.id, study)
    finally:
        server.stop()
        store.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(WATCH_APPROVE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == []


def test_reviewer_sees_the_overlay_before_approving_then_withdraws(site: Site, page: Page) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    sign_in(page, site.url)
    page.get_by_role("button", name="Review queue").click()
    item = page.locator(f"#review-{site.job_id}")
    images = item.locator("img.key-image")
    expect(images.first).to_be_visible()
    expect(item.locator(".overlay-status")).to_contain_text("key slice(s)")
    count = images.count()
    assert 1 <= count <= 3
    segments = ((255, 214, 0), (214, 40, 40))  # adipose, non-adipose soft tissue (the manifest's colours)
    for n in range(count):
        stats = images.nth(n).evaluate(f"(img) => ({SAMPLE})([img, {list(segments[0])}])")
        assert stats["width"] >= 512 and stats["sd"] > 20, stats  # an image, not a blank rectangle
        assert stats["hits"] > 100, stats  # the adipose outline and fill are drawn in its colour
    approve = item.get_by_role("button", name=f"Approve job {site.job_id}")
    expect(approve).to_be_enabled()
    enabled = page.evaluate("() => window.__approveEnabled")
    assert enabled and all(e["shown"] for e in enabled), enabled  # never enabled before the images showed
    link = item.get_by_role("link", name=f"Open job {site.job_id} in the viewer")
    expect(link).to_have_attribute("href", VIEWER.format(study_uid=site.study_uid))
    expect(link).to_have_attribute("target", "_blank")
    item.screenshot(path=str(ARTIFACTS / "review-overlay.png"))

    approve.click()
    expect(page.get_by_role("status")).to_contain_text(f"Job {site.job_id} approved")
    with site.store.transaction() as db:  # the dispatcher delivered them (no PACS in this test)
        db.execute("UPDATE outbox SET state = ? WHERE job_id = ?", (OutboxState.SENT, site.job_id))

    page.get_by_role("button", name="Reviewed").click()
    row = page.locator("#reviewed-table tbody tr").filter(has_text="APPROVED")
    row.get_by_role("button", name=f"Withdraw job {site.job_id}").click()
    expect(page.get_by_role("alert")).to_contain_text("a reason is required")
    row.get_by_label(f"Reason to withdraw job {site.job_id}").fill("outline includes the table")
    row.get_by_role("button", name=f"Withdraw job {site.job_id}").click()
    expect(page.get_by_role("status")).to_have_text(
        f"Job {site.job_id} withdrawn: rejection note queued to 1 destination(s).")
    expect(page.locator("#reviewed-table tbody tr").filter(has_text="WITHDRAWN")).to_contain_text(
        "outline includes the table")
    page.screenshot(path=str(ARTIFACTS / "review-withdrawn.png"), full_page=True)
    review = Reviews(site.store, site.settings.review).get(site.job_id)
    assert (review.state, review.reviewer, review.via) == (ReviewState.WITHDRAWN, REVIEWER, "api")
    kos = [o for o in site.store.outbox() if o["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.88.59"]
    assert [(o["destination"], o["state"]) for o in kos] == [("pacs", "PENDING")]
