"""Every call into RQ's internals that the BatchWorker makes, and nothing else.

RQ's worker handles one job at a time; the BatchWorker claims and records whole batches, so it
writes RQ's state itself: executions, the started/finished/failed registries, results, the
intermediate list, the queue. This module is the only file that does, so that `rq info`, the
registries and every job's status stay true and the next RQ upgrade has one place to look
(written against rq 3.0.0).

The rules kept here, whoever calls:
- a job hash is size-checked inside Redis before a byte of it is fetched;
- nothing recorded runs code: callback, webhook, dependency and repeat fields are stripped at
  claim, and abandoned frames are recovered here, not by RQ's StartedJobRegistry.cleanup (which
  imports and calls callbacks, sends webhooks and enqueues dependents);
- a frame that already reached a terminal state is never recorded again.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import uuid4

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.executions import Execution, ExecutionRegistry
from rq.job import JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.results import Result
from rq.utils import as_text, current_timestamp, parse_composite_key, utcformat
from rq.utils import now as now  # re-exported: the timestamp RQ writes
from rq.worker_registration import clean_worker_registry

from .jobs import FORBIDDEN_FIELDS, MAX_DATA_BYTES, MAX_FIELD_BYTES, MAX_FIELDS, FrameJob

TERMINAL = frozenset({JobStatus.FINISHED.value, JobStatus.FAILED.value, JobStatus.STOPPED.value,
                      JobStatus.CANCELED.value})

# One round trip per batch; a hash that is not a hash, has too many fields or a field over its
# bound comes back as a reason instead of its bytes (0 for a missing job).
_FETCH_LUA = """
local out = {}
local max_data, max_field, max_fields = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then
    out[i] = 0
  elseif kind ~= 'hash' then
    out[i] = 'the job key holds a ' .. kind .. ', not a hash'
  else
    local n = redis.call('HLEN', key)
    if n > max_fields then
      out[i] = 'the job hash has ' .. n .. ' fields (limit ' .. max_fields .. ')'
    else
      local flat = redis.call('HGETALL', key)
      local bad = nil
      for j = 1, #flat, 2 do
        local limit = max_field
        if flat[j] == 'data' then limit = max_data end
        if #flat[j] > 64 then
          bad = 'the job hash has a field name of ' .. #flat[j] .. ' bytes'
        elseif #flat[j + 1] > limit then
          bad = 'job hash field ' .. flat[j] .. ' is ' .. #flat[j + 1] .. ' bytes (limit ' .. limit .. ')'
        end
        if bad then break end
      end
      if not bad and redis.call('EXISTS', key .. ':dependents') == 1 then
        table.insert(flat, 'dependents')
        table.insert(flat, '1')
      end
      out[i] = bad or flat
    end
  end
end
return out
"""

# Put an id that a dead worker moved to the intermediate list back at the head of the queue: only
# if it is still there, unclaimed, and nobody rescued it since we first saw it (ARGV[2]).
# -1: it has been rescued too often; the caller fails it as poison.
_RESCUE_LUA = """
local status = redis.call('HGET', KEYS[3], 'status')
if status == 'started' then return 0 end
local rescues = tonumber(redis.call('HGET', KEYS[3], 'vq_rescues') or '0')
if rescues ~= tonumber(ARGV[2]) then return 0 end
if rescues >= tonumber(ARGV[3]) then return -1 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[3], 'vq_rescues', 1)
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


class Unreadable:
    """A job whose hash could not even be fetched safely: its id and why."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.id = job_id
        self.reason = reason

    @property
    def not_a_hash(self) -> bool:
        return self.reason.startswith("the job key holds")


# -- taking frames off the queue ----------------------------------------------------------------
def wait_for_id(conn: Redis, queue: Queue, timeout: float) -> str | None:
    """Block up to `timeout` s for one id, moved to the intermediate list as RQ's dequeue does."""
    value = conn.blmove(queue.key, queue.intermediate_queue_key, timeout)
    return None if value is None else as_text(value)


def take_ids(conn: Redis, queue: Queue, want: int) -> list[str]:
    """Up to `want` more ids, without blocking."""
    with conn.pipeline(transaction=False) as pipe:
        for _ in range(want):
            pipe.lmove(queue.key, queue.intermediate_queue_key)
        return [as_text(x) for x in pipe.execute() if x is not None]


