"""How the trainer's commands refuse what they were given: one line naming the problem, exit status 2.

A missing run folder, an empty or unknown data folder, weights that are not weights: the person at
the terminal needs the sentence, not the traceback that leads to it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from worker.artifact import ArtifactError

from .data import DataError
from .export import ExportError
from .weights import WeightsError

# Not ValueError itself: a bug that raises one (a shape torch refuses) keeps its traceback.
REFUSALS = (DataError, WeightsError, ExportError, ArtifactError, FileNotFoundError, NotADirectoryError)


def run(main: Callable[[], int]) -> int:
    """`main()`'s exit status, or 2 with "error: …" on stderr when it refused its input."""
    try:
        return main()
    except REFUSALS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
