"""The model registry, kept in Redis so a worker on any host needs only REDIS_URL.

Keys (prefix `vq:models`):
    :versions              ZSET version -> publish time
    :v:<version>:manifest  the manifest JSON
    :v:<version>:file:<n>  a serving file, raw bytes
    :v:<version>:float     the float weights, zlib-compressed (for the updater and CUDA workers)
    :current               the version workers serve
    :history               LIST of versions promoted, newest first (rollback walks it)
    :events                pub/sub channel: a message on every promotion

CLI: `python -m worker.registry publish PATH [--no-promote] | list | current | promote VERSION |
fetch VERSION DIR [--float] | rollback [--to VERSION]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from redis import Redis

from .artifact import FLOAT_FILE, MANIFEST, ArtifactError, read_manifest, serving_files, validate_manifest, verify_files

PREFIX = "vq:models"
DEFAULT_KEEP = int(os.environ.get("VQ_REGISTRY_KEEP", 5))


# The float weights are stored zlib-compressed; inflated in chunks straight to disk, never past this.
MAX_FLOAT_BYTES = 8 * 1024**3


class RegistryError(RuntimeError):
    pass


def _inflate_to(blob: bytes, path: Path, version: str, chunk: int = 64 * 1024**2) -> None:
    inflater = zlib.decompressobj()
    written = 0
    with path.open("wb") as out:
        data = inflater.decompress(blob, chunk)
        while data:
            written += len(data)
            if written > MAX_FLOAT_BYTES:
                raise ArtifactError(f"registry entry for {version}: float weights inflate past {MAX_FLOAT_BYTES} bytes")
            out.write(data)
            data = inflater.decompress(inflater.unconsumed_tail, chunk)
        out.write(inflater.flush())


class ModelRegistry:
    def __init__(self, connection: Redis, prefix: str = PREFIX, keep: int = DEFAULT_KEEP) -> None:
        self.conn = connection
        self.prefix = prefix
        self.keep = max(2, keep)  # the current version and its predecessor always survive pruning

    # -- keys ---------------------------------------------------------------------------------
    @property
    def versions_key(self) -> str:
        return f"{self.prefix}:versions"

    @property
    def current_key(self) -> str:
        return f"{self.prefix}:current"

    @property
    def history_key(self) -> str:
        return f"{self.prefix}:history"

    @property
    def events_channel(self) -> str:
        return f"{self.prefix}:events"

    def _vkey(self, version: str, part: str) -> str:
        return f"{self.prefix}:v:{version}:{part}"

    # -- writing ------------------------------------------------------------------------------
    def publish(self, path: Path | str, promote: bool = True) -> str:
        """Verify the artifact at `path`, store it, optionally make it current; returns its version."""
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest)
        version = manifest.get("version")
        if not version:
            raise RegistryError(f"{path}/{MANIFEST} has no version")
        if self.conn.zscore(self.versions_key, version) is not None:
            raise RegistryError(f"version {version} is already published")
        with self.conn.pipeline() as pipe:
            pipe.set(self._vkey(version, "manifest"), json.dumps(manifest))
            for name in manifest["files"]:
                data = (path / name).read_bytes()
                if name == FLOAT_FILE:
                    pipe.set(self._vkey(version, "float"), zlib.compress(data, 1))
                else:
                    pipe.set(self._vkey(version, f"file:{name}"), data)
            pipe.zadd(self.versions_key, {version: time.time()})
            pipe.execute()
        if promote:
            self.promote(version)
        self.prune()
        return version

    def promote(self, version: str) -> None:
        """Point `current` at `version` and tell every worker."""
        if self.conn.zscore(self.versions_key, version) is None:
            raise RegistryError(f"version {version} is not in the registry (see `python -m worker.registry list`)")
        with self.conn.pipeline() as pipe:
            pipe.set(self.current_key, version)
            pipe.lrem(self.history_key, 0, version)
            pipe.lpush(self.history_key, version)
            pipe.publish(self.events_channel, json.dumps({"event": "promote", "version": version}))
            pipe.execute()

    def rollback(self, to: str | None = None) -> str:
        """Make `to` (default: the version promoted before the current one) current again."""
        current = self.current()
        if to is None:
            history = [v.decode() for v in self.conn.lrange(self.history_key, 0, -1)]
            earlier = [v for v in history if v != current and self.exists(v)]
            if not earlier:
                raise RegistryError("no earlier promoted version to roll back to")
            to = earlier[0]
        self.promote(to)
        # The rolled-back version must not be the next rollback target.
        if current:
            self.conn.lrem(self.history_key, 0, current)
        return to

    def prune(self) -> list[str]:
        """Delete the oldest versions beyond `keep`, never the current one or its predecessor."""
        versions = self.versions()
        if len(versions) <= self.keep:
            return []
        history = [v.decode() for v in self.conn.lrange(self.history_key, 0, 1)]
        protected = set(history) | {self.current()}
        removable = [v for v in versions if v not in protected]
        doomed = removable[: len(versions) - self.keep]
        for version in doomed:
            keys = list(self.conn.scan_iter(match=self._vkey(version, "*")))
            with self.conn.pipeline() as pipe:
                if keys:
                    pipe.delete(*keys)
                pipe.zrem(self.versions_key, version)
                pipe.lrem(self.history_key, 0, version)
                pipe.execute()
        return doomed

    # -- reading ------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """All versions, oldest first."""
        return [v.decode() for v in self.conn.zrange(self.versions_key, 0, -1)]

    def exists(self, version: str) -> bool:
        return self.conn.zscore(self.versions_key, version) is not None

    def current(self) -> str | None:
        raw = self.conn.get(self.current_key)
        return raw.decode() if raw else None

    def manifest(self, version: str) -> dict[str, Any]:
        raw = self.conn.get(self._vkey(version, "manifest"))
        if raw is None:
            raise RegistryError(f"version {version} is not in the registry")
        return validate_manifest(json.loads(raw))

    def fetch(self, version: str, dest: Path | str, device: str = "cpu", include_float: bool = False) -> Path:
        """Write what `device` serves (plus the float weights if asked) under dest/<version>, verified.

        An existing verified copy is reused; a corrupt one is replaced.
        """
        manifest = self.manifest(version)
        names = serving_files(manifest, device)
        if include_float and FLOAT_FILE not in names:
            names = [*names, FLOAT_FILE]
        target = Path(dest) / version
        try:
            if read_manifest(target) == manifest:
                verify_files(target, manifest, names)
                return target
        except ArtifactError:
            pass
        tmp = Path(dest) / f".{version}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name in names:
                compressed = name == FLOAT_FILE
                data = self.conn.get(self._vkey(version, "float" if compressed else f"file:{name}"))
                if data is None:
                    raise ArtifactError(f"registry entry for {version} is missing {name}")
                if compressed:
                    _inflate_to(data, tmp / name, version)
                else:
                    (tmp / name).write_bytes(data)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            verify_files(tmp, manifest, names)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def describe(self) -> list[dict[str, Any]]:
        current = self.current()
        rows = []
        for version in self.versions():
            m = self.manifest(version)
            rows.append({
                "version": version,
                "current": version == current,
                "arch": m["arch"],
                "classes": len(m["class_names"]),
                "precision": m.get("precision"),
                "parent": m.get("parent_version"),
                "created_at": m.get("created_at"),
                "metrics": m.get("metrics", {}),
            })
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.registry", description="The model registry in Redis.")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="versions kept (older ones are pruned)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish", help="store an artifact directory (and make it current)")
    p.add_argument("path")
    p.add_argument("--no-promote", action="store_true")
    sub.add_parser("list", help="versions, oldest first, as JSON lines")
    sub.add_parser("current", help="print the current version")
    p = sub.add_parser("promote", help="make VERSION current")
    p.add_argument("version")
    p = sub.add_parser("rollback", help="make the previously promoted version current")
    p.add_argument("--to")
    p = sub.add_parser("fetch", help="write a version's files to DIR/<version>")
    p.add_argument("version")
    p.add_argument("dest")
    p.add_argument("--float", action="store_true", help="include the float weights")
    args = parser.parse_args(argv)

    reg = ModelRegistry(Redis.from_url(args.redis_url), keep=args.keep)
    try:
        if args.cmd == "publish":
            print(reg.publish(args.path, promote=not args.no_promote))
        elif args.cmd == "list":
            for row in reg.describe():
                print(json.dumps(row))
        elif args.cmd == "current":
            current = reg.current()
            if current is None:
                print("no current model", file=sys.stderr)
                return 1
            print(current)
        elif args.cmd == "promote":
            reg.promote(args.version)
            print(args.version)
        elif args.cmd == "rollback":
            print(reg.rollback(args.to))
        elif args.cmd == "fetch":
            print(reg.fetch(args.version, args.dest, include_float=args.float))
    except (RegistryError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
