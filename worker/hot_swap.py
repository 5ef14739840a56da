"""Hot swap: follow the registry's `current` pointer and prepare the next model off the hot path.

A watcher thread wakes on the registry's pub/sub notification (or, as a fallback, every
VQ_SWAP_POLL_S seconds), fetches, verifies, loads and warms the new version, and holds it ready.
The BatchWorker takes it between batches (and while idle, between dequeue polls), so no frame is
dropped and every result is stamped with the version that made it.

The watcher owns the swap state: the version in service, the one prepared and not yet taken, and
the versions refused. A version that fails to load or verify is refused, logged and counted, and
not tried again; one that could not be fetched because Redis was away is tried again.

With a ShadowRunner (worker/shadow.py) it also follows the shadow pointer `vq:models:shadow`: the
candidate named there is fetched, verified (signature included) and warmed here, on this thread,
like a promoted version, then installed for the shadow thread; it is retired when the pointer goes,
expires or names another version. A candidate that fails here is refused for this worker.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import structlog
from redis import Redis

from .metrics import WorkerMetrics
from .model_source import load_engine
from .redis_health import is_transient
from .registry import InvalidVersionError, ModelRegistry
from .runtime import InferenceEngine
from .settings import Settings
from .shadow import ShadowRunner, read_spec

log = structlog.get_logger("visionqueue.hot_swap")


class ModelWatcher:
    def __init__(self, settings: Settings, connection: Redis, serving: str, metrics: WorkerMetrics,
                 shadow: ShadowRunner | None = None) -> None:
        self.settings = settings
        self.shadow = shadow
        self.registry = ModelRegistry(connection)
        self.connection = connection
        self.serving = serving
        self.metrics = metrics
        self.refused: set[str] = set()
        # the served model's input size (set by the BatchWorker): a shadow must take the same frames
        self.serving_input_size: tuple[int, ...] | None = None
        self._prepared: InferenceEngine | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vq-model-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        engine = self.take()
        if engine is not None:
            engine.close()

    @property
    def prepared(self) -> str | None:
        engine = self._prepared
        return engine.version if engine is not None else None

    def take(self) -> InferenceEngine | None:
        """The prepared engine, once: from now on it is the one in service."""
        with self._lock:
            engine, self._prepared = self._prepared, None
            if engine is not None:
                self.serving = engine.version
        return engine

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.registry.events_channel)
                # Returns on a notification, else after the poll interval: either way, check.
                pubsub.get_message(timeout=self.settings.swap_poll_s)
                self.check()
                self.check_shadow()
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("model watch failed; retrying")
                if pubsub is not None:
                    pubsub.close()
                pubsub = None  # resubscribe: a restarted Redis forgot the subscription
                self._stop.wait(self.settings.swap_poll_s)
        if pubsub is not None:
            pubsub.close()

    def check(self) -> InferenceEngine | None:
        """Prepare the registry's current version if it is neither served, prepared nor refused."""
        try:
            current = self.registry.current()
        except InvalidVersionError as exc:  # `current` holds something that is no version: data, refused once
            bad = f"invalid:{exc}"
            if bad not in self.refused:
                self.refused.add(bad)
                self.metrics.model_swaps.labels(outcome="refused").inc()
                log.error("registry's current pointer refused; keeping the model in service", serving=self.serving,
                          error=str(exc))
            return None
        if current is None or current in (self.serving, self.prepared) or current in self.refused:
            return None
        log.info("new model version promoted; preparing it", version=current, serving=self.serving)
        try:
            engine = load_engine(self.settings, self.connection, version=current)
        except Exception as exc:
            if is_transient(exc) or (exc.__cause__ is not None and is_transient(exc.__cause__)):
                log.warning("could not fetch the new model; will try again", version=current,
                            error=f"{type(exc).__name__}: {exc}")
                return None
            self.refused.add(current)
            self.metrics.model_swaps.labels(outcome="refused").inc()
            log.error("model refused; keeping the one in service", version=current, serving=self.serving,
                      error=f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            stale, self._prepared = self._prepared, engine
        if stale is not None:  # promoted and superseded before the worker took it
            stale.close()
        return engine

    def check_shadow(self) -> None:
        """Load the shadow pointer's candidate, or retire the one running when the pointer moved on."""
        if self.shadow is None:
            return
        spec = read_spec(self.connection)
        running = self.shadow.version
        if running is not None and (spec is None or not spec.live() or spec.version != running
                                    or running == self.serving):
            self.shadow.retire("the shadow pointer moved on" if spec is None or spec.version != running
                               else "the shadow window ended")
        if spec is None or not self.shadow.wanted(spec, self.serving):
            return
        log.info("shadow candidate announced; preparing it", version=spec.version, serving=self.serving)
        # One decode thread: the shadow engine takes frames the serving engine already decoded.
        settings = replace(self.settings, decode_threads=1)
        try:
            engine = load_engine(settings, self.connection, version=spec.version)
        except Exception as exc:
            if is_transient(exc) or (exc.__cause__ is not None and is_transient(exc.__cause__)):
                log.warning("could not fetch the shadow candidate; will try again", version=spec.version,
                            error=f"{type(exc).__name__}: {exc}")
                return
            self.shadow.refuse(spec.version, f"{type(exc).__name__}: {exc}")
            return
        self.shadow.install(spec, engine, self.serving_input_size)
