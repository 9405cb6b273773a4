"""Hand a finished job's memory back to the operating system.

A job allocates and frees hundreds of MB (the volume, the label map, ONNX Runtime's activations,
the SEG's frames). glibc's allocator keeps much of what is freed: chunks below its (self-raising)
mmap threshold stay in the heap of the thread that freed them, and every thread that allocated
(the job's worker, ONNX Runtime's pool) has a heap of its own. Measured on the demo model, a
300-slice job left the process ~290 MB above its idle size, free memory that glibc kept.
``malloc_trim(0)`` releases the free pages of every heap (glibc ≥ 2.8 also returns free pages in the
middle of a heap, not only at its top). It is glibc-only, so it is looked up once and skipped
where it does not exist (musl, macOS, Windows); nothing depends on it but the resident size.

:func:`tune_allocator` also fixes glibc's thresholds, once per process. Left dynamic, freeing a large
block raises the mmap threshold (up to 32 MB) and the trim threshold with it (up to 64 MB): blocks
up to 32 MB then come from the heaps, and each thread's heap may keep up to 64 MB of free top that
``malloc_trim`` does not touch (it trims the top of the main heap only). Fixed at 1 MiB and 4 MiB,
large arrays go straight back to the OS when freed and a thread's heap keeps at most 4 MiB on top.

highdicom parses a 22 MB JSON table of the standard's modules on its first SEG and keeps it for good:
~65 MB of Python objects, most of what stayed resident after a job once the pages were trimmed.
It is dropped between jobs too; the next job parses it again (about 0.25 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from functools import cache
from typing import Any

log = logging.getLogger(__name__)


#: glibc mallopt parameters (malloc.h) and the values set
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 4 << 20


@cache
def _libc_function(name: str) -> Any:
    """A glibc function by name, or ``None`` where the C library is not glibc or lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt but not this
        return getattr(libc, name)
    except (OSError, AttributeError):
        return None


@cache
def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module's docstring); once per process.

    ``True`` when set. Call it where a process starts running jobs, before the first one.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc allocator thresholds %s", "fixed" if done else "left as they were")
    return done


def _drop_highdicom_tables() -> None:
    try:
        from highdicom import _standard_utils
    except ImportError:  # pragma: no cover - highdicom is a dependency; a private module may move
        return
    loader = getattr(_standard_utils, "get_module_attribute_map", None)
    clear = getattr(loader, "cache_clear", None)  # an lru_cache: the modules that imported it share it
    if callable(clear):
        clear()


def release_memory() -> bool:
    """Drop library tables, collect garbage cycles and return free heap pages to the OS.

    Call it between jobs, once their results are dropped: it frees nothing still in use. ``True``
    when the C library returned pages.
    """
    _drop_highdicom_tables()
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    try:
        return bool(trim(0))
    except OSError:  # pragma: no cover - a C library that exports the name but misbehaves
        log.debug("malloc_trim failed", exc_info=True)
        return False
