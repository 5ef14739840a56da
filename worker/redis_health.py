"""Riding through Redis faults: which errors are transient, and how long a process waits for Redis.

A worker, a producer, the gateway and the updater all meet the same faults: a restart (refused
connections, then LOADING while the AOF replays), a failover (READONLY; UNBLOCKED for a call blocked
at that moment), a full server (OOM under `maxmemory`), a full disk (MISCONF), a pause. None of
them is a reason to exit. `RedisHealth` is the one place that decides: it backs off with jitter,
logs once per change of state, reports up/down to whoever wants to know (a metric), and gives up
only after `max_outage_s` of continuous failure.

Where Redis is, and with which credential, is decided here too, once for every process:
`resolve_url` (REDIS_URL / REDIS_URL_FILE / REDIS_PASSWORD_FILE), `mask_url` for anything that
shows a URL, and `python -m worker.redis_health exec CMD…` for `rq` commands, which take a URL only.

Light: no torch; producers import it.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import structlog
from redis import Redis
from redis import exceptions as rex

from .settings import ROWS, SettingsError, check_redis_url, setting

log = structlog.get_logger("visionqueue.redis")

T = TypeVar("T")

# Server replies that mean "not now" rather than "never": the same command succeeds later. Matched on
# the reply's first word (BUSYGROUP, say, is a permanent "group exists", not BUSY). UNBLOCKED is what a
# client blocked in BLMOVE or XREADGROUP gets when its master is demoted (REPLICAOF, as Sentinel does to
# an old master): the command did nothing, and the server closes the connection after the reply.
# MISCONF: a snapshot could not be written (a full disk) and Redis refuses writes until one is.
_TRANSIENT_CODES = frozenset({"OOM", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "BUSY",
                              "CLUSTERDOWN", "UNBLOCKED", "MISCONF"})


class RedisOutageError(RuntimeError):
    """Redis stayed unreachable longer than the process is allowed to wait."""


def is_transient(exc: BaseException) -> bool:
    """True for a Redis error that a retry later can cure (down, restarting, read-only, full, paused)."""
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return False  # a wrong credential does not heal by waiting
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        return True  # includes BusyLoadingError (LOADING) and socket timeouts during CLIENT PAUSE
    # redis-py maps these replies to their own classes and strips the prefix from the message
    # ("READONLY You can't write…" becomes ReadOnlyError("You can't write…")): check the class first.
    if isinstance(exc, rex.ReadOnlyError | rex.OutOfMemoryError | rex.MasterDownError | rex.TryAgainError
                  | rex.ClusterDownError):
        return True
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        # A pipeline's error is annotated "Command # 3 (…) of pipeline caused error: OOM …", and a
        # MULTI that Redis refused as a whole (ExecAbortError, e.g. RQ's is_suspended under OOM) reads
        # "Transaction discarded because of: OOM …": the cause is the code after either.
        for marker in ("caused error: ", "because of: "):
            text = text.rsplit(marker, 1)[-1]
        if text.startswith("Error running script"):
            # A write that failed inside a script, as Redis reports it when the script met the fault after it
            # had started (seen with a FAILOVER): "Error running script (call to f_…): @user_script:76:
            # @user_script: 76: -READONLY You can't write…". The script wrote nothing: the fault met its first write.
            text = text.rsplit(": -", 1)[-1]
        return text.split(" ", 1)[0] in _TRANSIENT_CODES
    return False


class RedisHealth:
    """Shared by every thread of one process: Redis is up until a call fails, down until one succeeds.

    `max_outage_s` counts from the first failure after the last success, whichever thread saw them.
    """

    def __init__(self, max_outage_s: float, *, on_change: Callable[[bool], None] | None = None,
                 base_delay: float = 0.05, max_delay: float = 2.0, what: str = "redis") -> None:
        self.max_outage_s = max_outage_s
        self.on_change = on_change
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.what = what
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._failures = 0
        self._writes_refused = False  # the last failure was a write refused (READONLY, OOM, MISCONF…)
        self.outages = 0

    @property
    def up(self) -> bool:
        return self._down_since is None

    def down_for(self) -> float:
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def succeeded(self, wrote: bool = True) -> None:
        """A call went through. A read (`wrote=False`) does not end an outage of refused writes: reads
        still work on a server that is read-only or full, and saying "back" there would only flap."""
        if self._down_since is None or (not wrote and self._writes_refused):
            return
        with self._lock:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since, self._failures = None, 0
        log.warning(f"{self.what} is back", down_s=round(down_for, 2))
        if self.on_change:
            self.on_change(True)

    def failed(self, exc: BaseException) -> float:
        """Record a transient failure; the seconds to wait before trying again.

        Raises RedisOutageError once Redis has been away longer than `max_outage_s`.
        """
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
                self.outages += 1
            self._failures += 1
            # Sticky for the outage: a connection dropped in the middle of a READONLY window does not
            # make the next read proof that writes work again.
            refused = not isinstance(exc, rex.ConnectionError | rex.TimeoutError)
            self._writes_refused = refused if first else self._writes_refused or refused
            failures = self._failures
            down_for = time.monotonic() - self._down_since
        if first:
            log.warning(f"{self.what} is unavailable; waiting for it", error=_short(exc),
                        max_outage_s=self.max_outage_s)
            if self.on_change:
                self.on_change(False)
        if down_for > self.max_outage_s:
            raise RedisOutageError(
                f"{self.what} has been unavailable for {down_for:.0f}s, past the limit of {self.max_outage_s:.0f}s "
                f"(VQ_REDIS_OUTAGE_S); last error: {_short(exc)}"
            ) from exc
        # Exponential backoff with full jitter: a fleet coming back does not stampede the server.
        cap = min(self.max_delay, self.base_delay * 2 ** min(failures, 16))
        return random.uniform(cap / 2, cap)

    def call(self, fn: Callable[[], T], *, stop: threading.Event | None = None, reads_only: bool = False) -> T:
        """`fn()` until it succeeds, waiting out transient Redis errors; others propagate at once.

        With `stop` set while waiting, the last error is raised instead of waiting further. A `fn` that
        only reads says so (`reads_only`): its success does not end an outage of refused writes.
        """
        while True:
            try:
                value = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = self.failed(exc)
                if stop is not None:
                    if stop.wait(delay):
                        raise
                else:
                    time.sleep(delay)
                continue
            self.succeeded(wrote=not reads_only)
            return value


# The variables are rows of worker.settings.TABLE (scope "redis"); the names stay here for messages.
DEFAULT_REDIS_URL: str = ROWS["REDIS_URL"].default
URL_ENV = "REDIS_URL"
URL_FILE_ENV = "REDIS_URL_FILE"
PASSWORD_FILE_ENV = "REDIS_PASSWORD_FILE"
# `rq` reads its URL from here when no -u is given: a password never has to be on a command line,
# where every local user can read it (ps, /proc/PID/cmdline).
RQ_URL_ENV = "RQ_REDIS_URL"


class RedisConfigError(SettingsError):
    """A Redis URL or credential file that cannot be used; the message names the variable, never a secret."""


def resolve_url(url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The Redis URL to connect to, password included.

    `url` (a --redis-url flag), else the contents of the file named by REDIS_URL_FILE, else
    REDIS_URL, else redis://localhost:6379/0. With REDIS_PASSWORD_FILE, that file's contents are
    the password (the URL names the ACL user, e.g. `redis://worker@redis:6379/0`). Why files: a
    Kubernetes or compose secret mounted read-only reaches only the process that mounts it, where
    an environment variable shows in `docker inspect`, crash reports and child processes. TLS is in
    the URL too: `rediss://…?ssl_ca_certs=/ca.pem&ssl_certfile=/client.pem&ssl_keyfile=/client.key`.
    """
    try:
        # Row by row, and REDIS_URL only when it is used: a --redis-url flag makes a stale variable harmless.
        if url is None:
            url_file = setting(URL_FILE_ENV, env)
            url = _read_secret(url_file, URL_FILE_ENV) if url_file else setting(URL_ENV, env)
            if url_file:
                check_redis_url(url, URL_FILE_ENV)
        else:  # given by a flag or a caller: an empty one is a mistake, not "the default"
            check_redis_url(url, "the Redis URL")
        password_file = setting(PASSWORD_FILE_ENV, env)
    except RedisConfigError:
        raise
    except SettingsError as exc:
        raise RedisConfigError(str(exc)) from None
    if not password_file:
        return url
    password = _read_secret(password_file, PASSWORD_FILE_ENV)
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError as exc:
        raise RedisConfigError(f"the Redis URL {mask_url(url)} cannot be parsed") from exc
    if has_password:
        # Two sources for one secret: whichever won, the other would be a silent surprise.
        raise RedisConfigError(f"{PASSWORD_FILE_ENV} is set and the Redis URL {mask_url(url)} has a password too: "
                               "keep one of them")
    if parts.scheme == "unix":
        query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("password", password)])
        return f"unix://{urlunsplit(parts._replace(query=query))[len('unix:'):]}"  # keep unix:///path
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _read_secret(path: str, variable: str) -> str:
    try:
        # A trailing newline is what `echo` and most editors add; it is never part of the secret.
        value = Path(path).read_text().strip("\r\n")
    except OSError as exc:
        raise RedisConfigError(f"{variable}={path}: cannot read it ({exc.strerror})") from exc
    if not value:
        raise RedisConfigError(f"{variable}={path}: the file is empty")
    return value


