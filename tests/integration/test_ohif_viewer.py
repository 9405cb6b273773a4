"""What a reader sees: Portico's SEG, SR and SC in a real Orthanc, opened in the OHIF v3 viewer.

The pinned ``@ohif/app`` build (``scripts/fetch-ohif.sh``; skipped with that hint when absent) is
served same-origin with Orthanc's DICOMweb (:mod:`tests.support.ohif`) and driven in Debian's
headless Chromium with SwiftShader WebGL. The results are the shipped demo model's on a phantom CT.
Checks: opened from the study link, OHIF loads the SR's planar measurements by itself (app-config
``disableConfirmationPrompts``) and its measurement panel lists them with their areas, the SR's own view
draws its outlines with its stored values (area, volume), the SEG loads with its three segments and
overlay pixels in their colours, the SC summary displays. The tests only open links, click and read the
page; they run no OHIF command. Screenshots go to
``var/test-artifacts/`` (``PORTICO_TEST_ARTIFACTS``); the time from opening the study to the SEG
overlay drawn is printed.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from pydicom.dataset import Dataset
from pyorthanc import Orthanc

from appliance.demo_study import write_ct_series
from appliance.pacs_standin import OrthancStandIn
from inference.packages import load_package
from inference.phantom import make_phantom
from inference.pipeline import run_segmentation
from inference.results.summary import build_summary
from inference.runtime.onnxruntime import SessionCache
from inference.settings import InferenceSettings
from tests.conftest import REPO
from tests.support.net import free_port
from tests.support.ohif import CHROMIUM_ARGS, OHIF_DIST, OhifServer
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("PORTICO_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))
TIMEOUT_S = 45.0
#: what OHIF's page says about the loaded SR and segmentations (its services are on window)
STATE = """() => {
  const s = window.services;
  const segs = s ? s.segmentationService.getSegmentations() : [];
  return {
    text: document.body.innerText,
    segments: segs.flatMap((g) => Object.values(g.segments || {}).filter(Boolean).map((x) => x.label)),
    outlines: document.querySelectorAll("svg polyline, svg path").length,
  };
}"""


#: OHIF's record of the tours a browser has been shown
TOUR_SEEN = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


@dataclass
class Study:
    study_uid: str
    seg: Dataset
    sr: Dataset
    sc: list[Dataset]


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ohif(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OhifServer, Study]]:
    if not (OHIF_DIST / "index.html").is_file():
        pytest.skip(f"no OHIF build at {OHIF_DIST}: run scripts/fetch-ohif.sh (npm registry)")
    if shutil.which("Orthanc") is None:
        pytest.fail("Orthanc is not installed: run `make setup` (Debian package orthanc)")
    tmp = tmp_path_factory.mktemp("ohif")
    orthanc = OrthancStandIn(tmp / "orthanc", free_port(), free_port())
    orthanc.start()
    try:
        phantom = make_phantom((12, 256, 256), (3.0, 1.4, 1.4), seed=7)
        series = write_ct_series(phantom.hu, phantom.spacing, tmp / "ct")
        package = load_package(REPO / "models" / "ct-body-composition")
        settings = InferenceSettings()
        result = run_segmentation(series.paths, package, SessionCache(), settings, "ohif-test")
        sc = build_summary(result.volume, result.labels, result.measurements, package.manifest, settings.device,
                           settings.uid_root, "ohif-test")
        client = Orthanc(orthanc.url)
        for data in [*(p.read_bytes() for p in series.paths), *(to_bytes(ds) for ds in (result.seg, result.sr, *sc))]:
            client.post_instances(data)
        server = OhifServer(orthanc.url)
        try:
            yield server, Study(str(result.seg.StudyInstanceUID), result.seg, result.sr, sc)
        finally:
            server.close()
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Chromium is not installed: run `make setup` (Debian package chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    # a reader who has seen OHIF's first-visit tour: it starts whenever the viewport mounts and its
    # overlay takes the clicks (ui-next Onboarding, the 'ohif.tours' customization, localStorage)
    context.add_init_script(TOUR_SEEN)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ohif-last-{len(list(ARTIFACTS.glob('ohif-last-*')))}.png"))
    (ARTIFACTS / "ohif-console.log").open("a").write("\n".join(console) + "\n")
    context.close()


def state(page: Page) -> dict[str, Any]:
    out: dict[str, Any] = page.evaluate(STATE)
    return out


def viewport_pixels(page: Page) -> np.ndarray:
    """RGB of the main viewport (right of the study browser) in a screenshot, the tour skipped."""
    skip_tour(page)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    return shot[60:-40, 300:-60]


def yellow(pixels: np.ndarray) -> int:
    """Pixels of a yellow hue (the adipose segment, however OHIF blends it over the grey CT)."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r > 50) & (g > 0.7 * r) & (g < 0.95 * r) & (b < 0.4 * r)).sum())


