"""BatchWorker: an RQ worker that classifies frames in batches, in-process.

`rq worker --worker-class worker.BatchWorker inference`

One batch, end to end:
  1. `dequeue_job_and_maintain_ttl`  wait for a free batch slot, then for the first frame (BLMOVE);
                 an idle worker swaps models and runs recovery here too. While a batch is still
                 waiting for or in the forward pass, `_wait_for_turn` claims ahead only frames that
                 are already queued (no worker was free for them): a frame that arrives then goes to
                 a worker blocked on the queue, not behind this worker's forward pass.
  2. `_take`     claim it and every frame ready behind it, up to `max_batch`, in one server-side
                 script (`rq_internals.claim_batch`): each job hash size-checked in Redis, marked
                 started under an RQ execution with a lease, exactly as RQ marks one job; then
                 `_admit` judges each frame (`outcomes.judge`) and starts decoding the acceptable ones.
     `_collect`  claim more the same way: while the forward pass is busy (the batch could not run
                 sooner), else polling for at most `max_wait_ms` while fewer are ready.
  4. `_infer`    on the inference thread, while the main thread collects the next batch: wait for
                 the decodes, one forward pass, one outcome per frame (a corrupt frame fails alone).
  5. `_finish`   on the finish thread, while the next forward pass runs: one script call records
                 every result or failure, RQ's registries and the results stream
                 (`rq_internals.record_batch`); a frame that already ended is counted as a
                 duplicate, not written again.

Per frame, Python does only what needs Python (restore and judge the job, build and serialize the
result); every per-frame Redis command runs inside the two scripts. `vq_stage_cpu_seconds_total`
shows the split; `python -m deploy.bench --plumbing` measures it.

Nothing in a job can stop the worker: every job is data (`FrameJob.restore`, `outcomes.judge`), and
every Redis call rides through an outage of up to VQ_REDIS_OUTAGE_S (`RedisHealth`), keeping the
batches in hand and recording them when Redis is back. Every call into RQ's internals is in
`worker/rq_internals.py`; frames whose worker died are recovered by `worker/recovery.py`.

At-least-once: every claimed frame has an RQ execution whose TTL is VQ_HEARTBEAT_TTL; a heartbeat
thread keeps it alive while its batch is in hand. SIGTERM stops dequeuing, finishes the batches in
hand, then exits.

Shadow runs (`continual.update --shadow`, worker/shadow.py): a share of batches is handed, already
decoded, to a candidate model on its own thread once their results are recorded; its answers go to
Redis statistics only, and nothing it does can fail, change or delay a frame.
"""

from __future__ import annotations

import functools
import queue as stdqueue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from redis import Redis
from rq.exceptions import StopRequested
from rq.queue import Queue
from rq.suspension import is_suspended
from rq.worker import SimpleWorker, WorkerStatus

from . import rq_internals as rq
from .artifact import ArtifactError
from .drift_stats import DriftStats
from .hot_swap import ModelWatcher
from .jobs import RESULTS_STREAM, FrameJob, FrameQueue
from .logs import configure_logging
from .metrics import WorkerMetrics
from .model_source import NoModelError, configure_torch, load_engine
from .outcomes import Failure, FailureKind, FrameTask, Success, judge
from .recovery import IntermediateWatch, recover_abandoned
from .redis_health import RedisHealth, RedisOutageError, is_transient, with_timeouts
from .results import build_result, failure_fields, stream_fields
from .runtime import InferenceEngine, resolve_claim_ahead
from .sample_feed import SampleFeed, SamplingConfig
from .serializer import MsgpackSerializer
from .settings import Settings
from .shadow import ShadowRunner, ShadowWork

log = structlog.get_logger("visionqueue.worker")

T = TypeVar("T")

BLOCK_S = 1.0  # longest blocking dequeue: stop requests, idle swaps and maintenance wait no longer
SUSPEND_POLL_S = 0.1
# How often a worker whose forward pass is busy looks for queued frames (VQ_CLAIM_AHEAD=backlog).
# Coarse is enough: a frame found later only starts decoding later, as the batch cannot run before
# the forward pass ends, and the end of the forward pass is not waited for by polling.
AHEAD_POLL_S = 0.005


