"""VQ_KEEP_FREED_MEMORY: freed memory is reused without faulting its pages in again.

On the bench's full path a BatchWorker took 218 page faults per frame with glibc's defaults and
3-7 with the setting on (a probe counting the worker processes' minor faults over 3,000 frames).
Here, the simplest case of it: 40 MB of blocks under glibc's mmap threshold, freed together, go
back to the kernel from the top of the heap and fault in again the next time, unless kept.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "on":
    from worker.malloc import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def batch():  # a batch's worth of decoded frames and replies (150 KB and under), then all freed
    blocks = [np.ones(100 * 1024, dtype=np.uint8) for _ in range(400)]
    del blocks
batch()  # the first touch of the memory faults in either case
before = faults()
for _ in range(5):
    batch()
print(json.dumps((faults() - before) / 5))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    per_block = {mode: json.loads(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                                 check=True).stdout) for mode in ("on", "off")}
    pages = 400 * 100 * 1024 // 4096  # what one batch allocates
    assert per_block["off"] > pages / 2, per_block  # glibc's default trims the heap's top each time
    assert per_block["on"] < pages / 50, per_block
