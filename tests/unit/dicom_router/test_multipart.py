"""The incremental multipart parser: the same parts however the body is cut into chunks."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from dicom_router.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart

B = "b0undary"
DELIMITER = f"\r\n--{B}".encode()


def body(*parts: bytes, headers: str = "Content-Type: application/dicom\r\n", preamble: bytes = b"",
         epilogue: bytes = b"") -> bytes:
    out = [preamble + (b"\r\n" if preamble else b"")]
    for data in parts:
        out += [f"--{B}\r\n{headers}\r\n".encode(), data, b"\r\n"]
    out.append(f"--{B}--".encode() + epilogue)
    return b"".join(out)


def parse(chunks: Iterable[bytes], boundary: str = B) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    current: bytearray | None = None
    for chunk in chunks:
        for event in parser.feed(chunk):
            if isinstance(event, PartStart):
                assert current is None
                current = bytearray()
                parts.append((event.headers, b""))
            elif isinstance(event, PartData):
                assert current is not None and len(event.data) > 0
                current += event.data
            elif isinstance(event, PartEnd):
                assert current is not None
                parts[-1] = (parts[-1][0], bytes(current))
                current = None
    parser.close()
    assert parser.done and current is None
    return parts


def chunked(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos:pos + size])
        pos += size
    return [*out, data[pos:]]


# contents that look like the delimiter or start like it, at the edges of a part
TRICKY = [
    b"",
    b"x",
    b"\r\n",
    b"\r\n--",
    f"\r\n--{B[:-1]}".encode(),  # a delimiter missing its last character
    f"--{B}".encode(),  # a delimiter without the line break before it is content
    f"\r\n-{B}\r\n".encode(),
    b"\x00" * 128 + b"DICM" + bytes(range(256)),
    b"\r" * 7 + b"\n--" + B.encode()[:3],
]


def test_parts_headers_and_content() -> None:
    parts = parse([body(b"first", b"", b"third\r\n")])
    assert [data for _, data in parts] == [b"first", b"", b"third\r\n"]
    assert parts[0][0] == {"content-type": "application/dicom"}


@pytest.mark.parametrize("data", TRICKY)
def test_every_single_cut_gives_the_same_parts(data: bytes) -> None:
    whole = body(b"a", data, b"tail", preamble=b"ignored preamble", epilogue=b"\r\nignored epilogue")
    expected = [b"a", data, b"tail"]
    for cut in range(len(whole) + 1):
        assert [d for _, d in parse([whole[:cut], whole[cut:]])] == expected, cut


def test_byte_by_byte() -> None:
    whole = body(*TRICKY)
    assert [d for _, d in parse(whole[i:i + 1] for i in range(len(whole)))] == TRICKY


@pytest.mark.parametrize("seed", range(200))
def test_random_parts_in_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b"\r\n-" + B.encode() + b"\x00\xff"
    parts = [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 200))) + rng.choice(TRICKY)
             for _ in range(rng.randrange(1, 6))]
    parts = [p for p in parts if DELIMITER not in p + b"\r\n"]  # a sender's boundary never occurs in content
    whole = body(*parts)
    sizes = [rng.randrange(1, 40) for _ in range(len(whole) // 10)]
    assert [d for _, d in parse(chunked(whole, sizes))] == parts


def test_a_large_part_is_passed_on_as_it_arrives() -> None:
    """What the parser keeps between chunks is bounded by the delimiter's length, not the part's."""
    parser = MultipartParser(B)
    parser.feed(f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    passed = 0
    chunk = bytes(range(256)) * 256  # 64 KiB
    for i in range(1, 161):  # 10 MiB
        passed += sum(len(e.data) for e in parser.feed(chunk) if isinstance(e, PartData))
        assert i * len(chunk) - passed < len(DELIMITER)
    events = parser.feed(f"\r\n--{B}--\r\n".encode())
    passed += sum(len(e.data) for e in events if isinstance(e, PartData))
    assert passed == 160 * len(chunk) and isinstance(events[-1], PartEnd)


def test_no_headers_padding_folding_and_a_first_delimiter_without_preamble() -> None:
    raw = (f"--{B}  \t\r\n\r\nno headers\r\n--{B}\r\nContent-Type: application/dicom;\r\n"
           f" transfer-syntax=1.2.840.10008.1.2.1\r\nX-Odd:no space\r\nnot a header line\r\n\r\n2\r\n--{B}--").encode()
    parts = parse([raw])
    assert parts[0] == ({}, b"no headers")
    assert parts[1][0] == {"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                           "x-odd": "no space"}


def test_what_follows_the_close_delimiter_is_ignored() -> None:
    parser = MultipartParser(B)
    events = parser.feed(body(b"x", epilogue=f"\r\n--{B}\r\n\r\nnot a part".encode()))
    assert sum(isinstance(e, PartStart) for e in events) == 1 and parser.done
    assert parser.feed(b"more") == []


@pytest.mark.parametrize(("raw", "match"), [
    (b"", "does not contain the multipart boundary"),
    (b"no boundary here", "does not contain the multipart boundary"),
    (f"--{B}\r\n\r\npart without end".encode(), "ends inside a part"),
    (f"--{B}\r\nContent-Type: application/dicom".encode(), "ends inside a part"),
    (f"--{B}".encode(), "ends inside a part"),
])
def test_an_incomplete_body_is_refused_at_close(raw: bytes, match: str) -> None:
    parser = MultipartParser(B)
    parser.feed(raw)
    with pytest.raises(MultipartError, match=match):
        parser.close()


@pytest.mark.parametrize(("raw", "match"), [
    (f"--{B}junk\r\n\r\n".encode(), "trailing characters"),
    (f"--{B}\r\n".encode() + b"X-Long: " + b"a" * 20000, "headers are longer"),
    (f"--{B}\r\n".encode() + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n", "headers are longer"),
    (b"x" * 20000, "does not start with the multipart boundary"),
    (f"--{B}".encode() + b" " * 20000, "boundary line does not end"),
])
def test_broken_framing_is_refused_without_buffering_more(raw: bytes, match: str) -> None:
    parser = MultipartParser(B)
    with pytest.raises(MultipartError, match=match):
        for i in range(0, len(raw), 1000):
            parser.feed(raw[i:i + 1000])


@pytest.mark.parametrize("boundary", ["", "a" * 201, "é", "a\r\nb"])
def test_bad_boundaries(boundary: str) -> None:
    with pytest.raises(ValueError, match="boundary"):
        MultipartParser(boundary)
