"""Past one Redis: stations spread over N independent Redis (or Valkey) instances, the shards.

RQ does not run on Redis Cluster (transactions and LMOVE across hash slots: rq issues 862, 1942,
2021), so a site that outgrows one Redis runs several plain ones and splits the work by station:

  - the shard map is an ordered list of URLs: `REDIS_URLS` (comma-separated) or `REDIS_URLS_FILE`
    (one per line, `#` comments; a mounted secret, and it wins). Every process of the site reads the
    same list. Position is identity: shard i is the i-th URL.
  - a station's shard is `shard_index(station, n)`: rendezvous (highest-random-weight) hashing, each
    shard scoring blake2b(f"{i}:{station}") and the highest score winning. Stable across processes,
    hosts and Python versions (never `hash()`, which is salted per process). Why rendezvous rather
    than `hash % n`: appending shard n moves only the stations whose new top score is shard n (about
    1/(n+1) of them) and every other station stays where its results and samples are; `% n` would
    move almost all. Why not a ring: rendezvous needs no virtual nodes and no table to balance.
    Replacing a shard's URL in place (a new host) moves nothing; removing one from the middle
    renumbers those after it, so shards are only ever appended (or replaced in place).
  - a frame, its RQ job, its result, the `inference:results` entry and its sample all live on the
    station's shard: nothing crosses shards. The model registry is written on the primary (shard 0)
    and mirrored to the others (`python -m worker.registry mirror`), so every worker reads its own
    shard's registry exactly as with one Redis.
  - a worker serves one shard: `VQ_SHARD=i` and `python -m worker.shards exec rq worker …` (which
    sets rq's RQ_REDIS_URL to shard i's URL, the password from REDIS_PASSWORD_FILE, never on a command
    line). Round-robin over several shards in one worker is not offered: `rq worker` serves one
    connection, and a worker per shard scales each shard on its own queue length (one KEDA trigger each).

CLI: `python -m worker.shards list | which STATION… | exec CMD…`. Light: no torch; producers import it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from .redis_health import RedisConfigError, exec_with_url, mask_url, resolve_url
from .settings import SettingsError, check_redis_url, setting

URLS_ENV = "REDIS_URLS"
URLS_FILE_ENV = "REDIS_URLS_FILE"
SHARD_ENV = "VQ_SHARD"
PRIMARY = 0  # the shard that holds the written registry; the others hold mirrors


def _score(index: int, station: str) -> int:
    digest = hashlib.blake2b(f"{index}:{station}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_index(station: str, n: int) -> int:
    """The shard (0 … n-1) of `station` among `n`: rendezvous hashing (see the module docstring)."""
    if n < 1:
        raise ValueError(f"a shard map needs at least one shard, got {n}")
    # max over (score, -index): a tie (2^-64) goes to the lower index, the same on every host.
    return max(range(n), key=lambda i: (_score(i, station), -i))


def _check(urls: Sequence[str], variable: str) -> tuple[str, ...]:
    found = tuple(u.strip() for u in urls if u.strip())
    if not found:
        raise SettingsError(f"{variable} names no shard")
    for number, url in enumerate(found):
        check_redis_url(url, f"{variable}: shard {number}")  # never echoes the value: it may carry a password
    if len(set(found)) != len(found):
        # Two shards on one Redis would share one queue and double-count each other's frames.
        raise SettingsError(f"{variable} names the same URL twice")
    return found


def configured_urls(env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """The shard map's URLs as written (no password added), or None when no shard map is set.

    REDIS_URLS_FILE wins over REDIS_URLS; a bad entry raises SettingsError naming the variable.
    """
    path = setting(URLS_FILE_ENV, env)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{URLS_FILE_ENV}={path}: cannot read it ({exc.strerror})") from None
        # Whole-line comments only: a `#` inside a URL (a query, a fragment) stays part of it.
        return _check([line for line in text.splitlines() if not line.lstrip().startswith("#")], URLS_FILE_ENV)
    raw = setting(URLS_ENV, env)
    return _check(raw.split(","), URLS_ENV) if raw else None


@dataclass(frozen=True)
class ShardMap:
    """The ordered shard URLs, as written: the password (REDIS_PASSWORD_FILE) is added when a client
    connects (`worker.redis_health.connect` / `resolve_url`), exactly once, as for REDIS_URL."""

    urls: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("a shard map needs at least one shard")

    def __len__(self) -> int:
        return len(self.urls)

    def index_for(self, station: str) -> int:
        return shard_index(station, len(self.urls))

    def url_for(self, station: str) -> str:
        return self.urls[self.index_for(station)]

    def url(self, index: int) -> str:
        if not 0 <= index < len(self.urls):
            raise SettingsError(f"{SHARD_ENV}={index} is out of range: the shard map has {len(self.urls)} "
                                f"shard(s), 0 … {len(self.urls) - 1}")
        return self.urls[index]

    @property
    def primary_url(self) -> str:
        return self.urls[PRIMARY]

    def describe(self) -> list[str]:
        return [mask_url(u) for u in self.urls]

    def connect(self, index: int, **kwargs: object) -> Redis:
        """A client for shard `index`, with the timeouts every process uses (worker.redis_health.connect)."""
        from .redis_health import connect

        return connect(self.url(index), **kwargs)


def shard_map(urls: Sequence[str] | str | ShardMap | None = None,
              env: Mapping[str, str] | None = None) -> ShardMap | None:
    """The shard map: `urls` (a list, or a comma-separated string), else REDIS_URLS_FILE / REDIS_URLS.

    None when no shard map is configured (one Redis: REDIS_URL as ever). Every URL is resolved once
    here (REDIS_PASSWORD_FILE readable, no second password in a URL) so a bad one stops the process
    at start, named; the map keeps them as written. One ACL user per role on every shard.
    """
    if isinstance(urls, ShardMap):
        return urls
    if isinstance(urls, str):
        urls = urls.split(",")
    raw = _check(urls, "--redis-urls") if urls is not None else configured_urls(env)
    if raw is None:
        return None
    try:
        for url in raw:
            resolve_url(url, env)
    except RedisConfigError:
        raise
    except SettingsError as exc:
        raise RedisConfigError(str(exc)) from None
    return ShardMap(raw)


def station_url(station: str, url: str | None = None, urls: Sequence[str] | str | ShardMap | None = None,
                env: Mapping[str, str] | None = None) -> str | None:
    """Where `station` sends its frames, as written (give it to `connect`, which adds the password):
    `url` when given (an explicit --redis-url wins), else its shard's URL when a shard map is
    configured (`urls` or the environment), else None: REDIS_URL_FILE / REDIS_URL, as ever. An empty
    `url` is returned as it is, for `resolve_url` to refuse: an empty flag is a mistake, not the default."""
    if url is not None:
        return url
    shards = shard_map(urls, env)
    return shards.url_for(station) if shards is not None else None


def served_url(url: str | None = None, urls: Sequence[str] | str | ShardMap | None = None,
               shard: int | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The one Redis a worker or gateway serves, as written: `url` if given, else shard `shard` (default
    VQ_SHARD) of the shard map, else None (REDIS_URL_FILE / REDIS_URL). A shard map without a shard
    index is an error: serving shard 0 by accident would leave every other shard's stations unserved."""
    if url is not None:
        return url
    shards = shard_map(urls, env)
    index = setting(SHARD_ENV, env) if shard is None else shard
    if shards is None:
        if index is not None:
            raise SettingsError(f"{SHARD_ENV}={index} is set but no shard map is: set {URLS_ENV} or {URLS_FILE_ENV}")
        return None
    if index is None:
        raise SettingsError(f"a shard map is set ({len(shards)} shards): set {SHARD_ENV} to the shard this "
                            "process serves")
    return shards.url(index)


