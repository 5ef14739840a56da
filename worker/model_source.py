"""Where the served model comes from: a local artifact (VQ_MODEL_PATH) or the Redis registry."""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from redis import Redis

from .artifact import SIGNATURE_FILE, is_valid_version, load_for_serving, read_manifest
from .malloc import keep_freed_memory
from .redis_health import is_transient
from .registry import InvalidVersionError, ModelRegistry, RegistryError
from .runtime import InferenceEngine, resolve_decode_device, resolve_device
from .settings import Settings
from .signing import verify_manifest

log = structlog.get_logger("visionqueue.model")


class NoModelError(RuntimeError):
    pass


def configure_torch(settings: Settings) -> None:
    """The process settings a serving model runs under: torch's threads and what malloc keeps."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.keep_freed_memory == "on":
        keep_freed_memory()


def _verify_local(path: Path, settings: Settings) -> None:
    """A pinned local artifact is held to the same key as the registry: it must carry manifest.sig."""
    manifest = read_manifest(path)
    sig_path = path / SIGNATURE_FILE
    signature = sig_path.read_bytes() if sig_path.is_file() else None
    signed_by = verify_manifest(manifest, signature, settings.model_pubkeys)
    log.info("local model signature verified", path=str(path), key=signed_by)


def current_artifact(settings: Settings, connection: Redis | None, version: str | None = None) -> Path:
    """The artifact directory to serve: VQ_MODEL_PATH, else `version` (default: current) from the registry.

    With VQ_MODEL_PUBKEY set, a version without a valid signature from a trusted key raises
    SignatureError before anything is written to the cache.
    """
    if settings.model_path is not None and version is None:
        if settings.model_pubkeys:
            _verify_local(settings.model_path, settings)
        return settings.model_path
    if connection is None:
        raise NoModelError("no VQ_MODEL_PATH and no Redis connection to read the registry")
    registry = ModelRegistry(connection)
    version = version or registry.current()
    if version is None:
        raise NoModelError(
            "the registry has no current model: publish one with `python -m worker.registry publish ARTIFACT` "
            "or set VQ_MODEL_PATH to an artifact directory"
        )
    try:
        return registry.fetch(version, settings.model_cache, device=resolve_device(settings.device).split(":")[0],
                              trusted_keys=settings.model_pubkeys, backend=settings.backend)
    except RegistryError as exc:
        raise NoModelError(str(exc)) from exc


def _load_one(settings: Settings, connection: Redis | None, version: str | None) -> InferenceEngine:
    device = resolve_device(settings.device)
    path = current_artifact(settings, connection, version)
    serving = load_for_serving(path, device=device, precision=settings.precision, backend=settings.backend)
    engine = InferenceEngine(serving, device=device, decode_threads=settings.decode_threads,
                             topk=settings.topk, max_batch=settings.max_batch,
                             decode_device=resolve_decode_device(settings.decode_device, device),
                             compile_mode=settings.compile, tta=settings.tta)
    engine.warm_up()
    log.info("model loaded", version=engine.version, arch=serving.manifest["arch"], precision=engine.precision,
             device=device, decode_device=engine.decode_device, compile=engine.compile_mode, path=str(path),
             signed_by_trusted_key=bool(settings.model_pubkeys))
    return engine


def _transient(exc: BaseException) -> bool:
    # The same test the hot-swap watcher uses: Redis being away is retried, not a refusal.
    return is_transient(exc) or (exc.__cause__ is not None and is_transient(exc.__cause__))


def load_engine(settings: Settings, connection: Redis | None, version: str | None = None) -> InferenceEngine:
    """Load, verify and warm up a model so it is ready before it takes a frame.

    At start (no `version`, following the registry) a current version that is refused (bad
    pointer, bad manifest, bad checksum, missing or invalid signature) does not stop the worker:
    it falls back along the promotion history to the newest earlier version that loads, and says
    so. Only if none loads is NoModelError raised. The hot-swap watcher will try the current
    version again, and refuse and count it there.
    """
    if version is not None or settings.model_path is not None or connection is None:
        return _load_one(settings, connection, version)
    registry = ModelRegistry(connection)
    current: str | None = None
    try:
        current = registry.current()
    except InvalidVersionError as exc:
        first: Exception = exc
    else:
        if current is None:
            return _load_one(settings, connection, None)  # raises the "no current model" NoModelError
        try:
            return _load_one(settings, connection, current)
        except Exception as exc:
            if _transient(exc):
                raise
            first = exc
    refused = f"{type(first).__name__}: {first}"
    log.error("the registry's current model is refused at start; falling back along the promotion history",
              version=current, error=refused)
    tried = []
    for candidate in registry.history(valid_only=False):
        if candidate == current or not registry.exists(candidate):
            if candidate != current and not is_valid_version(candidate):
                log.error("history entry is not a valid version; skipped", entry=candidate[:80])
            continue
        tried.append(candidate)
        try:
            engine = _load_one(settings, connection, candidate)
        except Exception as exc:
            if _transient(exc):
                raise
            log.error("earlier version refused too", version=candidate, error=f"{type(exc).__name__}: {exc}")
            continue
        log.warning("SERVING AN EARLIER VERSION: the current one was refused", serving=candidate,
                    current=current, error=refused)
        return engine
    raise NoModelError(
        f"the registry's current model was refused ({refused}) and no earlier promoted version loads "
        f"(tried: {', '.join(tried) or 'none'}); fix the registry (`python -m worker.registry list`, "
        "`rollback --to VERSION`) or set VQ_MODEL_PATH"
    )
