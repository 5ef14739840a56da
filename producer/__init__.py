"""visionqueue producer: capture stations and uploaders that feed the `inference` queue.

Commands: `python -m producer files|camera|watch --help`. Python API: `producer.api.Producer`.
Light by design: it imports `worker`'s contract modules (frames, jobs, serializer), redis, rq,
structlog, and OpenCV only when encoding or capturing — never torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BacklogFull", "Outcome", "Producer"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m producer` imports this package first, and a bad VQ_MAX_* limit (read when the
    # frame contract loads) must reach the command line's clean error, not a traceback from here.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
