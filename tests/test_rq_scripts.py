"""The claim and record scripts write exactly what RQ's own worker writes, and fail one job at a time.

Everything is read back through RQ's own API (Job, Execution, registries, Result), on a real
redis-server.
"""

from __future__ import annotations

import pytest
from helpers import jpeg
from redis import Redis
from redis.exceptions import OutOfMemoryError
from rq.executions import Execution
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.worker import Worker

from worker import rq_internals as rq
from worker.frames import make_frame
from worker.jobs import FAILURE_TTL, RESULTS_STREAM, FrameJob, FrameQueue, enqueue_frames
from worker.redis_health import is_transient
from worker.serializer import MsgpackSerializer


def _queue(conn: Redis, n: int) -> tuple[FrameQueue, list[str]]:
    queue = FrameQueue(connection=conn)
    jobs = enqueue_frames(queue, [make_frame(jpeg(16, 16, seed=i), station="s", seq=i) for i in range(n)])
    return queue, [j.id for j in jobs]


def _fetch(conn: Redis, job_id: str) -> FrameJob:
    return FrameJob.fetch(job_id, connection=conn, serializer=MsgpackSerializer)


def test_a_claim_marks_each_job_started_as_rq_would(redis_conn):
    queue, ids = _queue(redis_conn, 3)
    held = rq.wait_for_id(redis_conn, queue, 1)
    claims = rq.claim_batch(redis_conn, queue, "w1", [held], 5, 30, MsgpackSerializer)
    assert [job.id for job, _ in claims.claimed] == ids
    assert redis_conn.llen(queue.key) == 0 and redis_conn.llen(queue.intermediate_queue_key) == 0
    started = StartedJobRegistry(queue.name, connection=redis_conn)
    assert sorted(started.get_job_ids(cleanup=False)) == sorted(ids)
    for job, execution_id in claims.claimed:
        fresh = _fetch(redis_conn, job.id)
        assert fresh.get_status() == JobStatus.STARTED and fresh.worker_name == "w1"
        execution = Execution.fetch(execution_id, job.id, connection=redis_conn)
        assert execution.worker_name == "w1"
        assert redis_conn.ttl(execution.key) > 0 and redis_conn.ttl(job.key) == -1  # leased; the job persists
        assert [e.id for e in fresh.get_executions()] == [execution_id]
    assert len(redis_conn.smembers("rq:worker:w1:executions")) == 3


def test_a_record_writes_results_and_registries_that_rq_reads(redis_conn):
    queue, _ = _queue(redis_conn, 3)
    claims = rq.claim_batch(redis_conn, queue, "w1", [], 3, 30, MsgpackSerializer)
    (ok, eid_ok), (bad, eid_bad), (retry, eid_retry) = claims.claimed
    records = [rq.Record.success(ok, eid_ok, "1764330000.5", {"label": "scratch"}, 300, {"status": "ok"}),
               rq.Record.failure(bad, eid_bad, "1764330000.5", "FrameError: truncated", {"status": "failed"}),
               rq.Record.retry(retry, eid_retry)]
    codes, trimmed = rq.record_batch(redis_conn, queue, "w1", records, stream=RESULTS_STREAM, stream_maxlen=1000)
    assert codes == ["w", "w", "w"] and trimmed == 0

    done = _fetch(redis_conn, ok.id)
    assert done.get_status() == JobStatus.FINISHED and done.return_value() == {"label": "scratch"}
    assert done.latest_result().execution_id == eid_ok and 0 < redis_conn.ttl(done.key) <= 300
    assert FinishedJobRegistry(queue.name, connection=redis_conn).get_job_ids() == [ok.id]

    failed = _fetch(redis_conn, bad.id)
    assert failed.get_status() == JobStatus.FAILED
    assert failed.latest_result().exc_string == "FrameError: truncated"
    assert FailedJobRegistry(queue.name, connection=redis_conn).get_job_ids() == [bad.id]

    again = _fetch(redis_conn, retry.id)
    assert again.get_status() == JobStatus.QUEUED and again.retries_left == retry.retries_left - 1
    assert redis_conn.lrange(queue.key, 0, -1) == [retry.id.encode()]

    assert StartedJobRegistry(queue.name, connection=redis_conn).get_job_ids(cleanup=False) == []
    assert redis_conn.keys("rq:execution:*") == [] and redis_conn.smembers("rq:worker:w1:executions") == set()
    assert redis_conn.xlen(RESULTS_STREAM) == 2  # the retried frame goes on the stream when it ends
    worker = Worker.find_by_key("rq:worker:w1", connection=redis_conn)
    assert worker is None or (worker.successful_job_count, worker.failed_job_count) == (1, 1)
    assert redis_conn.hget("rq:worker:w1", "successful_job_count") == b"1"


