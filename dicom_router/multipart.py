"""An incremental ``multipart/related`` (RFC 2046 5.1, RFC 2387) parser: bytes in as they arrive, events out.

STOW-RS bodies can be gigabytes, so nothing here holds a whole part: :meth:`MultipartParser.feed`
takes a chunk of any size (a byte, a megabyte; a delimiter may straddle chunks) and returns what it
completed: :class:`PartStart` with the part's headers, :class:`PartData` pieces of its content, and
:class:`PartEnd`. What it keeps between chunks is bounded: the tail that could still begin a
delimiter, or a part's headers (at most ``max_header_bytes``). The caller decides what to do with the
content (spool it, cap it, count parts).

Why our own rather than a library: the maintained streaming parsers (``python-multipart``,
``streaming-form-data``) are built for ``multipart/form-data``: they expect a Content-Disposition
with a field name in every part and hand parts to form fields or files, where STOW-RS parts carry
only a Content-Type and must reach the DICOM checks as they come. The framing itself is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

#: RFC 2046 allows 70; we take a little more from lenient senders
MAX_BOUNDARY_LENGTH = 200
DEFAULT_MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body is not well-formed multipart: the message says where (it never quotes the body)."""


@dataclass(frozen=True)
class PartStart:
    """A part begins; its header names are lower-case, values stripped."""

    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartData:
    """A piece of the current part's content (a view of bytes the parser will not change)."""

    data: memoryview


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete (its closing delimiter has been seen)."""


Event = PartStart | PartData | PartEnd


class _State(Enum):
    PREAMBLE = auto()
    DELIMITER = auto()
    HEADERS = auto()
    BODY = auto()
    EPILOGUE = auto()


class MultipartParser:
    """Split a ``multipart/*`` body into parts, chunk by chunk.

    Parameters
    ----------
    boundary
        The ``boundary`` parameter of the request's Content-Type.
    max_header_bytes
        The most a part's header block (or the preamble before the first delimiter) may take;
        beyond it :meth:`feed` raises :class:`MultipartError` rather than buffer more.

    Raises
    ------
    ValueError
        The boundary is empty, too long, not ASCII, or contains a line break.
    """

    def __init__(self, boundary: str, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        if not boundary or len(boundary) > MAX_BOUNDARY_LENGTH or not boundary.isascii() \
                or "\r" in boundary or "\n" in boundary:
            raise ValueError("the multipart boundary must be 1-200 ASCII characters without line breaks")
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._max_header_bytes = max_header_bytes
        self._state = _State.PREAMBLE
        # a virtual line break, so that a delimiter at the very start of the body is found like any other
        self._pending = b"\r\n"
        self._preamble_seen = 0

    @property
    def done(self) -> bool:
        """Whether the close delimiter has been seen (anything after it is ignored)."""
        return self._state is _State.EPILOGUE

    @property
    def in_part(self) -> bool:
        """Whether a part has started and not yet ended."""
        return self._state is _State.BODY

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Event]:
        """Parse the next ``chunk`` of the body; returns the events it completed, in order.

        Raises
        ------
        MultipartError
            The body breaks the framing (a malformed delimiter line, headers that never end or are
            too long, no delimiter within the first ``max_header_bytes``).
        """
        if self._state is _State.EPILOGUE or not chunk:
            return []
        buf = self._pending + bytes(chunk) if self._pending else bytes(chunk)
        view = memoryview(buf)
        events: list[Event] = []
        pos = 0
        delimiter = self._delimiter
        keep = len(delimiter) - 1  # the longest tail that may be the start of a delimiter
        while pos < len(buf):
            state = self._state
            if state is _State.BODY:
                found = buf.find(delimiter, pos)
                if found < 0:
                    safe = len(buf) - keep
                    if safe > pos:
                        events.append(PartData(view[pos:safe]))
                        pos = safe
                    break
                if found > pos:
                    events.append(PartData(view[pos:found]))
                events.append(PartEnd())
                pos = found + len(delimiter)
                self._state = _State.DELIMITER
            elif state is _State.PREAMBLE:
                found = buf.find(delimiter, pos)
                if found < 0:
                    start = max(pos, len(buf) - keep)
                    self._preamble_seen += start - pos
                    pos = start
                    if self._preamble_seen > self._max_header_bytes:
                        raise MultipartError("the body does not start with the multipart boundary")
                    break
                pos = found + len(delimiter)
                self._state = _State.DELIMITER
            elif state is _State.DELIMITER:
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] == b"--":
                    self._state = _State.EPILOGUE
                    pos = len(buf)
                    break
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    if len(buf) - pos > self._max_header_bytes:
                        raise MultipartError("a multipart boundary line does not end")
                    break
                if buf[pos:line_end].strip(b" \t"):
                    raise MultipartError("a multipart boundary line has trailing characters")
                pos = line_end  # keep its CRLF: an empty header block is then "\r\n\r\n" like any other end
                self._state = _State.HEADERS
            elif state is _State.HEADERS:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > self._max_header_bytes:
                        raise MultipartError(f"a part's headers are longer than {self._max_header_bytes} bytes")
                    break
                if end - pos > self._max_header_bytes:
                    raise MultipartError(f"a part's headers are longer than {self._max_header_bytes} bytes")
                events.append(PartStart(_headers(buf[pos + 2:end])))
                pos = end + 4
                self._state = _State.BODY
            else:  # pragma: no cover - EPILOGUE returns above
                break
        self._pending = buf[pos:] if self._state is not _State.EPILOGUE else b""
        return events

    def close(self) -> None:
        """The body has ended: check that it ended with the close delimiter.

        Raises
        ------
        MultipartError
            No delimiter at all, or the body ends inside a part (no close delimiter).
        """
        if self._state is _State.EPILOGUE:
            return
        if self._state is _State.PREAMBLE:
            raise MultipartError("the body does not contain the multipart boundary")
        raise MultipartError("the multipart body ends inside a part (no closing boundary)")


def _headers(block: bytes) -> dict[str, str]:
    """``Name: value`` lines (folded lines joined) as lower-case names; lines without a colon are skipped."""
    headers: dict[str, str] = {}
    last: str | None = None
    for raw in block.split(b"\r\n"):
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t") and last is not None:  # obsolete folding (RFC 5322 2.2.3)
            headers[last] = f"{headers[last]} {line.strip()}"
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip():
            last = name.strip().lower()
            headers[last] = value.strip()
    return headers