def _noting_crash(method: Callable[..., T]) -> Callable[..., T]:
    """For the methods RQ's work loop calls. It logs an unexpected exception and returns as if asked to
    stop, and `rq worker` then exits 0: a supervisor that restarts on failure (systemd
    Restart=on-failure) would leave the queue unserved. The error is kept so that `teardown` exits
    non-zero with it. Only the main thread's: the heartbeat thread handles its own errors."""
    @functools.wraps(method)
    def noted(self: BatchWorker, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except StopRequested:
            raise
        except Exception as exc:
            if threading.current_thread() is threading.main_thread():
                self._crashed = exc
            raise
    return noted


@dataclass
class Batch:
    queue: Queue
    claimed_at: float
    started_at: str  # the claim's time as RQ's results record an execution's start
    engine: InferenceEngine | None = None
    tasks: list[FrameTask] = field(default_factory=list)
    decode_started: float = 0.0
    record_attempts: int = 0
    records: list[rq.Record] | None = None  # built once: a retried write sends the same
    drift: DriftStats | None = None  # what the model said, per station, for continual.drift
    shadow: ShadowWork | None = None  # handed to the shadow candidate once the batch is recorded


class BatchWorker(SimpleWorker):
    job_class = FrameJob
    queue_class = FrameQueue

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        self.settings = Settings.from_env()
        configure_logging(self.settings.log_format, self.settings.log_level)
        # Whatever `rq worker` was given (-S, -j, --worker-ttl, --maintenance-interval), frames
        # need msgpack, FrameJob and short TTLs: RQ's CLI has no environment variable for -S.
        kwargs["serializer"] = MsgpackSerializer
        kwargs["job_class"] = FrameJob
        kwargs["queue_class"] = FrameQueue
        kwargs["worker_ttl"] = self.settings.worker_ttl
        kwargs.pop("default_worker_ttl", None)
        kwargs["maintenance_interval"] = self.settings.maintenance_interval
        # Socket timeouts: a server that went silent (a partition, CLIENT PAUSE) is an outage to
        # ride through, not a call that hangs forever.
        connection = with_timeouts(kwargs.get("connection") or _connection_of(queues))
        kwargs["connection"] = connection
        names = [q.name if isinstance(q, Queue) else q for q in ([queues] if isinstance(queues, str | Queue)
                                                                 else queues)]
        super().__init__([FrameQueue(n, connection=connection) for n in names], *args, **kwargs)
        self.log_job_description = False
        self.metrics = WorkerMetrics()
        self.health = RedisHealth(self.settings.redis_outage_s, on_change=lambda up: self.metrics.redis_up.set(up),
                                  what="redis (worker)")
        self.sampling = SamplingConfig.from_env()
        self.samples: SampleFeed | None = None
        self.engine: InferenceEngine | None = None
        self._overlap = False
        # Until bootstrap knows the engine's device (the tests drive these methods without one)
        self._claim_ahead = resolve_claim_ahead(self.settings.claim_ahead, "cpu")
        self._watcher: ModelWatcher | None = None
        self._shadow: ShadowRunner | None = None
        self._intermediate = IntermediateWatch(self.settings.heartbeat_ttl)
        self._handoff: stdqueue.Queue[Batch | None] = stdqueue.Queue()
        self._finishing: stdqueue.Queue[Batch | None] = stdqueue.Queue()
        # Three batches in hand at most: one decoding, one in the forward pass, one being recorded.
        self._slots = threading.Semaphore(3)
        self._unrun = 0  # batches handed to the inference thread whose forward pass has not ended
        self._forward_free = threading.Event()
        self._forward_free.set()
        self._batches: dict[int, Batch] = {}
        self._lock = threading.Lock()
        self._stop_threads = threading.Event()
        self._give_up = threading.Event()
        self._fatal: BaseException | None = None
        self._crashed: BaseException | None = None  # what ended RQ's work loop, if not a stop request
        self._threads: list[threading.Thread] = []
        self._drift_refused = False

    # -- riding through Redis faults ----------------------------------------------------------
    def _redis(self, fn: Callable[[], T], reads_only: bool = False) -> T:
        """`fn()` on the main thread, waiting out a Redis outage; past VQ_REDIS_OUTAGE_S the worker exits 1."""
        try:
            return self.health.call(fn, stop=self._give_up, reads_only=reads_only)
        except RedisOutageError as exc:
            self._fail_fatally(exc)
            raise SystemExit(f"visionqueue worker: {exc}") from exc

    def _quietly(self, fn: Callable[[], Any]) -> None:
        """A Redis call that can be skipped while Redis is away (a heartbeat, a state shown in `rq info`)."""
        try:
            fn()
            self.health.succeeded()
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._note_failure(exc)

    def _note_failure(self, exc: BaseException) -> None:
        try:
            self.health.failed(exc)
        except RedisOutageError as outage:
            self._fail_fatally(outage)

    def _fail_fatally(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
            log.error("giving up: redis stayed away too long", error=str(exc), batches_in_hand=len(self._batches))
        self._give_up.set()

    @_noting_crash
    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
        else:
            self._quietly(lambda: super(BatchWorker, self).heartbeat(timeout))

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline)
        else:
            self._state = state  # RQ's signal handler reads the local copy; Redis's may lag during an outage
            self._quietly(lambda: super(BatchWorker, self).set_state(state))

    @_noting_crash
    def check_for_suspension(self, burst: bool) -> None:
        """RQ's `rq suspend`, looked at every SUSPEND_POLL_S (RQ sleeps 1 s), so that `rq resume` sets a fleet
        back to work within a tenth of a second of each other; the idle loop asks too (see below)."""
        if burst:  # RQ's own: a suspended burst worker exits
            self._redis(lambda: super(BatchWorker, self).check_for_suspension(burst), reads_only=True)
            return
        if not self._suspended():
            return
        log.info("suspended: `rq resume` resumes", worker=self.name)
        before = self.get_state()
        self.set_state(WorkerStatus.SUSPENDED)
        beat = time.monotonic()
        while not self._stop_requested and self._suspended():
            time.sleep(SUSPEND_POLL_S)
            if time.monotonic() - beat > 10:  # RQ's loop does not beat: its worker left `rq info` after 7 min
                self.heartbeat()
                beat = time.monotonic()
        self.set_state(before)

    def _suspended(self) -> bool:
        return bool(self._redis(lambda: is_suspended(self.connection, self), reads_only=True))

    def _shutdown(self) -> None:
        # Never raise StopRequested from the signal handler, as RQ does when idle: raised between
        # moving frames off the queue and claiming them, it would strand them. Nor call Redis from
        # it: the interrupted code may hold the connection pool's lock. The dequeue loop looks at
        # the flag at least every BLOCK_S.
        self._stop_requested = True

    # -- lifecycle ----------------------------------------------------------------------------
    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # The model is loaded and warmed up before the worker registers: a worker that is
        # visible to `rq info` can take frames at full speed.
        configure_torch(self.settings)
        if self.settings.metrics_port:  # first: a port taken is found before a minute of model loading
            try:
                self.metrics.serve(self.settings.metrics_port)
            except OSError as exc:
                raise SystemExit(f"visionqueue worker: VQ_METRICS_PORT={self.settings.metrics_port}: cannot listen "
                                 f"there ({exc.strerror or exc}); pick a free port, or 0 for no metrics") from None
        try:
            self.engine = self._redis(lambda: load_engine(self.settings, self.connection))
        except (ArtifactError, NoModelError) as exc:  # said in one line, not under RQ's traceback
            where = f"VQ_MODEL_PATH={self.settings.model_path}" if self.settings.model_path else "the registry"
            raise SystemExit(f"visionqueue worker: no model to serve from {where}: {exc}") from None
        # Measured on 2 CPU cores (resnet18 int8 @224): overlapped 188 frames/s, sequential 178.
        self._overlap = self.settings.overlap_decode == "on"
        self._claim_ahead = resolve_claim_ahead(self.settings.claim_ahead, self.engine.device)
        self.metrics.set_model(self.engine.version, self.engine.precision)
        self._redis(lambda: super(BatchWorker, self).bootstrap(*args, **kwargs))
        if self.sampling.strategy != "none" or self.sampling.audit_rate > 0:
            self.samples = SampleFeed(self.connection, self.metrics, self.sampling)
            self.samples.start()
        self._start_thread(self._inference_loop, "vq-inference")
        self._start_thread(self._finish_loop, "vq-finish")
        self._start_thread(self._heartbeat_loop, "vq-heartbeat")
        if self.settings.model_path is None:  # a local artifact is pinned; the registry's current is followed
            self._shadow = self._shadow_runner()
            self._watcher = ModelWatcher(self.settings, self.connection, self.engine.version, self.metrics,
                                         shadow=self._shadow)
            self._watcher.serving_input_size = tuple(self.engine.input_size)
            self._watcher.start()
        log.info("batch worker ready", worker=self.name, queues=self.queue_names(),
                 **{**self.settings.describe(), "claim_ahead": self._claim_ahead})

    def _shadow_runner(self) -> ShadowRunner | None:
        """The shadow thread, unless VQ_SHADOW_SHARE=0 keeps this worker out of shadow runs."""
        if self.settings.shadow_share <= 0:
            return None
        # Its own connection pool with timeouts: its statistics never queue behind the hot path's calls.
        runner = ShadowRunner(with_timeouts(self.connection), self.metrics, self.settings.shadow_share, self.samples)
        runner.start()
        return runner

    def _start_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def teardown(self) -> None:
        # Warm shutdown: the batches already claimed are finished before the worker unregisters.
        if self._watcher is not None:
            self._watcher.stop()
        if self._threads:
            self._handoff.put(None)
            inference, finisher, *others = self._threads
            inference.join()
            finisher.join()
            self._stop_threads.set()
            for thread in others:
                thread.join(timeout=5)
            self._threads = []
        if self._shadow is not None:
            self._shadow.stop()
        if self.samples is not None:
            self.samples.stop()
        if self.engine is not None:
            self.engine.close()
        self._quietly(lambda: super(BatchWorker, self).teardown())
        if self._fatal is not None:
            raise SystemExit(f"visionqueue worker: {self._fatal}")
        if self._crashed is not None:
            raise SystemExit(f"visionqueue worker: stopped by an unexpected error: "
                             f"{type(self._crashed).__name__}: {self._crashed}")

    # -- maintenance --------------------------------------------------------------------------
    def run_maintenance_tasks(self) -> None:
        try:
            self._quietly(self._maintain)
        except Exception:
            # Recovery is a sweep that the next interval repeats: a bug or an odd key in it must not
            # take the worker (and the frames it is serving) down.
            log.exception("maintenance failed; will try again")
            self.last_cleaned_at = rq.now()

    def _maintain(self) -> None:
        super().run_maintenance_tasks()
        if not rq.is_registered(self.connection, self):
            # Redis forgot this worker: it was flushed, or it came back from its AOF after the worker's key
            # expired while it was down (a restart longer than VQ_WORKER_TTL). The worker serves on either
            # way, but `rq info`, the registries and an autoscaler counting workers would not see it.
            log.warning("this worker's registration was gone from redis; registering it again", worker=self.name)
            rq.register_again(self, self._state)
        for queue in self.queues:
            counts = self._intermediate.sweep(self.connection, queue, self.settings.max_rescues, self.name,
                                              self.serializer)
            self._count_recovery(counts)

    def clean_registries(self) -> None:
        # RQ's own cleanup of the started registry would run code named in a job hash; ours does not.
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                try:
                    self._count_recovery(recover_abandoned(self.connection, queue, self.settings.max_rescues,
                                                           self.name, self.serializer))
                    rq.clean_other_registries(queue)
                finally:
                    queue.release_maintenance_lock()
        self.last_cleaned_at = rq.now()

    def _count_recovery(self, counts: dict[str, int]) -> None:
        for action, n in counts.items():
            if action in ("requeued", "poison", "rejected"):
                self.metrics.frames.labels(outcome="rescued" if action == "requeued" else action).inc(n)

    # -- the batch ----------------------------------------------------------------------------
    @_noting_crash
    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """The first frame of the next batch, with a batch slot held; None to stop."""
        self.set_state(WorkerStatus.IDLE)
        idle_since = time.monotonic()
        queue = self.queues[0]
        while True:
            if self._fatal is not None:
                raise SystemExit(f"visionqueue worker: {self._fatal}")
            if self._stop_requested:
                return None
            self._swap_if_ready()  # an idle worker swaps too, without waiting for a frame
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            self.heartbeat()
            # The slot is taken *before* a frame leaves the queue: a frame moved to the intermediate
            # list and left unclaimed for a heartbeat TTL looks abandoned, and would run twice.
            if not self._slots.acquire(timeout=BLOCK_S):
                continue
            try:
                ahead = self._wait_for_turn(queue)
                batch = self._first_claims(queue, None if ahead else timeout)
            except BaseException:
                self._slots.release()
                raise
            if batch is not None:
                return batch, queue
            self._slots.release()
            if timeout is None:  # burst mode: the queue is empty
                return None
            # RQ looks only between jobs; an idle worker would take a whole batch after `rq suspend`
            self.check_for_suspension(False)
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None

    def _wait_for_turn(self, queue: Queue) -> bool:
        """Return once the forward pass is free (False), or frames are queued that no free worker took (True).

        Blocking on the queue while the forward pass is busy would win a new frame from a worker that
        is idle (Redis serves blocked clients first come, first served) and make it wait a whole
        forward pass. A frame still in the queue has no idle worker to go to: claiming it ahead
        (`backlog`) lets its decode overlap the forward pass, which is what keeps a GPU busy. `full`
        claims ahead only once a whole batch is queued; with `off` frames stay queued for whichever
        worker is free first.
        """
        if self._claim_ahead == "always":
            return False
        enough = {"backlog": 1, "full": self.settings.max_batch}.get(self._claim_ahead)  # None: never ahead
        while not self._forward_free.is_set():
            if self._stop_requested or self._fatal is not None:
                return False
            if enough and self._redis(lambda: self.connection.llen(queue.key), reads_only=True) >= enough:
                return True
            self._forward_free.wait(AHEAD_POLL_S)
        return False

    def _first_claims(self, queue: Queue, timeout: int | None) -> Batch | None:
        """A new batch holding the first frames that are ready, or None when none came within BLOCK_S.

        `timeout` None: take only what is queued now (burst mode, or claiming ahead)."""
        held = []
        if timeout is not None:
            with self.metrics.stage("dequeue"):
                job_id = self._redis(lambda: rq.wait_for_id(self.connection, queue, min(BLOCK_S, timeout)))
            if job_id is None:
                return None
            held = [job_id]
        batch = Batch(queue=queue, claimed_at=time.time(), started_at=repr(time.time()))
        self._take(batch, held, self.settings.max_batch - len(held))
        if not batch.tasks:
            return None
        with self._lock:  # from now on the heartbeat thread keeps the batch's leases alive
            self._batches[id(batch)] = batch
        return batch

    @_noting_crash
    def execute_job(self, batch: Batch, queue: Queue) -> None:
        try:
            self.set_state(WorkerStatus.BUSY)
            self._collect(batch)
        except BaseException:
            with self._lock:
                self._batches.pop(id(batch), None)
            self._slots.release()
            raise
        with self._lock:
            self._unrun += 1
            self._forward_free.clear()
        self._handoff.put(batch)

    def _collect(self, batch: Batch) -> None:
        """More frames without blocking, until max_batch: when it claims ahead (`backlog`, `full`), for as
        long as the forward pass is busy (this batch could not run sooner), then for at most max_wait_ms."""
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
        gather = self._claim_ahead in ("backlog", "full")
        while len(batch.tasks) < self.settings.max_batch and not self._stop_requested:
            if self._take(batch, [], self.settings.max_batch - len(batch.tasks)):
                continue
            if gather and not self._forward_free.is_set():
                self._forward_free.wait(AHEAD_POLL_S)
                continue
            if time.monotonic() >= deadline:
                break
            # Redis resolves blocking timeouts at its `hz`, far coarser than milliseconds.
            time.sleep(0.0005)

    def _take(self, batch: Batch, held: list[str], want: int) -> int:
        """Claim `held` and up to `want` more frames into `batch` (one script call); how many were claimed."""
        with self.metrics.stage("claim"):
            token = rq.claim_token()  # one per claim, kept across retries: a lost reply never claims twice
            claims = self._redis(lambda: rq.claim_batch(self.connection, batch.queue, self.name, held, want,
                                                        self.settings.heartbeat_ttl, self.serializer, token))
            tasks = [FrameTask(job=job, execution_id=eid) for job, eid in claims.claimed]
            batch.tasks += tasks
            if tasks:
                self._admit(batch, tasks)
        for job_id, reason in claims.dropped:  # nothing to record a failure into: say so, and let the id go
            log.error("queue entry is not a job; dropped", job_id=job_id[:200], reason=reason)
        if claims.duplicates:
            self.metrics.frames.labels(outcome="duplicate").inc(claims.duplicates)
        if claims.gone:
            self.metrics.frames.labels(outcome="expired").inc(claims.gone)
        if claims.dropped:
            self.metrics.frames.labels(outcome="failed").inc(len(claims.dropped))
        return len(claims.claimed)

    def _swap_if_ready(self) -> None:
        """Between batches: the next batch uses the new engine; batches in hand finish on theirs."""
        engine = self._watcher.take() if self._watcher is not None else None
        if engine is None:
            return
        old, self.engine = self.engine, engine
        if old is not None:
            old.close(wait=False)
        self.metrics.set_model(engine.version, engine.precision)
        if self._watcher is not None:
            self._watcher.serving_input_size = tuple(engine.input_size)
        self.metrics.model_swaps.labels(outcome="swapped").inc()
        log.info("model swapped", version=engine.version, previous=old.version if old else None)

    def _admit(self, batch: Batch, tasks: list[FrameTask]) -> None:
        """Judge frames just claimed and start decoding those that may run; the batch's first
        admission fixes the engine it runs on."""
        if batch.engine is None:
            self._swap_if_ready()
            assert self.engine is not None
            batch.engine = self.engine
        wall = time.time()
        for task in tasks:
            verdict = judge(task.job, wall)
            if isinstance(verdict, Failure):
                task.outcome = verdict
            else:
                task.frame = verdict
        if self._overlap:
            self._start_decode(batch, tasks)

    def _start_decode(self, batch: Batch, tasks: list[FrameTask]) -> None:
        batch.decode_started = batch.decode_started or time.perf_counter()
        runnable = [t for t in tasks if t.frame is not None]
        futures = batch.engine.submit_decode([t.frame["image"] for t in runnable])
        for task, future in zip(runnable, futures, strict=True):
            task.decode = future

    # -- inference thread ---------------------------------------------------------------------
    def _inference_loop(self) -> None:
        """Forward passes back to back: recording a batch's outcome happens on the finish thread."""
        while True:
            batch = self._handoff.get()
            if batch is None:
                self._finishing.put(None)
                return
            try:
                with self.metrics.stage("infer"):
                    self._infer(batch)
            except Exception as exc:  # the model itself failed: nothing is known to be wrong with the frames
                log.exception("batch failed", size=len(batch.tasks))
                for task in batch.tasks:
                    if task.outcome is None or isinstance(task.outcome, Success):
                        task.outcome = Failure.error(exc)
            with self._lock:
                self._unrun -= 1
                if not self._unrun:
                    self._forward_free.set()
            self._finishing.put(batch)

    def _infer(self, batch: Batch) -> None:
        """Set every task's outcome."""
        engine = batch.engine
        if not self._overlap:
            self._start_decode(batch, batch.tasks)
        images, decoded = [], []
        for task in batch.tasks:
            if task.decode is None:
                continue
            try:
                images.append(task.decode.result())
                decoded.append(task)
            except Exception as exc:  # FrameError for a corrupt image; anything else still fails it alone
                task.outcome = Failure(FailureKind.BAD_INPUT, str(exc)[:500])
        decode_s = time.perf_counter() - batch.decode_started
        if not images:
            return
        t0 = time.perf_counter()
        probs = engine.forward(images)
        infer_s = time.perf_counter() - t0
        self.metrics.batch_size.observe(len(images))
        self.metrics.decode.observe(decode_s)
        self.metrics.inference.observe(infer_s)
        batch.drift = DriftStats(engine.version)
        predictions = engine.predictions(probs)
        if self._shadow is not None and self._shadow.wants(engine.version):
            # References only: the frames stay decoded for the shadow thread, nothing is copied here.
            batch.shadow = ShadowWork(engine.version, [t.frame for t in decoded], images, predictions,
                                      engine.class_names)
        for task, image, prediction in zip(decoded, images, predictions, strict=True):
            batch.drift.add(task.frame["station"], prediction.confidence, prediction.class_index)
            if self.samples is not None:
                self.samples.offer(task.frame, prediction, image, engine.version, engine.class_names)
            enqueued = task.job.enqueued_at.timestamp() if task.job.enqueued_at else batch.claimed_at
            queue_wait = max(0.0, batch.claimed_at - enqueued)
            self.metrics.queue_wait.observe(queue_wait)
            task.outcome = Success(build_result(
                task.frame, prediction, model_version=engine.version, precision=engine.precision,
                worker=self.name, queue_wait_ms=queue_wait * 1000, decode_ms=decode_s * 1000,
                inference_ms=infer_s * 1000, batch_size=len(images),
            ))

    # -- finish thread ------------------------------------------------------------------------
    def _finish_loop(self) -> None:
        while True:
            batch = self._finishing.get()
            if batch is None:
                return
            try:
                with self.metrics.stage("record"):
                    self.health.call(lambda b=batch: self._finish(b), stop=self._give_up)
                if batch.drift:
                    self._write_drift(batch)
                if batch.shadow is not None and self._shadow is not None:
                    self._shadow.submit(batch.shadow)  # after the record: never part of the frames' latency
            except RedisOutageError as exc:
                self._fail_fatally(exc)
            except Exception:
                # The frames stay claimed; their leases expire and recovery runs them again.
                log.exception("could not record batch outcome; frames will be recovered", size=len(batch.tasks))
            finally:
                batch.shadow = None  # the shadow thread holds its own reference while it needs the images
                with self._lock:
                    self._batches.pop(id(batch), None)
                self._slots.release()

    def _finish(self, batch: Batch) -> None:
        """Record every frame's outcome in one script call; frames already ended are duplicates.

        Idempotent: run again after Redis went away mid-write, it writes nothing twice.
        """
        batch.record_attempts += 1
        if batch.records is None:
            batch.records = self._records(batch)
        codes, trimmed = rq.record_batch(
            self.connection, batch.queue, self.name, batch.records, attempt=batch.record_attempts,
            stream=RESULTS_STREAM, stream_maxlen=self.settings.results_maxlen,
            working_s=(time.time() - batch.claimed_at) * len(batch.tasks))
        recorded: Counter[str] = Counter()
        for task, code in zip(batch.tasks, codes, strict=True):
            if code in ("w", "mine"):  # "mine": written by this batch before a connection broke
                recorded[_label(task)] += 1
            elif code == "dup":
                recorded["duplicate"] += 1
            elif code == "gone":
                recorded["expired"] += 1
                log.warning("frame's job hash vanished while in hand; nothing recorded", job_id=task.job.id)
            else:
                recorded["error"] += 1
                log.error("frame's outcome could not be written", job_id=task.job.id, error=code[:200])
        self.metrics.results_trimmed.inc(trimmed)
        for outcome, n in recorded.items():
            self.metrics.frames.labels(outcome=outcome).inc(n)
        for task in batch.tasks:
            if isinstance(task.outcome, Success):
                self.metrics.end_to_end.observe(task.outcome.result["timings"]["end_to_end_ms"] / 1000.0)
        self.successful_job_count += recorded["ok"]
        self.failed_job_count += _failures(recorded)
        log.debug("batch done", size=len(batch.tasks), version=batch.engine.version if batch.engine else None,
                  **recorded)

    def _write_drift(self, batch: Batch) -> None:
        """A statistic: skipped while Redis is away, and never a reason to doubt the batch's record."""
        def write() -> None:
            with self.connection.pipeline(transaction=False) as pipe:
                assert batch.drift is not None
                batch.drift.write(pipe)
                pipe.execute()

        try:
            self._quietly(write)
        except Exception as exc:  # e.g. an ACL without vq:drift:*: say so once, keep serving
            if not self._drift_refused:
                self._drift_refused = True
                log.error("drift histograms not written; continual.drift will see no frames from this worker",
                          error=f"{type(exc).__name__}: {str(exc)[:200]}")

    def _records(self, batch: Batch) -> list[rq.Record]:
        with self.metrics.stage("stream"):
            entries = [self._stream_entry(batch, task) for task in batch.tasks]
        records = []
        for task, entry in zip(batch.tasks, entries, strict=True):
            outcome = task.outcome or Failure(FailureKind.ERROR, "no outcome was set for this frame")
            task.outcome = outcome
            if isinstance(outcome, Success):
                keep = self._without_image(task) if self.settings.keep_images == "failed" else b""
                records.append(rq.Record.success(task.job, task.execution_id, batch.started_at, outcome.result,
                                                 task.job.get_result_ttl(self.default_result_ttl), entry, keep))
            elif outcome.kind is FailureKind.ERROR and task.job.retries_left:
                records.append(rq.Record.retry(task.job, task.execution_id))
            else:
                records.append(rq.Record.failure(task.job, task.execution_id, batch.started_at, outcome.text, entry))
        return records

    @staticmethod
    def _without_image(task: FrameTask) -> bytes:
        """The job's data to keep once its result is recorded; b"" (keep the image) if it cannot be built:
        a frame is worth more than the memory, and an error here would hold up the whole batch's record."""
        try:
            return task.job.data_without_image()
        except Exception:
            log.exception("could not build the job's data without its image; it keeps the image", job_id=task.job.id)
            return b""

    @staticmethod
    def _stream_entry(batch: Batch, task: FrameTask) -> dict[str, str] | None:
        if isinstance(task.outcome, Success):
            return stream_fields(task.outcome.result)
        if task.outcome and task.outcome.kind is FailureKind.ERROR and task.job.retries_left:
            return None  # it runs again: its outcome goes on the stream then
        station = (task.frame or {}).get("station", "")
        text = task.outcome.text if task.outcome else "no outcome"
        return failure_fields(task.job.id, station, text, batch.engine.version if batch.engine else "")

    # -- heartbeats ---------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Keep claimed frames' executions alive while their batch is in hand."""
        interval = max(1.0, self.settings.heartbeat_ttl / 3.0)
        while not self._stop_threads.wait(interval):
            with self._lock:
                batches = list(self._batches.values())
            if batches:
                try:
                    self._quietly(lambda b=batches: self._keep_alive(b))
                except Exception:
                    # A thread that died here would let every lease in hand run out while its frames are served.
                    log.exception("could not renew the leases of the frames in hand; trying again")

    def _keep_alive(self, batches: list[Batch]) -> None:
        held = []
        for batch in batches:
            age = time.time() - batch.claimed_at
            # A frame stuck past its job timeout is left to expire and be recovered.
            held += [(t.job.id, t.execution_id) for t in list(batch.tasks) if age <= (t.job.timeout or 180)]
        rq.renew_leases(self.connection, self.queues[0], held, self.settings.heartbeat_ttl)
        self.heartbeat()


def _label(task: FrameTask) -> str:
    """The outcome a written record counts as (see worker/outcomes.py)."""
    outcome = task.outcome
    if isinstance(outcome, Success):
        return "ok"
    if outcome is not None and outcome.kind is FailureKind.ERROR and task.job.retries_left:
        return "retried"
    return outcome.kind.value if outcome is not None else "error"


def _failures(recorded: Counter[str]) -> int:
    """What RQ counts as failed: every terminal failure (not a retry, not a duplicate)."""
    return sum(n for kind, n in recorded.items() if kind not in ("ok", "retried", "duplicate"))


def _connection_of(queues: Any) -> Redis:
    from rq.connections import get_connection_from_queues

    return get_connection_from_queues(queues)


__all__ = ["BatchWorker"]