def fetch_jobs(conn: Redis, ids: list[str], serializer: Any) -> list[FrameJob | Unreadable | None]:
    """The jobs behind `ids` (None: gone, e.g. its TTL ran out while queued), size-checked in Redis first."""
    if not ids:
        return []
    keys = [FrameJob.key_for(i) for i in ids]
    replies = conn.eval(_FETCH_LUA, len(keys), *keys, MAX_DATA_BYTES, MAX_FIELD_BYTES, MAX_FIELDS)
    jobs: list[FrameJob | Unreadable | None] = []
    for job_id, reply in zip(ids, replies, strict=True):
        if reply == 0:
            jobs.append(None)
        elif isinstance(reply, bytes | str):
            jobs.append(Unreadable(job_id, as_text(reply)))
        else:
            job = FrameJob(job_id, connection=conn, serializer=serializer)
            job.restore(dict(zip(reply[::2], reply[1::2], strict=True)))
            jobs.append(job)
    return jobs


def placeholder(conn: Redis, job_id: str, queue: Queue, serializer: Any) -> FrameJob:
    """A job object for an id whose hash cannot be read, so that it can be failed like any other."""
    job = FrameJob(job_id, connection=conn, serializer=serializer)
    job.origin = queue.name
    job.data = b""
    job.defects, job.forbidden = [], []
    return job


def forget_ids(pipe: Pipeline, queue: Queue, ids: Iterable[str]) -> None:
    """Take ids off the intermediate list: RQ's own cleanup would otherwise fail them a minute later."""
    for job_id in ids:
        pipe.lrem(queue.intermediate_queue_key, 1, job_id)


# -- claiming -----------------------------------------------------------------------------------
def new_execution(job: FrameJob, worker_name: str) -> Execution:
    """An execution made here, not by `Execution.create`, so a claim retried after an ambiguous
    failure writes the same keys again instead of a second, orphaned execution."""
    execution = Execution(id=uuid4().hex, job_id=job.id, connection=job.connection, worker_name=worker_name)
    execution._job = job
    return execution


def claim(pipe: Pipeline, queue: Queue, job: FrameJob, execution: Execution, ttl: int) -> None:
    """Mark the job started under `execution` (a lease of `ttl` s); strip what could run code from a job that has it."""
    execution.save(ttl=ttl, pipeline=pipe)
    ExecutionRegistry(job_id=job.id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)
    job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=ttl, xx=False)
    pipe.sadd(execution.worker_executions_key, execution.composite_key)
    pipe.expire(execution.worker_executions_key, ttl + 60)
    job.prepare_for_execution(execution.worker_name, pipe)
    if job.forbidden:  # seen by fetch_jobs a moment ago; planted later, recovery and record_failure strip them
        pipe.hdel(job.key, *FORBIDDEN_FIELDS)
        pipe.delete(job.dependents_key)  # RQ would enqueue what it names when the job ends
    pipe.persist(job.key)
    pipe.lrem(queue.intermediate_queue_key, 1, job.id)


def keep_alive(pipe: Pipeline, job: FrameJob, execution: Execution, ttl: int) -> None:
    execution.heartbeat(job.started_job_registry, ttl, pipe)


def worker_busy(pipe: Pipeline, worker: Any) -> None:
    from rq.worker import WorkerStatus

    worker.set_state(WorkerStatus.BUSY, pipeline=pipe)


# -- recording ----------------------------------------------------------------------------------
def read_states(conn: Redis, jobs: list[FrameJob]) -> list[tuple[str | None, str | None]]:
    """(status, worker name) of each job, as Redis has them now."""
    with conn.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hmget(job.key, "status", "worker_name")
        return [(as_text(s) if s else None, as_text(w) if w else None) for s, w in pipe.execute()]


def transaction(conn: Redis, watch: list[str], write: Any) -> list[Any] | None:
    """Run `write(pipe)` in MULTI/EXEC, only if none of `watch` changed since `write` looked.

    The replies, or None when one of `watch` changed (look again and retry).
    """
    with conn.pipeline() as pipe:
        try:
            if watch:
                pipe.watch(*watch)
            pipe.multi()
            write(pipe)
            return pipe.execute()
        except WatchError:
            return None


