"""Every setting of visionqueue, in one table: `TABLE` below.

A row is one setting: its scope (which component reads it), its name on the settings object, its
environment variable, its type, default, bounds or choices, and a one-line meaning; the gateway's
rows also name their command-line flag. The table produces

  - the settings objects (`Settings` for the worker, `SamplingConfig`, `RedisSettings`,
    `LogSettings`, `RegistrySettings`, `FrameLimits`, `ContinualSettings`, `GatewaySettings`),
  - the error for a bad value: a `SettingsError` naming the variable (or flag) and what it accepts,
  - the README's tables: `python -m worker.settings --markdown [SCOPE]`, checked by
    `python -m worker.settings --check-readme README.md` (and tests/test_settings.py).

This module is the only one that reads `os.environ` for a setting. `rq worker` takes no custom flags,
so a worker is configured here entirely; a bad value stops it at start. Light: no torch, producers
import it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting with a value it cannot take; the message names the variable (or flag) and its bounds."""


SCOPES: dict[str, str] = {
    "worker": "Worker (`rq worker --worker-class worker.BatchWorker`)",
    "frames": "Frame limits (workers, producers and the gateway enforce the same)",
    "samples": "Sample capture for the learning loop (in every worker)",
    "registry": "Model registry and signing",
    "redis": "Redis connection (every process)",
    "logging": "Logging (every entry point)",
    "continual": "Learning loop (`continual.ingest`, `continual.update`, the store)",
    "gateway": "HTTP gateway (`python -m deploy.gateway`; a flag wins over its variable)",
}

# What each kind accepts, as the README's "allowed" column says it (numbers and choices say their own).
KINDS: dict[str, str] = {
    "int": "",
    "float": "",
    "choice": "",
    "device": "`auto`, `cpu`, `cuda`, `cuda:N`",
    "path": "a path",
    "dir": "an existing directory",
    "file": "a readable file",
    "url": "a `redis://`, `rediss://` or `unix://` URL",
    "urls": "`redis://`, `rediss://` or `unix://` URLs, comma-separated",
    "key": "one key, no spaces",
    "pubkeys": "files or keys (PEM, base64), comma-separated",
    "host": "a host name or address",
}


@dataclass(frozen=True)
class Row:
    scope: str
    name: str  # the field on the scope's settings object
    env: str
    kind: str
    default: Any
    meaning: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    flag: str | None = None
    shown: str | None = None  # the README's default when the value alone would mislead (computed defaults)
    secret: bool = False  # never echo the value in an error: it may hold a password or an API key


