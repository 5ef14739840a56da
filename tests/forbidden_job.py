"""A job function the BatchWorker must never import: importing it leaves a marker file."""

import os
from pathlib import Path

marker = os.environ.get("VQ_TEST_MARKER")
if marker:
    Path(marker).write_text("imported")


def boom(*args, **kwargs):
    if marker:
        Path(marker).write_text("called")
