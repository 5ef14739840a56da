"""Redis fault injection against a private redis-server (`worker.redis_server.RedisServer`).

    faults = RedisFaults(server)            # server started with appendonly=True
    faults.kill9_and_restart()              # SIGKILL, then the same port and dir, replaying the AOF
    faults.pause(15)                        # CLIENT PAUSE ALL: every client blocks
    faults.oom_window(15)                   # maxmemory just below used memory, noeviction: writes get OOM
    faults.readonly_window(15)              # a coordinated FAILOVER to a copy: writes get READONLY
    faults.disk_full_window(15)             # a snapshot that cannot be written: writes get MISCONF

Each `*_window` has a context-manager form (`with faults.readonly(): ...`) for tests that act
inside the window. Each call returns a `FaultRecord` (start, end, what happened) for reports.

READONLY without losing data: `REPLICAOF` straight at another server would make this one
full-sync from it and drop its dataset. Instead a second, empty server first becomes *our*
replica (it copies the dataset), then `FAILOVER TO` it (Redis 6.2+: writes are paused until the
replica has caught up, then the roles swap, and this server resyncs partially from a copy of its
own history: PSYNC2 accepts the old replication id). Clients still talk to this server, which is
now a read-only replica: every write gets READONLY. To end the window the roles swap back the
same way and the copy is shut down. If a coordinated failover cannot complete, `readonly()`
raises before anything was demoted rather than falling back to a plain REPLICAOF.

`readonly(via="replicaof")` demotes as Sentinel or an operator does: the copy is promoted with
REPLICAOF NO ONE and this server is pointed at it with REPLICAOF (writes paused first until the copy
has caught up, so nothing is lost). A client blocked in BLMOVE or XREADGROUP at that moment gets
`UNBLOCKED ... (master -> replica?)` and its connection is closed. A coordinated FAILOVER can do that
too (2 of 8 failovers of a busy worker on Redis 7.0).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import BusyLoadingError, ConnectionError, ResponseError, TimeoutError

from worker.redis_server import RedisServer


class FaultError(RuntimeError):
    pass


@dataclass
class FaultRecord:
    kind: str
    started: float  # unix time the fault began
    ended: float = 0.0  # unix time the server was healthy again
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended - self.started)


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (ConnectionError, TimeoutError, BusyLoadingError, ResponseError) as exc:
            last = exc
        time.sleep(interval)
    raise FaultError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


class RedisFaults:
    """Faults played on `server`. Its own admin connection has no socket timeout issues: short-lived ones."""

    def __init__(self, server: RedisServer, load_timeout: float = 120.0) -> None:
        self.server = server
        self.load_timeout = load_timeout

    def _admin(self, port: int | None = None, timeout: float = 5.0) -> Redis:
        return Redis(host="127.0.0.1", port=port or self.server.port, socket_timeout=timeout,
                     socket_connect_timeout=timeout)

    def _ready(self) -> bool:
        with contextlib.closing(self._admin()) as r:
            return bool(r.ping())

    # -- kill -9 ------------------------------------------------------------------------------
    def kill9_and_restart(self, down_s: float = 0.0) -> FaultRecord:
        """SIGKILL redis-server, stay down `down_s`, start it on the same port and dir (AOF replay).

        Returns once it answers PING again (LOADING is over): `detail` has the keys before and after.
        """
        if not self.server.appendonly:
            raise FaultError("kill -9 without appendonly loses the dataset: start the server with appendonly=True")
        with contextlib.closing(self._admin()) as r:
            keys_before = r.dbsize()
        record = FaultRecord("redis_kill9", time.time())
        proc = self.server.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record.detail["killed_pid"] = proc.pid
        if down_s > 0:
            time.sleep(down_s)  # the outage itself, not a synchronisation
        self.server.start(timeout=self.load_timeout)
        _wait(self._ready, self.load_timeout, "redis-server to load its AOF")
        record.ended = time.time()
        with contextlib.closing(self._admin()) as r:
            record.detail.update(keys_before=keys_before, keys_after=r.dbsize(), new_pid=self.server.proc.pid)
        return record

    # -- CLIENT PAUSE -------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self, seconds: float, mode: str = "ALL") -> Iterator[FaultRecord]:
        """Every client's commands block (mode ALL) for `seconds`; the block returns once the pause is over.

        The pause cannot be cut short: on Redis 7.0 CLIENT UNPAUSE is itself held by a PAUSE ALL,
        and a new connection's handshake is paused too (a client connecting during the window
        waits or times out, as it would against a stalled server).
        """
        record = FaultRecord(f"pause_{mode.lower()}", time.time(), detail={"mode": mode, "seconds": seconds})
        with contextlib.closing(self._admin()) as r:
            r.execute_command("CLIENT", "PAUSE", int(seconds * 1000), mode)
        until = time.monotonic() + seconds
        try:
            yield record
        finally:
            remaining = until - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)  # the window's length: the server ends the pause by itself
            _wait(self._ready, 30, "the pause to end")
            record.ended = time.time()

    def pause(self, seconds: float) -> FaultRecord:
        with self.paused(seconds) as record:
            pass
        return record

    # -- OOM ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def oom(self, margin_bytes: int = 64 * 1024) -> Iterator[FaultRecord]:
        """maxmemory just below used memory with noeviction: writes fail with OOM until the block ends.

        Below, not above: a limit a few writes away is never reached by a workload that frees as much
        as it writes (a worker replacing each finished frame's image), and then no write fails."""
        with contextlib.closing(self._admin()) as r:
            before = r.config_get("maxmemory*")
            used = int(r.info("memory")["used_memory"])
            limit = max(1, used - margin_bytes)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", limit)
        record = FaultRecord("redis_oom", time.time(), detail={"used_memory": used, "maxmemory": limit})
        try:
            yield record
        finally:
            with contextlib.closing(self._admin()) as r:
                r.config_set("maxmemory", before.get("maxmemory", "0"))
                r.config_set("maxmemory-policy", before.get("maxmemory-policy", "noeviction"))
                record.detail["used_memory_at_end"] = int(r.info("memory")["used_memory"])
            record.ended = time.time()

    def oom_window(self, seconds: float, margin_bytes: int = 64 * 1024) -> FaultRecord:
        with self.oom(margin_bytes) as record:
            time.sleep(seconds)  # the window's length
        return record

    # -- READONLY -----------------------------------------------------------------------------
    def _linked(self, master: Redis, replica: Redis, caught_up: bool = False) -> bool:
        """The copy follows this server; `caught_up`: it has every write too (only stable while writes are paused)."""
        m = master.info("replication")
        rep = replica.info("replication")
        # FAILOVER also needs the master to list the replica as online, which can trail the replica's own view.
        online = any(isinstance(v, dict) and v.get("state") == "online" for k, v in m.items() if k.startswith("slave"))
        return online and rep.get("master_link_status") == "up" and \
            (not caught_up or rep.get("slave_repl_offset") == m.get("master_repl_offset"))

    def _failover(self, master_port: int, to_port: int, timeout: float) -> None:
        """Coordinated FAILOVER from master_port to its replica to_port; returns when roles have swapped."""
        with contextlib.closing(self._admin(master_port)) as r:
            r.execute_command("FAILOVER", "TO", "127.0.0.1", to_port, "TIMEOUT", int(timeout * 1000))

        def swapped() -> bool:
            with contextlib.closing(self._admin(master_port)) as old, contextlib.closing(self._admin(to_port)) as new:
                o, n = old.info("replication"), new.info("replication")
                return (o.get("role") == "slave" and o.get("master_link_status") == "up"
                        and n.get("role") == "master")

        _wait(swapped, timeout + 10, f"failover from {master_port} to {to_port}", interval=0.05)

    def _demote(self, copy_port: int, timeout: float) -> None:
        """REPLICAOF NO ONE on the copy, then REPLICAOF it here, with writes paused until the copy caught up."""
        with contextlib.closing(self._admin()) as r, contextlib.closing(self._admin(copy_port)) as c:
            r.execute_command("CLIENT", "PAUSE", int(timeout * 1000), "WRITE")
            try:
                _wait(lambda: self._linked(r, c, caught_up=True), timeout, "the copy to catch up")
                c.replicaof("NO", "ONE")
                r.replicaof("127.0.0.1", copy_port)
            finally:
                r.execute_command("CLIENT", "UNPAUSE")
            _wait(lambda: r.info("replication").get("master_link_status") == "up", timeout,
                  f"the demoted server to follow {copy_port}")

    @contextlib.contextmanager
    def readonly(self, timeout: float = 30.0, via: str = "failover") -> Iterator[FaultRecord]:
        """This server is a read-only replica of a copy of itself until the block ends; no data is lost.

        `via`: "failover" (a coordinated FAILOVER) or "replicaof" (Sentinel's way: blocked calls get UNBLOCKED).
        """
        if via not in ("failover", "replicaof"):
            raise ValueError(f"via must be 'failover' or 'replicaof', not {via!r}")
        copy = RedisServer().start()
        record = FaultRecord("redis_readonly", time.time(), detail={"copy_port": copy.port, "via": via})
        demoted = False
        try:
            with contextlib.closing(self._admin(copy.port)) as c, contextlib.closing(self._admin()) as r:
                keys = r.dbsize()
                c.replicaof("127.0.0.1", self.server.port)
                # Linked is enough: both ways of demoting pause writes until the copy has caught up. Waiting
                # here for equal offsets never ends while a busy producer keeps writing.
                _wait(lambda: self._linked(r, c), timeout, "the copy to sync")
                record.detail["keys"] = keys
            if via == "failover":
                self._failover(self.server.port, copy.port, timeout)
            else:
                self._demote(copy.port, timeout)
            demoted = True
            record.started = time.time()
            yield record
        finally:
            try:
                if demoted:
                    self._promote_back(copy.port, timeout, via)
            finally:
                try:
                    with contextlib.closing(self._admin()) as r:
                        if r.info("replication").get("role") != "master":  # never leave the server demoted
                            r.replicaof("NO", "ONE")
                        record.detail["keys_after"] = r.dbsize()
                finally:
                    copy.stop()
                    record.ended = time.time()

    def _promote_back(self, copy_port: int, timeout: float, via: str) -> None:
        if via == "failover":
            self._failover(copy_port, self.server.port, timeout)
            return
        # Nothing writes to the copy: once this server has all of it, it is promoted (by the caller).
        with contextlib.closing(self._admin()) as r, contextlib.closing(self._admin(copy_port)) as c:
            _wait(lambda: self._linked(c, r, caught_up=True), timeout, "the copy's writes to return")

    def readonly_window(self, seconds: float, timeout: float = 30.0, via: str = "failover") -> FaultRecord:
        with self.readonly(timeout, via) as record:
            time.sleep(seconds)  # the window's length
        return record

    # -- MISCONF ------------------------------------------------------------------------------
    def _snapshot(self, r: Redis, timeout: float) -> str:
        """A BGSAVE, once no other child (an AOF rewrite, a replica's sync, a save) is in the way: "ok" or "err"."""
        def started() -> bool:
            try:
                r.bgsave()
            except ResponseError as exc:  # "already in progress", "another child process is active"
                if "progress" in str(exc) or "child" in str(exc):
                    return False
                raise
            return True

        def ended() -> str | None:
            info = r.info("persistence")
            return None if info["rdb_bgsave_in_progress"] else info["rdb_last_bgsave_status"]

        _wait(started, timeout, "a snapshot to start", interval=0.1)
        return _wait(ended, timeout, "a snapshot to end")

    def _rdb_path(self, r: Redis) -> Path:
        return Path(r.config_get("dir")["dir"]) / r.config_get("dbfilename")["dbfilename"]

    @staticmethod
    def _set_aside(target: Path) -> Path:
        """Where a real RDB file waits while a directory stands in its place."""
        return target.with_name(target.name + ".vq-fault")

    @contextlib.contextmanager
    def disk_full(self, timeout: float = 60.0) -> Iterator[FaultRecord]:
        """Writes get MISCONF until the block ends, as when the disk fills: Redis with save points refuses
        writes once a snapshot failed. Here it fails because a directory stands where the RDB file goes."""
        with contextlib.closing(self._admin()) as r:
            before = {**r.config_get("save"), **r.config_get("stop-writes-on-bgsave-error")}
            target = self._rdb_path(r)
            record = FaultRecord("redis_disk_full", time.time(), detail={"in_the_way": str(target)})
            try:
                if target.is_file():
                    target.rename(self._set_aside(target))
                (target / "in-the-way").mkdir(parents=True, exist_ok=True)
                r.config_set("stop-writes-on-bgsave-error", "yes")
                r.config_set("save", "3600 1")
                if self._snapshot(r, timeout) != "err":
                    raise FaultError(f"a snapshot was written although {target} is a directory")
                record.started = time.time()
                yield record
            finally:
                try:
                    self._clear_the_way(target)
                    record.detail["healed_by_snapshot"] = self._snapshot(r, timeout)
                finally:
                    for name, value in before.items():
                        r.config_set(name, value)
                    record.ended = time.time()

    def _clear_the_way(self, target: Path) -> None:
        if target.is_dir():
            shutil.rmtree(target)
        kept = self._set_aside(target)
        if kept.exists():
            kept.rename(target)

    def disk_full_window(self, seconds: float, timeout: float = 60.0) -> FaultRecord:
        with self.disk_full(timeout) as record:
            time.sleep(seconds)  # the window's length
        return record

    # -- after any fault ----------------------------------------------------------------------
    def heal(self) -> None:
        """Whatever was left behind: the server up, master, unpaused, no maxmemory."""
        if not self.server.running:
            self.server.start(timeout=self.load_timeout)
        _wait(self._ready, self.load_timeout, "redis-server to answer")
        with contextlib.closing(self._admin()) as r:
            if r.info("replication").get("role") != "master":
                r.replicaof("NO", "ONE")
            r.config_set("maxmemory", 0)
            target = self._rdb_path(r)
            if target.is_dir() or r.info("persistence")["rdb_last_bgsave_status"] != "ok":
                self._clear_the_way(target)
                self._snapshot(r, self.load_timeout)


__all__ = ["FaultError", "FaultRecord", "RedisFaults"]