def red(pixels: np.ndarray) -> int:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r > 60) & (g < 0.4 * r) & (b < 0.4 * r)).sum())


def skip_tour(page: Page) -> None:
    """OHIF's first-visit tour dims the screen; skip it if it shows all the same."""
    skip = page.get_by_text("Skip all", exact=True)
    if skip.count():
        skip.first.click(timeout=5000)


def sr_shown(page: Page) -> dict[str, Any] | None:
    """The SR's own view: its outlines with the values it stores (area in cm2, volume)."""
    s = state(page)
    return s if "Area:" in str(s["text"]) and "cm2" in str(s["text"]) and int(str(s["outlines"])) > 0 else None


#: the SR as OHIF's display set service holds it: rehydratable, and hydrated once its measurements are
#: loaded into the tools (read only: the test runs no OHIF command)
SR_DISPLAY_SET = """() => {
  const s = window.services;
  const sr = s && s.displaySetService.getActiveDisplaySets().find((d) => d.Modality === 'SR');
  return sr ? { rehydratable: sr.isRehydratable === true, hydrated: sr.isHydrated === true,
                measurements: s.measurementService.getMeasurements().length } : null;
}"""


def sr_hydrated(page: Page) -> dict[str, Any] | None:
    """OHIF loaded the SR's three planar measurements by itself (app-config ``disableConfirmationPrompts``)."""
    sr: dict[str, Any] | None = page.evaluate(SR_DISPLAY_SET)
    return sr if sr and sr["hydrated"] and sr["measurements"] == 3 else None


def test_ohif_draws_the_srs_outlines_with_their_measurements(ohif: tuple[OhifServer, Study], page: Page) -> None:
    server, study = ohif
    page.goto(server.viewer_url(study.study_uid, str(study.sr.SeriesInstanceUID)))
    # opened from the link, OHIF loads the SR's measurements and turns the viewport to the CT; the SR's
    # own view (its stored values) is a double-click on its thumbnail, as a reader would bring it back
    wait_for(lambda: sr_hydrated(page), timeout=TIMEOUT_S, interval=1.0, message="the SR loaded by OHIF")
    skip_tour(page)
    page.locator("[data-cy=study-browser-thumbnail-no-image]").filter(
        has_text=str(study.sr.SeriesDescription)).first.dblclick()
    found = wait_for(lambda: sr_shown(page), timeout=TIMEOUT_S, interval=1.0,
                     message="SR outlines and measurements in OHIF")
    assert found is not None
    text = str(found["text"])
    assert "Area:" in text and "cm2" in text  # the planar group's value leads (OHIF shows the first few)
    # the volume too; OHIF 3.13.2 drops the labels of the attenuation values here: for a measurement
    # without a group-level SCOORD it skips every NUM whose content holds no SCOORD (theirs holds the
    # derivation, Mean etc.); they stay in the SR and in the SC summary
    assert "Volume:" in text and "cm3" in text
    page.screenshot(path=str(ARTIFACTS / "ohif-sr.png"))


def test_ohif_loads_the_seg_with_its_segments_and_draws_the_overlay(ohif: tuple[OhifServer, Study],
                                                                    page: Page) -> None:
    server, study = ohif
    t0 = time.monotonic()
    page.goto(server.viewer_url(study.study_uid, str(study.seg.SeriesInstanceUID)))
    wait_for(lambda: len(list(state(page)["segments"])) == 3,
             timeout=TIMEOUT_S, interval=0.5, message="SEG segments in OHIF")
    assert list(state(page)["segments"]) == ["Adipose tissue", "Non-adipose soft tissue", "Bone"]
    # adipose overlay in its recommended colour (manifest RGB 255, 214, 0; OHIF blends it over the CT)
    wait_for(lambda: yellow(viewport_pixels(page)) > 2000, timeout=TIMEOUT_S, interval=0.5, message="SEG overlay drawn")
    print(f"OHIF: study opened to SEG overlay drawn in {time.monotonic() - t0:.1f} s")
    skip_tour(page)
    page.screenshot(path=str(ARTIFACTS / "ohif-seg.png"))


