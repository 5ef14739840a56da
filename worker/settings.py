"""Worker settings from environment variables.

`rq worker` takes no custom flags, so everything the BatchWorker needs comes from here.
A bad value stops the worker at start with a message naming the variable.

| variable | default | meaning |
| --- | --- | --- |
| VQ_MODEL_PATH | (unset) | a local artifact directory; unset: the registry's current model |
| VQ_MODEL_CACHE | ~/.cache/visionqueue/models | where registry artifacts are unpacked |
| VQ_DEVICE | auto | cpu, cuda, cuda:N; auto picks cuda when available |
| VQ_PRECISION | auto | auto (int8 on CPU when the artifact has it, fp16 on CUDA), int8, fp32, fp16, bf16 |
| VQ_MAX_BATCH | 32 | most frames in one forward pass |
| VQ_MAX_WAIT_MS | 5 | longest wait for more frames while fewer than VQ_MAX_BATCH are ready |
| VQ_DECODE_THREADS | 2 | threads decoding images |
| VQ_TORCH_THREADS | (torch's default) | intra-op threads for the forward pass |
| VQ_OVERLAP_DECODE | on | decode the next batch during this batch's forward pass (on, off) |
| VQ_TOPK | 3 | classes reported per frame |
| VQ_HEARTBEAT_TTL | 10 | seconds an in-flight frame stays claimed without a heartbeat |
| VQ_WORKER_TTL | 30 | the worker's own registration TTL |
| VQ_MAINTENANCE_INTERVAL | 5 | seconds between registry maintenance (abandoned-frame recovery) |
| VQ_RESULTS_MAXLEN | 100000 | approximate length bound of the `inference:results` stream |
| VQ_METRICS_PORT | 0 | Prometheus metrics port; 0 disables |
| VQ_SWAP_POLL_S | 1.0 | how often to check the registry's current pointer (notification is immediate) |
| VQ_REDIS_OUTAGE_S | 120 | how long the worker rides through a Redis outage (batches kept) before it exits non-zero |
| VQ_MAX_RESCUES | 3 | a frame taken back from dead workers more often than this fails as poison |
| VQ_LOG_FORMAT | auto | json, console or auto (json when stderr is not a terminal) |
| VQ_LOG_LEVEL | info | debug, info, warning, error |
| VQ_MODEL_PUBKEY | (unset) | trusted Ed25519 public key(s): files or keys (PEM/base64), comma-separated |

The learning-loop capture (VQ_SAMPLE_*) is configured in `worker/sample_feed.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


class SettingsError(ValueError):
    pass


def _env_number(env: dict[str, str], name: str, default: float, lo: float, hi: float, cast: type, kind: str):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {kind}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def env_int(env: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    return _env_number(env, name, default, lo, hi, int, "an integer")


def env_float(env: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    return _env_number(env, name, default, lo, hi, float, "a number")


def env_choice(env: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _model_pubkeys(env: dict[str, str]) -> tuple[str, ...]:
    raw = env.get("VQ_MODEL_PUBKEY") or ""
    if not raw.strip():
        return ()
    from .signing import SigningError, parse_public_keys

    try:
        return parse_public_keys(raw)
    except SigningError as exc:
        raise SettingsError(f"VQ_MODEL_PUBKEY: {exc}") from None


def _device(env: dict[str, str]) -> str:
    value = (env.get("VQ_DEVICE") or "auto").strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise SettingsError(f"VQ_DEVICE={value!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class Settings:
    model_path: Path | None = None
    model_cache: Path = Path.home() / ".cache" / "visionqueue" / "models"
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    decode_threads: int = 2
    torch_threads: int = 0
    overlap_decode: str = "on"
    topk: int = 3
    heartbeat_ttl: int = 10
    worker_ttl: int = 30
    maintenance_interval: int = 5
    results_maxlen: int = 100_000
    metrics_port: int = 0
    swap_poll_s: float = 1.0
    redis_outage_s: float = 120.0
    max_rescues: int = 3
    log_format: str = "auto"
    log_level: str = "info"
    model_pubkeys: tuple[str, ...] = ()  # base64 raw Ed25519 keys; empty: signatures are not required

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        model_path = env.get("VQ_MODEL_PATH") or None
        if model_path and not Path(model_path).is_dir():
            raise SettingsError(f"VQ_MODEL_PATH={model_path!r} is not a directory")
        return cls(
            model_path=Path(model_path) if model_path else None,
            model_cache=Path(env.get("VQ_MODEL_CACHE") or cls.model_cache),
            device=_device(env),
            precision=env_choice(env, "VQ_PRECISION", "auto", ("auto", "int8", "fp32", "fp16", "bf16")),
            max_batch=env_int(env, "VQ_MAX_BATCH", 32, 1, 1024),
            max_wait_ms=env_float(env, "VQ_MAX_WAIT_MS", 5.0, 0.0, 10_000.0),
            decode_threads=env_int(env, "VQ_DECODE_THREADS", 2, 1, 64),
            torch_threads=env_int(env, "VQ_TORCH_THREADS", 0, 0, 256),
            overlap_decode=env_choice(env, "VQ_OVERLAP_DECODE", "on", ("on", "off")),
            topk=env_int(env, "VQ_TOPK", 3, 1, 100),
            heartbeat_ttl=env_int(env, "VQ_HEARTBEAT_TTL", 10, 3, 3600),
            worker_ttl=env_int(env, "VQ_WORKER_TTL", 30, 16, 3600),
            maintenance_interval=env_int(env, "VQ_MAINTENANCE_INTERVAL", 5, 1, 3600),
            results_maxlen=env_int(env, "VQ_RESULTS_MAXLEN", 100_000, 0, 100_000_000),
            metrics_port=env_int(env, "VQ_METRICS_PORT", 0, 0, 65535),
            swap_poll_s=env_float(env, "VQ_SWAP_POLL_S", 1.0, 0.05, 3600.0),
            redis_outage_s=env_float(env, "VQ_REDIS_OUTAGE_S", 120.0, 1.0, 86_400.0),
            max_rescues=env_int(env, "VQ_MAX_RESCUES", 3, 1, 100),
            log_format=env_choice(env, "VQ_LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=env_choice(env, "VQ_LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            model_pubkeys=_model_pubkeys(env),
        )

    def describe(self) -> dict[str, object]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}
