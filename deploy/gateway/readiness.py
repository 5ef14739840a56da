"""/readyz: is there a worker that can classify a frame sent now?

The decision, and why it has this shape:

* **A live worker on `inference` is the evidence that a model is held.** `BatchWorker.bootstrap`
  loads and warms the model *before* the worker registers with RQ, and a worker whose model fails
  to load exits without registering. So "registered" already means "holds a model", for a local
  artifact (`VQ_MODEL_PATH`) as well as for the registry's current version. A plain `rq worker`
  on the queue (the naive baseline) loads lazily on its first frame; it counts too, since frames
  sent to it are classified.
* **The registry's `current` pointer is reported, not required.** It is neither necessary (a
  worker pinned to `VQ_MODEL_PATH` never reads it) nor sufficient (a published model with no
  worker classifies nothing). Requiring it would make a correctly running fleet look down.
* **"Live" is decided from RQ's own worker registry** (`rq.Worker.all(queue=…)`, the per-queue
  worker set), filtered to workers whose hash still exists, whose state is not `suspended` and
  whose `last_heartbeat` is younger than `stale_after_s`. RQ keeps a SIGKILLed worker's hash for
  `worker_ttl + 60` s (90 s with the BatchWorker's defaults); the heartbeat age notices sooner. A
  BatchWorker heartbeats at least every `VQ_MAINTENANCE_INTERVAL` (5 s) while idle and from its
  heartbeat thread while busy, so the default of 60 s has a wide margin over a busy Redis or a
  slow batch, and is still well under RQ's own expiry.
* **`rq suspend` makes every worker stop taking jobs**; that is checked as one flag, since a
  worker only reports `suspended` once its loop notices.

Kubernetes takes an unready gateway out of its Service, which is what an empty worker pool should
do to clients (they get a connection error at the load balancer instead of a 504 after the
timeout). The worker Deployment must then keep at least one replica (KEDA `minReplicaCount: 1`,
as `deploy/k8s/keda-scaledobject.yaml` has it): scaled to zero, no frame would reach the queue
through the gateway to scale it up again.
"""

from __future__ import annotations

from datetime import UTC, datetime

from redis import Redis
from rq import Worker
from rq.suspension import is_suspended

from worker.jobs import FrameQueue
from worker.registry import ModelRegistry, RegistryError

from .models import Readiness, WorkerInfo

DEFAULT_STALE_AFTER_S = 60.0


def check_readiness(connection: Redis, queue: FrameQueue, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Readiness:
    """Ready when at least one worker listening on `queue` is live (see the module docstring)."""
    workers = [_describe(w) for w in Worker.all(queue=queue)]
    live = [w for w in workers if _is_live(w, stale_after_s)]
    try:
        model_version = ModelRegistry(connection).current()
    except RegistryError:  # a planted `current`: workers refuse it and keep serving; say so without echoing it
        model_version = "invalid"
    queue_length = queue.count
    reason = None
    if is_suspended(connection):
        reason = "workers are suspended (rq suspend); run `rq resume` to let them take frames"
    elif not workers:
        reason = f"no worker listens on queue {queue.name!r}"
    elif not live:
        reason = (f"no live worker on queue {queue.name!r}: {len(workers)} registered, none with a heartbeat in the "
                  f"last {stale_after_s:g}s and a state other than 'suspended'")
    return Readiness(ready=reason is None, reason=reason, workers=live if reason is None else workers,
                     model_version=model_version, queue_length=queue_length)


def _describe(worker: Worker) -> WorkerInfo:
    age = None
    if worker.last_heartbeat is not None:
        beat = worker.last_heartbeat
        if beat.tzinfo is None:  # RQ writes UTC; older versions parsed it without a zone
            beat = beat.replace(tzinfo=UTC)
        age = round((datetime.now(UTC) - beat).total_seconds(), 3)
    state = worker.get_state()
    return WorkerInfo(name=worker.name, state=str(getattr(state, "value", state)), last_heartbeat_s=age)


def _is_live(worker: WorkerInfo, stale_after_s: float) -> bool:
    return (worker.state != "suspended" and worker.last_heartbeat_s is not None
            and worker.last_heartbeat_s <= stale_after_s)
