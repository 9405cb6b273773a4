"""Errors raised by the inference package, each with a stable code."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error inference raises on purpose."""

    code = "inference_error"


class PackageError(InferenceError):
    """A model package is malformed, tampered with or unsigned."""

    code = "package_invalid"


class SeriesError(InferenceError):
    """A series cannot be used for a model (geometry, modality, decoding)."""

    code = "series_unusable"


class RuntimeUnavailableError(InferenceError):
    """No execution provider could run the model."""

    code = "runtime_unavailable"
