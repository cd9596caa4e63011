"""fastcomer.allocator: the glibc settings take effect (freed megabyte tensors stay in the
heap for reuse, not given back to be faulted in again), the knob leaves malloc alone, and bad
values fail loudly. Each case runs in a process of its own: malloc settings are per process
and cannot be undone."""
import os
import platform
import subprocess
import sys

import pytest

from fastcomer.allocator import GLIBC_SETTINGS, MALLOC_ENV, glibc_tunables

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Three 30 MiB tensors live at once, then all freed (a step's temporaries come and go
# together); prints what keep_freed_memory() returned and the bytes glibc's heap still holds
# afterwards (mallinfo2's arena). Whatever glibc's defaults have adapted to (their mmap
# threshold rises up to 32 MiB as mapped blocks are freed, their trim threshold is twice it),
# such tensors are either mapped and unmapped or the freed 90 MiB heap top is given back:
# the next ones are faulted in afresh. Kept, they stay in the heap for reuse.
CHURN = """
import ctypes, torch
from fastcomer.allocator import keep_freed_memory
print(keep_freed_memory())
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
live = [torch.ones(30 << 18) for _ in range(3)]
del live
print(mallinfo2().arena)
"""


def run(code, policy=None):
    env = {key: value for key, value in os.environ.items() if key not in (MALLOC_ENV, "GLIBC_TUNABLES")}
    if policy is not None:
        env[MALLOC_ENV] = policy
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_tunables_name_every_setting():
    # the value docs/cpu.md tells servers to export
    assert glibc_tunables() == ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824:"
                                "glibc.malloc.top_pad=67108864")
    assert GLIBC_SETTINGS["mmap_threshold"] <= 32 << 20  # glibc refuses a larger threshold


@needs_glibc
def test_freed_tensors_stay_in_the_heap():
    kept = run(CHURN)
    assert kept.returncode == 0, kept.stderr
    applied, heap = kept.stdout.split()
    assert applied == glibc_tunables()
    assert int(heap) >= 90 << 20

    system = run(CHURN, policy="system")
    assert system.returncode == 0, system.stderr
    applied, heap = system.stdout.split()
    assert applied == "None"
    assert int(heap) < 90 << 20


def test_bad_policy_raises():
    result = run("from fastcomer.allocator import keep_freed_memory; keep_freed_memory()", policy="sometimes")
    assert result.returncode != 0
    assert f"{MALLOC_ENV} must be 'keep' or 'system'" in result.stderr


@needs_glibc
def test_release_gives_kept_memory_back():
    resident = "print(int(open('/proc/self/statm').read().split()[1]) * 4096)\n"  # bytes in RAM
    code = CHURN + resident + "from fastcomer.allocator import release_freed_memory\nrelease_freed_memory()\n" + resident
    result = run(code)
    assert result.returncode == 0, result.stderr
    _, heap, kept, released = result.stdout.split()
    assert int(heap) >= 90 << 20  # kept by the settings
    assert int(kept) - int(released) >= 80 << 20  # most of the 90 MiB freed given back
