"""Keep freed memory in the process for reuse: CPU inference without a page fault per activation.

A 3-D network's activations are tens to hundreds of MB each. glibc's ``malloc`` serves blocks
that large with fresh ``mmap`` pages and returns them to the kernel when they are freed (and trims
the heap top above a threshold), so every forward pass touches hundreds of MB of new pages: on
the spleen UNet (4 windows of 96^3, 2 CPU cores) about 60,000 minor page faults per forward and
~30 % of the sliding window's time. Telling ``malloc`` to serve everything from its heap and to
keep freed memory there makes later forward passes reuse the same pages (jemalloc or tcmalloc
through ``LD_PRELOAD`` have the same effect)::

    from common.memory import keep_freed_memory
    keep_freed_memory()      # at the start of an inference command, not at import

The cost: the process keeps its peak memory until it exits (the memory is reused, not returned).
Only glibc is tuned; elsewhere (macOS, musl) the call does nothing and returns False. CUDA
memory is unaffected (PyTorch's caching allocator already reuses it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1  # mallopt takes an int: trim only a free heap top above 2 GiB


def keep_freed_memory() -> bool:
    """Make glibc ``malloc`` keep and reuse freed memory (no ``mmap`` per large block, no trimming).

    Affects the whole process from now on; returns True when the setting was applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` of ``/proc/self/status`` on Linux (the
    high-water mark of the process's own address space), else ``ru_maxrss``. On Linux ``ru_maxrss``
    also carries the peak of whatever ran in the process before ``exec``: a fresh interpreter
    started by ``subprocess`` or a spawn start method would report its parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    scale = 1 if platform.system() == "Linux" else 1024  # KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / scale
