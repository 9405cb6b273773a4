"""Memory per study: compact (int16) volumes, CPU batch sizes, slice-wise planar regions, release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from appliance.demo_study import write_ct_series
from inference.memory import release_memory, tune_allocator
from inference.predict import batch_size_for
from inference.results.planar import outline, planar_regions, reference_slice
from inference.runtime.base import CPU_PROVIDER
from inference.volume import load_series

SPACING = (2.5, 1.5, 1.25)


@pytest.fixture(scope="module")
def hu() -> NDArray[np.float32]:
    rng = np.random.default_rng(3)
    return rng.integers(-1024, 3000, size=(6, 24, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def series(hu: NDArray[np.float32], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(hu, SPACING, tmp_path_factory.mktemp("ct")).paths


def edit(path: Path, change: object) -> None:
    ds = pydicom.dcmread(path)
    assert callable(change)
    change(ds)
    ds.save_as(path)


def copies(paths: list[Path], out: Path) -> list[Path]:
    out.mkdir()
    for p in paths:
        (out / p.name).write_bytes(p.read_bytes())
    return [out / p.name for p in paths]


def test_compact_volume_is_int16_with_the_same_values(series: list[Path], hu: NDArray[np.float32]) -> None:
    compact, plain = load_series(series, compact=True), load_series(series)
    assert compact.hu.dtype == np.int16 and plain.hu.dtype == np.float32
    np.testing.assert_array_equal(compact.hu, plain.hu)
    np.testing.assert_array_equal(compact.hu, hu)
    assert compact.hu.nbytes * 2 == plain.hu.nbytes


def test_compact_applies_integer_rescale_exactly(series: list[Path], tmp_path: Path) -> None:
    paths = copies(series, tmp_path / "s")

    def rescale(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-3000"
    edit(paths[2], rescale)
    compact = load_series(paths, compact=True)
    assert compact.hu.dtype == np.int16
    np.testing.assert_array_equal(compact.hu, load_series(paths).hu)


@pytest.mark.parametrize("slope, intercept", [("0.5", "-10"), ("1", "0.25"), ("20", "-1024")])
def test_compact_falls_back_to_float32(series: list[Path], tmp_path: Path, slope: str, intercept: str) -> None:
    """Fractional rescale (known from the headers) or values beyond int16 (known only once decoded)."""
    paths = copies(series, tmp_path / "s")

    def rescale(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    edit(paths[4], rescale)
    compact = load_series(paths, compact=True)
    assert compact.hu.dtype == np.float32
    np.testing.assert_array_equal(compact.hu, load_series(paths).hu)


def test_cpu_batches_stay_small_and_accelerators_keep_theirs() -> None:
    assert batch_size_for((1, 512, 512), CPU_PROVIDER) == 1
    assert batch_size_for((96, 96, 96), CPU_PROVIDER) == 1
    assert batch_size_for((1, 128, 128), CPU_PROVIDER) == 4
    assert batch_size_for((1, 256, 256), CPU_PROVIDER, largest=8) == 4
    assert batch_size_for((1, 512, 512), "CUDAExecutionProvider") == 4


def test_planar_regions_match_whole_volume_masks() -> None:
    rng = np.random.default_rng(5)
    labels = (rng.random((7, 20, 22)) < 0.3).astype(np.uint8) * rng.integers(1, 4, (7, 20, 22)).astype(np.uint8)
    labels[3, 5:15, 5:15] = 2  # a clear largest slice for label 2
    regions = planar_regions(labels, [1, 2, 3, 9], (0.5, 0.5))
    assert sorted(regions) == [1, 2, 3]  # label 9 is absent
    for label, region in regions.items():
        mask = labels == label
        z = reference_slice(mask)
        assert region.slice_index == z
        assert z is not None
        assert region.pixel_count == int(mask[z].sum())
        np.testing.assert_array_equal(region.outline, outline(mask[z]))


def test_release_memory_is_safe_to_call() -> None:
    block = np.ones(50_000_000 // 8)
    del block
    assert release_memory() in (True, False)
    assert release_memory() in (True, False)


def test_tune_allocator_is_once_per_process() -> None:
    first = tune_allocator()
    assert isinstance(first, bool)
    assert tune_allocator() is first
