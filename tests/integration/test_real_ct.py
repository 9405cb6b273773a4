"""Real, JPEG 2000-compressed CT (TotalSegmentator's example, Apache-2.0) through the whole path."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.integration.conftest import Appliance, Pacs
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def real_ct_copy(real_data: Path, out: Path) -> list[Path]:
    """The example series with its blanked UIDs filled in (Orthanc needs them); pixels untouched."""
    study, series = generate_uid(entropy_srcs=["portico-real-ct"]), generate_uid(entropy_srcs=["portico-real-ct-s"])
    out.mkdir()
    paths = []
    for src in sorted((real_data / "totalsegmentator" / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.PatientID = ds.get("PatientID") or "REALCT-ANON"
        path = out / f"{src.name}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_real_compressed_ct_gets_seg_and_sr(
        real_data: Path, tmp_path: Path, orthanc_factory: Callable[..., Pacs],
        portico_factory: Callable[..., Appliance]) -> None:
    paths = real_ct_copy(real_data, tmp_path / "ct")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600)
    study_id = pacs.upload(paths)
    pacs.send_to("portico", study_id)
    derived = wait_for(lambda: (d := pacs.derived(study_id)) and set(d) == {"SEG", "SR"} and d,
                       timeout=300, interval=0.25, message="SEG and SR in Orthanc")
    seg = hd.seg.Segmentation.from_dataset(
        pydicom.dcmread(io.BytesIO(pacs.client.get_instances_id_file(derived["SEG"][0]))))
    sources = {ds.SOPInstanceUID for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)}
    referenced = {ref.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for ref in s.ReferencedInstanceSequence}
    assert referenced == sources
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Adipose tissue", "Non-adipose soft tissue", "Bone"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
        ["55603005", "87784001", "3138006"]
    sr = hd.sr.srread(io.BytesIO(pacs.client.get_instances_id_file(derived["SR"][0])))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    planar = sr.content.get_image_measurement_groups()  # TID 1501, what OHIF draws: an outline per segment
    assert len(planar) == 3
    for group in planar:
        (area,) = group.get_measurements()
        assert area.name.meaning == "Area"
        (outline,) = area.referenced_coordinates  # the area is inferred from a POLYLINE on a source image
        assert outline.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources
    store = portico.store()
    try:
        measurements = store.results()[0].detail.get("measurements") or store.results()[1].detail["measurements"]
    finally:
        store.close()
    by_name = {m["name"]: m for m in measurements}
    assert -190 <= by_name["Adipose tissue"]["mean"] <= -30
    assert -29 <= by_name["Non-adipose soft tissue"]["mean"] <= 150
    assert by_name["Bone"]["mean"] >= 150
