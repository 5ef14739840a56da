"""visionqueue's runtime and its contracts.

`import worker` stays light (no torch) so producers can use the contract modules; the
BatchWorker (torch) is imported on first use, which is what `rq worker -w worker.BatchWorker` does.
"""

from typing import Any

__all__ = ["BatchWorker"]


def __getattr__(name: str) -> Any:
    if name == "BatchWorker":
        from .batch_worker import BatchWorker

        return BatchWorker
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
