"""BatchWorker: an RQ worker that classifies frames in batches, in-process.

`rq worker --worker-class worker.BatchWorker inference`

One batch, end to end:
  1. `dequeue_job_and_maintain_ttl`  wait for a free batch slot, then for the first frame; an idle
                 worker swaps models and runs recovery here too.
  2. `_collect`  more frames without blocking, until `max_batch`, polling client-side for at most
                 `max_wait_ms` while fewer are ready; each job hash is size-checked in Redis first.
  3. `_claim`    judge every job (`outcomes.judge`), mark every one started in one transaction (RQ
                 executions, StartedJobRegistry, status) and start decoding the acceptable frames.
  4. `_infer`    on the inference thread, while the main thread collects the next batch: wait for
                 the decodes, one forward pass, one outcome per frame (a corrupt frame fails alone).
  5. `_finish`   on the finish thread, while the next forward pass runs: one transaction records
                 every result or failure, RQ's registries and the results stream — unless a frame
                 already has a terminal outcome (then it is counted as a duplicate, not written).

Nothing in a job can stop the worker: every job is data (`FrameJob.restore`, `outcomes.judge`), and
every Redis call rides through an outage of up to VQ_REDIS_OUTAGE_S (`RedisHealth`), keeping the
batches in hand and recording them when Redis is back. Every call into RQ's internals is in
`worker/rq_internals.py`; frames whose worker died are recovered by `worker/recovery.py`.

At-least-once: every claimed frame has an RQ execution whose TTL is VQ_HEARTBEAT_TTL; a heartbeat
thread keeps it alive while its batch is in hand. SIGTERM stops dequeuing, finishes the batches in
hand, then exits.
"""

from __future__ import annotations

import queue as stdqueue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from redis import Redis
from redis.exceptions import ResponseError
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from . import rq_internals as rq
from .hot_swap import ModelWatcher
from .jobs import RESULTS_STREAM, FrameJob, FrameQueue
from .logs import configure_logging
from .metrics import WorkerMetrics
from .model_source import configure_torch, load_engine
from .outcomes import Failure, FailureKind, FrameTask, Success, judge
from .recovery import IntermediateWatch, recover_abandoned
from .redis_health import RedisHealth, RedisOutageError, is_transient, with_timeouts
from .results import build_result, failure_fields, stream_fields
from .runtime import InferenceEngine
from .sample_feed import SampleFeed, SamplingConfig
from .serializer import MsgpackSerializer
from .settings import Settings

log = structlog.get_logger("visionqueue.worker")

T = TypeVar("T")

BLOCK_S = 1.0  # longest blocking dequeue: stop requests, idle swaps and maintenance wait no longer


