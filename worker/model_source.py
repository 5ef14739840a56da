"""Where the served model comes from: a local artifact (VQ_MODEL_PATH) or the Redis registry."""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
from redis import Redis

from .artifact import load_for_serving
from .registry import ModelRegistry, RegistryError
from .runtime import InferenceEngine, resolve_device
from .settings import Settings

log = structlog.get_logger("visionqueue.model")


class NoModelError(RuntimeError):
    pass


def configure_torch(settings: Settings) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def current_artifact(settings: Settings, connection: Redis | None, version: str | None = None) -> Path:
    """The artifact directory to serve: VQ_MODEL_PATH, else `version` (default: current) from the registry."""
    if settings.model_path is not None and version is None:
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
        return registry.fetch(version, settings.model_cache, device=resolve_device(settings.device).split(":")[0])
    except RegistryError as exc:
        raise NoModelError(str(exc)) from exc


def load_engine(settings: Settings, connection: Redis | None, version: str | None = None) -> InferenceEngine:
    """Load, verify and warm up a model so it is ready before it takes a frame."""
    device = resolve_device(settings.device)
    path = current_artifact(settings, connection, version)
    serving = load_for_serving(path, device=device, precision=settings.precision)
    engine = InferenceEngine(serving, device=device, decode_threads=settings.decode_threads,
                             topk=settings.topk, max_batch=settings.max_batch)
    engine.warm_up()
    log.info("model loaded", version=engine.version, arch=serving.manifest["arch"], precision=engine.precision,
             device=device, path=str(path))
    return engine
