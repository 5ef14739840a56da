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

import zlib
from base64 import b64encode
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import WatchError
from rq.defaults import DEFAULT_FAILURE_TTL, RQ_KEY_PREFIX
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.job import JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.results import Result
from rq.utils import as_text, current_timestamp, parse_composite_key, utcformat
from rq.utils import now as now  # re-exported: the timestamp RQ writes
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY, clean_worker_registry
from rq.worker_registration import register as register_worker

from .frames import job_id_text
from .jobs import FAILURE_TTL, FORBIDDEN_FIELDS, MAX_DATA_BYTES, MAX_FIELD_BYTES, MAX_FIELDS, FrameJob

log = structlog.get_logger("worker.rq_internals")

TERMINAL = frozenset({JobStatus.FINISHED.value, JobStatus.FAILED.value, JobStatus.STOPPED.value,
                      JobStatus.CANCELED.value})

# Reads one job hash without trusting it (shared by every script here): the hash is size-checked
# before a byte of it leaves Redis. Returns a code and a value: 0 missing; 1 not a hash (reason);
# 2 a hash over its bounds (reason); 3 the flat field list (without a `data` over INLINE_DATA bytes,
# which `_restore_all` reads), plus its status and whether it carries a forbidden field. A separate
# `:dependents` set is reported as if it were a field.
_READ_JOB = """
local INLINE_DATA = 8192
local function read_job(key, max_data, max_field, max_fields, forbidden)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return 0 end
  if kind ~= 'hash' then return 1, 'the job key holds a ' .. kind .. ', not a hash' end
  local n = redis.call('HLEN', key)
  if n > max_fields then return 2, 'the job hash has ' .. n .. ' fields (limit ' .. max_fields .. ')' end
  -- Every field, but a large image stays in Redis: copying a ~45 KB string into Lua and back out
  -- costs Redis ~70 us a frame, more than the rest of a claim, so the caller reads it with a plain
  -- HGET (`_restore_all`) once its size has passed here. A small one comes along (one round trip).
  local names = redis.call('HKEYS', key)
  local others = {}
  for _, name in ipairs(names) do
    if #name > 64 then return 2, 'the job hash has a field name of ' .. #name .. ' bytes' end
    if name == 'data' then
      local size = redis.call('HSTRLEN', key, 'data')
      if size > max_data then return 2, 'job hash field data is ' .. size .. ' bytes (limit ' .. max_data .. ')' end
      if size <= INLINE_DATA then others[#others + 1] = name end
    else
      others[#others + 1] = name
    end
  end
  local flat, status, strip = {}, nil, false
  local values = #others > 0 and redis.call('HMGET', key, unpack(others)) or {}
  for j, name in ipairs(others) do
    local value = values[j]
    if name ~= 'data' and #value > max_field then
      return 2, 'job hash field ' .. name .. ' is ' .. #value .. ' bytes (limit ' .. max_field .. ')'
    end
    flat[#flat + 1] = name
    flat[#flat + 1] = value
    if name == 'status' then status = value end
    if forbidden[name] then strip = true end
  end
  if redis.call('EXISTS', key .. ':dependents') == 1 then
    flat[#flat + 1] = 'dependents'
    flat[#flat + 1] = '1'
    strip = true
  end
  return 3, flat, status, strip
end
local TERMINAL = {finished = true, failed = true, stopped = true, canceled = true}
-- Redis itself unwell (full, read-only, loading...): such an error can only meet a script's first
-- write, so raising it leaves nothing written and the caller retries the whole call.
local FAULTS = {OOM = true, READONLY = true, LOADING = true, MASTERDOWN = true, NOREPLICAS = true, MISCONF = true,
  BUSY = true, TRYAGAIN = true, CLUSTERDOWN = true}
-- `w(...)` runs a write: a per-key error (a planted key of the wrong type) is kept in `err` for the
-- caller to pin on one job; a fault is kept in `fault` (bare, as Redis sends it), writes stop, and
-- the script answers with it as its own error reply.
local err, fault
local function w(...)
  if fault then return end
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    local text = string.match(r.err, '^@[^:]+: %d+: %-(%u+ [^%c]*)') or r.err
    if FAULTS[string.match(text, '^(%u+) ') or ''] then fault = text elseif not err then err = r.err end
  end
  return r
end
-- A frame's `vq_rescues`, as every script and `rescue_counts` read it: a planted value that is no count is 0.
local function rescues_of(key)
  local raw = redis.call('HGET', key, 'vq_rescues')
  return (raw and string.match(raw, '^%d+$')) and tonumber(raw) or 0
end
local function name_set(list) local set = {} for _, v in ipairs(list) do set[v] = true end return set end
"""

