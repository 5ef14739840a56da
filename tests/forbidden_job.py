"""Functions the BatchWorker must never import or call.

Importing this module leaves a marker file (`VQ_TEST_MARKER`); `boom` marks it "called".
`record` is the callback the poison corpus plants in job hashes (`deploy/poison.py`): each call
appends one line to `VQ_TEST_CALLS`, so a soak that plants many can count them all.
"""

import os
import time
from pathlib import Path

marker = os.environ.get("VQ_TEST_MARKER")
if marker:
    Path(marker).write_text("imported")


def boom(*args, **kwargs):
    if marker:
        Path(marker).write_text("called")


def record(*args, **kwargs):
    # Appends rather than overwrites: several worker processes may call it during one soak.
    calls = os.environ.get("VQ_TEST_CALLS") or marker
    if calls:
        job = args[0] if args else None
        what = getattr(job, "id", None) or repr(args[:1])[:200]
        with open(calls, "a") as f:
            f.write(f"{time.time():.3f} pid={os.getpid()} record {what}\n")
