"""Past one Redis: the shard map, stations' shards, workers per shard, the mirrored registry, ingest of
every shard, and a dead shard stopping only its own stations. Real redis-servers, a real tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import wait_for
from helpers import ROOT, jpeg, tiny_artifact
from redis import Redis

from continual.ingest import ingest
from continual.store import SampleStore
from deploy.shards import stations_per_shard
from deploy.workers import start_shard_worker, stop_worker, wait_registered
from producer.api import Producer
from worker.jobs import RESULTS_STREAM
from worker.redis_server import RedisServer
from worker.registry import ModelRegistry, mirror
from worker.sample_feed import SAMPLES_STREAM
from worker.settings import SettingsError
from worker.shards import ShardMap, served_url, shard_index, shard_map, station_url


@pytest.fixture
def servers():
    started = [RedisServer().start() for _ in range(3)]
    yield started
    for s in started:
        s.stop()


# -- the hash -----------------------------------------------------------------------------------------

def test_a_station_has_one_stable_shard_and_stations_spread_evenly():
    stations = [f"line-{i}" for i in range(3000)]
    three = {s: shard_index(s, 3) for s in stations}
    # Fixed values: the same on every host and Python (a salted hash() would fail here).
    assert [shard_index(f"cam-{i}", 3) for i in range(6)] == [1, 2, 0, 2, 0, 0]
    counts = Counter(three.values())
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 900  # 1000 each ± noise
    # Appending a shard moves only the stations the new shard wins, about a quarter of them.
    four = {s: shard_index(s, 4) for s in stations}
    moved = [s for s in stations if three[s] != four[s]]
    assert all(four[s] == 3 for s in moved) and 0.2 < len(moved) / len(stations) < 0.3


def test_the_shard_map_comes_from_the_file_or_the_variable_and_bad_values_are_named(tmp_path):
    env = {"REDIS_URLS": "redis://a:1/0, redis://b:2/0"}
    assert shard_map(env=env) == ShardMap(("redis://a:1/0", "redis://b:2/0"))
    map_file = tmp_path / "shards"
    map_file.write_text("# site shards\nredis://c:3/0\n\nredis://d:4/0\n")
    assert shard_map(env={**env, "REDIS_URLS_FILE": str(map_file)}).urls == ("redis://c:3/0", "redis://d:4/0")
    assert shard_map(env={}) is None
    with pytest.raises(SettingsError, match="REDIS_URLS: shard 1 is not a redis://") as exc:
        shard_map(env={"REDIS_URLS": "redis://a:1/0,http://u:secret@b/0"})
    assert "secret" not in str(exc.value)
    with pytest.raises(SettingsError, match="same URL twice"):
        shard_map(env={"REDIS_URLS": "redis://a:1/0,redis://a:1/0"})
    # A worker serves the shard VQ_SHARD names, and must name one when a shard map is set.
    assert served_url(env={**env, "VQ_SHARD": "1"}) == "redis://b:2/0"
    with pytest.raises(SettingsError, match="set VQ_SHARD"):
        served_url(env=env)
    with pytest.raises(SettingsError, match="VQ_SHARD=2 is out of range"):
        served_url(env={**env, "VQ_SHARD": "2"})
    with pytest.raises(SettingsError, match="no shard map"):
        served_url(env={"VQ_SHARD": "0"})
    # An explicit URL wins; without a map a station uses REDIS_URL as ever (None: the default).
    assert station_url("cam-0", "redis://x:9/0", env=env) == "redis://x:9/0"
    assert station_url("cam-0", env=env) == "redis://b:2/0" and station_url("cam-0", env={}) is None


def test_cli_says_which_shard_a_station_has_and_exec_hands_rq_its_shard(subprocess_env):
    env = {**subprocess_env, "REDIS_URLS": "redis://a:1/0,redis://b:2/0,redis://c:3/0", "VQ_SHARD": "2"}
    out = subprocess.run([sys.executable, "-m", "worker.shards", "which", "cam-0", "cam-1"], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert [json.loads(line)["shard"] for line in out.stdout.splitlines()] == [1, 2]
    out = subprocess.run([sys.executable, "-m", "worker.shards", "exec", sys.executable, "-c",
                          "import os; print(os.environ['RQ_REDIS_URL'])"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "redis://c:3/0", out.stderr


# -- the registry: one primary, mirrored --------------------------------------------------------------

def test_registry_mirror_copies_versions_current_and_history_and_drops_what_the_primary_pruned(tmp_path, servers):
    primary = ModelRegistry(Redis.from_url(servers[0].url), keep=2)
    replica = ModelRegistry(Redis.from_url(servers[1].url), keep=2)
    versions = []
    for i in range(3):
        artifact = tiny_artifact(tmp_path / f"m{i}", size=16)
        versions.append(primary.publish(artifact))
    events = replica.conn.pubsub()
    events.subscribe(replica.events_channel)
    wait_for(lambda: events.get_message(timeout=0.1), what="subscribed")
    report = mirror(primary, replica)
    assert report["copied"] == primary.versions() == replica.versions() and report["promoted"]
    assert replica.current() == versions[2] and replica.history() == primary.history()
    message = wait_for(lambda: events.get_message(timeout=0.1), what="promote event on the replica")
    assert json.loads(message["data"]) == {"event": "promote", "version": versions[2]}
    # Byte for byte: the replica's workers fetch and verify the very same files.
    fetched = replica.fetch(versions[2], tmp_path / "cache")
    assert (fetched / "manifest.json").exists()
    # Idempotent, and a rollback on the primary reaches the replica at the next mirror.
    assert mirror(primary, replica) == {"copied": [], "dropped": [], "current": versions[2], "promoted": False}
    primary.rollback()
    assert mirror(primary, replica)["promoted"] and replica.current() == versions[1]
    # A version pruned on the primary leaves the replica too.
    primary.conn.zrem(primary.versions_key, versions[2])
    assert mirror(primary, replica)["dropped"] == [versions[2]] and not replica.exists(versions[2])


def test_registry_cli_publishes_on_the_primary_and_mirrors(tmp_path, servers, subprocess_env):
    artifact = tiny_artifact(tmp_path / "m", size=16)
    env = {**subprocess_env, "REDIS_URLS": ",".join(s.url for s in servers)}
    out = subprocess.run([sys.executable, "-m", "worker.registry", "publish", str(artifact)], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    version = out.stdout.strip()
    assert [json.loads(line)["copied"] for line in out.stderr.splitlines() if line.startswith("{")] == [[version]] * 2
    for s in servers:
        assert ModelRegistry(Redis.from_url(s.url)).current() == version
    servers[2].kill()  # a dead replica is reported, the others are mirrored
    out = subprocess.run([sys.executable, "-m", "worker.registry", "mirror"], env=env, capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 1 and [("error" in r) for r in reports] == [False, True]


# -- ingest reads every shard -------------------------------------------------------------------------

def test_ingest_drains_every_shard_and_skips_none(tmp_path, servers, monkeypatch):
    shards = ShardMap(tuple(s.url for s in servers))
    for i, s in enumerate(servers):
        conn = Redis.from_url(s.url)
        for k in range(2):
            conn.xadd(SAMPLES_STREAM, {"image": jpeg(seed=10 * i + k), "frame_id": f"f{i}-{k}",
                                       "station": f"s{i}", "label": "ok", "confidence": "0.4"})
    with SampleStore(tmp_path / "store") as store:
        # The updater passes one connection (the primary); the other shards come along.
        counts = ingest(Redis.from_url(servers[0].url), store, shards=shards)
    assert counts["added"] == 6 and counts["acked"] == 6
    for s in servers:
        assert Redis.from_url(s.url).xlen(SAMPLES_STREAM) == 0
    # From the environment too, and a dead shard is skipped (its samples wait in its stream).
    monkeypatch.setenv("REDIS_URLS", ",".join(shards.urls))
    monkeypatch.setenv("VQ_REDIS_OUTAGE_S", "1")
    Redis.from_url(servers[1].url).xadd(SAMPLES_STREAM, {"image": jpeg(seed=99), "frame_id": "late", "station": "x"})
    servers[2].kill()
    with SampleStore(tmp_path / "store") as store:
        assert ingest(Redis.from_url(servers[0].url), store)["added"] == 1


# -- the mechanism, end to end ------------------------------------------------------------------------

def test_each_shard_serves_its_stations_and_a_dead_shard_stops_only_its_own(tmp_path, subprocess_env):
    """2 shards × 1 worker, started as deployments start them; model from the primary's registry,
    mirrored. Frames go to their station's shard, results stay there, and killing shard 1 leaves
    shard 0's station served."""
    servers = [RedisServer().start() for _ in range(2)]
    shards = ShardMap(tuple(s.url for s in servers))
    procs = []
    try:
        version = ModelRegistry(Redis.from_url(shards.primary_url)).publish(tiny_artifact(tmp_path / "m", size=32))
        assert mirror(ModelRegistry(Redis.from_url(shards.primary_url)),
                      ModelRegistry(Redis.from_url(shards.url(1))))["copied"] == [version]
        env = {**subprocess_env, "VQ_LOG_FORMAT": "json", "VQ_TORCH_THREADS": "1", "VQ_DECODE_THREADS": "1",
               "VQ_MODEL_CACHE": str(tmp_path / "cache")}
        for i in range(2):
            procs.append(start_shard_worker(list(shards.urls), i, f"w{i}", env, output=subprocess.DEVNULL))
        for i, proc in enumerate(procs):
            wait_registered(Redis.from_url(shards.url(i)), proc, f"w{i}", timeout=90)
        stations = sorted(stations_per_shard(2, 2), key=shards.index_for)
        assert [shards.index_for(s) for s in stations] == [0, 1]
        producers = {s: Producer(shards, station=s, wait_for_redis=False) for s in stations}
        ids = {s: p.submit_many([jpeg(seed=k) for k in range(4)]) for s, p in producers.items()}
        for s, p in producers.items():
            outcomes = list(p.wait(ids[s], timeout=60))
            assert [o.status for o in outcomes] == ["finished"] * 4, outcomes
            assert {o.result["model_version"] for o in outcomes} == {version}  # each shard's own registry copy
        for i, s in enumerate(stations):
            on_shard = Redis.from_url(shards.url(i)).xrange(RESULTS_STREAM)
            assert {e[1][b"station"].decode() for e in on_shard} == {s}  # results never cross shards

        servers[1].kill()
        with pytest.raises(Exception):  # noqa: B017 - the refusal is the point, whatever redis-py calls it
            producers[stations[1]].submit_bytes(jpeg(seed=7))
        more = producers[stations[0]].submit_many([jpeg(seed=k) for k in range(8, 12)])
        outcomes = list(producers[stations[0]].wait(more, timeout=60))
        assert [o.status for o in outcomes] == ["finished"] * 4
    finally:
        for proc in procs:
            stop_worker(proc, timeout=20)
        for s in servers:
            s.stop()