def test_a_finished_frame_can_keep_its_job_without_its_image(redis_conn):
    queue, _ = _queue(redis_conn, 2)
    claims = rq.claim_batch(redis_conn, queue, "w1", [], 2, 30, MsgpackSerializer)
    (dropped, eid_dropped), (kept, eid_kept) = claims.claimed
    image = kept.args[0]["image"]
    records = [rq.Record.success(dropped, eid_dropped, "1.0", {"label": "a"}, 300, None,
                                 dropped.data_without_image()),
               rq.Record.success(kept, eid_kept, "1.0", {"label": "a"}, 300, None)]
    assert rq.record_batch(redis_conn, queue, "w1", records)[0] == ["w", "w"]
    light = _fetch(redis_conn, dropped.id)
    assert light.args[0] == {**dropped.args[0], "image": b""} and light.func_name == dropped.func_name
    assert light.return_value() == {"label": "a"} and light.get_status() == JobStatus.FINISHED
    assert int(redis_conn.hget(light.key, "vq_image_dropped_bytes")) == len(dropped.data) - len(
        dropped.data_without_image())
    assert redis_conn.hstrlen(light.key, "data") == len(dropped.data_without_image()) < len(image)
    assert _fetch(redis_conn, kept.id).args[0]["image"] == image


def test_a_frame_that_already_ended_is_never_written_again(redis_conn):
    queue, _ = _queue(redis_conn, 1)
    [(job, eid)] = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer).claimed
    record = rq.Record.success(job, eid, "1.0", {"label": "a"}, 300, {"status": "ok"})
    assert rq.record_batch(redis_conn, queue, "w1", [record], stream=RESULTS_STREAM)[0] == ["w"]
    # the same batch again after a lost reply: this worker's own write
    assert rq.record_batch(redis_conn, queue, "w1", [record], attempt=2, stream=RESULTS_STREAM)[0] == ["mine"]
    # another run of the frame (rescued while the first was slow) ends as a duplicate
    other = rq.Record.failure(job, "", "1.0", "WorkerError: late", {"status": "failed"})
    assert rq.record_batch(redis_conn, queue, "w2", [other], stream=RESULTS_STREAM)[0] == ["dup"]
    assert _fetch(redis_conn, job.id).get_status() == JobStatus.FINISHED
    assert redis_conn.xlen(RESULTS_STREAM) == 1
    # ... and a claim lets an ended frame go instead of running it twice
    queue.connection.lpush(queue.key, job.id)
    claims = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer)
    assert claims.duplicates == 1 and not claims.claimed


def test_a_claim_retried_after_its_reply_was_lost_answers_with_the_same_frames(redis_conn):
    queue, ids = _queue(redis_conn, 5)
    token = rq.claim_token()
    first = rq.claim_batch(redis_conn, queue, "w1", [], 2, 30, MsgpackSerializer, token)
    # The reply is lost (a dropped connection); the worker calls again with the same token.
    again = rq.claim_batch(redis_conn, queue, "w1", [], 2, 30, MsgpackSerializer, token)
    assert [(j.id, e) for j, e in again.claimed] == [(j.id, e) for j, e in first.claimed] != []
    assert [j.id for j, _ in again.claimed] == ids[:2] and again.claimed[0][0].data == first.claimed[0][0].data
    assert redis_conn.llen(queue.key) == 3  # nothing more taken
    started = StartedJobRegistry(queue.name, connection=redis_conn)
    assert sorted(started.get_job_ids(cleanup=False)) == sorted(ids[:2])
    nxt = rq.claim_batch(redis_conn, queue, "w1", [], 5, 30, MsgpackSerializer, rq.claim_token())
    assert [j.id for j, _ in nxt.claimed] == ids[2:]  # a new claim takes what is left


def test_gone_and_not_a_job_ids_are_let_go_and_counted(redis_conn):
    queue, [real] = _queue(redis_conn, 1)
    redis_conn.rpush(queue.key, "vanished", "planted")
    redis_conn.set(FrameJob.key_for("planted"), "a string, not a hash")
    claims = rq.claim_batch(redis_conn, queue, "w1", [], 10, 30, MsgpackSerializer)
    assert [j.id for j, _ in claims.claimed] == [real] and claims.gone == 1
    assert claims.dropped == [("planted", "the job key holds a string, not a hash")]
    assert redis_conn.llen(queue.intermediate_queue_key) == 0