_FETCH_LUA = _READ_JOB + """
local out = {}
local none = {}
for i, key in ipairs(KEYS) do
  local code, value = read_job(key, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), none)
  out[i] = value or 0
end
return out
"""

# Claim a batch in one call: the ids this worker already moved to the intermediate list (a
# blocking BLMOVE) plus up to `want` more popped off the queue. Each is read (size-checked), and
# unless it already ended, marked started under a new execution with a lease of `ttl` s, exactly
# as RQ's worker marks one job: execution hash, per-job execution registry, started registry,
# the worker's execution index, the job's status fields. Fields that could run code are stripped.
# Popped ids sit on the intermediate list until the end of the script, so an error half-way leaves
# them where recovery finds them; a per-job write error (a planted key of the wrong type) fails
# that job alone.
NOT_A_JOB_ID = "the queue entry is not a job id (letters, digits, _ and - only)"  # also the claim script's

# Per id: {id, 0} gone; {id, 1} already ended; {id, 2, reason} not a job (dropped);
# {id, 3, execution id, fields}; {id, 4, execution id, reason} claimed, but unreadable.
# A retry is safe: what a call claimed is kept under the worker's claim key with the call's token
# (its execution id prefix), and a second call with that token (its reply was lost to a dropped
# connection) answers with those frames again, read afresh, instead of taking more: the first ones
# would otherwise sit started until their leases ran out, and count as rescued from a dead worker.
_CLAIM_LUA = _READ_JOB + """
local queue, inter, wip, wexec, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local worker, iso, ts, now, ttl, base = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local want, max_data, max_field, max_fields = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
  tonumber(ARGV[10])
local jp, ep, xp = ARGV[11], ARGV[12], ARGV[13]
local nforbidden = tonumber(ARGV[14])
local forbidden_list = {}
for i = 1, nforbidden do forbidden_list[i] = ARGV[14 + i] end
local forbidden = name_set(forbidden_list)
-- Only this script writes the claim key: anything else there is planted, and goes. (Never a write when
-- it is absent: Redis checks a full memory only at a script's first write, which must be a real one.)
local ckind = redis.call('TYPE', ckey).ok
if ckind ~= 'hash' and ckind ~= 'none' then redis.call('DEL', ckey) end
local stored = redis.call('HGET', ckey, 'token') == base and redis.call('HGET', ckey, 'claimed')
local decoded, pairs_claimed = pcall(cjson.decode, stored or 'null')
if stored and decoded and type(pairs_claimed) == 'table' then
  -- Each frame again only while it is still this claim's: started, by this worker, under this execution
  -- (a retry that comes after the lease ran out may find it rescued, or taken by another worker).
  local again = {}
  for _, pair in ipairs(pairs_claimed) do
    local id, eid = pair[1], pair[2]
    local code, value, status = read_job(jp .. id, max_data, max_field, max_fields, forbidden)
    if code == 0 then again[#again + 1] = {id, 0}
    elseif code ~= 3 then again[#again + 1] = {id, 4, eid, value}
    elseif status == 'started' and redis.call('HGET', jp .. id, 'worker_name') == worker
        and redis.call('EXISTS', ep .. id .. ':' .. eid) == 1 then again[#again + 1] = {id, 3, eid, value}
    else again[#again + 1] = {id, 1} end
  end
  return again
end
local ids = {}
for i = 15 + nforbidden, #ARGV do ids[#ids + 1] = ARGV[i] end
local nheld = #ids
local popped = {}
if want > 0 then popped = redis.call('LPOP', queue, want) or {} end
if #popped > 0 then redis.call('RPUSH', inter, unpack(popped)) end
for _, id in ipairs(popped) do ids[#ids + 1] = id end

local out, claimed = {}, 0
for _, id in ipairs(ids) do
  local jk = jp .. id
  local code, value, status, strip
  -- RQ's job id alphabet (worker.frames.job_id_text): anything else was planted, and an id with ':'
  -- would make execution keys that RQ's registries cannot split back.
  if #id > 1024 or not string.match(id, '^[%w_%-]+$') then
    code, value = 1, '@NOT_A_JOB_ID@'
  else
    code, value, status, strip = read_job(jk, max_data, max_field, max_fields, forbidden)
  end
  if code == 0 then out[#out + 1] = {id, 0}
  elseif code == 1 then out[#out + 1] = {id, 2, value}
  elseif status and TERMINAL[status] then out[#out + 1] = {id, 1}
  else
    claimed = claimed + 1
    err = nil
    local eid = base .. string.format('%04x', claimed)
    local ck = id .. ':' .. eid
    w('HSET', ep .. ck, 'id', eid, 'job_id', id, 'created_at', ts, 'last_heartbeat', ts, 'worker_name', worker)
    w('EXPIRE', ep .. ck, ttl)
    w('ZADD', xp .. id, now + ttl + 60, eid)
    w('EXPIRE', xp .. id, ttl + 60)
    w('ZADD', wip, now + ttl, ck)
    w('SADD', wexec, ck)
    w('HSET', jk, 'last_heartbeat', iso, 'status', 'started', 'started_at', iso, 'worker_name', worker)
    w('PERSIST', jk)
    if strip then
      w('HDEL', jk, unpack(forbidden_list))
      w('DEL', jk .. ':dependents')
    end
    if fault then return redis.error_reply(fault) end
    if err then out[#out + 1] = {id, 4, eid, 'the frame could not be marked started: ' .. err}
    elseif code == 2 then out[#out + 1] = {id, 4, eid, value}
    else out[#out + 1] = {id, 3, eid, value} end
  end
end
if #popped > 0 then redis.call('LTRIM', inter, 0, -#popped - 1) end
for i = 1, nheld do redis.call('LREM', inter, 1, ids[i]) end
redis.call('DEL', ckey)
if claimed > 0 then
  redis.call('EXPIRE', wexec, ttl + 60)
  local kept = {}
  for _, o in ipairs(out) do if o[2] >= 3 then kept[#kept + 1] = {o[1], o[3]} end end
  redis.call('HSET', ckey, 'token', base, 'claimed', cjson.encode(kept))
  redis.call('EXPIRE', ckey, ttl)  -- a retry past the leases finds nothing to replay: recovery has them
end
return out
""".replace("@NOT_A_JOB_ID@", NOT_A_JOB_ID)