def _rows() -> tuple[Row, ...]:
    W, F, S, RG, RD, L, C, G = "worker", "frames", "samples", "registry", "redis", "logging", "continual", "gateway"
    return (
        # -- worker ---------------------------------------------------------------------------------
        Row(W, "model_path", "VQ_MODEL_PATH", "dir", None,
            "a local artifact directory; unset: the registry's current model"),
        Row(W, "model_cache", "VQ_MODEL_CACHE", "path", "~/.cache/visionqueue/models",
            "where registry artifacts are unpacked"),
        Row(W, "device", "VQ_DEVICE", "device", "auto", "where the model runs; `auto` picks cuda when available"),
        Row(W, "precision", "VQ_PRECISION", "choice", "auto",
            "`auto`: int8 on CPU when the artifact has it, fp16 autocast on CUDA",
            choices=("auto", "int8", "fp32", "fp16", "bf16")),
        Row(W, "backend", "VQ_BACKEND", "choice", "torch",
            "what runs the model: `torch` (int8 FX/PT2E on CPU, autocast on CUDA) or `onnxruntime` (the "
            "artifact's model.onnx from `python -m trainer.export --into-artifact`, CPU; needs the `export` extra)",
            choices=("torch", "onnxruntime")),
        Row(W, "max_batch", "VQ_MAX_BATCH", "int", 32, "most frames in one forward pass", 1, 1024),
        Row(W, "max_wait_ms", "VQ_MAX_WAIT_MS", "float", 5.0,
            "longest wait for more frames while fewer than `VQ_MAX_BATCH` are ready", 0.0, 10_000.0),
        Row(W, "decode_threads", "VQ_DECODE_THREADS", "int", 2, "threads decoding images", 1, 64),
        Row(W, "torch_threads", "VQ_TORCH_THREADS", "int", 0, "intra-op threads for the forward pass", 0, 256,
            shown="`0` (torch's)"),
        Row(W, "overlap_decode", "VQ_OVERLAP_DECODE", "choice", "on",
            "decode the next batch during this batch's forward pass", choices=("on", "off")),
        Row(W, "keep_freed_memory", "VQ_KEEP_FREED_MEMORY", "choice", "on",
            "glibc: keep the memory a forward pass frees for the next one (`mallopt`) rather than return it "
            "to the kernel and fault it in again; the worker keeps its peak heap resident (worker/malloc.py)",
            choices=("on", "off")),
        Row(W, "claim_ahead", "VQ_CLAIM_AHEAD", "choice", "auto",
            "when a worker whose forward pass is busy takes its next batch: `off`, not until the forward pass "
            "is free; `backlog`, only frames already queued (a new frame goes to an idle worker first), so their "
            "decode overlaps the forward pass; `full`, only once a whole batch is queued; `always`, block on the "
            "queue at once; `auto`: `backlog` with the model on CUDA, `full` on the CPU (worker/runtime.py)",
            choices=("auto", "off", "full", "backlog", "always")),
        Row(W, "decode_device", "VQ_DECODE_DEVICE", "choice", "auto",
            "where JPEGs are decoded: `cuda` batches them through nvJPEG and resizes there (PNG and what nvJPEG "
            "refuses go to the decode threads); `auto`: on the model's device when that is CUDA",
            choices=("auto", "cpu", "cuda")),
        Row(W, "compile", "VQ_COMPILE", "choice", "off",
            "torch.compile the float model at padded batch sizes, each warmed before the first frame "
            "(`reduce-overhead`: CUDA graphs); int8 models keep their backend's own",
            choices=("off", "reduce-overhead", "max-autotune")),
        Row(W, "topk", "VQ_TOPK", "int", 3, "classes reported per frame", 1, 100),
        Row(W, "tta", "VQ_TTA", "choice", "off",
            "test-time augmentation: `hflip` also classifies each frame mirrored in the same batch and averages "
            "the calibrated probabilities (results say `tta`; see the Training section for its cost)",
            choices=("off", "hflip")),
        Row(W, "heartbeat_ttl", "VQ_HEARTBEAT_TTL", "int", 10,
            "seconds a claimed frame survives its worker's death before it is re-run", 3, 3600),
        Row(W, "worker_ttl", "VQ_WORKER_TTL", "int", 30, "seconds the worker's own registration lives", 16, 3600),
        Row(W, "maintenance_interval", "VQ_MAINTENANCE_INTERVAL", "int", 5,
            "seconds between recovery sweeps (frames of dead workers)", 1, 3600),
        Row(W, "keep_images", "VQ_KEEP_IMAGES", "choice", "failed",
            "which ended frames keep their image in Redis until their job's TTL: `failed` (a frame that got "
            "its result keeps the rest of its job, args included, but not the image: Redis memory per frame "
            "drops from the image's size to a few KB); `all` (RQ's way)", choices=("failed", "all")),
        Row(W, "results_maxlen", "VQ_RESULTS_MAXLEN", "int", 100_000,
            "approximate length bound of the `inference:results` stream", 0, 100_000_000),
        Row(W, "metrics_port", "VQ_METRICS_PORT", "int", 0,
            "Prometheus metrics port: `vq_frames_total{outcome}`, `vq_redis_up`, `vq_results_trimmed_total`, "
            "`vq_batch_size`, `vq_queue_wait_seconds`, `vq_inference_seconds`, `vq_end_to_end_seconds`, "
            "`vq_model_info`, `vq_model_swaps_total`, `vq_samples_total`", 0, 65535, shown="`0` (off)"),
        Row(W, "swap_poll_s", "VQ_SWAP_POLL_S", "float", 1.0,
            "seconds between checks of the registry's current version (pub/sub is immediate)", 0.05, 3600.0),
        Row(W, "shadow_share", "VQ_SHADOW_SHARE", "float", 0.25,
            "share of batches also run through a shadow candidate (`continual.update --shadow`), after their "
            "results are recorded; the updater's share can only lower it; `0`: never shadow", 0.0, 1.0),
        Row(W, "max_rescues", "VQ_MAX_RESCUES", "int", 3,
            "a frame taken back from dead workers more often than this fails as poison", 1, 100),
        # -- frames (read at import by worker.frames) -----------------------------------------------
        Row(F, "max_image_bytes", "VQ_MAX_IMAGE_BYTES", "int", 16 * 1024 * 1024,
            "largest encoded image in a frame", 1024, 1024**3, shown="`16777216` (16 MiB)"),
        Row(F, "max_pixels", "VQ_MAX_PIXELS", "int", 40_000_000,
            "most pixels an image may declare in its header, checked before decoding", 64, 10**9),
        # -- samples --------------------------------------------------------------------------------
        Row(S, "strategy", "VQ_SAMPLE_STRATEGY", "choice", "least_confidence",
            "how uncertainty is measured; `none` captures only the audit share",
            choices=("least_confidence", "margin", "entropy", "none")),
        Row(S, "threshold", "VQ_SAMPLE_THRESHOLD", "float", 0.6,
            "capture a frame whose calibrated top-1 probability (or margin) is below this", 0.0, 1.0),
        Row(S, "audit_rate", "VQ_SAMPLE_AUDIT_RATE", "float", 0.01,
            "share of all frames captured at random, so the store stays representative", 0.0, 1.0),
        Row(S, "per_minute", "VQ_SAMPLE_PER_MINUTE", "int", 120, "fleet-wide captures per minute", 0, 10**7),
        Row(S, "per_hour", "VQ_SAMPLE_PER_HOUR", "int", 2_000, "fleet-wide captures per hour", 0, 10**8),
        Row(S, "per_day", "VQ_SAMPLE_PER_DAY", "int", 20_000, "fleet-wide captures per day", 0, 10**9),
        Row(S, "per_class_hour", "VQ_SAMPLE_PER_CLASS_HOUR", "int", 500,
            "fleet-wide captures per predicted class per hour", 0, 10**8),
        Row(S, "dedup_bits", "VQ_SAMPLE_DEDUP_BITS", "int", 6,
            "a frame within this many bits (64-bit difference hash) of its station's recent ones is a duplicate; "
            "-1: off", -1, 64),
        Row(S, "stream_maxlen", "VQ_SAMPLE_STREAM_MAXLEN", "int", 20_000,
            "un-ingested samples `continual:samples` may hold; more are refused (`dropped_full`)", 1, 10**8),
        # -- registry and signing -------------------------------------------------------------------
        Row(RG, "model_pubkeys", "VQ_MODEL_PUBKEY", "pubkeys", (),
            "trusted Ed25519 public key(s): serve (and fine-tune) only versions signed by one of them",
            shown="unset (no signature required)"),
        Row(RG, "sign_key_file", "VQ_SIGN_KEY_FILE", "file", None,
            "Ed25519 private key (PEM) that publishers (trainer, updater) sign new versions with"),
        Row(RG, "registry_keep", "VQ_REGISTRY_KEEP", "int", 5,
            "versions kept; older ones are pruned, never the current one or its predecessor", 2, 1000),
        # -- redis ----------------------------------------------------------------------------------
        Row(RD, "redis_url", "REDIS_URL", "url", "redis://localhost:6379/0",
            "where Redis is (a `--redis-url` flag wins; TLS options go in the query)", secret=True),
        Row(RD, "redis_url_file", "REDIS_URL_FILE", "file", None,
            "a file holding the URL (a mounted secret); wins over `REDIS_URL`"),
        Row(RD, "redis_password_file", "REDIS_PASSWORD_FILE", "file", None,
            "a file holding the password for the URL's ACL user; the URL then carries none"),
        Row(RD, "redis_outage_s", "VQ_REDIS_OUTAGE_S", "float", 120.0,
            "seconds a process waits out a Redis outage before it gives up and says why", 1.0, 86_400.0),
        # Past one Redis (RQ cannot use Redis Cluster): independent shards, stations spread by a stable hash.
        Row(RD, "redis_urls", "REDIS_URLS", "urls", None,
            "shard by station over these Redis URLs, comma-separated, in a fixed order (see \"Past one Redis\"); "
            "unset: one Redis", secret=True, shown="unset (`REDIS_URL` alone)"),
        Row(RD, "redis_urls_file", "REDIS_URLS_FILE", "file", None,
            "the shard map: a file of shard URLs, one per line, `#` comments; wins over `REDIS_URLS`"),
        Row(RD, "shard", "VQ_SHARD", "int", None,
            "the shard (0-based index into the shard URLs) a worker, gateway or `worker.shards exec` serves",
            0, 1023),
        # -- logging --------------------------------------------------------------------------------
        Row(L, "log_format", "VQ_LOG_FORMAT", "choice", "auto",
            "structlog renderer; `auto`: JSON when stderr is not a terminal", choices=("auto", "json", "console")),
        Row(L, "log_level", "VQ_LOG_LEVEL", "choice", "info", "lowest level logged",
            choices=("debug", "info", "warning", "error")),
        # -- continual ------------------------------------------------------------------------------
        Row(C, "store", "CONTINUAL_STORE", "path", "var/continual",
            "the sample store: content-addressed images and the SQLite index"),
        Row(C, "holdout_pct", "CONTINUAL_HOLDOUT_PCT", "int", 20,
            "percent of captured images held out for evaluation, fixed by content hash", 0, 100),
        Row(C, "runs", "CONTINUAL_RUNS", "path", "var/updates", "where `continual.update` writes its runs"),
        Row(C, "base_split", "CONTINUAL_BASE_SPLIT", "file", None,
            "`split.json` of the original training data: the original holdout and the replay buffer"),
        # -- gateway --------------------------------------------------------------------------------
        Row(G, "api_key", "VQ_API_KEY", "key", None, "one accepted API key (added to `--api-key`s)",
            flag="--api-key", secret=True),
        Row(G, "api_key_file", "VQ_API_KEY_FILE", "file", None,
            "a file of API keys, one per line (one per client), `#` comments", flag="--api-key-file"),
        Row(G, "host", "VQ_GATEWAY_HOST", "host", "127.0.0.1", "address to listen on", flag="--host"),
        Row(G, "port", "VQ_GATEWAY_PORT", "int", 8080, "port to listen on", 1, 65535, flag="--port"),
        Row(G, "max_queue", "VQ_GATEWAY_MAX_QUEUE", "int", 1000,
            "queue length at which submissions get 429", 1, 10**9, flag="--max-queue"),
        Row(G, "timeout", "VQ_GATEWAY_TIMEOUT", "float", 30.0,
            "seconds /v1/classify waits when the client gives no `?timeout=`", 0.1, 300.0, flag="--timeout"),
        # A waiter holds a connection all along; results stay readable 600 s, so past 300 s poll /v1/jobs.
        Row(G, "request_timeout", "VQ_GATEWAY_REQUEST_TIMEOUT", "float", 60.0,
            "the most seconds /v1/classify may wait, whatever `?timeout=` says", 0.1, 300.0,
            flag="--request-timeout"),
        # A 16 MiB upload at 5 Mbit/s takes 27 s; slower clients are cut off.
        Row(G, "body_timeout", "VQ_GATEWAY_BODY_TIMEOUT", "float", 30.0,
            "seconds a request body may take to arrive, else 408", 0.1, 3600.0, flag="--body-timeout"),
        Row(G, "max_upload_bytes", "VQ_GATEWAY_MAX_UPLOAD_BYTES", "int", None,
            "largest image accepted, else 413", 1, 1024**3, flag="--max-upload-bytes",
            shown="`VQ_MAX_IMAGE_BYTES`"),
        # A 12 MP inspection camera; the worker's VQ_MAX_PIXELS is its own bound.
        Row(G, "max_pixels", "VQ_GATEWAY_MAX_PIXELS", "int", 12_000_000,
            "most pixels an image may declare, else 422 before decoding", 64, 10**9, flag="--max-pixels"),
        Row(G, "max_inflight_bytes", "VQ_GATEWAY_MAX_INFLIGHT_BYTES", "int", 256 * 1024 * 1024,
            "image bytes uploaded or queued and not yet done, else 429", 1024, 1024**4,
            flag="--max-inflight-bytes", shown="`268435456` (256 MiB)"),
        # The rest of maxmemory is results, samples, the registry and the output buffers of workers
        # fetching batches (the load test saw 3 MB frames take Redis from 80 % to 96 %).
        Row(G, "redis_fill", "VQ_GATEWAY_REDIS_FILL", "float", 0.7,
            "fraction of Redis's `maxmemory` frames may fill, else 503", 0.01, 1.0, flag="--redis-fill"),
        Row(G, "max_waiters", "VQ_GATEWAY_MAX_WAITERS", "int", 1000,
            "concurrent /v1/classify requests, else 503", 1, 10**6, flag="--max-waiters"),
        # A 30 fps camera with room to catch up.
        Row(G, "rate_limit", "VQ_GATEWAY_RATE_LIMIT", "float", 100.0,
            "frames/s per API key (per address without auth), else 429; 0: none", 0.0, 10**6, flag="--rate-limit"),
        Row(G, "rate_burst", "VQ_GATEWAY_RATE_BURST", "int", 200,
            "frames a key may send at once after being idle", 1, 10**7, flag="--rate-burst"),
        Row(G, "limit_concurrency", "VQ_GATEWAY_LIMIT_CONCURRENCY", "int", None,
            "uvicorn's backstop on connections, answering 503 to everything, probes included", 2, 10**7,
            flag="--limit-concurrency", shown="2 × max waiters + 256"),
    )


