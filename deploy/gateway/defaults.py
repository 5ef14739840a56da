"""The gateway's defaults, in a module light enough for `python -m deploy.gateway --help`."""

from __future__ import annotations

DEFAULT_MAX_QUEUE = 1000  # queue length at which submissions get 429
DEFAULT_TIMEOUT = 30.0  # seconds /v1/classify waits when the client gives no ?timeout=
MAX_TIMEOUT = 300.0  # results stay readable 600 s (RESULT_TTL); past this, poll /v1/jobs instead
DEFAULT_RETRY_AFTER_S = 1  # Retry-After on a 429: the workers drain a full queue in seconds, not minutes