def test_queue_entries_that_cannot_be_job_ids_are_dropped_and_the_batch_is_served(redis_conn):
    # Anyone who may push frames can push these: not UTF-8, a ':' (it would split execution keys),
    # a space, an empty entry; the ':' and space ones even with a job hash behind them.
    queue, ids = _queue(redis_conn, 4)
    planted = [b"\xff\xfe-bad", b"a:b", b"a b", b""]
    for raw in planted[1:3]:
        redis_conn.hset(b"rq:job:" + raw, mapping={"status": "queued", "data": b"x"})
    redis_conn.delete(queue.key)
    redis_conn.rpush(queue.key, ids[0], ids[1], *planted, ids[2], ids[3])
    held = rq.wait_for_id(redis_conn, queue, 1)
    claims = rq.claim_batch(redis_conn, queue, "w1", [held], 10, 30, MsgpackSerializer)
    assert [job.id for job, _ in claims.claimed] == ids
    not_an_id = "the queue entry is not a job id (letters, digits, _ and - only)"
    assert [reason for _, reason in claims.dropped] == [not_an_id] * 4
    assert [job_id for job_id, _ in claims.dropped] == ["\\xff\\xfe-bad", "a:b", "a b", ""]
    assert redis_conn.llen(queue.intermediate_queue_key) == 0 and redis_conn.llen(queue.key) == 0
    started = StartedJobRegistry(queue.name, connection=redis_conn)
    assert sorted(started.get_job_ids(cleanup=False)) == sorted(ids)  # no execution key with a stray ':'


def test_a_planted_entry_met_by_the_blocking_wait_or_a_sweep_is_dropped_there(redis_conn):
    queue = FrameQueue(connection=redis_conn)
    redis_conn.rpush(queue.key, b"\xff-idle")
    assert rq.wait_for_id(redis_conn, queue, 1) is None  # as a timeout: nothing to serve
    assert redis_conn.llen(queue.intermediate_queue_key) == 0
    _, [stranded] = _queue(redis_conn, 1)
    redis_conn.delete(queue.key)
    redis_conn.rpush(queue.intermediate_queue_key, b"\xfe-left", stranded, b"x:y")
    redis_conn.hset(FrameJob.key_for(stranded), "vq_rescues", "abc")  # planted: not a count
    assert rq.intermediate_ids(redis_conn, queue) == [stranded]
    assert redis_conn.lrange(queue.intermediate_queue_key, 0, -1) == [stranded.encode()]
    assert rq.rescue_counts(redis_conn, [stranded]) == [0]
    assert rq.rescue_from_intermediate(redis_conn, queue, stranded, 0, 3) == 1  # back on the queue
    assert redis_conn.lrange(queue.key, 0, -1) == [stranded.encode()]
    assert redis_conn.hget(FrameJob.key_for(stranded), "vq_rescues") == b"1"
    registry = queue.started_job_registry.key
    redis_conn.zadd(registry, {b"a:b:c": 1, b"\xff:e1": 1, f"{stranded}:e1": 1})
    assert rq.expired_executions(redis_conn, queue) == [(stranded, "e1")]
    assert redis_conn.zrange(registry, 0, -1) == [f"{stranded}:e1".encode()]


def test_a_planted_key_of_the_wrong_type_fails_its_own_job_only(redis_conn):
    queue, ids = _queue(redis_conn, 3)
    redis_conn.set(f"rq:executions:{ids[1]}", "planted")  # ZADD on it will fail
    claims = rq.claim_batch(redis_conn, queue, "w1", [], 3, 30, MsgpackSerializer)
    defects = {job.id: job.defects for job, _ in claims.claimed}
    assert defects[ids[0]] == [] and defects[ids[2]] == []
    assert "could not be marked started" in defects[ids[1]][0] and "WRONGTYPE" in defects[ids[1]][0]
    records = [rq.Record.failure(j, e, "1.0", f"FrameError: {j.defects[0]}", None) if j.defects
               else rq.Record.success(j, e, "1.0", {"label": "a"}, 300, None) for j, e in claims.claimed]
    assert rq.record_batch(redis_conn, queue, "w1", records)[0] == ["w", "w", "w"]
    assert [_fetch(redis_conn, i).get_status() for i in ids] == [JobStatus.FINISHED, JobStatus.FAILED,
                                                                 JobStatus.FINISHED]