TABLE: tuple[Row, ...] = _rows()
ROWS: dict[str, Row] = {row.env: row for row in TABLE}


def scope_rows(scope: str) -> tuple[Row, ...]:
    if scope not in SCOPES:
        raise KeyError(f"unknown settings scope {scope!r}; one of {', '.join(SCOPES)}")
    return tuple(row for row in TABLE if row.scope == scope)


# -- reading ------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _number(row: Row, raw: str, label: str) -> int | float:
    cast, kind = (int, "an integer") if row.kind == "int" else (float, "a number")
    try:
        value = cast(raw)
    except ValueError:
        raise SettingsError(f"{label}={raw!r} is not {kind}") from None
    assert row.lo is not None and row.hi is not None
    # NaN compares false with everything, so it lands here too.
    if not row.lo <= value <= row.hi:
        lo, hi = (int(row.lo), int(row.hi)) if row.kind == "int" else (row.lo, row.hi)
        raise SettingsError(f"{label}={value} is out of range [{lo}, {hi}]")
    return value


def _text(row: Row, raw: str, label: str) -> str:
    # A newline or NUL in a path or key is a copy-paste accident (`echo` into a secret), never intended.
    if _CONTROL.search(raw):
        shown = "" if row.secret else f"={raw!r}"
        raise SettingsError(f"{label}{shown} holds a control character (a stray newline?)")
    return raw