# Record a batch's outcomes in one call, each as RQ's worker records one job's: status, result
# (rq:results:<id>), finished or failed registry, TTLs, the execution removed. A frame that
# already ended is not written again ('dup'; 'mine' when this worker wrote it in an earlier
# attempt whose reply was lost). A finished frame's data can be replaced by the frame without its
# image (VQ_KEEP_IMAGES): the job stays readable (args, description, result) while the image's
# memory goes back to Redis for the next frame. Then one entry per written frame on the results
# stream, the worker's counters, and one trim of the stream (its count is the last reply).
# Record kinds: ok, fail, retry (model error: back at the head, one retry spent), rescue (a dead
# worker's frame back at the head; only while it is still started).
_RECORD_LUA = _READ_JOB + """
local queue, inter, wip, finished, failed, wkey, wexec, stream, queues =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local worker, iso, ts, now, maxlen, attempt, working = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local jp, ep, xp, rp, count = ARGV[8], ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12])
local nforbidden = tonumber(ARGV[13])
local forbidden_list = {}
for i = 1, nforbidden do forbidden_list[i] = ARGV[13 + i] end
local i = 14 + nforbidden

local function expire(key, ttl)
  if ttl == -1 then w('PERSIST', key) else w('EXPIRE', key, ttl) end
end
local function score(ttl) if ttl < 0 then return '+inf' end return now + ttl end

local out, ok_n, failed_n = {}, 0, 0
while i <= #ARGV do
  local kind, id, eid, ttl, started, a, b, keep, nstream = ARGV[i], ARGV[i + 1], ARGV[i + 2],
    tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], tonumber(ARGV[i + 8])
  if started == '' then started = ts end
  local fields_at = i + 9
  i = fields_at + 2 * nstream
  local jk, rk = jp .. id, rp .. id
  err = nil
  local state = redis.pcall('HMGET', jk, 'status', 'worker_name')
  local code
  if type(state) == 'table' and state.err then code = 'error: ' .. state.err
  elseif not state[1] and redis.call('EXISTS', jk) == 0 then code = 'gone'
  elseif state[1] and TERMINAL[state[1]] then
    code = (attempt > 1 and state[2] == worker) and 'mine' or 'dup'
  elseif kind == 'rescue' and state[1] ~= 'started' then code = 'raced'
  else
    if kind == 'ok' then
      w('HSET', jk, 'status', 'finished', 'ended_at', iso)
      if keep ~= '' then  -- the job's data without its image: the image's memory is reused at once
        w('HSET', jk, 'vq_image_dropped_bytes', redis.call('HSTRLEN', jk, 'data') - #keep, 'data', keep)
      end
      w('XADD', rk, 'MAXLEN', 10, '*', 'type', 1, 'worker_name', worker, 'return_value', a, 'execution_id', eid,
        'execution_started_at', started, 'execution_ended_at', ts)
      expire(rk, ttl)
      if ttl ~= 0 then w('ZADD', finished, score(ttl), id) end
      ok_n = ok_n + 1
    elseif kind == 'fail' then
      w('HSET', jk, 'status', 'failed', 'ended_at', iso, 'exc_info', b)
      w('HDEL', jk, unpack(forbidden_list))
      w('DEL', jk .. ':dependents')
      w('ZADD', failed, score(ttl), id)
      w('XADD', rk, 'MAXLEN', 10, '*', 'type', 2, 'worker_name', worker, 'exc_string', a, 'execution_id', eid,
        'execution_started_at', started, 'execution_ended_at', ts)
      expire(rk, ttl)
      if eid == '' then w('LREM', inter, 1, id) end
      failed_n = failed_n + 1
    else  -- retry, rescue: back at the head of the queue (a frame is only worth anything while it is fresh)
      w('HSET', jk, 'status', 'queued', 'enqueued_at', iso)
      if kind == 'retry' then w('HSET', jk, 'retries_left', a) else w('HSET', jk, 'vq_rescues', rescues_of(jk) + 1) end
      w('LPUSH', queue, id)
      w('SADD', queues, queue)
    end
    -- RQ's job.cleanup(ttl): 0 deletes the job now, a positive TTL expires it, -1 keeps it.
    if kind == 'ok' or kind == 'fail' then
      if ttl == 0 then w('DEL', jk, rk) elseif ttl > 0 then w('EXPIRE', jk, ttl) end
    end
    code = err and ('error: ' .. err) or 'w'
    if nstream > 0 and not err then
      local entry = {'XADD', stream, '*'}
      for f = fields_at, fields_at + 2 * nstream - 1 do entry[#entry + 1] = ARGV[f] end
      w(unpack(entry))
    end
  end
  if eid ~= '' and code ~= 'raced' then
    local ck = id .. ':' .. eid
    w('DEL', ep .. ck)
    w('ZREM', wip, ck)
    w('ZREM', xp .. id, eid)
    w('SREM', wexec, ck)
  end
  if fault then return redis.error_reply(fault) end
  out[#out + 1] = code
end
if count == 1 and (ok_n > 0 or failed_n > 0) then
  w('HINCRBY', wkey, 'successful_job_count', ok_n)
  w('HINCRBY', wkey, 'failed_job_count', failed_n)
  w('HINCRBYFLOAT', wkey, 'total_working_time', working)
end
local trimmed = 0
if maxlen > 0 then trimmed = redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen) end
out[#out + 1] = trimmed
return out
"""

