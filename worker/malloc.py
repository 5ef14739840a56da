"""Keep the memory a batch frees for the next batch, instead of handing it back to the kernel (glibc).

Each batch allocates and frees images, replies and tensors (a batch of 32 at 224 px has
activations of 19-26 MB). glibc gives freed memory back to the kernel: blocks over its mmap
threshold are unmapped, and the top of a heap past its trim threshold is released. Both start at
128 KB and adapt to the sizes freed, but a worker's many threads and sizes keep them low: on the
bench's full path a worker took 218 page faults per frame, each page zeroed by the kernel (`perf`
showed `clear_page_erms`, absent from the in-process loop's profile). Fixed thresholds stop that:
3-7 faults per frame. PyTorch's CPU performance guide swaps in jemalloc or tcmalloc with
LD_PRELOAD for this; `mallopt` gets glibc to do the same without a preload, from inside the
process (`VQ_KEEP_FREED_MEMORY`). The cost: the process keeps its peak heap as resident memory.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import structlog

log = structlog.get_logger("visionqueue.malloc")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit: larger blocks are always mmap'd
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free heap kept before any of it goes back to the kernel
TOP_PAD = 64 * 1024 * 1024  # the heap grows in steps this large, not a page at a time


@functools.cache  # the settings are the process's: set them once, however often configure_torch runs
def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory; False where libc is not glibc or it refused a setting."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    options = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
               "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD), "M_TOP_PAD": (M_TOP_PAD, TOP_PAD)}
    refused = [name for name, (option, value) in options.items() if mallopt(option, value) != 1]
    if refused:
        log.warning("glibc refused some malloc settings; freed memory may go back to the kernel", refused=refused)
    return not refused