def _parse(row: Row, raw: str, label: str) -> Any:
    if row.kind in ("int", "float"):
        return _number(row, raw, label)
    if row.kind == "choice":
        value = raw.strip().lower()
        if value not in row.choices:
            raise SettingsError(f"{label}={value!r} is not one of {', '.join(row.choices)}")
        return value
    if row.kind == "device":
        value = raw.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise SettingsError(f"{label}={value!r} is not one of auto, cpu, cuda, cuda:N")
    if row.kind == "pubkeys":
        from .signing import SigningError, parse_public_keys

        try:
            return parse_public_keys(raw)
        except SigningError as exc:
            raise SettingsError(f"{label}: {exc}") from None
    value = _text(row, raw.strip(), label)
    if row.kind == "path":
        return Path(value).expanduser()
    if row.kind == "dir":
        if not Path(value).expanduser().is_dir():
            raise SettingsError(f"{label}={value!r} is not a directory")
        return Path(value).expanduser()
    if row.kind == "file":
        if not Path(value).expanduser().is_file():
            raise SettingsError(f"{label}={value}: cannot read it (no such file)")
        return value
    if row.kind == "url":
        return check_redis_url(value, label)
    if row.kind == "urls":
        for number, url in enumerate(u.strip() for u in value.split(",") if u.strip()):
            check_redis_url(url, f"{label}: shard {number}")
        return value
    if row.kind in ("key", "host"):
        if any(c.isspace() for c in value):
            shown = "" if row.secret else f"={value!r}"
            extra = "; several keys go in VQ_API_KEY_FILE" if row.kind == "key" else ""
            raise SettingsError(f"{label}{shown} holds whitespace{extra}")
        return value
    raise AssertionError(f"row {row.env} has an unknown kind {row.kind!r}")


REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str, label: str) -> str:
    """`url` when redis-py can connect by it; SettingsError naming `label` (never the URL: it may hold a
    password) when its scheme, port or database number is wrong."""
    if not url.strip():
        raise SettingsError(f"{label} is empty")
    try:
        parts = urlsplit(url)
        scheme = parts.scheme
    except ValueError:
        scheme = "?"
    if scheme not in REDIS_SCHEMES:
        raise SettingsError(f"{label} is not a redis://, rediss:// or unix:// URL (scheme {scheme!r})")
    if scheme == "unix":
        return url
    try:
        parts.port  # noqa: B018 -- reading it is the check: urlsplit raises for a port out of range
    except ValueError:
        raise SettingsError(f"{label} has a port that is not a number in 0..65535") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise SettingsError(f"{label} names database {db!r}: a number is expected (redis://host:6379/0)")
    return url


def _default(row: Row) -> Any:
    if row.kind in ("path", "dir") and row.default is not None:
        return Path(row.default).expanduser()
    return row.default


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def value_of(row: Row, raw: str | None) -> Any:
    """`raw` (an environment value; None or empty: unset) as the row's value; SettingsError if it cannot be."""
    if raw is None or not raw.strip():
        return _default(row)
    return _parse(row, raw, row.env)