# Renew the leases of the frames in hand, as RQ's Execution.heartbeat does for one: only where
# the execution is still registered (XX), so a lease that recovery already took back stays gone.
_RENEW_LUA = """
local wip, ep, xp, ts, now, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 6, #ARGV, 2 do
  local id, eid = ARGV[i], ARGV[i + 1]
  local ck = id .. ':' .. eid
  redis.pcall('HSET', ep .. ck, 'last_heartbeat', ts)
  redis.pcall('EXPIRE', ep .. ck, ttl)
  redis.pcall('ZADD', wip, 'XX', now + ttl, ck)
  redis.pcall('ZADD', xp .. id, 'XX', now + ttl + 60, eid)
  redis.pcall('EXPIRE', xp .. id, ttl + 60)
end
return 0
"""

# Put an id that a dead worker moved to the intermediate list back at the head of the queue: only
# if it is still there, unclaimed, and nobody rescued it since we first saw it (ARGV[2]).
# -1: it has been rescued too often; the caller fails it as poison.
_RESCUE_LUA = _READ_JOB + """
local status = redis.call('HGET', KEYS[3], 'status')
if status == 'started' then return 0 end
-- a planted value that is no count reads as 0, as in rescue_counts: the frame is rescued, and its claim fails it
local rescues = rescues_of(KEYS[3])
if rescues ~= tonumber(ARGV[2]) then return 0 end
if rescues >= tonumber(ARGV[3]) then return -1 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], 'vq_rescues', rescues + 1)
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
    """Block up to `timeout` s for one id, moved to the intermediate list as RQ's dequeue does.

    An entry that cannot be a job id (planted: not UTF-8, or outside RQ's alphabet) is taken off the
    intermediate list and logged, and None returned as for a timeout: nothing of it can be served.
    """
    value = conn.blmove(queue.key, queue.intermediate_queue_key, timeout)
    if value is None:
        return None
    job_id = job_id_text(value)
    if job_id is None:
        _drop_from_intermediate(conn, queue, value)
    return job_id


def _drop_from_intermediate(conn: Redis, queue: Queue, raw: bytes) -> None:
    """Take an entry that cannot be a job id off the intermediate list, and say so."""
    conn.lrem(queue.intermediate_queue_key, 1, raw)
    log.error("queue entry is not a job; dropped", job_id=shown_id(raw), reason=NOT_A_JOB_ID)


def shown_id(raw: bytes | str) -> str:
    """A queue entry as text for a log line or a reason, whatever bytes it holds."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    return text[:200]


def fetch_jobs(conn: Redis, ids: list[str], serializer: Any) -> list[FrameJob | Unreadable | None]:
    """The jobs behind `ids` (None: gone, e.g. its TTL ran out while queued), size-checked in Redis first."""
    if not ids:
        return []
    keys = [FrameJob.key_for(i) for i in ids]
    replies = _run(conn, _FETCH_LUA, keys, [MAX_DATA_BYTES, MAX_FIELD_BYTES, MAX_FIELDS])
    readable = [(job_id, reply) for job_id, reply in zip(ids, replies, strict=True)
                if reply != 0 and not isinstance(reply, bytes | str)]
    restored = dict(zip([job_id for job_id, _ in readable], _restore_all(conn, readable, serializer), strict=True))
    jobs: list[FrameJob | Unreadable | None] = []
    for job_id, reply in zip(ids, replies, strict=True):
        if reply == 0:
            jobs.append(None)
        elif isinstance(reply, bytes | str):
            jobs.append(Unreadable(job_id, as_text(reply)))
        else:
            jobs.append(restored[job_id])
    return jobs


def _restore_all(conn: Redis, hashes: list[tuple[str, list[bytes]]], serializer: Any) -> list[FrameJob]:
    """Jobs from (id, fields) as the scripts return them, a large `data` left out there and read here.

    The scripts checked each image's size and left a large one in Redis (moving it through Lua costs
    more than the rest of a claim); one pipelined HGET reads those. An image replaced in between by an
    oversized one is read once, then refused by FrameJob.restore's own size check; one deleted in
    between restores as a job with no data: both fail their frame alone.
    """
    fields = [dict(zip(flat[::2], flat[1::2], strict=True)) for _, flat in hashes]
    missing = [i for i, f in enumerate(fields) if b"data" not in f]
    if missing:
        with conn.pipeline(transaction=False) as pipe:
            for i in missing:
                pipe.hget(FrameJob.key_for(hashes[i][0]), "data")
            for i, image in zip(missing, pipe.execute(), strict=True):
                if image is not None:
                    fields[i][b"data"] = image
    jobs = []
    for (job_id, _), found in zip(hashes, fields, strict=True):
        job = FrameJob(job_id, connection=conn, serializer=serializer)
        job.restore(found)
        jobs.append(job)
    return jobs


_SCRIPTS: dict[str, Script] = {}


def _run(conn: Any, source: str, keys: list[Any], args: list[Any]) -> Any:
    """EVALSHA of `source` (loaded on first use, and again after a restart or SCRIPT FLUSH)."""
    script = _SCRIPTS.get(source)
    if script is None:
        script = _SCRIPTS[source] = Script(conn, source)
    return script(keys=keys, args=args, client=conn)


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
EXECUTION_PREFIX = f"{RQ_KEY_PREFIX}:execution:"
CLAIM_KEY_TEMPLATE = f"{RQ_KEY_PREFIX}:worker:{{}}:vq-claim"  # the last claim: its token and what it took
EXECUTIONS_PREFIX = ExecutionRegistry.key_template.format("")
RESULTS_PREFIX = Result.get_key("")
# The forbidden names that are real hash fields ("dependents" stands for the separate set).
_FORBIDDEN = [name for name in FORBIDDEN_FIELDS if name != "dependents"]


@dataclass
class Claims:
    """What one claim call took: the claimed frames, and the ids it let go and why."""

    claimed: list[tuple[FrameJob, str]] = field(default_factory=list)  # (job, execution id)
    duplicates: int = 0  # already ended (at-least-once: not run again)
    gone: int = 0  # no job hash (its TTL ran out while queued)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id, why): not a job at all


def _stamp() -> tuple[str, str, int]:
    """Now as RQ writes it: ISO text (job hash), float seconds (execution, result), whole seconds (scores)."""
    stamp = now()
    return utcformat(stamp), repr(stamp.timestamp()), current_timestamp()


def claim_token() -> str:
    """A token for one claim, kept across its retries (`claim_batch`): the prefix of its execution ids."""
    return uuid4().hex[:28]


def claim_batch(conn: Redis, queue: Queue, worker_name: str, held: list[str], want: int, ttl: int,
                serializer: Any, token: str | None = None) -> Claims:
    """Claim `held` (ids this worker moved to the intermediate list) and up to `want` more off the queue.

    Called again with the same `token` (from `claim_token`) after an error, it answers with what the
    first call claimed, if that call ran (its reply lost), and claims afresh if it did not.
    """
    iso, ts, whole = _stamp()
    keys = [queue.key, queue.intermediate_queue_key, queue.started_job_registry.key,
            WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name), CLAIM_KEY_TEMPLATE.format(worker_name)]
    args = [worker_name, iso, ts, whole, ttl, token or claim_token(), want, MAX_DATA_BYTES, MAX_FIELD_BYTES, MAX_FIELDS,
            FrameJob.redis_job_namespace_prefix, EXECUTION_PREFIX, EXECUTIONS_PREFIX, len(_FORBIDDEN), *_FORBIDDEN,
            *held]
    claims = Claims()
    replies = _run(conn, _CLAIM_LUA, keys, args)
    readable = [(as_text(reply[0]), reply[3]) for reply in replies if reply[1] == 3]
    restored = iter(_restore_all(conn, readable, serializer))
    for reply in replies:
        # Codes 3 and 4 carry ids the script checked (RQ's alphabet): used as ids, whole. Code 2 may carry
        # anything a producer pushed: shown, cut short, never used as an id.
        code = reply[1]
        job_id = shown_id(reply[0]) if code == 2 else as_text(reply[0])
        if code == 0:
            claims.gone += 1
        elif code == 1:
            claims.duplicates += 1
        elif code == 2:
            claims.dropped.append((job_id, as_text(reply[2])))
        elif code == 3:
            claims.claimed.append((next(restored), as_text(reply[2])))
        else:
            job = placeholder(conn, job_id, queue, serializer)
            job.defects.append(as_text(reply[3]))
            claims.claimed.append((job, as_text(reply[2])))
    return claims


