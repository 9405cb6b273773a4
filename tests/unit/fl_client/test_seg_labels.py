"""Training labels from SEGs: BINARY ones as they are, FRACTIONAL ones by their most probable segment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_client.dataset import seg_labels
from tests.support.segs import seg_manifest, write_segs


def test_binary_and_fractional_segs_give_the_same_label_map(tmp_path: Path) -> None:
    segs = write_segs(tmp_path)
    manifest = seg_manifest()
    binary = seg_labels(segs.binary, segs.volume, manifest)
    fractional = seg_labels(segs.fractional, segs.volume, manifest)
    assert binary.shape == segs.volume.hu.shape and set(np.unique(binary)) > {0}
    # inside a segment the probability is ≥ 128/255, on its rim < 128/255: the rim stays background
    np.testing.assert_array_equal(fractional, binary)


def test_fractional_voxels_below_one_half_are_background(tmp_path: Path) -> None:
    segs = write_segs(tmp_path)
    labels = seg_labels(segs.fractional, segs.volume, seg_manifest())
    best = segs.probabilities.max(axis=0)
    assert not labels[best < 128].any()
    assert labels[best >= 128].all()
