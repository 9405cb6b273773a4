"""The log keeps library messages that may quote data values out: tracebacks, library loggers, warnings."""

from __future__ import annotations

import io
import logging
import sys
import threading
import warnings

import pytest
from pydicom import config as pydicom_config
from pydicom.valuerep import DA

from appliance.logs import (
    WITHHELD,
    JsonFormatter,
    LibraryMessages,
    TextFormatter,
    format_exception,
    library_message,
    module_of,
    quiet_libraries,
    show_warning,
)
from inference.errors import ResultEncodingError, SeriesError, describe

BIRTH = "1980-07-14"


def _encoding_failure() -> ResultEncodingError:
    try:
        try:
            DA(BIRTH)
        except ValueError as exc:
            raise ResultEncodingError(f"the SEG and SR could not be built: {describe(exc)}") from exc
    except ResultEncodingError as outer:
        return outer
    raise AssertionError("not raised")


def test_describe_names_type_and_place_never_the_value() -> None:
    exc = _encoding_failure().__cause__
    assert exc is not None and BIRTH in str(exc)  # what pydicom says
    text = describe(exc)
    assert BIRTH not in text
    assert text.startswith("ValueError in pydicom.valuerep.") and "(from tests.unit" not in text
    assert describe(ValueError("no traceback " + BIRTH)) == "ValueError"


def test_tracebacks_keep_frames_and_our_messages_and_withhold_library_messages() -> None:
    exc = _encoding_failure()
    text = format_exception((type(exc), exc, exc.__traceback__))
    assert BIRTH not in text
    assert "Traceback (most recent call last):" in text and "valuerep.py" in text
    assert f"ValueError: {WITHHELD}" in text
    assert "The above exception was the direct cause of the following exception" in text
    assert text.rstrip().endswith("inference.errors.ResultEncodingError: the SEG and SR could not be built: "
                                  + describe(exc.__cause__))  # type: ignore[arg-type]
    # context (an error while handling another) as well; the value from a variable, as a real one
    # would be (a traceback shows source lines)
    name = "ZZPHI" + "NAME"
    try:
        try:
            raise KeyError(name)
        except KeyError:
            raise SeriesError("instance 0: no image plane geometry") from None
    except SeriesError as own:
        assert "ZZPHINAME" not in format_exception((type(own), own, own.__traceback__))
    try:
        try:
            raise KeyError(name)
        except KeyError:
            raise SeriesError("instance 0: no image plane geometry")  # noqa: B904 (the context is the point)
    except SeriesError as own:
        text = format_exception((type(own), own, own.__traceback__))
        assert "During handling of the above exception" in text and "ZZPHINAME" not in text
        assert "SeriesError: instance 0: no image plane geometry" in text


@pytest.mark.parametrize("formatter", [TextFormatter("%(levelname)s %(name)s: %(message)s"), JsonFormatter()])
def test_logged_exceptions_quote_no_value(formatter: logging.Formatter) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger("tests.logs.exceptions")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            DA(BIRTH)
        except ValueError:
            logger.exception("job 1 failed")
    finally:
        logger.removeHandler(handler)
    assert "job 1 failed" in out.getvalue() and "ValueError" in out.getvalue()
    assert BIRTH not in out.getvalue()


def test_library_records_are_cut_before_quotes_and_colons() -> None:
    assert library_message(f"Invalid value for VR DA: '{BIRTH}'.") == f"Invalid value for VR DA {WITHHELD}"
    assert library_message('The string "ZZSINGLEPHI" is unlikely') == f"The string {WITHHELD}"
    assert library_message("no quotes here") == "no quotes here"
    assert library_message("'ZZPHI'") == WITHHELD
    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "Invalid value for VR CS: %r", ("female",),
                               None)
    assert LibraryMessages().filter(record) and "female" not in record.getMessage()
    ours = logging.LogRecord("appliance.jobs", logging.INFO, __file__, 1, "job %d: %s", (1, "done"), None)
    assert LibraryMessages().filter(ours) and ours.getMessage() == "job 1: done"


def test_warnings_are_logged_as_category_and_place(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="appliance.logs"):
        show_warning(UserWarning('The string "ZZSINGLEPHI" is unlikely to represent a name'), UserWarning,
                     "/x/lib/python3.11/site-packages/highdicom/base.py", 199)
    assert "ZZSINGLEPHI" not in caplog.text
    assert "UserWarning from highdicom.base line 199" in caplog.text
    assert module_of("/work/main/inference/results/seg.py") == "inference.results.seg"


def test_quiet_libraries_turns_value_quoting_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # keep the test process as it was
    settings = pydicom_config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    monkeypatch.setattr(settings, "writing_validation_mode", settings.writing_validation_mode)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    for name in ("pynetdicom", "highdicom"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    quiet_libraries()
    assert settings.reading_validation_mode == settings.writing_validation_mode == pydicom_config.IGNORE
    assert warnings.showwarning is show_warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DA(BIRTH.replace("-", ""))
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.PatientBirthDate = BIRTH  # no warning at all now: pydicom's would quote the value
    assert not caught