def renew_leases(conn: Redis, queue: Queue, held: list[tuple[str, str]], ttl: int) -> None:
    """Extend the leases of (job id, execution id) pairs in hand by `ttl` s."""
    if not held:
        return
    _, ts, whole = _stamp()
    args: list[Any] = [EXECUTION_PREFIX, EXECUTIONS_PREFIX, ts, whole, ttl]
    for pair in held:
        args += pair
    _run(conn, _RENEW_LUA, [queue.started_job_registry.key], args)


# -- recording ----------------------------------------------------------------------------------
@dataclass
class Record:
    """One frame's outcome, ready for `record_batch` (see `_RECORD_LUA` for the kinds)."""

    kind: str
    job_id: str
    execution_id: str = ""  # "" when no execution holds it (a frame failed off the intermediate list)
    ttl: int = 0
    started_at: str = ""
    payload: str = ""
    exc_info: bytes = b""
    stream: dict[str, str] | None = None
    keep_data: bytes = b""  # "ok" only: the job's data from now on, in place of the frame with its image

    @classmethod
    def success(cls, job: FrameJob, execution_id: str, started_at: str, result: dict[str, Any], result_ttl: int,
                stream: dict[str, str] | None, keep_data: bytes = b"") -> Record:
        # As RQ's Result.serialize writes a return value: the job's serializer, then base64.
        return cls("ok", job.id, execution_id, result_ttl, started_at,
                   b64encode(job.serializer.dumps(result)).decode(), b"", stream, keep_data)

    @classmethod
    def failure(cls, job: FrameJob, execution_id: str, started_at: str, reason: str,
                stream: dict[str, str] | None) -> Record:
        packed = zlib.compress(reason.encode())
        # RQ's year for a job that set none; ours for one whose hash could not be read (it may be huge)
        ttl = job.failure_ttl if job.failure_ttl is not None else FAILURE_TTL if job.defects else DEFAULT_FAILURE_TTL
        return cls("fail", job.id, execution_id, ttl, started_at, b64encode(packed).decode(), packed, stream)

    @classmethod
    def retry(cls, job: FrameJob, execution_id: str) -> Record:
        return cls("retry", job.id, execution_id, payload=str(max(0, (job.retries_left or 1) - 1)))

    @classmethod
    def rescue(cls, job_id: str, execution_id: str) -> Record:
        return cls("rescue", job_id, execution_id)

    def args(self) -> list[Any]:
        fields = self.stream or {}
        out: list[Any] = [self.kind, self.job_id, self.execution_id, self.ttl, self.started_at, self.payload,
                          self.exc_info, self.keep_data, len(fields)]
        for name, value in fields.items():
            out += (name, value)
        return out