def record_success(pipe: Pipeline, job: FrameJob, execution: Execution | None, result: dict[str, Any],
                   result_ttl: int, worker_name: str, ended: datetime) -> None:
    # Only the fields that changed: RQ's job.save() would rewrite the whole hash, frame included.
    job._status = JobStatus.FINISHED
    job.ended_at = ended
    pipe.hset(job.key, mapping={"status": JobStatus.FINISHED.value, "ended_at": utcformat(ended)})
    Result.create(job, Result.Type.SUCCESSFUL, ttl=result_ttl, return_value=result, worker_name=worker_name,
                  pipeline=pipe, execution_id=execution.id if execution else None,
                  execution_started_at=execution.created_at if execution else None, execution_ended_at=ended)
    if result_ttl != 0:
        job.finished_job_registry.add(job, result_ttl, pipe)
    job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
    if execution is not None:
        execution.delete(job=job, pipeline=pipe)


def record_failure(pipe: Pipeline, job: FrameJob, execution: Execution | None, reason: str, worker_name: str,
                   ended: datetime) -> None:
    job._status = JobStatus.FAILED
    job.ended_at = ended
    pipe.hdel(job.key, *FORBIDDEN_FIELDS)  # nothing that reads the failed job later may run them
    pipe.delete(job.dependents_key)
    job._handle_failure(reason, pipe, worker_name=worker_name, execution_id=execution.id if execution else None,
                        execution_started_at=execution.created_at if execution else None,
                        execution_ended_at=ended)
    if execution is not None:
        execution.delete(job=job, pipeline=pipe)


def requeue(pipe: Pipeline, job: FrameJob, queue: Queue, execution: Execution | None, spend_retry: bool) -> None:
    """Back at the head of the queue (a frame is only worth anything while it is fresh)."""
    if spend_retry and job.retries_left:
        job.retries_left -= 1
    queue._enqueue_job(job, pipeline=pipe, at_front=True)
    if execution is not None:
        execution.delete(job=job, pipeline=pipe)


def worker_counts(pipe: Pipeline, worker_key: str, ok: int, failed: int, working_s: float) -> None:
    pipe.hincrby(worker_key, "successful_job_count", ok)
    pipe.hincrby(worker_key, "failed_job_count", failed)
    pipe.hincrbyfloat(worker_key, "total_working_time", working_s)


# -- recovery of frames whose worker died -------------------------------------------------------
def intermediate_ids(conn: Redis, queue: Queue) -> list[str]:
    return [as_text(x) for x in conn.lrange(queue.intermediate_queue_key, 0, -1)]


def rescue_counts(conn: Redis, ids: list[str]) -> list[int]:
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(FrameJob.key_for(job_id), "vq_rescues")
        return [int(x or 0) for x in pipe.execute()]


def rescue_from_intermediate(conn: Redis, queue: Queue, job_id: str, seen_rescues: int, max_rescues: int) -> int:
    """1: back on the queue; 0: not stale after all; -1: rescued too often (fail it with `fail_poison`)."""
    keys = [queue.intermediate_queue_key, queue.key, FrameJob.key_for(job_id)]
    return int(conn.eval(_RESCUE_LUA, len(keys), *keys, job_id, seen_rescues, max_rescues))


def live_executions(conn: Redis, job_id: str) -> set[str]:
    """Ids of the job's executions whose lease has not run out."""
    key = ExecutionRegistry(job_id=job_id, connection=conn).key
    return {as_text(m) for m in conn.zrangebyscore(key, current_timestamp(), "+inf")}


def expired_executions(conn: Redis, queue: Queue) -> list[tuple[str, str]]:
    """(job id, execution id) of every lease in the started registry that ran out."""
    members = conn.zrangebyscore(queue.started_job_registry.key, 0, current_timestamp())
    return [parse_composite_key(as_text(m)) for m in members]


def drop_lease(pipe: Pipeline, queue: Queue, job_id: str, execution_id: str) -> None:
    execution = Execution(id=execution_id, job_id=job_id, connection=queue.connection)
    pipe.zrem(queue.started_job_registry.key, execution.composite_key)
    pipe.delete(execution.key)
    ExecutionRegistry(job_id=job_id, connection=queue.connection).remove(execution=execution, pipeline=pipe)


def clean_other_registries(queue: Queue) -> None:
    """RQ's housekeeping that runs no job code: expired finished/failed entries, dead workers."""
    FinishedJobRegistry(queue.name, connection=queue.connection, job_class=FrameJob,
                        serializer=queue.serializer).cleanup()
    FailedJobRegistry(queue.name, connection=queue.connection, job_class=FrameJob,
                      serializer=queue.serializer).cleanup()
    clean_worker_registry(queue)
