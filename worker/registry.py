"""The model registry, kept in Redis so a worker on any host needs only REDIS_URL.

Keys (prefix `vq:models`):
    :versions              ZSET version -> publish time
    :v:<version>:manifest  the manifest JSON (canonical: sorted keys, no whitespace)
    :v:<version>:signature the Ed25519 signature over the canonical manifest (absent: unsigned)
    :v:<version>:file:<n>  a serving file, raw bytes (n from the artifact file allowlist)
    :v:<version>:float     the float weights, zlib-compressed (for the updater and CUDA workers)
    :current               the version workers serve
    :history               LIST of versions promoted, newest first (rollback walks it)
    :events                pub/sub channel: a message on every promotion

Whoever can write Redis can write all of this, so every value read back is data: a version must
match one strict pattern before it becomes part of a key or a directory name, file names come from
the artifact allowlist, and per-version keys are named exactly (never a SCAN pattern).

CLI: `python -m worker.registry publish PATH [--no-promote] [--sign-key FILE] | list | current |
promote VERSION | fetch VERSION DIR [--float] | rollback [--to VERSION] | verify VERSION |
keygen --out DIR | mirror`.

Past one Redis (`worker.shards`): the registry is written on the primary shard (shard 0) only and
mirrored to every other shard, so each shard's workers read (and hear `:events` on) their own Redis
as with one. `mirror(primary, replica)` copies what a replica lacks (byte for byte, GET/SET: the
publisher and updater ACL users need nothing more), sets `current` and `history` as on the primary
(announcing a change on the replica's channel) and drops versions the primary pruned. With a shard
map and no `--redis-url`, `publish`, `promote` and `rollback` write the primary and then mirror;
`python -m worker.registry mirror` does it on its own: after `continual.update` or a trainer's
publish, and to bring back a shard that was down or new. It is idempotent; a replica that cannot be
reached is reported (exit 1) and catches up at the next mirror.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from .artifact import (
    DATA_FILES,
    FLOAT_FILE,
    MANIFEST,
    SIGNATURE_FILE,
    ArtifactError,
    check_version,
    is_valid_version,
    parse_manifest,
    read_manifest,
    safe_child,
    serving_files,
    verify_files,
)
from .redis_health import connect
from .settings import ROWS, SettingsError, setting
from .signing import (
    PUBKEY_ENV,
    SIGN_KEY_ENV,
    SignatureError,
    SigningError,
    canonical_manifest,
    generate_keypair,
    key_id,
    parse_public_keys,
    public_key_of,
    sign_manifest,
    verify_manifest,
)

PREFIX = "vq:models"
DEFAULT_KEEP: int = ROWS["VQ_REGISTRY_KEEP"].default  # a registry built without `keep` reads VQ_REGISTRY_KEEP


# The float weights are stored zlib-compressed; inflated in chunks straight to disk, never past this.
MAX_FLOAT_BYTES = 8 * 1024**3


class RegistryError(RuntimeError):
    pass


class InvalidVersionError(RegistryError):
    """A version (given, or read from Redis) that does not have the one accepted shape."""


def _valid(version: object, what: str = "version") -> str:
    try:
        return check_version(version, what)
    except ArtifactError as exc:
        raise InvalidVersionError(str(exc)) from None


def _inflate_to(blob: bytes, path: Path, version: str, chunk: int = 64 * 1024**2) -> None:
    try:
        _inflate(blob, path, version, chunk)
    except zlib.error as exc:
        raise ArtifactError(f"registry entry for {version}: float weights are not valid zlib data ({exc})") from None


def _inflate(blob: bytes, path: Path, version: str, chunk: int) -> None:
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


@contextmanager
def _install_lock(base: Path, version: str) -> Iterator[None]:
    """One installer per version per cache: replicas sharing a cache volume never delete each other's files."""
    fd = os.open(base / f".{version}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # never follow a planted link: remove the link itself
    elif path.is_dir():
        shutil.rmtree(path)


class ModelRegistry:
    def __init__(self, connection: Redis, prefix: str = PREFIX, keep: int | None = None) -> None:
        self.conn = connection
        self.prefix = prefix
        # The current version and its predecessor always survive pruning.
        self.keep = max(2, setting("VQ_REGISTRY_KEEP") if keep is None else keep)

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
        return f"{self.prefix}:v:{_valid(version)}:{part}"

    def _file_key(self, version: str, name: str) -> str:
        if name not in DATA_FILES:
            raise ArtifactError(f"{name[:80]!r} is not an allowed artifact file name")
        return self._vkey(version, "float" if name == FLOAT_FILE else f"file:{name}")

    def version_keys(self, version: str) -> list[str]:
        """Every key a version can own, named exactly: what prune deletes (no pattern, no key list from Redis)."""
        return [self._vkey(version, "manifest"), self._vkey(version, "signature"),
                *(self._file_key(version, name) for name in sorted(DATA_FILES))]

    # -- writing ------------------------------------------------------------------------------
    def publish(self, path: Path | str, promote: bool = True, sign_key: Path | str | None = None) -> str:
        """Verify the artifact at `path`, store it (signed), optionally make it current; returns its version.

        `sign_key` defaults to $VQ_SIGN_KEY_FILE, so every caller of publish (the trainer, the
        updater after its gate) signs when the host holds the key; without one the version is
        stored unsigned, and workers that pin a key will refuse it.
        """
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest)
        version = manifest.get("version")
        if not version:
            raise RegistryError(f"{path}/{MANIFEST} has no version")
        version = _valid(version)
        sign_key = sign_key or setting(SIGN_KEY_ENV)
        signature = sign_manifest(manifest, sign_key) if sign_key else None
        if self.conn.zscore(self.versions_key, version) is not None:
            raise RegistryError(f"version {version} is already published")
        with self.conn.pipeline() as pipe:
            pipe.set(self._vkey(version, "manifest"), canonical_manifest(manifest))
            if signature is not None:
                pipe.set(self._vkey(version, "signature"), signature)
            for name in manifest["files"]:
                data = safe_child(path, name).read_bytes()
                pipe.set(self._file_key(version, name), zlib.compress(data, 1) if name == FLOAT_FILE else data)
            pipe.zadd(self.versions_key, {version: time.time()})
            pipe.execute()
        if promote:
            self.promote(version)
        self.prune()
        return version

    def promote(self, version: str) -> None:
        """Point `current` at `version` and tell every worker; RegistryError, current unchanged, when the
        version is not listed or has lost its manifest or a file (no worker could load it)."""
        version = _valid(version)
        if self.conn.zscore(self.versions_key, version) is None:
            raise RegistryError(f"version {version} is not in the registry (see `python -m worker.registry list`)")
        problem = self.unservable(version)
        if problem:
            raise RegistryError(f"version {version} cannot be made current: {problem}")
        with self.conn.pipeline() as pipe:
            pipe.set(self.current_key, version)
            pipe.lrem(self.history_key, 0, version)
            pipe.lpush(self.history_key, version)
            pipe.publish(self.events_channel, json.dumps({"event": "promote", "version": version}))
            pipe.execute()

    def rollback(self, to: str | None = None) -> str:
        """Make `to` (default: the version promoted before the current one) current again.

        Works with a broken `current` too (that is when it is needed most): the bad value is replaced.
        """
        if to is not None:
            to = _valid(to)
        current = self._current_or_none()
        if to is None:
            earlier = [v for v in self.history() if v != current and self.exists(v) and not self.unservable(v)]
            if not earlier:
                raise RegistryError("no earlier promoted version to roll back to (one whose manifest and files "
                                    "are all still in the registry)")
            to = earlier[0]
        self.promote(to)
        # The rolled-back version must not be the next rollback target (unless it was the target itself).
        if current and current != to:
            self.conn.lrem(self.history_key, 0, current)
        return to

    def unservable(self, version: str) -> str | None:
        """Why no worker could load `version` from the registry (its manifest or a file it lists is gone or
        unreadable), or None. Checks presence, not content: a worker verifies every checksum as it loads."""
        try:
            manifest = self.manifest(version)
        except (RegistryError, ArtifactError) as exc:
            return f"its manifest: {exc}"
        names = list(manifest.get("files") or {})
        with self.conn.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self._file_key(version, name))
            present = pipe.execute()
        missing = [name for name, here in zip(names, present, strict=True) if not here]
        return f"its {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} gone from Redis" if missing else None

    def prune(self) -> list[str]:
        """Delete the oldest versions beyond `keep`, never the current one or its predecessor."""
        members = [m.decode(errors="replace") for m in self.conn.zrange(self.versions_key, 0, -1)]
        invalid = [m for m in members if not is_valid_version(m)]
        if invalid:
            # Planted members own no keys we would name; drop the entries themselves (exact members).
            self.conn.zrem(self.versions_key, *invalid)
        versions = [m for m in members if is_valid_version(m)]
        if len(versions) <= self.keep:
            return []
        protected = set(self.history()[:2]) | {self._current_or_none()}
        removable = [v for v in versions if v not in protected]
        doomed = removable[: len(versions) - self.keep]
        for version in doomed:
            with self.conn.pipeline() as pipe:
                pipe.delete(*self.version_keys(version))
                pipe.zrem(self.versions_key, version)
                pipe.lrem(self.history_key, 0, version)
                pipe.execute()
        return doomed

    # -- reading ------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """All valid versions, oldest first (a planted member that is not a version is ignored)."""
        members = (m.decode(errors="replace") for m in self.conn.zrange(self.versions_key, 0, -1))
        return [m for m in members if is_valid_version(m)]

    def exists(self, version: str) -> bool:
        return is_valid_version(version) and self.conn.zscore(self.versions_key, version) is not None

    def current(self) -> str | None:
        """The current version; InvalidVersionError if Redis holds something that is not a version."""
        raw = self.conn.get(self.current_key)
        if raw is None:
            return None
        value = raw.decode(errors="replace")
        if not is_valid_version(value):
            raise InvalidVersionError(
                f"the registry's current pointer {value[:80]!r} is not a valid model version; refusing it "
                "(repair with `python -m worker.registry rollback --to VERSION`)"
            )
        return value

    def _current_or_none(self) -> str | None:
        try:
            return self.current()
        except InvalidVersionError:
            return None

    def history(self, valid_only: bool = True) -> list[str]:
        """Versions promoted, newest first; entries that are not versions are dropped unless asked for."""
        entries = [v.decode(errors="replace") for v in self.conn.lrange(self.history_key, 0, -1)]
        return [v for v in entries if is_valid_version(v)] if valid_only else entries

    def manifest(self, version: str) -> dict[str, Any]:
        """The version's manifest, parsed within bounds and validated; it must name itself `version`."""
        version = _valid(version)
        raw = self.conn.get(self._vkey(version, "manifest"))
        if raw is None:
            raise RegistryError(f"version {version} is not in the registry")
        manifest = parse_manifest(raw, f"the registry's manifest of {version}")
        if manifest.get("version") != version:
            # A signed manifest copied under another name must not pass as that version.
            raise ArtifactError(f"the registry's entry {version} holds the manifest of {manifest.get('version')!r}")
        return manifest

    def signature(self, version: str) -> bytes | None:
        return self.conn.get(self._vkey(version, "signature"))

    def verify(self, version: str, trusted_keys: Sequence[str]) -> str:
        """The id of the trusted key that signed `version`; SignatureError if none did."""
        return verify_manifest(self.manifest(version), self.signature(version), trusted_keys)

    def fetch(self, version: str, dest: Path | str, device: str = "cpu", include_float: bool = False,
              trusted_keys: Sequence[str] | None = None, backend: str = "torch") -> Path:
        """Write what `device` serves (plus the float weights if asked) under dest/<version>, verified.

        With trusted keys (default: $VQ_MODEL_PUBKEY, so the updater checks the model it fine-tunes
        before it signs the result; `()` checks nothing) the signature is checked before anything
        is written. An existing verified copy is reused; a corrupt one is replaced.
        """
        version = _valid(version)
        if trusted_keys is None:
            trusted_keys = setting(PUBKEY_ENV)
        manifest = self.manifest(version)
        signature = self.signature(version)
        if trusted_keys:
            verify_manifest(manifest, signature, trusted_keys)
        names = serving_files(manifest, device, backend)  # VQ_BACKEND=onnxruntime fetches model.onnx only
        if include_float and FLOAT_FILE not in names:
            names = [*names, FLOAT_FILE]
        Path(dest).mkdir(parents=True, exist_ok=True)
        base = Path(dest).resolve()
        target = base / version
        if target.parent != base:
            raise InvalidVersionError(f"version {version!r} does not name a directory inside {base}")
        with _install_lock(base, version):
            if target.is_dir() and not target.is_symlink():
                try:
                    if read_manifest(target) == manifest:
                        verify_files(target, manifest, names)
                        return target
                except ArtifactError:
                    pass
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=base))
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
            try:
                for name in names:
                    data = self.conn.get(self._file_key(version, name))
                    if data is None:
                        raise ArtifactError(f"registry entry for {version} is missing {name}")
                    if name == FLOAT_FILE:
                        _inflate_to(data, safe_child(tmp, name), version)
                    else:
                        safe_child(tmp, name).write_bytes(data)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                if signature is not None:
                    (tmp / SIGNATURE_FILE).write_bytes(signature)
                verify_files(tmp, manifest, names)
                _remove(target)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def describe(self, trusted_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
        current = self._current_or_none()
        rows = []
        for version in self.versions():
            signature = self.signature(version)
            row: dict[str, Any] = {"version": version, "current": version == current, "signed": signature is not None}
            try:
                m = self.manifest(version)
            except (RegistryError, ArtifactError) as exc:
                rows.append({**row, "error": str(exc)})  # one bad entry must not hide the others
                continue
            if trusted_keys:
                try:
                    row["signed_by"] = verify_manifest(m, signature, trusted_keys)
                    row["signature_valid"] = True
                except SignatureError:
                    row["signature_valid"] = False
            row.update({
                "arch": m["arch"],
                "classes": len(m["class_names"]),
                "precision": m.get("precision"),
                "parent": m.get("parent_version"),
                "created_at": m.get("created_at"),
                "metrics": m.get("metrics", {}),
            })
            rows.append(row)
        return rows


def mirror(primary: ModelRegistry, replica: ModelRegistry) -> dict[str, Any]:
    """Make `replica` hold what `primary` holds: versions, `current`, `history`. What changed, as counts.

    Order matters for a worker reading the replica meanwhile: a version's keys are complete before
    it joins `:versions`, `current` moves only once its version is there, and versions are dropped
    only after `current` has left them.
    """
    versions = primary.versions()
    wanted = set(versions)
    copied = []
    for version in versions:
        if replica.conn.zscore(replica.versions_key, version) is not None:
            continue  # a version is immutable once published: present means equal
        keys = primary.version_keys(version)
        values = primary.conn.mget(keys)
        score = primary.conn.zscore(primary.versions_key, version)
        if values[0] is None or score is None:
            continue  # pruned on the primary meanwhile
        with replica.conn.pipeline() as pipe:
            # version_keys names the same parts in the same order on both sides (prefixes may differ).
            for key, value in zip(replica.version_keys(version), values, strict=True):
                if value is not None:
                    pipe.set(key, value)
            pipe.zadd(replica.versions_key, {version: score})
            pipe.execute()
        copied.append(version)
    current = primary._current_or_none()
    history = [v for v in primary.history() if v in wanted]
    moved = current is not None and replica._current_or_none() != current
    if replica.history(valid_only=False) != history or moved:
        with replica.conn.pipeline() as pipe:
            pipe.delete(replica.history_key)
            if history:
                pipe.rpush(replica.history_key, *history)
            if current is not None:
                pipe.set(replica.current_key, current)
                if moved:  # the replica's workers swap now, not at their next poll
                    pipe.publish(replica.events_channel, json.dumps({"event": "promote", "version": current}))
            pipe.execute()
    dropped = [v for v in replica.versions() if v not in wanted and v != current]
    for version in dropped:
        with replica.conn.pipeline() as pipe:
            pipe.delete(*replica.version_keys(version))
            pipe.zrem(replica.versions_key, version)
            pipe.execute()
    return {"copied": copied, "dropped": dropped, "current": current, "promoted": moved}


def mirror_shards(shards: Any, keep: int | None = None) -> list[dict[str, Any]]:
    """Mirror the primary shard's registry to every other shard of `shards` (a worker.shards.ShardMap).

    One report per replica; a replica that cannot be reached gets `error` and the others go on.
    """
    from .redis_health import mask_url
    from .shards import PRIMARY

    reports = []
    primary = ModelRegistry(connect(shards.primary_url, socket_timeout=120), keep=keep)
    try:
        for index in range(len(shards)):
            if index == PRIMARY:
                continue
            where = {"shard": index, "url": mask_url(shards.url(index))}
            conn = connect(shards.url(index), socket_timeout=120, socket_connect_timeout=5.0)
            try:
                reports.append({**where, **mirror(primary, ModelRegistry(conn, keep=keep))})
            except RedisError as exc:
                reports.append({**where, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            finally:
                conn.close()
    finally:
        primary.conn.close()
    return reports


def _trusted(flag: str | None) -> tuple[str, ...]:
    """--pubkey's keys, else $VQ_MODEL_PUBKEY's (the table reads and checks it)."""
    return parse_public_keys(flag) if flag and flag.strip() else setting(PUBKEY_ENV)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.registry", description="The model registry in Redis.")
    parser.add_argument("--redis-url", help="default: $REDIS_URL_FILE, else $REDIS_URL (password file: "
                                            "$REDIS_PASSWORD_FILE)")
    parser.add_argument("--redis-urls", metavar="URL,URL,…",
                        help="shard map (default: $REDIS_URLS_FILE, else $REDIS_URLS): read and write shard 0, the "
                             "primary; publish, promote and rollback then mirror it to the other shards")
    parser.add_argument("--keep", type=int, default=None,
                        help=f"versions kept, older ones are pruned (default: $VQ_REGISTRY_KEEP, else {DEFAULT_KEEP})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pubkey_help = f"trusted public key(s): file or key, comma-separated (default: ${PUBKEY_ENV})"
    p = sub.add_parser("publish", help="store an artifact directory (and make it current)")
    p.add_argument("path")
    p.add_argument("--no-promote", action="store_true")
    p.add_argument("--sign-key", default=None,
                   help=f"Ed25519 private key (PEM) to sign the manifest with (default: ${SIGN_KEY_ENV})")
    p = sub.add_parser("list", help="versions, oldest first, as JSON lines (signed, and valid for the trusted keys)")
    p.add_argument("--pubkey", default=None, help=pubkey_help)
    sub.add_parser("current", help="print the current version")
    p = sub.add_parser("promote", help="make VERSION current")
    p.add_argument("version")
    p = sub.add_parser("rollback", help="make the previously promoted version current")
    p.add_argument("--to")
    p = sub.add_parser("fetch", help="write a version's files to DIR/<version>")
    p.add_argument("version")
    p.add_argument("dest")
    p.add_argument("--float", action="store_true", help="include the float weights")
    p.add_argument("--pubkey", default=None, help=pubkey_help)
    p = sub.add_parser("verify", help="check VERSION's signature against the trusted key(s); exit 3 if invalid")
    p.add_argument("version")
    p.add_argument("--pubkey", default=None, help=pubkey_help)
    p = sub.add_parser("keygen", help="write an Ed25519 signing key (signing.key, 0600) and signing.pub to DIR")
    p.add_argument("--out", required=True)
    sub.add_parser("mirror", help="copy the primary shard's registry to every other shard (one JSON line each); "
                                  "exit 1 if a shard could not be reached")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "keygen":
            private, public = generate_keypair(args.out)
            raw = public_key_of(private)
            print(json.dumps({"signing_key": str(private), "public_key": str(public), "public_key_b64": raw,
                              "key_id": key_id(raw)}))
            return 0
        from .shards import shard_map

        # An explicit --redis-url is one Redis, as ever; otherwise a shard map means "the primary, then mirror".
        shards = None if args.redis_url is not None else shard_map(args.redis_urls)  # "" is refused, not the default
        if args.cmd == "mirror":
            if shards is None:
                print("error: mirror needs a shard map: --redis-urls, $REDIS_URLS_FILE or $REDIS_URLS",
                      file=sys.stderr)
                return 2
            return _print_mirror(mirror_shards(shards, keep=args.keep))
        url = shards.primary_url if shards is not None else args.redis_url
        reg = ModelRegistry(connect(url, socket_timeout=120), keep=args.keep)  # a model is one big SET
        if args.cmd == "publish":
            print(reg.publish(args.path, promote=not args.no_promote, sign_key=args.sign_key))
        elif args.cmd == "list":
            for row in reg.describe(_trusted(args.pubkey)):
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
            print(reg.fetch(args.version, args.dest, include_float=args.float, trusted_keys=_trusted(args.pubkey)))
        elif args.cmd == "verify":
            trusted = _trusted(args.pubkey)
            if not trusted:
                print(f"error: no trusted key: give --pubkey or set {PUBKEY_ENV}", file=sys.stderr)
                return 2
            print(json.dumps({"version": args.version, "signed_by": reg.verify(args.version, trusted)}))
        if shards is not None and len(shards) > 1 and args.cmd in ("publish", "promote", "rollback"):
            return _print_mirror(mirror_shards(shards, keep=args.keep), file=sys.stderr)
    except SignatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (RegistryError, ArtifactError, SigningError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:  # unreachable, refused credentials, a fault that outlasted the call
        print(f"error: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


def _print_mirror(reports: list[dict[str, Any]], file: Any = None) -> int:
    for report in reports:
        print(json.dumps(report), file=file or sys.stdout)
    return 1 if any("error" in r for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
