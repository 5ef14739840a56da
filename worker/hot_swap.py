"""Hot swap: follow the registry's `current` pointer and prepare the next model off the hot path.

A watcher thread wakes on the registry's pub/sub notification (or, as a fallback, every
VQ_SWAP_POLL_S seconds), fetches, verifies, loads and warms the new version, then hands it over.
The BatchWorker swaps engines between batches, so no frame is dropped and every result is stamped
with the version that made it. A version that fails to load or verify is refused, logged and
counted; the worker keeps serving the one it has and does not retry the refused version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from redis import Redis

from .metrics import WorkerMetrics
from .model_source import load_engine
from .registry import ModelRegistry
from .runtime import InferenceEngine
from .settings import Settings

log = structlog.get_logger("visionqueue.hot_swap")


class ModelWatcher:
    def __init__(self, settings: Settings, connection: Redis, serving: Callable[[], str],
                 on_ready: Callable[[InferenceEngine], None], metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.registry = ModelRegistry(connection)
        self.connection = connection
        self.serving = serving
        self.on_ready = on_ready
        self.metrics = metrics
        self.refused: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vq-model-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.registry.events_channel)
        except Exception:
            log.exception("cannot subscribe to model notifications; polling only")
        while not self._stop.is_set():
            try:
                # Returns on a notification, else after the poll interval: either way, check.
                pubsub.get_message(timeout=self.settings.swap_poll_s)
                self.check()
            except Exception:
                log.exception("model watch failed; retrying")
                self._stop.wait(self.settings.swap_poll_s)
        pubsub.close()

    def check(self) -> InferenceEngine | None:
        """Load the registry's current version if it is new; hand it over. The engine, or None."""
        current = self.registry.current()
        if current is None or current == self.serving() or current in self.refused:
            return None
        log.info("new model version promoted; preparing it", version=current, serving=self.serving())
        try:
            engine = load_engine(self.settings, self.connection, version=current)
        except Exception as exc:
            self.refused.add(current)
            self.metrics.model_swaps.labels(outcome="refused").inc()
            log.error("model refused; keeping the one in service", version=current, serving=self.serving(),
                      error=f"{type(exc).__name__}: {exc}")
            return None
        self.on_ready(engine)
        return engine