def setting(variable: str, env: Mapping[str, str] | None = None) -> Any:
    """One setting's value from `env` (default: the process environment), e.g. `setting("VQ_REGISTRY_KEEP")`."""
    return value_of(ROWS[variable], _environ(env).get(variable))


def read_scope(scope: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every row of `scope` as name → value, each checked; the first bad one raises SettingsError."""
    source = _environ(env)
    return {row.name: value_of(row, source.get(row.env)) for row in scope_rows(scope)}


def flag_type(variable: str) -> Callable[[str], Any]:
    """An argparse `type=` for the row's flag: the same bounds, and the error names the flag."""
    row = ROWS[variable]
    label = row.flag or row.env

    def parse(raw: str) -> Any:
        try:
            return _parse(row, raw, label)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = row.kind  # argparse names the type in "invalid <type> value" messages
    return parse


# Kept for callers that read an ad-hoc variable; a setting of visionqueue belongs in TABLE instead.
def env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    return value_of(ROWS.get(name) or Row("", name, name, "int", default, "", lo, hi), env.get(name))


def env_float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    return value_of(ROWS.get(name) or Row("", name, name, "float", default, "", lo, hi), env.get(name))


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    return value_of(ROWS.get(name) or Row("", name, name, "choice", default, "", choices=choices), env.get(name))


# -- the settings objects -----------------------------------------------------------------------------

_MODEL_CACHE: Path = _default(ROWS["VQ_MODEL_CACHE"])


@dataclass(frozen=True)
class Settings:
    """What a worker reads: the worker scope, plus its rows of redis, logging and registry."""

    model_path: Path | None = None
    model_cache: Path = _MODEL_CACHE
    device: str = ROWS["VQ_DEVICE"].default
    precision: str = ROWS["VQ_PRECISION"].default
    backend: str = ROWS["VQ_BACKEND"].default
    max_batch: int = ROWS["VQ_MAX_BATCH"].default
    max_wait_ms: float = ROWS["VQ_MAX_WAIT_MS"].default
    decode_threads: int = ROWS["VQ_DECODE_THREADS"].default
    torch_threads: int = ROWS["VQ_TORCH_THREADS"].default
    overlap_decode: str = ROWS["VQ_OVERLAP_DECODE"].default
    keep_freed_memory: str = ROWS["VQ_KEEP_FREED_MEMORY"].default
    claim_ahead: str = ROWS["VQ_CLAIM_AHEAD"].default
    decode_device: str = ROWS["VQ_DECODE_DEVICE"].default
    compile: str = ROWS["VQ_COMPILE"].default
    topk: int = ROWS["VQ_TOPK"].default
    tta: str = ROWS["VQ_TTA"].default
    heartbeat_ttl: int = ROWS["VQ_HEARTBEAT_TTL"].default
    worker_ttl: int = ROWS["VQ_WORKER_TTL"].default
    maintenance_interval: int = ROWS["VQ_MAINTENANCE_INTERVAL"].default
    keep_images: str = ROWS["VQ_KEEP_IMAGES"].default
    results_maxlen: int = ROWS["VQ_RESULTS_MAXLEN"].default
    metrics_port: int = ROWS["VQ_METRICS_PORT"].default
    swap_poll_s: float = ROWS["VQ_SWAP_POLL_S"].default
    shadow_share: float = ROWS["VQ_SHADOW_SHARE"].default
    max_rescues: int = ROWS["VQ_MAX_RESCUES"].default
    redis_outage_s: float = ROWS["VQ_REDIS_OUTAGE_S"].default
    log_format: str = ROWS["VQ_LOG_FORMAT"].default
    log_level: str = ROWS["VQ_LOG_LEVEL"].default
    model_pubkeys: tuple[str, ...] = ()  # base64 raw Ed25519 keys; empty: signatures are not required

    # Rows of other scopes that a worker needs; the rest of those scopes (a signing key, say) it never reads.
    EXTRA_ROWS = ("VQ_REDIS_OUTAGE_S", "VQ_LOG_FORMAT", "VQ_LOG_LEVEL", "VQ_MODEL_PUBKEY")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(_environ(env))
        values = read_scope("worker", env)
        values.update({ROWS[v].name: setting(v, env) for v in cls.EXTRA_ROWS})
        return cls(**values)

    def describe(self) -> dict[str, object]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class FrameLimits:
    max_image_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class RegistrySettings:
    model_pubkeys: tuple[str, ...]
    sign_key_file: str | None
    registry_keep: int


@dataclass(frozen=True)
class RedisSettings:
    redis_url: str
    redis_url_file: str | None
    redis_password_file: str | None
    redis_outage_s: float
    redis_urls: str | None = None  # the shard map (worker.shards reads and checks it)
    redis_urls_file: str | None = None
    shard: int | None = None


@dataclass(frozen=True)
class LogSettings:
    log_format: str
    log_level: str


@dataclass(frozen=True)
class ContinualSettings:
    store: Path
    holdout_pct: int
    runs: Path
    base_split: str | None


@dataclass(frozen=True)
class GatewaySettings:
    api_key: str | None
    api_key_file: str | None
    host: str
    port: int
    max_queue: int
    timeout: float
    request_timeout: float
    body_timeout: float
    max_upload_bytes: int | None  # None: the frames' VQ_MAX_IMAGE_BYTES
    max_pixels: int
    max_inflight_bytes: int
    redis_fill: float
    max_waiters: int
    rate_limit: float
    rate_burst: int
    limit_concurrency: int | None


# The object each scope's rows produce (the samples scope's is worker.sample_feed.SamplingConfig, which
# adds two internal sizes); tests check that their fields are exactly the scope's row names.
SCOPE_OBJECTS: dict[str, type] = {
    "frames": FrameLimits, "registry": RegistrySettings, "redis": RedisSettings, "logging": LogSettings,
    "continual": ContinualSettings, "gateway": GatewaySettings,
}


def frame_limits(env: Mapping[str, str] | None = None) -> FrameLimits:
    return FrameLimits(**read_scope("frames", env))


def registry_settings(env: Mapping[str, str] | None = None) -> RegistrySettings:
    return RegistrySettings(**read_scope("registry", env))


def redis_settings(env: Mapping[str, str] | None = None) -> RedisSettings:
    return RedisSettings(**read_scope("redis", env))


def redis_outage_s(env: Mapping[str, str] | None = None) -> float:
    """VQ_REDIS_OUTAGE_S: how long any process waits out a Redis outage."""
    return setting("VQ_REDIS_OUTAGE_S", env)


def redis_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when REDIS_URL or REDIS_URL_FILE names a Redis (checked: a bad value raises SettingsError).

    For entry points that start a Redis of their own when none is named (the demo) or refuse to
    guess (trainer --publish); everything else just connects, to the default when nothing is set.
    """
    source = _environ(env)
    named = [v for v in ("REDIS_URL_FILE", "REDIS_URL") if (source.get(v) or "").strip()]
    for variable in named:
        setting(variable, source)  # a bad value stops here, named, rather than at the first connection
    return bool(named)


def log_settings(env: Mapping[str, str] | None = None) -> LogSettings:
    return LogSettings(**read_scope("logging", env))


def continual_settings(env: Mapping[str, str] | None = None) -> ContinualSettings:
    return ContinualSettings(**read_scope("continual", env))


def gateway_settings(env: Mapping[str, str] | None = None) -> GatewaySettings:
    return GatewaySettings(**read_scope("gateway", env))


# -- the README's tables ------------------------------------------------------------------------------

def _num(value: float, kind: str) -> str:
    if kind == "int" or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown_default(row: Row) -> str:
    if row.shown is not None:
        return row.shown
    if row.default is None or row.default == ():
        return "unset"
    if isinstance(row.default, float) and not math.isnan(row.default):
        return f"`{row.default:g}`"
    return f"`{row.default}`"


def _allowed(row: Row) -> str:
    if row.kind in ("int", "float"):
        assert row.lo is not None and row.hi is not None
        return f"{_num(row.lo, row.kind)} – {_num(row.hi, row.kind)}"
    if row.kind == "choice":
        return ", ".join(f"`{c}`" for c in row.choices)
    return KINDS[row.kind]


def markdown(scope: str) -> str:
    """The README's table of `scope`, exactly as it sits between its markers."""
    rows = scope_rows(scope)
    flags = any(row.flag for row in rows)
    head = (["flag"] if flags else []) + ["variable", "default", "allowed", "meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = ([f"`{row.flag}`" if row.flag else ""] if flags else []) + [
            f"`{row.env}`", _shown_default(row), _allowed(row), row.meaning]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _markers(scope: str) -> tuple[str, str]:
    return f"<!-- settings:{scope} -->", f"<!-- /settings:{scope} -->"


def readme_tables(text: str) -> dict[str, str]:
    """scope → the table text found between that scope's markers in `text`."""
    found: dict[str, str] = {}
    for match in re.finditer(r"<!-- settings:([a-z]+) -->\n(.*?)\n?<!-- /settings:\1 -->", text, re.S):
        found[match.group(1)] = match.group(2).strip("\n")
    return found


def check_readme(text: str) -> list[str]:
    """What differs between the README's settings tables and the table here; empty when they agree."""
    problems: list[str] = []
    found = readme_tables(text)
    for scope in SCOPES:
        start, _ = _markers(scope)
        count = text.count(start)
        if count != 1:
            problems.append(f"{start} appears {count} times (once expected)")
        elif scope not in found:
            problems.append(f"{start} has no matching end marker")
        elif found[scope] != markdown(scope):
            problems.append(f"the {scope} table differs from worker/settings.py "
                            f"(regenerate: python -m worker.settings --write-readme README.md)")
    problems += [f"unknown settings scope in markers: {s}" for s in found if s not in SCOPES]
    return problems


def write_readme(text: str) -> str:
    """`text` with every marked table regenerated; nothing outside the markers changes."""
    def table(match: re.Match[str]) -> str:
        start, end = _markers(match.group(1))
        return f"{start}\n{markdown(match.group(1))}\n{end}"

    return re.sub(r"<!-- settings:([a-z]+) -->\n.*?<!-- /settings:\1 -->", table, text, flags=re.S)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.settings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--markdown", nargs="?", const="all", metavar="SCOPE",
                   help=f"print the README table of SCOPE (one of {', '.join(SCOPES)}), or of every scope")
    g.add_argument("--check-readme", metavar="README", help="exit 1 if README's marked tables differ from the table")
    g.add_argument("--write-readme", metavar="README", help="regenerate README's marked tables in place")
    g.add_argument("--env", action="store_true", help="check this environment's settings; exit 2 on a bad value")
    args = p.parse_args(argv)
    if args.markdown:
        scopes = list(SCOPES) if args.markdown == "all" else [args.markdown]
        if any(s not in SCOPES for s in scopes):
            p.error(f"--markdown: unknown scope {args.markdown!r}; one of {', '.join(SCOPES)}")
        for scope in scopes:
            start, end = _markers(scope)
            print(f"{start}\n{markdown(scope)}\n{end}\n" if len(scopes) > 1 else markdown(scope))
        return 0
    if args.env:
        try:
            for scope in SCOPES:
                read_scope(scope)
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    path = Path(args.check_readme or args.write_readme)
    text = path.read_text(encoding="utf-8")
    if args.write_readme:
        path.write_text(write_readme(text), encoding="utf-8")
        return 0
    problems = check_readme(text)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
