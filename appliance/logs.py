"""Log set-up for entry points only. Library modules just call ``logging.getLogger(__name__)``.

No patient data in the log, whatever the libraries say. Their messages may quote the data set value
they choked on (pydicom: ``Invalid value for VR DA: '1980-07-14'``; highdicom: a patient name it
finds odd; a ``ValueError`` that names a birth date), so :func:`configure`:

- turns pydicom's value validation off (at its default it only warns, quoting the value; nothing
  else changes), and keeps pydicom's, highdicom's and pynetdicom's own loggers at warnings;
- logs every Python warning as its category and origin, never its text (:func:`show_warning`);
- cuts what a record from pydicom's or highdicom's loggers says after its first quote or colon
  (:class:`LibraryMessages`);
- formats tracebacks with the frames and exception types but without the message of an exception
  that is not this project's own (:func:`format_exception`): ours carry a code and a message that
  quotes no value, a library's may quote anything;
- sends uncaught exceptions (main thread and others) through the same formatter.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
import warnings
from pathlib import Path
from types import TracebackType
from typing import TextIO

from pydicom import config as pydicom_config

from inference.errors import OWN_PACKAGES

log = logging.getLogger(__name__)

#: loggers of libraries whose messages may quote data set values
#: (pynetdicom's are kept: at warnings and above it speaks of associations; its data set dumps are at DEBUG/INFO)
LIBRARY_LOGGERS = ("pydicom", "highdicom", "py.warnings")
WITHHELD = "[message withheld: it may quote data values]"
_CUT = re.compile(r"""[:'"`]""")
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def is_own(exc: BaseException) -> bool:
    """Whether ``exc`` is one of this project's errors, whose messages quote no data set values."""
    return type(exc).__module__.split(".")[0] in OWN_PACKAGES


def format_exception(exc_info: ExcInfo | tuple[None, None, None]) -> str:
    """A traceback like Python's, with the messages of exceptions not our own withheld."""
    _, exc, _ = exc_info
    if exc is None:
        return ""
    chain: list[BaseException] = []  # the logged exception first, then its causes and contexts
    links: list[str] = []  # links[i]: printed between chain[i + 1] and chain[i]
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current, link = None, ""
        links.append(link)
    parts: list[str] = []
    for i in range(len(chain) - 1, -1, -1):
        item = chain[i]
        if item.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(item.__traceback__))
        name = f"{type(item).__module__}.{type(item).__qualname__}".removeprefix("builtins.")
        parts.append(f"{name}: {str(item) if is_own(item) else WITHHELD}\n")
        if i > 0:
            parts.append(links[i - 1])
    return "".join(parts).rstrip("\n")


class TextFormatter(logging.Formatter):
    def formatException(self, ei: ExcInfo | tuple[None, None, None]) -> str:
        return format_exception(ei)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": record.created, "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = format_exception(record.exc_info)
        return json.dumps(out)


class LibraryMessages(logging.Filter):
    """Cuts a library record's message after its first quote or colon, where quoted values begin."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in LIBRARY_LOGGERS or record.name.split(".")[0] in LIBRARY_LOGGERS:
            record.msg = library_message(record.getMessage())
            record.args = None
        return True


def library_message(text: str) -> str:
    """The part of a library's message before any quote or colon, and a note that the rest is withheld."""
    head = _CUT.split(text, maxsplit=1)
    kept = head[0].strip().rstrip(".,;")
    if len(head) == 1:
        return kept
    return f"{kept} {WITHHELD}" if kept else WITHHELD


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the appliance: the category and where, never the text."""
    log.warning("%s from %s line %d %s", category.__name__, module_of(filename), lineno, WITHHELD)


def module_of(filename: str) -> str:
    """``highdicom.base`` for ``…/site-packages/highdicom/base.py``; the file's stem otherwise."""
    path = Path(filename)
    parts = path.with_suffix("").parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return ".".join(parts[parts.index(anchor) + 1:])
    for i, part in enumerate(parts):
        if part in OWN_PACKAGES:
            return ".".join(parts[i:])
    return path.stem


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    log.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    log.critical("uncaught exception in thread %s", args.thread.name if args.thread else "?",
                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def quiet_libraries() -> None:
    """Keep the libraries' value-quoting messages out: see the module docstring."""
    # at WARN pydicom only warns (with the value) about a non-conformant value; IGNORE changes nothing else
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    # pynetdicom logs whole data sets (patient name, ID) at DEBUG/INFO, highdicom full UIDs at INFO
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.showwarning = show_warning
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread


def configure(level: str = "INFO", json_logs: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(LibraryMessages())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()