def record_batch(conn: Redis, queue: Queue, worker_name: str, records: list[Record],
                 attempt: int = 1, stream: str = "", stream_maxlen: int = 0, working_s: float = 0.0,
                 count: bool = True) -> tuple[list[str], int]:
    """Write every record in one call. Per record: 'w' written, 'dup' / 'mine' already ended, 'gone'
    (no job hash), 'raced' (a rescue of a frame no longer started), or 'error: ...'; and the
    number of entries trimmed off `stream`. `count`: add to the worker's RQ counters (not for a
    frame recovered on behalf of a dead worker)."""
    iso, ts, whole = _stamp()
    keys = [queue.key, queue.intermediate_queue_key, queue.started_job_registry.key,
            FinishedJobRegistry(queue.name, connection=conn).key, FailedJobRegistry(queue.name, connection=conn).key,
            Worker.redis_worker_namespace_prefix + worker_name, WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name),
            stream or "-",
            Queue.redis_queues_keys]
    args: list[Any] = [worker_name, iso, ts, whole, stream_maxlen if stream else 0, attempt, repr(working_s),
                       FrameJob.redis_job_namespace_prefix, EXECUTION_PREFIX, EXECUTIONS_PREFIX, RESULTS_PREFIX,
                       int(count), len(_FORBIDDEN), *_FORBIDDEN]
    for record in records:
        args += record.args()
    replies = _run(conn, _RECORD_LUA, keys, args)
    return [as_text(r) for r in replies[:-1]], int(replies[-1])


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


