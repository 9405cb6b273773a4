"""Errors raised by the inference package, each with a stable code.

Their messages never quote data set values (names, dates, identifiers, free text): they go to job
errors, the audit trail, the API and the log. A library's exception is described by
:func:`describe`, never by its message, which may quote the value it choked on.
"""

from __future__ import annotations

#: top-level packages of this project: an error's "where" names the innermost frame in one of them too
OWN_PACKAGES = ("appliance", "dicom_router", "inference", "fl_client")


class InferenceError(Exception):
    """Base of every error inference raises on purpose."""

    code = "inference_error"


class PackageError(InferenceError):
    """A model package is malformed, tampered with or unsigned."""

    code = "package_invalid"


class SeriesError(InferenceError):
    """A series cannot be used for a model (geometry, modality, decoding)."""

    code = "series_unusable"


class SeriesNotAcceptedError(SeriesError):
    """A usable series that the model's manifest does not accept (modality, body part, slices, spacing)."""

    code = "series_not_accepted"


class RuntimeUnavailableError(InferenceError):
    """No execution provider could run the model."""

    code = "runtime_unavailable"


class ResultEncodingError(InferenceError):
    """The derived objects (SEG, SR) of a finished inference could not be built."""

    code = "result_encoding_failed"


def describe(exc: BaseException) -> str:
    """``exc`` in words that quote no data: its type and where it was raised, never its message.

    For example ``ValueError in pydicom.valuerep.DA.__new__ (from inference.results.seg.build_seg)``:
    the innermost frame, and the innermost frame of this project's code when that is another one.
    """
    raised = ours = None
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", "?"))
        where = f"{module}.{tb.tb_frame.f_code.co_qualname}"
        raised = where
        if module.split(".")[0] in OWN_PACKAGES:
            ours = where
        tb = tb.tb_next
    name = type(exc).__qualname__
    if raised is None:
        return name
    return f"{name} in {raised}" + (f" (from {ours})" if ours and ours != raised else "")