def mask_url(url: str) -> str:
    """`url` with its password replaced by `***`: safe for error messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL: show nothing of it rather than a secret
        return "<redis url>"
    netloc, query = parts.netloc, parts.query
    if password:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[-1]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):  # redis-py also takes ?password=
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    masked = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and url.startswith(f"{parts.scheme}://"):  # unix:///path keeps its slashes
        masked = f"{parts.scheme}://{masked[len(parts.scheme) + 1:]}"
    return masked


def describe(conn: Redis) -> str:
    """Where `conn` points, for a log line: host:port/db (or the socket path), never a credential."""
    kwargs = conn.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    user = kwargs.get("username")
    return f"{user + '@' if user else ''}{where}/{kwargs.get('db', 0)}"


def connect(url: str | None = None, *, socket_timeout: float = 10.0, **kwargs: object) -> Redis:
    """A client whose calls cannot hang forever on a server that went silent (a partition, a pause).

    `url` goes through `resolve_url` (None: REDIS_URL_FILE / REDIS_URL; REDIS_PASSWORD_FILE adds
    the password). Blocking commands must block for less than `socket_timeout`.
    """
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("health_check_interval", 15)
    return Redis.from_url(resolve_url(url), socket_timeout=socket_timeout, **kwargs)


def credentials_refused(url: str | None = None) -> str | None:
    """Why the Redis at `url` refuses our credentials (wrong password, unknown user, no permission to
    PING), or None: it accepted them, or cannot be asked right now (a fault that passes is ridden through
    later, where a refusal at start would only be met again on every call)."""
    probe = connect(url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=0)
    try:
        probe.ping()
    except (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    except rex.RedisError:
        return None
    finally:
        probe.close()
    return None


def with_timeouts(conn: Redis, socket_timeout: float = 10.0) -> Redis:
    """The same server and credentials as `conn` (built by someone else, e.g. `rq worker -u`), with timeouts."""
    kwargs = dict(conn.connection_pool.connection_kwargs)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs["socket_timeout"] = socket_timeout
    kwargs.setdefault("health_check_interval", 15)
    pool = conn.connection_pool.__class__(connection_class=conn.connection_pool.connection_class, **kwargs)
    return Redis(connection_pool=pool)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.redis_health exec CMD ARGS…`: run CMD with RQ_REDIS_URL set from `resolve_url`.

    For `rq worker`, `rq info`, `rq requeue`…, which take a URL and nothing else: the password
    comes from REDIS_PASSWORD_FILE (or REDIS_URL_FILE) into CMD's environment, never onto its
    command line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    usage = ("usage: python -m worker.redis_health exec CMD [ARGS...]\n\n"
             f"Runs CMD with {RQ_URL_ENV} set from {URL_FILE_ENV} / {URL_ENV} / {PASSWORD_FILE_ENV}, e.g.\n"
             "  python -m worker.redis_health exec rq worker --worker-class worker.BatchWorker inference\n"
             "  python -m worker.redis_health exec rq info -S worker.serializer.MsgpackSerializer inference")
    if args[:1] in (["-h"], ["--help"]) or args[:2] in (["exec", "-h"], ["exec", "--help"]):
        print(usage)
        return 0
    if len(args) < 2 or args[0] != "exec":
        print(usage, file=sys.stderr)
        return 2
    command = args[2:] if args[1] == "--" else args[1:]
    if not command:
        print(usage, file=sys.stderr)
        return 2
    try:
        url = resolve_url()
    except RedisConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return exec_with_url(command, url)


def exec_with_url(command: list[str], url: str) -> int:
    """Replace this process with `command`, its environment gaining RQ_REDIS_URL=url (rq's own
    variable: the password never shows on a command line). 127 when it cannot be run."""
    env = dict(os.environ)
    env[RQ_URL_ENV] = url
    program = command[0]
    if os.sep not in program and shutil.which(program, path=env.get("PATH")) is None:
        # A virtualenv's own scripts (rq) sit beside its python, whether or not it is activated.
        beside = Path(sys.executable).with_name(program)
        program = str(beside) if beside.exists() else program
    try:
        os.execvpe(program, command, env)
    except OSError as exc:
        print(f"error: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - execvpe does not return


if __name__ == "__main__":
    sys.exit(main())