# -- recovery of frames whose worker died -------------------------------------------------------
def intermediate_ids(conn: Redis, queue: Queue) -> list[str]:
    """The ids on the intermediate list; an entry that cannot be a job id is taken off it and logged
    (it would otherwise stop every sweep that meets it, and the frames behind it would stay stranded)."""
    ids = []
    for raw in conn.lrange(queue.intermediate_queue_key, 0, -1):
        job_id = job_id_text(raw)
        if job_id is None:
            _drop_from_intermediate(conn, queue, raw)
        else:
            ids.append(job_id)
    return ids


def rescue_counts(conn: Redis, ids: list[str]) -> list[int]:
    """Each job's `vq_rescues`; a planted value that is no count reads as 0 (its claim then fails the frame
    with the defect named, where this sweep could only stop)."""
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(FrameJob.key_for(job_id), "vq_rescues")
        return [_count(x) for x in pipe.execute()]


def _count(raw: bytes | None) -> int:
    return int(raw) if raw and raw.isdigit() else 0  # as the rescue script reads it


def rescue_from_intermediate(conn: Redis, queue: Queue, job_id: str, seen_rescues: int, max_rescues: int) -> int:
    """1: back on the queue; 0: not stale after all; -1: rescued too often (fail it with `fail_poison`)."""
    keys = [queue.intermediate_queue_key, queue.key, FrameJob.key_for(job_id)]
    return int(conn.eval(_RESCUE_LUA, len(keys), *keys, job_id, seen_rescues, max_rescues))