def test_an_oversized_job_hash_is_claimed_with_its_defect_and_never_fetched(redis_conn):
    queue, [job_id] = _queue(redis_conn, 1)
    redis_conn.hset(FrameJob.key_for(job_id), "description", "x" * 70_000)
    [(job, _)] = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer).claimed
    assert job.defects == ["job hash field description is 70000 bytes (limit 65536)"]
    assert job.data == b""
    # Its own failure_ttl cannot be read: ours bounds how long its (maybe huge) hash stays, not RQ's year.
    assert rq.Record.failure(job, "e", "0", "defect", None).ttl == FAILURE_TTL


@pytest.mark.parametrize("value", [b"99999999999999999999", b"-5", b"ten"])
def test_a_planted_ttl_is_a_defect_of_its_own_frame(redis_conn, value):
    queue, [job_id] = _queue(redis_conn, 1)
    redis_conn.hset(FrameJob.key_for(job_id), "result_ttl", value)
    [(job, _)] = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer).claimed
    assert job.defects == [f"job hash field result_ttl={value!r} cannot be read"]
    assert rq.Record.failure(job, "e", "0", "defect", None).ttl == FAILURE_TTL


def test_an_oversized_image_is_refused_by_the_claim_without_being_read(redis_conn):
    from worker.jobs import MAX_DATA_BYTES

    queue, [job_id] = _queue(redis_conn, 1)
    redis_conn.hset(FrameJob.key_for(job_id), "data", b"\xff" * (MAX_DATA_BYTES + 1))
    [(job, _)] = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer).claimed
    assert job.defects == [f"job hash field data is {MAX_DATA_BYTES + 1} bytes (limit {MAX_DATA_BYTES})"]
    assert job.data == b""


def test_an_image_changed_after_the_claim_checked_it_fails_its_own_frame(redis_conn):
    """The claim checks each image's size in Redis and reads it afterwards: what changes in between is
    still caught, on this frame alone."""
    from worker.jobs import MAX_DATA_BYTES

    _, ids = _queue(redis_conn, 3)
    hashes = [(job_id, [b"status", b"started", b"origin", b"inference"]) for job_id in ids]
    redis_conn.hdel(FrameJob.key_for(ids[0]), "data")
    redis_conn.hset(FrameJob.key_for(ids[1]), "data", b"\xff" * (MAX_DATA_BYTES + 1))
    gone, huge, fine = rq._restore_all(redis_conn, hashes, MsgpackSerializer)
    assert gone.defects == ["the job hash has no data"]
    assert huge.defects == [f"job data is {MAX_DATA_BYTES + 1} bytes, over the limit of {MAX_DATA_BYTES}"]
    assert fine.defects == [] and fine.args[0]["id"] == ids[2]


@pytest.mark.parametrize("script", ["claim", "record"])
def test_a_full_redis_fails_the_whole_call_transiently_and_writes_nothing(redis_conn, script):
    queue, ids = _queue(redis_conn, 2)
    held = rq.wait_for_id(redis_conn, queue, 1)
    claims = None
    if script == "record":
        claims = rq.claim_batch(redis_conn, queue, "w1", [held], 1, 30, MsgpackSerializer)
    redis_conn.set("filler", "x" * 200_000)
    redis_conn.config_set("maxmemory", 100_000)
    try:
        with pytest.raises(OutOfMemoryError) as caught:
            if claims is None:
                rq.claim_batch(redis_conn, queue, "w1", [held], 0, 30, MsgpackSerializer)
            else:
                rq.record_batch(redis_conn, queue, "w1", [rq.Record.success(j, e, "1.0", {"label": "a"}, 300, None)
                                                          for j, e in claims.claimed])
    finally:
        redis_conn.config_set("maxmemory", 0)
    assert is_transient(caught.value)
    expected = JobStatus.QUEUED if claims is None else JobStatus.STARTED
    assert {_fetch(redis_conn, i).get_status() for i in (ids[0],)} == {expected}
    if claims is None:
        assert redis_conn.lrange(queue.intermediate_queue_key, 0, -1) == [held.encode()]