def test_ohif_displays_the_secondary_capture_summary(ohif: tuple[OhifServer, Study], page: Page) -> None:
    server, study = ohif
    page.goto(server.viewer_url(study.study_uid, str(study.sc[0].SeriesInstanceUID)))
    wait_for(lambda: "AI summary" in str(state(page)["text"]) and red(viewport_pixels(page)) > 500,
             timeout=TIMEOUT_S, interval=1.0, message="SC banner displayed")
    skip_tour(page)
    page.screenshot(path=str(ARTIFACTS / "ohif-sc.png"))


#: OHIF's tracked measurements (its measurement service), as its panel lists them
MEASUREMENTS = """() => window.services.measurementService.getMeasurements().map((m) => ({
  label: m.label, toolName: m.toolName, finding: m.finding ? m.finding.text : null,
  primary: (m.displayText && m.displayText.primary) || [], data: m.data,
}))"""


def sr_areas(sr: Dataset) -> dict[str, float]:
    """Finding → area (cm²) of the SR's planar groups, read back with highdicom."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    out = {}
    for group in report.get_image_measurement_groups():
        (area,) = group.get_measurements()
        assert group.finding_type is not None
        out[str(group.finding_type.meaning)] = float(area.value)
    return out


def test_ohif_lists_the_planar_measurements_in_its_panel_with_their_values(ohif: tuple[OhifServer, Study],
                                                                          page: Page) -> None:
    server, study = ohif
    expected = sr_areas(study.sr)
    assert len(expected) == 3
    # the link a reader opens, and nothing else: no prompt to answer, no OHIF command run by the test
    page.goto(server.viewer_url(study.study_uid, str(study.sr.SeriesInstanceUID)))
    hydrated = wait_for(lambda: sr_hydrated(page), timeout=TIMEOUT_S, interval=0.5,
                        message="OHIF loading the SR's measurements by itself")
    assert hydrated is not None and hydrated["rehydratable"]
    assert "continue tracking measurements" not in str(state(page)["text"])  # OHIF's prompt, not shown
    skip_tour(page)
    page.locator("[data-cy=trackedMeasurements-btn]").click()
    panel = page.locator("#viewerLayoutResizableRightPanel")  # the measurements panel, once opened
    wait_for(lambda: "Measurements (3)" in panel.inner_text(), timeout=TIMEOUT_S, interval=0.5,
             message="Measurements (3) in the panel")
    for finding, area_cm2 in expected.items():
        # selecting a row shows its slice; OHIF's tool then computes area and HU inside the outline,
        # which encloses exactly the pixels the SR's area counts
        panel.get_by_text(finding, exact=True).first.click()

        def shown(finding: str = finding) -> dict[str, Any] | None:
            found = [m for m in page.evaluate(MEASUREMENTS) if m["finding"] == finding]
            return found[0] if found and "mm²" in str(found[0]["primary"]) else None

        measurement = wait_for(shown, timeout=TIMEOUT_S, interval=0.5, message=f"{finding} area in the panel")
        assert measurement is not None
        area_text = str(measurement["primary"][0])  # e.g. "37742 mm²"
        assert float(area_text.split()[0]) == pytest.approx(area_cm2 * 100, rel=0.03), (finding, area_text)
        def listed(text: str = area_text) -> bool:
            return text in panel.inner_text()

        wait_for(listed, timeout=TIMEOUT_S, interval=0.5, message=f"{finding} area shown in the panel")
        assert "HU" in str(measurement["primary"])  # the attenuation inside the outline, OHIF's own
    text = panel.inner_text()
    assert all(finding in text for finding in expected)
    page.screenshot(path=str(ARTIFACTS / "ohif-measurements-panel.png"))