def live_executions(conn: Redis, job_id: str) -> set[str]:
    """Ids of the job's executions whose lease has not run out."""
    key = ExecutionRegistry(job_id=job_id, connection=conn).key
    return {as_text(m) for m in conn.zrangebyscore(key, current_timestamp(), "+inf")}


def expired_executions(conn: Redis, queue: Queue) -> list[tuple[str, str]]:
    """(job id, execution id) of every lease in the started registry that ran out. A member that is no
    `job id:execution id` (planted) is taken out of the registry and logged: it names no frame to recover."""
    found = []
    for member in conn.zrangebyscore(queue.started_job_registry.key, 0, current_timestamp()):
        parts = _execution_parts(member)
        if parts is None:
            conn.zrem(queue.started_job_registry.key, member)
            log.error("started registry entry names no frame; dropped", entry=shown_id(member))
        else:
            found.append(parts)
    return found


def _execution_parts(member: bytes) -> tuple[str, str] | None:
    try:
        job_id, execution_id = parse_composite_key(member.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return (job_id, execution_id) if job_id_text(job_id) is not None else None


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


# -- the worker's own registration --------------------------------------------------------------
def is_registered(conn: Redis, worker: Worker) -> bool:
    """Whether `rq info` (and an autoscaler counting a queue's workers) lists `worker` as RQ registered it:
    in RQ's set of workers and in each of its queues' sets, its hash whole.

    The sets have no TTL and the hash has one: a Redis restarted from its AOF after the hash expired
    still lists the worker, and a heartbeat since has left a hash of one field."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.sismember(REDIS_WORKER_KEYS, worker.key)
        for name in worker.queue_names():
            pipe.sismember(WORKERS_BY_QUEUE_KEY % name, worker.key)
        pipe.hexists(worker.key, "birth")
        return all(pipe.execute())


def register_again(worker: Worker, state: str) -> None:
    """What RQ's register_birth writes, with the worker's state, in one transaction: RQ's own would take
    the hash a heartbeat left since the loss for a live namesake, and a heartbeat can land between its
    check and its write."""
    worker.birth_date = worker.last_heartbeat = now()
    with worker.connection.pipeline() as pipe:
        pipe.delete(worker.key)
        pipe.hset(worker.key, mapping={**worker.serialize(), "state": state})
        register_worker(worker, pipe)
        pipe.expire(worker.key, worker.worker_ttl + 60)
        pipe.execute()
