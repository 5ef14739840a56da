"""The chaos harness itself: poison corpus, Redis faults, reconciliation, and a short soak.

The soak (`test_short_soak_loses_nothing`) runs `python -m deploy.chaos` for a minute with a
fault every 12 s against real worker processes; it is marked slow (about 3 minutes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import msgpack
import pytest
from conftest import wait_for
from redis import Redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from rq.job import JobStatus
from rq.results import Result

from deploy.chaos import (
    Accepted,
    JobState,
    Observed,
    classify,
    latency_windows,
    locate,
    parse_metrics,
    read_states,
    reason_key,
    reconcile,
    render_table,
    stream_duplicates,
)
from deploy.faults import RedisFaults
from deploy.poison import DELETE, PlantContext, all_poisons, by_name, frame_poisons, hash_poisons, plant
from worker.frames import make_frame
from worker.jobs import FrameQueue, enqueue_frames
from worker.redis_health import is_transient
from worker.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]


# -- the poison corpus ------------------------------------------------------------------------
def test_poison_corpus_is_self_consistent():
    poisons = all_poisons()
    names = [p.name for p in poisons]
    assert len(names) == len(set(names)), "poison names must be unique"
    assert by_name().keys() == set(names)
    assert {p.kind for p in frame_poisons()} == {"frame"} and {p.kind for p in hash_poisons()} == {"hash"}
    for p in poisons:
        re.compile(p.expect)
        assert p.why and p.expect, p.name
        assert (p.call is not None) == (p.kind == "frame"), p.name
        assert p.kind == "frame" or p.fields is not None or p.sidecar is not None, p.name
        assert not p.matches(None) and not p.matches("")
    # Every field of the frame and the named job-hash fields are covered.
    covered = " ".join(names)
    for field in ("deadline", "ts_", "seq_", "station_", "id_", "version_", "image_", "meta_", "args_", "kwargs_",
                  "func_", "created_at", "status_", "data_", "exc_info", "timeout", "result_ttl", "retries_left",
                  "success_callback", "failure_callback", "stopped_callback", "webhooks", "dependency_ids",
                  "dependents", "repeats"):
        assert field in covered, field


def test_every_poison_plants_and_reads_back(redis_conn: Redis):
    for poison in all_poisons():
        job_id = plant(redis_conn, "inference", poison, webhook_url="http://127.0.0.1:9")
        raw = redis_conn.hgetall(f"rq:job:{job_id}")
        assert raw, poison.name
        assert redis_conn.lpos("rq:queue:inference", job_id) is not None, poison.name
        if poison.kind == "frame":
            func, args, kwargs = poison.call(job_id)
            # Plain msgpack, no limits: the worker's serializer is meant to refuse some of these.
            stored_func, _, stored_args, stored_kwargs = msgpack.unpackb(raw[b"data"], raw=False,
                                                                         strict_map_key=False)
            assert stored_func == func, poison.name
            assert len(stored_args) == len(args) and sorted(stored_kwargs) == sorted(kwargs), poison.name
        else:
            ctx = PlantContext(job_id, "inference", "http://127.0.0.1:9")
            for key, value in (poison.fields(ctx) if poison.fields else {}).items():
                if value is DELETE:
                    assert key.encode() not in raw, (poison.name, key)
                else:
                    stored = raw[key.encode()]
                    want = value if isinstance(value, bytes) else str(value).encode()
                    assert stored == want, (poison.name, key)
            if poison.name == "dependents":
                assert redis_conn.smembers(f"rq:job:{job_id}:dependents") == {ctx.canary_id.encode()}
                assert redis_conn.hget(f"rq:job:{ctx.canary_id}", "status") == b"deferred"
    assert redis_conn.llen("rq:queue:inference") == len(all_poisons())


def test_poison_matches_names_the_problem():
    poisons = by_name()
    assert poisons["deadline_str"].matches("FrameError: meta.deadline_s must be a number, got '2s'")
    assert not poisons["deadline_str"].matches("FrameError: image is empty")
    assert poisons["ts_nan"].matches("FrameError: ts=nan is not a finite number")
    assert not poisons["ts_nan"].matches("FrameError: frame has 2 arguments")
    assert poisons["webhooks"].matches("JobRejected: job carries webhooks, which frames may not")


# -- Redis faults -----------------------------------------------------------------------------
@pytest.fixture
def aof_server():
    with RedisServer(appendonly=True) as server:
        yield server


def test_kill9_and_restart_keeps_every_acknowledged_write(aof_server: RedisServer):
    conn = Redis.from_url(aof_server.url)
    for i in range(500):
        conn.set(f"k{i}", i)
    port, pid = aof_server.port, aof_server.proc.pid
    record = RedisFaults(aof_server).kill9_and_restart()
    assert aof_server.port == port and aof_server.proc.pid != pid
    assert record.detail["keys_before"] == record.detail["keys_after"] == 500
    assert conn.get("k499") == b"499"


def test_pause_blocks_every_client_for_the_window(aof_server: RedisServer):
    conn = Redis.from_url(aof_server.url, socket_timeout=20)
    conn.ping()
    took: list[float] = []

    def write() -> None:
        t0 = time.monotonic()
        conn.set("during", 1)
        took.append(time.monotonic() - t0)

    faults = RedisFaults(aof_server)
    with faults.paused(2.0) as record:
        thread = threading.Thread(target=write)
        thread.start()
    thread.join(10)
    assert took and took[0] >= 1.0, took
    assert record.duration_s >= 2.0
    assert conn.get("during") == b"1"


def test_oom_window_refuses_writes_then_recovers(aof_server: RedisServer):
    conn = Redis.from_url(aof_server.url)
    conn.set("before", 1)
    faults = RedisFaults(aof_server)
    with faults.oom(margin_bytes=16 * 1024), pytest.raises(OutOfMemoryError):
        for i in range(100):
            conn.set(f"fill{i}", b"x" * 4096)
    assert conn.config_get("maxmemory")["maxmemory"] == "0"
    conn.set("after", 1)
    assert conn.get("before") == b"1"


@pytest.mark.parametrize("via", ["failover", "replicaof"])
def test_readonly_window_refuses_writes_and_loses_no_data(aof_server: RedisServer, via: str):
    conn = Redis.from_url(aof_server.url)
    for i in range(300):
        conn.set(f"k{i}", i)
    conn.rpush("list", *range(50))
    faults = RedisFaults(aof_server)
    with faults.readonly(via=via):
        with pytest.raises(ReadOnlyError):
            conn.set("during", 1)
        assert conn.get("k7") == b"7"  # reads still work: a replica
    conn.set("after", 1)
    assert conn.dbsize() == 302
    assert conn.llen("list") == 50 and conn.get("k299") == b"299"
    assert conn.info("replication")["role"] == "master"


def test_a_full_disk_window_refuses_writes_with_misconf_and_heals(aof_server: RedisServer):
    conn = Redis.from_url(aof_server.url)
    conn.set("before", 1)
    with RedisFaults(aof_server).disk_full() as record:
        with pytest.raises(ResponseError) as caught:
            conn.set("during", 1)
        assert str(caught.value).startswith("MISCONF") and is_transient(caught.value)
        assert conn.get("before") == b"1"
    assert conn.set("after", 1) and record.detail["healed_by_snapshot"] == "ok"
    assert conn.config_get("save")["save"] == ""  # the server's own setting is back
    assert conn.dbsize() == 2


def test_a_demotion_unblocks_a_blocked_call_with_an_error_that_is_waited_out(aof_server: RedisServer):
    """Sentinel's REPLICAOF answers a worker's idle BLMOVE with UNBLOCKED: not now, not never."""
    conn = Redis.from_url(aof_server.url)
    blocked = Redis.from_url(aof_server.url, socket_timeout=120)
    caught: list[BaseException] = []

    def wait_on_empty_queue() -> None:
        try:
            blocked.blmove("empty", "elsewhere", 0)  # until something happens, however long the setup takes
        except Exception as exc:
            caught.append(exc)

    thread = threading.Thread(target=wait_on_empty_queue)
    thread.start()
    wait_for(lambda: conn.info("clients")["blocked_clients"] == 1, timeout=10, what="the BLMOVE to block")
    with RedisFaults(aof_server).readonly(via="replicaof"):
        thread.join(timeout=60)
    assert caught and "UNBLOCKED" in str(caught[0]), caught
    assert is_transient(caught[0])
    assert blocked.lpush("empty", "x") == 1  # the closed connection is replaced on the next call


# -- reconciliation ---------------------------------------------------------------------------
def _acc(job_id: str, poison: str | None = None, ttl: int | None = None, at: float = 100.0) -> Accepted:
    return Accepted(job_id, ts=at - 0.01, accepted_at=at, poison=poison, ttl=ttl)


def test_reason_key_groups_by_class_and_first_words():
    assert reason_key("FrameError: image is 70000 bytes, over the limit of 16 bytes") == \
        reason_key("FrameError: image is 123 bytes, over the limit of 16 bytes")
    assert reason_key("Traceback (most recent call last):\n  File x\nValueError: could not convert") == \
        "ValueError: could not convert"
    assert reason_key(None) == "(no reason recorded)"
    oom = ("OutOfMemoryError: Command # 18 (HSET rq:job:4e87934752b94ff49f469c62f291d48f created_at x) of pipeline "
           "caused error: command not allowed when used memory > 'maxmemory'.")
    assert reason_key(oom) == reason_key(oom.replace("# 18", "# 3").replace("4e8793", "ffffff"))


def test_classify_each_terminal_state():
    assert classify(_acc("a"), JobState("finished"), 200) == ("finished", "")
    assert classify(_acc("a"), JobState("failed", "FrameError: image is empty"), 200) == \
        ("failed", "FrameError: image is empty")
    assert classify(_acc("a"), JobState("failed", "FrameExpired: frame is 3s old"), 200)[0] == "expired"
    assert classify(_acc("a", ttl=10), JobState(None), 200)[0] == "expired"
    assert classify(_acc("a", ttl=1000), JobState(None), 200) == ("lost", "job hash missing")
    assert classify(_acc("a"), JobState(None), 200) == ("lost", "job hash missing")
    assert classify(_acc("a"), JobState("queued"), 200) == ("lost", "status queued")
    assert classify(_acc("a"), JobState("bogus"), 200) == ("lost", "status bogus")
    assert classify(_acc("a"), None, 200) == ("lost", "never read")


def test_reconcile_accounts_every_accepted_frame_once():
    poisons = {p.name: p for p in all_poisons()}
    accepted = {i: _acc(i) for i in ("f1", "f2", "f3", "f4", "f5")}
    accepted["p1"] = _acc("p1", poison="deadline_str")
    accepted["p2"] = _acc("p2", poison="deadline_str")
    accepted["p3"] = _acc("p3", poison="image_empty")
    observed = {
        "f1": Observed(JobState("finished"), 101),
        "f2": Observed(JobState("failed", "FrameError: image is empty"), 101),
        "p1": Observed(JobState("failed", "FrameError: meta.deadline_s must be a number"), 101),
        "p2": Observed(JobState("failed", "TimeoutError: Redis went away"), 101),
        "p3": Observed(JobState("finished"), 101),
    }
    # f3 ended after the watcher's last poll; f4 is still queued; f5's hash is gone.
    final = {"f3": JobState("finished"), "f4": JobState("queued"), "f5": JobState(None)}
    places = {"f4": "in the queue", "f5": "in no queue or registry"}
    r = reconcile(accepted, observed, final, poisons, now=200, places=places)
    assert r["accepted"] == 8
    assert (r["finished"], r["failed"], r["expired"], r["lost"]) == (3, 3, 0, 2)
    assert r["finished"] + r["failed"] + r["expired"] + r["lost"] == r["accepted"]
    assert r["lost_by_state"] == {"status queued, in the queue": 1, "job hash missing, in no queue or registry": 1}
    assert r["failed_by_reason"]["FrameError: image is empty"] == 1
    assert r["poison"]["planted"] == 3
    assert r["poison"]["by_name"]["deadline_str"] == {"failed as expected": 1, "failed, other reason": 1}
    assert r["poison"]["by_name"]["image_empty"] == {"finished": 1}
    # The first terminal state seen wins: a later re-run of f1 does not count it twice.
    r2 = reconcile(accepted, observed, {**final, "f1": JobState("queued")}, poisons, now=200)
    assert r2["finished"] == 3


def test_duplicates_latency_windows_and_metrics_parsing():
    assert stream_duplicates([("a", "ok"), ("b", "ok"), ("a", "ok"), ("c", "failed"), ("c", "ok")]) == {"a": 2}
    faults = [{"kind": "pause", "started": 100.0, "ended": 115.0}]
    lat = [(90.0, 10.0), (95.0, 12.0), (101.0, 5000.0), (120.0, 3000.0), (130.0, 20.0), (200.0, 11.0)]
    w = latency_windows(lat, faults, before_s=15, settle_s=10, after_s=15)
    assert w["by_fault"]["pause"]["before"]["n"] == 2
    assert w["by_fault"]["pause"]["during"]["n"] == 2 and w["by_fault"]["pause"]["during"]["p50_ms"] >= 3000
    assert w["by_fault"]["pause"]["after"]["n"] == 1
    assert w["outside_faults"]["n"] == 4 and w["all"]["n"] == 6
    text = ('# HELP vq_frames_total x\nvq_frames_total{outcome="ok"} 12.0\n'
            'vq_frames_total{outcome="duplicate"} 3.0\nvq_redis_up 1.0\nother_metric 5\n')
    m = parse_metrics(text)
    assert m['vq_frames_total{outcome="duplicate"}'] == 3.0 and m["vq_redis_up"] == 1.0 and "other_metric" not in m


def test_table_shows_every_must_be_zero_row():
    accepted = {"f1": _acc("f1"), "f2": _acc("f2")}
    recon = reconcile(accepted, {"f1": Observed(JobState("finished"), 101)}, {"f2": JobState("queued")}, {}, 200,
                      {"f2": "in no queue or registry"})
    faults = [{"kind": "pause", "started": 100.0, "ended": 108.0, "detail": {}, "error": None}]
    report = {
        "run": {"minutes": 1.0, "workers": 2, "rate_fps": 50.0, "rate_basis": "--rate", "poison_share": 0.02,
                "fault_every_s": 12, "faults": ["pause"]},
        "producer": {"sent": 2, "unsent": 0},
        "reconcile": recon,
        "duplicates": {"metric": 0.0, "metric_seen": False, "stream_frames": 0},
        "worker_restarts": [{"worker": "w", "code": 1, "at": 105.0}],
        "canaries": {"planted_code_ran": 0},
        "faults": faults,
        "latency": latency_windows([(99.0, 20.0), (101.0, 900.0)], faults),
        "passed": False,
    }
    table = render_table(report)
    assert re.search(r"LOST \(must be 0\)\s+1\b", table)
    assert "status queued, in no queue or registry" in table
    assert re.search(r"WORKER RESTARTS \(must be 0\)\s+1\b", table)
    assert re.search(r"PLANTED CODE RAN \(must be 0\)\s+0\b", table)
    assert "verdict: FAIL" in table and "pause" in table


def test_read_states_and_locate_from_real_rq_state(redis_conn: Redis):
    queue = FrameQueue(connection=redis_conn)
    frames = [make_frame(b"\xff\xd8\xff" + b"\0" * 64, station="s", seq=i) for i in range(4)]
    done, failed, queued, gone = enqueue_frames(queue, frames)
    redis_conn.lrem(queue.key, 0, done.id)
    Result.create(done, Result.Type.SUCCESSFUL, ttl=60, return_value={"label": "ok"})
    done.set_status(JobStatus.FINISHED)
    redis_conn.lrem(queue.key, 0, failed.id)
    Result.create_failure(failed, ttl=60, exc_string="FrameError: image is empty (0 bytes)")
    failed.set_status(JobStatus.FAILED)
    redis_conn.lrem(queue.key, 0, gone.id)
    redis_conn.delete(gone.key)
    # A failed poison whose exc_info is a zlib bomb: read with a bound, never inflated whole.
    bomb = hash_poisons()[0]
    bomb_id = plant(redis_conn, "inference", bomb)
    redis_conn.hset(f"rq:job:{bomb_id}", mapping={"status": "failed",
                                                  "exc_info": zlib.compress(b"E" * (50 * 1024 * 1024))})
    states = read_states(redis_conn, [done.id, failed.id, queued.id, gone.id, bomb_id])
    assert states[done.id].status == "finished"
    assert states[failed.id].status == "failed" and states[failed.id].reason.startswith("FrameError: image is empty")
    assert states[queued.id].status == "queued" and states[gone.id].status is None
    assert len(states[bomb_id].reason) <= 64 * 1024
    places = locate(redis_conn, [queued.id, gone.id, bomb_id])
    assert places[queued.id] == "in the queue"
    assert places[gone.id] == "in no queue or registry"
    assert places[bomb_id] == "in the queue"


# -- the soak ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_soak_loses_nothing(tmp_path: Path, subprocess_env: dict[str, str]):
    out = tmp_path / "chaos-out"
    cmd = [sys.executable, "-m", "deploy.chaos", "--minutes", "1", "--fault-every", "12", "--capacity-seconds", "5",
           "--load", "0.5", "--pause-s", "8", "--oom-s", "8", "--drain-s", "90", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=840)
    report_path = out / "report.json"
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    table = proc.stdout[proc.stdout.find("chaos soak:"):]
    kinds = [f["kind"] for f in report["faults"]]
    assert {"kill_worker", "kill_redis", "pause", "oom"} <= set(kinds), kinds
    assert not [f for f in report["faults"] if f["error"]], report["faults"]
    assert report["reconcile"]["lost"] == 0, table
    assert report["worker_restarts"] == [], table
    assert report["canaries"]["planted_code_ran"] == 0, report["canaries"]
    r = report["reconcile"]
    assert r["finished"] + r["failed"] + r["expired"] + r["lost"] == r["accepted"] > 0
    assert (out / "timeline.png").exists()
    assert proc.returncode == 0, table

