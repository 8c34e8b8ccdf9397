"""common.memory.keep_freed_memory: after the call, freeing and allocating large tensors again reuses
the same pages (no minor page faults), where glibc's defaults hand out fresh pages every time.
Each case runs in its own process: the setting is process-wide."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting tunes glibc's malloc; elsewhere it does nothing")

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from common.memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # 64 MiB of float32, touched, freed; the heap settles
        torch.ones(16 << 20)
    start = faults()
    for _ in range(5):
        torch.ones(16 << 20)
    print(applied, faults() - start)
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied == "True"
    pages = 5 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # 81,920 pages of 4 KiB
    assert default > pages // 2  # glibc's default: fresh pages for each 64 MiB block
    assert kept < pages // 50  # kept: the same pages again
