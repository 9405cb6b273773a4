"""Derived DICOM objects of a run: the SEG, the TID 1500 SR and their deterministic UIDs."""

from inference.results.seg import build_seg
from inference.results.sr import build_sr
from inference.results.uids import derive_uid, derived_uids, make_run_key

__all__ = ["build_seg", "build_sr", "derive_uid", "derived_uids", "make_run_key"]