def test_a_transaction_redis_refuses_when_full_is_transient_too(redis_conn):
    """RQ's own MULTI calls (is_suspended, on every turn of the work loop) fail under OOM: as the
    queued command's OutOfMemoryError, or, when Redis refuses the EXEC itself, as ExecAbortError
    "Transaction discarded because of: OOM …" (the message a chaos soak's worker quit on). Both wait."""
    from redis.exceptions import ExecAbortError, RedisError
    from rq.suspension import is_suspended

    redis_conn.set("filler", "x" * 200_000)
    redis_conn.config_set("maxmemory", 100_000)
    try:
        with pytest.raises(RedisError) as caught:
            is_suspended(redis_conn)
    finally:
        redis_conn.config_set("maxmemory", 0)
    assert is_transient(caught.value)
    seen = ExecAbortError("Transaction discarded because of: OOM command not allowed when used memory > 'maxmemory'.")
    assert is_transient(seen)
    assert not is_transient(ExecAbortError("Transaction discarded because of: ERR unknown command 'FOO'"))
    assert not is_transient(ExecAbortError("Transaction discarded because of previous errors."))


def test_a_fault_met_inside_a_script_is_transient_and_a_scripts_own_error_is_not():
    """The reply a claim got in CI when a FAILOVER demoted Redis around it: the worker must wait, not quit."""
    from redis.exceptions import ResponseError

    seen = ("Error running script (call to f_69cc3299162e1171c1f4ca4dff0ac82d64860a1d): @user_script:76: "
            "@user_script: 76: -READONLY You can't write against a read only replica.")
    assert is_transient(ResponseError(seen))
    assert is_transient(ResponseError(seen.replace("-READONLY You can't write against a read only replica.",
                                                   "-OOM command not allowed when used memory > 'maxmemory'.")))
    assert not is_transient(ResponseError("Error running script (call to f_69cc): @user_script:12: "
                                          "@user_script: 12: -WRONGTYPE Operation against a key holding the wrong "
                                          "kind of value"))
    assert not is_transient(ResponseError("Error running script (call to f_69cc): @user_script:3: user_script:3: "
                                          "attempt to compare nil with number"))


def test_leases_are_renewed_only_where_they_still_exist(redis_conn):
    queue, _ = _queue(redis_conn, 2)
    claims = rq.claim_batch(redis_conn, queue, "w1", [], 2, 5, MsgpackSerializer)
    (a, ea), (b, eb) = claims.claimed
    started = StartedJobRegistry(queue.name, connection=redis_conn)
    redis_conn.zrem(started.key, f"{b.id}:{eb}")  # recovery took this one back
    before = redis_conn.zscore(started.key, f"{a.id}:{ea}")
    rq.renew_leases(redis_conn, queue, [(a.id, ea), (b.id, eb)], 600)
    assert redis_conn.zscore(started.key, f"{a.id}:{ea}") > before + 500
    assert redis_conn.zscore(started.key, f"{b.id}:{eb}") is None


def test_a_late_retry_of_a_claim_does_not_take_back_what_recovery_gave_another_worker(redis_conn):
    queue, [job_id] = _queue(redis_conn, 1)
    token = rq.claim_token()
    [(_, eid)] = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer, token).claimed
    # w1's reply is lost and its retry comes late: meanwhile its lease ran out, recovery put the frame
    # back, and w2 claimed it.
    rq.record_batch(redis_conn, queue, "w1", [rq.Record.rescue(job_id, eid)], stream=RESULTS_STREAM,
                    stream_maxlen=1000)
    assert len(rq.claim_batch(redis_conn, queue, "w2", [], 1, 30, MsgpackSerializer).claimed) == 1
    late = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer, token)
    assert late.claimed == [] and late.duplicates == 1  # not run a second time by w1
    assert _fetch(redis_conn, job_id).worker_name == "w2"
    redis_conn.set("rq:worker:w3:vq-claim", "planted")  # not a hash: cleared, never a stopped worker
    assert rq.claim_batch(redis_conn, queue, "w3", [], 1, 30, MsgpackSerializer).claimed == []


def test_an_unreadable_job_with_a_long_id_is_failed_under_its_whole_id(redis_conn):
    queue = FrameQueue(connection=redis_conn)
    long_id = "x" * 300
    redis_conn.hset(FrameJob.key_for(long_id), mapping={"status": "queued", "description": "d" * 70_000})
    redis_conn.rpush(queue.key, long_id)
    [(job, _)] = rq.claim_batch(redis_conn, queue, "w1", [], 1, 30, MsgpackSerializer).claimed
    assert job.id == long_id and job.defects
