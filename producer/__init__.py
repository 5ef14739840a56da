"""visionqueue producer: capture stations and uploaders that feed the `inference` queue.

Commands: `python -m producer files|camera|watch --help`. Python API: `producer.api.Producer`.
Light by design: it imports `worker`'s contract modules (frames, jobs, serializer), redis, rq,
structlog, and OpenCV only when encoding or capturing — never torch.
"""

from .api import BacklogFull, Outcome, Producer

__all__ = ["BacklogFull", "Outcome", "Producer"]
