"""glibc malloc settings for a CPU decoding process.

A search allocates and frees tensors of a few megabytes many times per step (attention
scores, the ARM's coverage and convolution outputs, rescoring's batched attentions). By
default glibc serves large blocks with fresh memory mappings and returns freed memory at
the top of its heap to the system, so each such tensor comes back as fresh pages: a page
fault per 4 KiB page (about 2 us each on this project's 2-core machine) and pages the
kernel zeroes. Measured there (2026-11-23, torch 2.13 CPU, 128x512, beam 10, max_len 60):
22,000-30,000 minor faults per search by default, 6,500-8,500 with `GLIBC_SETTINGS`.

`keep_freed_memory()` applies GLIBC_SETTINGS to this process, so freed blocks stay in the
heap for the next allocation; the price is that the process keeps up to the trim threshold
of freed memory instead of returning it. fastcomer applies it in the processes it owns (its
command line, `decode_images`' workers) unless FASTCOMER_MALLOC=system; a server's own
processes get the same settings from the environment: `GLIBC_TUNABLES=$(python -c
"import fastcomer.allocator as a; print(a.glibc_tunables())")` before they start.
"""
import ctypes
import ctypes.util
import os
import platform
from typing import Dict, Optional

MALLOC_ENV = "FASTCOMER_MALLOC"  # "keep" (default): keep_freed_memory() in fastcomer's processes; "system": leave malloc alone

# glibc's settings, in bytes, with their mallopt numbers: blocks up to 32 MiB come from the
# heap (glibc's largest allowed threshold), up to 1 GiB of freed heap top is kept, and the
# heap grows 64 MiB at a time.
GLIBC_SETTINGS: Dict[str, int] = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30, "top_pad": 64 << 20}
_MALLOPT_PARAMS = {"trim_threshold": -1, "top_pad": -2, "mmap_threshold": -3}

_applied: Optional[str] = None


def glibc_tunables() -> str:
    """GLIBC_SETTINGS as a GLIBC_TUNABLES value, for processes started with it."""
    return ":".join(f"glibc.malloc.{name}={value}" for name, value in GLIBC_SETTINGS.items())


def malloc_policy() -> str:
    """$FASTCOMER_MALLOC: 'keep' (the default) or 'system'."""
    value = os.environ.get(MALLOC_ENV, "keep").strip() or "keep"
    if value not in ("keep", "system"):
        raise ValueError(f"{MALLOC_ENV} must be 'keep' or 'system', got {value!r}")
    return value


def applied_settings() -> Optional[str]:
    """The settings keep_freed_memory() applied to this process (a GLIBC_TUNABLES value), or None."""
    return _applied


def keep_freed_memory() -> Optional[str]:
    """Apply GLIBC_SETTINGS to this process (once) when its C library is glibc and
    $FASTCOMER_MALLOC is not 'system'. Returns the settings in force as a GLIBC_TUNABLES
    value, or None when malloc was left alone (another C library, or 'system')."""
    global _applied
    if _applied is None and malloc_policy() == "keep" and _is_glibc():
        libc = _libc()
        if all(libc.mallopt(_MALLOPT_PARAMS[name], value) == 1 for name, value in GLIBC_SETTINGS.items()):
            _applied = glibc_tunables()
    return _applied


def release_freed_memory() -> None:
    """Give the heap's free memory back to the system now (glibc's malloc_trim; nothing on
    other C libraries). Before forking workers: they neither inherit it nor copy it page by
    page as they write to it (measured after a reference search had grown the heap to 1.7 GB:
    2 images on 2 workers 1.65-1.89x the throughput of one process with it, 1.48-1.67x without)."""
    if _is_glibc():
        _libc().malloc_trim(0)


def _is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))