USAGE = """usage: python -m worker.shards list | which STATION... | exec CMD [ARGS...]

  list           the shard map, one JSON line per shard (passwords masked)
  which STATION  the shard of each station: {"station", "shard", "url"}
  exec CMD       run CMD with RQ_REDIS_URL set to shard $VQ_SHARD's URL, e.g.
                 VQ_SHARD=1 python -m worker.shards exec rq worker --worker-class worker.BatchWorker inference

The shard map: REDIS_URLS_FILE (one URL per line), else REDIS_URLS (comma-separated); the password
from REDIS_PASSWORD_FILE. Without a shard map, `exec` serves REDIS_URL_FILE / REDIS_URL."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[1:2] in (["-h"], ["--help"]):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command == "list":
            shards = shard_map()
            for i, url in enumerate(shards.describe() if shards else []):
                print(json.dumps({"shard": i, "url": url, "primary": i == PRIMARY}))
            return 0 if shards else 1
        if command == "which":
            shards = shard_map()
            for station in rest:
                index = shards.index_for(station) if shards else 0
                url = shards.describe()[index] if shards else mask_url(resolve_url())
                print(json.dumps({"station": station, "shard": index, "url": url}))
            return 0
        if command == "exec":
            program = rest[1:] if rest[:1] == ["--"] else rest
            if not program:
                print(USAGE, file=sys.stderr)
                return 2
            url = resolve_url(served_url())  # the password added here, once
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return exec_with_url(program, url)


if __name__ == "__main__":
    sys.exit(main())
