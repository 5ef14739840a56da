"""Reading frame results back from RQ: one outcome per job id, as they arrive.

Each polling round is one pipeline: for every job still pending, the job's `status` field and
its latest entry in RQ's result stream (`Result.get_key`, decoded with `Result.restore`) — what
`job.get_status()` and `job.latest_result()` read, without a round trip per job and without
`Job.fetch_many`, which would download every frame's image bytes again on every round.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.job import JobStatus
from rq.results import Result

from worker.jobs import FrameJob, read_result
from worker.redis_health import RedisHealth, is_transient

FINISHED = JobStatus.FINISHED.value
FAILED = JobStatus.FAILED.value
EXPIRED = "expired"
TIMEOUT = "timeout"
_GIVEN_UP = {JobStatus.STOPPED.value: "job was stopped", JobStatus.CANCELED.value: "job was canceled"}

EXPIRED_TEXT = (
    "job is gone from Redis: its ttl ran out before a worker took it (frame deadline), its result "
    "expired before it was read, or Redis lost it (a restart without persistence, a flush)"
)


@dataclass(frozen=True)
class Outcome:
    """What became of one frame's job.

    `status` is "finished" (then `result` is the worker's result dict), or "failed",
    "stopped", "canceled", "expired" (gone from Redis) or "timeout" (still pending when the
    wait ended); then `error` says why, with the worker's traceback for a failure.
    """

    job_id: str
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == FINISHED and self.result is not None

    @property
    def reason(self) -> str | None:
        """The last line of `error` without the exception's module path, e.g. 'FrameError: …'."""
        if not self.error:
            return None
        lines = [line.strip() for line in self.error.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else self.error.strip()
        return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))", "", last)


def wait_for_results(
    connection: Redis,
    job_ids: str | Iterable[str],
    timeout: float | None = 60.0,
    interval: float = 0.05,
    health: RedisHealth | None = None,
) -> Iterator[Outcome]:
    """Yield an `Outcome` for each job id, in the order they complete.

    Polls every `interval` seconds (one pipeline per round). After `timeout` seconds (None:
    wait for ever) the jobs still pending are yielded with status "timeout". With `health`, a
    transient Redis error (down, restarting, READONLY, OOM, paused) is waited out with its backoff
    instead of raised, up to its outage limit (RedisOutageError) or the timeout.
    """
    pending = [job_ids] if isinstance(job_ids, str) else list(dict.fromkeys(job_ids))  # one id, not its letters
    deadline = None if timeout is None else time.monotonic() + timeout
    last_status: dict[str, str] = {}
    while pending:
        try:
            with connection.pipeline(transaction=False) as pipe:
                for job_id in pending:
                    pipe.hget(FrameJob.key_for(job_id), "status")
                    pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
                replies = pipe.execute()
        except Exception as exc:
            if health is None or not is_transient(exc):
                raise
            delay = health.failed(exc)  # RedisOutageError past the limit
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                for job_id in pending:
                    yield Outcome(job_id, TIMEOUT, error=f"no result within {timeout:g}s (Redis is unavailable; "
                                  f"the job was {last_status.get(job_id, 'accepted')})")
                return
            time.sleep(delay if left is None else min(delay, left))
            continue
        if health is not None:
            health.succeeded()
        still = []
        for i, job_id in enumerate(pending):
            status = replies[2 * i].decode() if replies[2 * i] is not None else None
            outcome = _outcome(connection, job_id, status, replies[2 * i + 1])
            if outcome is None:
                last_status[job_id] = status or "unknown"
                still.append(job_id)
            else:
                yield outcome
        pending = still
        if not pending:
            return
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            for job_id in pending:
                yield Outcome(job_id, TIMEOUT, error=f"no result within {timeout:g}s (job is {last_status[job_id]})")
            return
        time.sleep(interval if deadline is None else min(interval, deadline - now))


def _outcome(connection: Redis, job_id: str, status: str | None, entries: list) -> Outcome | None:
    """The job's outcome, or None while it is still pending."""
    result = _latest_result(connection, job_id, entries)
    if status is None:
        # The job hash is gone. Its result stream may outlive it by a moment; use it if so.
        if result is not None and result.type == Result.Type.SUCCESSFUL:
            return _finished(job_id, result)
        if result is not None and result.exc_string:
            return Outcome(job_id, FAILED, error=result.exc_string)
        return Outcome(job_id, EXPIRED, error=EXPIRED_TEXT)
    if status == FINISHED:
        if result is None or result.type != Result.Type.SUCCESSFUL:
            return None  # status written before the result: read it next round
        return _finished(job_id, result)
    if status == FAILED:
        if result is not None and result.exc_string:
            return Outcome(job_id, FAILED, error=result.exc_string)
        return Outcome(job_id, FAILED, error="job failed (no failure text was stored)")
    if status in _GIVEN_UP:
        return Outcome(job_id, status, error=_GIVEN_UP[status])
    return None


def _latest_result(connection: Redis, job_id: str, entries: list) -> Result | None:
    if not entries:
        return None
    result_id, payload = entries[0]
    return read_result(job_id, result_id.decode(), payload, connection)


def _finished(job_id: str, result: Result) -> Outcome:
    value = result.return_value
    # RQ stores a value msgpack cannot encode as a placeholder string with status "finished":
    # anything but a dict is not a result this producer can use.
    if not isinstance(value, dict):
        return Outcome(job_id, FAILED, error=f"worker returned an unusable result: {value!r:.200}")
    return Outcome(job_id, FINISHED, result=value)
