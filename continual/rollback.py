"""`python -m continual.rollback [--to VERSION]`: move the registry's `current` back; workers follow.

Exit status: 0 done; 2 no version to roll back to, or one whose manifest or files are gone; 3 Redis
unreachable or refusing our credentials.
"""

from __future__ import annotations

import argparse
import sys

from redis.exceptions import RedisError

from worker.redis_health import connect
from worker.registry import ModelRegistry, RegistryError
from worker.settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m continual.rollback", description=__doc__)
    p.add_argument("--redis-url", help="default: REDIS_URL_FILE, else REDIS_URL (password: REDIS_PASSWORD_FILE)")
    p.add_argument("--to", help="the version to serve (default: the one promoted before the current one)")
    a = p.parse_args(argv)
    try:
        registry = ModelRegistry(connect(a.redis_url))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            before = registry.current()
        except RegistryError as exc:  # a planted `current`: still repairable with --to
            before = f"(invalid: {exc})"
        after = registry.rollback(a.to)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"error: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    print(f"current model: {before} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
