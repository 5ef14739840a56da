"""`python -m continual.rollback [--to VERSION]`: move the registry's `current` back; workers follow."""

from __future__ import annotations

import argparse
import os
import sys

from redis import Redis

from worker.registry import ModelRegistry, RegistryError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m continual.rollback", description=__doc__)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    p.add_argument("--to", help="the version to serve (default: the one promoted before the current one)")
    a = p.parse_args(argv)
    registry = ModelRegistry(Redis.from_url(a.redis_url))
    try:
        before = registry.current()
    except RegistryError as exc:  # a planted `current`: still repairable with --to
        before = f"(invalid: {exc})"
    try:
        after = registry.rollback(a.to)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"current model: {before} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