@dataclass
class Batch:
    queue: Queue
    engine: InferenceEngine
    claimed_at: float
    tasks: list[FrameTask] = field(default_factory=list)
    decode_started: float = 0.0
    record_attempts: int = 0


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
        self._watcher: ModelWatcher | None = None
        self._intermediate = IntermediateWatch(self.settings.heartbeat_ttl)
        self._handoff: stdqueue.Queue[Batch | None] = stdqueue.Queue()
        self._finishing: stdqueue.Queue[Batch | None] = stdqueue.Queue()
        # Three batches in hand at most: one decoding, one in the forward pass, one being recorded.
        self._slots = threading.Semaphore(3)
        self._batches: dict[int, Batch] = {}
        self._lock = threading.Lock()
        self._stop_threads = threading.Event()
        self._give_up = threading.Event()
        self._fatal: BaseException | None = None
        self._threads: list[threading.Thread] = []

    # -- riding through Redis faults ----------------------------------------------------------
    def _redis(self, fn: Callable[[], T]) -> T:
        """`fn()` on the main thread, waiting out a Redis outage; past VQ_REDIS_OUTAGE_S the worker exits 1."""
        try:
            return self.health.call(fn, stop=self._give_up)
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

    def check_for_suspension(self, burst: bool) -> None:
        self._redis(lambda: super(BatchWorker, self).check_for_suspension(burst))

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
        self.engine = self._redis(lambda: load_engine(self.settings, self.connection))
        # Measured on 2 CPU cores (resnet18 int8 @224): overlapped 188 frames/s, sequential 178.
        self._overlap = self.settings.overlap_decode == "on"
        self.metrics.set_model(self.engine.version, self.engine.precision)
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
        self._redis(lambda: super(BatchWorker, self).bootstrap(*args, **kwargs))
        if self.sampling.strategy != "none" or self.sampling.audit_rate > 0:
            self.samples = SampleFeed(self.connection, self.metrics, self.sampling)
            self.samples.start()
        self._start_thread(self._inference_loop, "vq-inference")
        self._start_thread(self._finish_loop, "vq-finish")
        self._start_thread(self._heartbeat_loop, "vq-heartbeat")
        if self.settings.model_path is None:  # a local artifact is pinned; the registry's current is followed
            self._watcher = ModelWatcher(self.settings, self.connection, self.engine.version, self.metrics)
            self._watcher.start()
        log.info("batch worker ready", worker=self.name, queues=self.queue_names(), **self.settings.describe())

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
        if self.samples is not None:
            self.samples.stop()
        if self.engine is not None:
            self.engine.close()
        self._quietly(lambda: super(BatchWorker, self).teardown())
        if self._fatal is not None:
            raise SystemExit(f"visionqueue worker: {self._fatal}")

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
                job = self._dequeue_first(queue, timeout)
            except BaseException:
                self._slots.release()
                raise
            if job is not None:
                return job, queue
            self._slots.release()
            if timeout is None:  # burst mode: the queue is empty
                return None
            if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                return None

    def _dequeue_first(self, queue: Queue, timeout: int | None) -> FrameJob | None:
        if timeout is None:  # burst mode: never block
            job_id = next(iter(self._redis(lambda: rq.take_ids(self.connection, queue, 1))), None)
        else:
            job_id = self._redis(lambda: rq.wait_for_id(self.connection, queue, min(BLOCK_S, timeout)))
        if job_id is None:
            return None
        jobs = self._load(queue, [job_id])
        return jobs[0] if jobs else None

    def execute_job(self, job: FrameJob, queue: Queue) -> None:
        try:
            batch = self._claim(self._collect(job, queue), queue)
        except BaseException:
            self._slots.release()
            raise
        self._handoff.put(batch)

    def _collect(self, first: FrameJob, queue: Queue) -> list[FrameJob]:
        """The first job plus up to max_batch - 1 more, waiting at most max_wait_ms for them."""
        jobs = [first]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
        while len(jobs) < self.settings.max_batch:
            want = self.settings.max_batch - len(jobs)
            ids = self._redis(lambda n=want: rq.take_ids(self.connection, queue, n))
            if ids:
                jobs += self._load(queue, ids)
                continue
            if time.monotonic() >= deadline:
                break
            # Redis resolves blocking timeouts at its `hz`, far coarser than milliseconds.
            time.sleep(0.0005)
        return jobs

    def _load(self, queue: Queue, ids: list[str]) -> list[FrameJob]:
        """Jobs for ids taken off the queue; the gone ones (TTL ran out while queued) are counted and forgotten."""
        fetched = self._redis(lambda: rq.fetch_jobs(self.connection, ids, self.serializer))
        jobs, gone, not_jobs = [], [], []
        for job_id, job in zip(ids, fetched, strict=True):
            if job is None:
                gone.append(job_id)
            elif isinstance(job, rq.Unreadable) and job.not_a_hash:
                not_jobs.append(job_id)  # nothing to record a failure into: say so, and let the id go
                log.error("queue entry is not a job; dropped", job_id=job_id[:200], reason=job.reason)
            elif isinstance(job, rq.Unreadable):
                placeholder = rq.placeholder(self.connection, job_id, queue, self.serializer)
                placeholder.defects.append(job.reason)
                jobs.append(placeholder)
            else:
                jobs.append(job)
        if gone or not_jobs:
            self._redis(lambda: self._forget(queue, gone + not_jobs))
            self.metrics.frames.labels(outcome="expired").inc(len(gone))
            self.metrics.frames.labels(outcome="failed").inc(len(not_jobs))
        return jobs

    def _forget(self, queue: Queue, ids: list[str]) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            rq.forget_ids(pipe, queue, ids)
            pipe.execute()

    def _swap_if_ready(self) -> None:
        """Between batches: the next batch uses the new engine; batches in hand finish on theirs."""
        engine = self._watcher.take() if self._watcher is not None else None
        if engine is None:
            return
        old, self.engine = self.engine, engine
        if old is not None:
            old.close(wait=False)
        self.metrics.set_model(engine.version, engine.precision)
        self.metrics.model_swaps.labels(outcome="swapped").inc()
        log.info("model swapped", version=engine.version, previous=old.version if old else None)

    def _claim(self, jobs: list[FrameJob], queue: Queue) -> Batch:
        """Judge every job, mark the runnable and the refused ones started in one transaction, start decoding."""
        self._swap_if_ready()
        assert self.engine is not None
        batch = Batch(queue=queue, engine=self.engine, claimed_at=time.time())
        duplicates = []
        for job in jobs:
            if job.get_status(refresh=False).value in rq.TERMINAL:
                duplicates.append(job.id)  # run and recorded already (at-least-once): not again
                continue
            task = FrameTask(job=job, execution=rq.new_execution(job, self.name))
            verdict = judge(job, batch.claimed_at)
            if isinstance(verdict, Failure):
                task.outcome = verdict
            else:
                task.frame = verdict
            batch.tasks.append(task)

        self._redis(lambda: self._write_claims(batch, queue, duplicates))
        if duplicates:
            self.metrics.frames.labels(outcome="duplicate").inc(len(duplicates))
        for task in batch.tasks:
            self.executions[task.execution.id] = task.execution
        with self._lock:
            self._batches[id(batch)] = batch
        if self._overlap:
            self._start_decode(batch)
        return batch

    def _write_claims(self, batch: Batch, queue: Queue, duplicates: list[str]) -> None:
        """One transaction for the batch; idempotent, so a retry after a broken connection writes the same again."""
        def write(tasks: list[FrameTask], forget: list[str]) -> None:
            with self.connection.pipeline() as pipe:
                for task in tasks:
                    rq.claim(pipe, queue, task.job, task.execution, self.settings.heartbeat_ttl)
                rq.forget_ids(pipe, queue, forget)
                rq.worker_busy(pipe, self)
                self.heartbeat(pipeline=pipe)
                pipe.execute()

        try:
            write(batch.tasks, duplicates)
        except ResponseError as exc:
            if is_transient(exc):
                raise
            # One job's hash refused a write (changed under us into something else): claim the
            # others one by one and let that one go, rather than the whole batch.
            for task in list(batch.tasks):
                try:
                    write([task], [])
                except ResponseError as one:
                    if is_transient(one):
                        raise
                    batch.tasks.remove(task)
                    self._forget(queue, [task.job.id])
                    self.metrics.frames.labels(outcome="failed").inc()
                    log.error("frame could not be claimed; dropped", job_id=task.job.id, error=str(one)[:200])
            self._forget(queue, duplicates)

    def _start_decode(self, batch: Batch) -> None:
        batch.decode_started = time.perf_counter()
        runnable = [t for t in batch.tasks if t.frame is not None]
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
                self._infer(batch)
            except Exception as exc:  # the model itself failed: nothing is known to be wrong with the frames
                log.exception("batch failed", size=len(batch.tasks))
                for task in batch.tasks:
                    if task.outcome is None or isinstance(task.outcome, Success):
                        task.outcome = Failure.error(exc)
            self._finishing.put(batch)

    def _infer(self, batch: Batch) -> None:
        """Set every task's outcome."""
        engine = batch.engine
        if not self._overlap:
            self._start_decode(batch)
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
        for task, image, prediction in zip(decoded, images, engine.predictions(probs), strict=True):
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
                self.health.call(lambda b=batch: self._finish(b), stop=self._give_up)
            except RedisOutageError as exc:
                self._fail_fatally(exc)
            except Exception:
                # The frames stay claimed; their leases expire and recovery runs them again.
                log.exception("could not record batch outcome; frames will be recovered", size=len(batch.tasks))
            finally:
                with self._lock:
                    self._batches.pop(id(batch), None)
                for task in batch.tasks:
                    self.executions.pop(task.execution.id, None)
                self._slots.release()

    def _finish(self, batch: Batch) -> None:
        """Record every frame's outcome in one transaction; frames already terminal are duplicates.

        Idempotent: run again after Redis went away mid-write, it writes nothing twice.
        """
        batch.record_attempts += 1
        tasks = batch.tasks
        recorded: Counter[str] = Counter()

        def write(pipe: Any) -> None:
            states = rq.read_states(self.connection, [t.job for t in tasks])
            recorded.clear()
            ended = rq.now()
            for task, (status, holder) in zip(tasks, states, strict=True):
                if status in rq.TERMINAL:
                    # Written by another run of the frame, or by this batch before a connection broke.
                    recorded["ok" if batch.record_attempts > 1 and holder == self.name else "duplicate"] += 1
                    continue
                recorded[self._record(pipe, batch, task, ended)] += 1
                pipe.xadd(RESULTS_STREAM, self._stream_entry(batch, task))
            rq.worker_counts(pipe, self.key, recorded["ok"], _failures(recorded),
                             (time.time() - batch.claimed_at) * len(tasks))
            if self.settings.results_maxlen:
                # The stream is a bounded live tail (the job's result is the record): trimmed once a
                # batch, last, and what is trimmed is counted. `~` trims whole nodes: cheap.
                pipe.xtrim(RESULTS_STREAM, maxlen=self.settings.results_maxlen, approximate=True)

        while (replies := rq.transaction(self.connection, [t.job.key for t in tasks], write)) is None:
            batch.record_attempts += 1  # a frame changed under us (another run of it): look again
        if self.settings.results_maxlen:
            self.metrics.results_trimmed.inc(replies[-1])
        for outcome, n in recorded.items():
            self.metrics.frames.labels(outcome=outcome).inc(n)
        for task in tasks:
            if isinstance(task.outcome, Success):
                self.metrics.end_to_end.observe(task.outcome.result["timings"]["end_to_end_ms"] / 1000.0)
        self.successful_job_count += recorded["ok"]
        self.failed_job_count += _failures(recorded)
        log.debug("batch done", size=len(tasks), version=batch.engine.version, **recorded)

    def _record(self, pipe: Any, batch: Batch, task: FrameTask, ended: Any) -> str:
        outcome = task.outcome or Failure(FailureKind.ERROR, "no outcome was set for this frame")
        if isinstance(outcome, Success):
            rq.record_success(pipe, task.job, task.execution, outcome.result,
                              task.job.get_result_ttl(self.default_result_ttl), self.name, ended)
            return "ok"
        if outcome.kind is FailureKind.ERROR and task.job.retries_left:
            rq.requeue(pipe, task.job, batch.queue, task.execution, spend_retry=True)
            return "retried"
        rq.record_failure(pipe, task.job, task.execution, outcome.text, self.name, ended)
        return outcome.kind.value

    @staticmethod
    def _stream_entry(batch: Batch, task: FrameTask) -> dict[str, str]:
        if isinstance(task.outcome, Success):
            return stream_fields(task.outcome.result)
        station = (task.frame or {}).get("station", "")
        text = task.outcome.text if task.outcome else "no outcome"
        return failure_fields(task.job.id, station, text, batch.engine.version)

    # -- heartbeats ---------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Keep claimed frames' executions alive while their batch is in hand."""
        interval = max(1.0, self.settings.heartbeat_ttl / 3.0)
        while not self._stop_threads.wait(interval):
            with self._lock:
                batches = list(self._batches.values())
            if batches:
                self._quietly(lambda b=batches: self._keep_alive(b))

    def _keep_alive(self, batches: list[Batch]) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for batch in batches:
                for task in batch.tasks:
                    if time.time() - batch.claimed_at > (task.job.timeout or 180):
                        continue  # a frame stuck this long is left to expire and be recovered
                    rq.keep_alive(pipe, task.job, task.execution, self.settings.heartbeat_ttl)
            self.heartbeat(pipeline=pipe)
            pipe.execute()


def _failures(recorded: Counter[str]) -> int:
    """What RQ counts as failed: every terminal failure (not a retry, not a duplicate)."""
    return sum(n for kind, n in recorded.items() if kind not in ("ok", "retried", "duplicate"))


def _connection_of(queues: Any) -> Redis:
    from rq.connections import get_connection_from_queues

    return get_connection_from_queues(queues)


__all__ = ["BatchWorker"]
