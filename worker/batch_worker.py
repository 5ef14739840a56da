"""BatchWorker: an RQ worker that classifies frames in batches, in-process.

`rq worker --worker-class worker.BatchWorker inference`

One batch, end to end:
  1. `_collect`  the loop's blocking dequeue gives the first frame; more are drained without
                 blocking (LMOVE into RQ's intermediate list, as RQ's own dequeue does) until
                 `max_batch`, polling client-side for at most `max_wait_ms` while fewer are ready.
  2. `_claim`    one pipeline marks every job started (RQ executions, StartedJobRegistry, status),
                 rejects what must not run (a function other than the inference entry, stale or
                 malformed frames) and starts decoding in the thread pool.
  3. `_infer`    on the inference thread, while the main thread collects the next batch: wait for
                 the decodes, one forward pass, per-frame outcome (a corrupt frame fails alone).
  4. `_finish`   on the finish thread, while the next forward pass runs: one pipeline writes every
                 result / failure, RQ's registries and the results stream.

At-least-once: every claimed frame has an RQ execution whose TTL is VQ_HEARTBEAT_TTL; a heartbeat
thread keeps it alive while its batch is in hand. If the worker is SIGKILLed the executions expire
and any worker's maintenance (every VQ_MAINTENANCE_INTERVAL s) re-enqueues the frames (they carry
`Retry`). SIGTERM stops dequeuing, finishes the batches in hand, then exits.
"""

from __future__ import annotations

import queue as stdqueue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis import Redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.utils import as_text, now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from .frames import FrameError, frame_deadline, validate_frame
from .hot_swap import ModelWatcher
from .jobs import JOB_FUNC, RESULTS_STREAM, FrameJob, FrameQueue
from .logs import configure_logging
from .metrics import WorkerMetrics
from .model_source import configure_torch, load_engine
from .results import build_result, error_text, failure_fields, stream_fields
from .runtime import InferenceEngine
from .sample_feed import SampleFeed, SamplingConfig
from .serializer import MsgpackSerializer
from .settings import Settings

log = structlog.get_logger("visionqueue.worker")


class FrameExpired(Exception):
    """The frame waited past its deadline: not worth classifying any more."""


class JobRejected(Exception):
    """The job names a function other than the inference entry; it is never imported or called."""


@dataclass
class Batch:
    queue: Queue
    engine: InferenceEngine
    claimed_at: float
    jobs: list[Job] = field(default_factory=list)
    executions: dict[str, Execution] = field(default_factory=dict)
    frames: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    decodes: dict[str, Any] = field(default_factory=dict)
    decode_started: float = 0.0


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
        connection = kwargs.get("connection") or _connection_of(queues)
        kwargs["connection"] = connection
        names = [q.name if isinstance(q, Queue) else q for q in ([queues] if isinstance(queues, str | Queue)
                                                                 else queues)]
        super().__init__([FrameQueue(n, connection=connection) for n in names], *args, **kwargs)
        self.log_job_description = False
        self.metrics = WorkerMetrics()
        self.sampling = SamplingConfig.from_env()
        self.samples: SampleFeed | None = None
        self.engine: InferenceEngine | None = None
        self._overlap = False
        self._next_engine: InferenceEngine | None = None
        self._watcher: ModelWatcher | None = None
        self._handoff: stdqueue.Queue[Batch | None] = stdqueue.Queue()
        self._finishing: stdqueue.Queue[tuple[Batch, dict[str, Any]] | None] = stdqueue.Queue()
        # Three batches in hand at most: one decoding, one in the forward pass, one being recorded.
        self._slots = threading.Semaphore(3)
        self._transit_seen: dict[str, float] = {}
        self._batches: dict[int, Batch] = {}
        self._lock = threading.Lock()
        self._stop_threads = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def dequeue_timeout(self) -> int:
        # Block no longer than the maintenance interval, so an idle worker still recovers
        # abandoned frames on time.
        return max(1, min(self.worker_ttl - 15, self.settings.maintenance_interval))

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # The model is loaded and warmed up before the worker registers: a worker that is
        # visible to `rq info` can take frames at full speed.
        configure_torch(self.settings)
        self.engine = load_engine(self.settings, self.connection)
        # Measured on 2 CPU cores (resnet18 int8 @224): overlapped 188 frames/s, sequential 178.
        self._overlap = self.settings.overlap_decode == "on"
        self.metrics.set_model(self.engine.version, self.engine.precision)
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
        super().bootstrap(*args, **kwargs)
        if self.sampling.strategy != "none" or self.sampling.audit_rate > 0:
            self.samples = SampleFeed(self.connection, self.metrics, self.sampling)
            self.samples.start()
        self._start_thread(self._inference_loop, "vq-inference")
        self._start_thread(self._finish_loop, "vq-finish")
        self._start_thread(self._heartbeat_loop, "vq-heartbeat")
        if self.settings.model_path is None:  # a local artifact is pinned; the registry's current is followed
            self._watcher = ModelWatcher(self.settings, self.connection, lambda: self.engine.version,
                                         self._model_ready, self.metrics)
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
        super().teardown()

    # -- the batch ----------------------------------------------------------------------------
    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        # Wait for a free slot *before* taking a frame: a frame moved to the intermediate list and left
        # there unclaimed for a heartbeat TTL looks abandoned, and another worker would run it too.
        while not self._slots.acquire(timeout=1.0):
            self.heartbeat()
        try:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        except BaseException:
            self._slots.release()
            raise
        if result is None:
            self._slots.release()
        return result

    def execute_job(self, job: Job, queue: Queue) -> None:
        jobs = self._collect(job, queue)
        batch = self._claim(jobs, queue)
        self._handoff.put(batch)

    def _collect(self, first: Job, queue: Queue) -> list[Job]:
        """The first job plus up to max_batch - 1 more, waiting at most max_wait_ms for them."""
        jobs = [first]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
        missing_ids: list[str] = []
        while True:
            want = self.settings.max_batch - len(jobs)
            if want <= 0:
                break
            ids = self._drain_ids(queue, want)
            if ids:
                for job_id, fetched in zip(ids, self.job_class.fetch_many(
                        ids, connection=self.connection, serializer=self.serializer), strict=True):
                    if fetched is None:
                        missing_ids.append(job_id)
                    else:
                        jobs.append(fetched)
                continue
            if time.monotonic() >= deadline:
                break
            # Redis resolves blocking timeouts at its `hz`, far coarser than milliseconds.
            time.sleep(0.0005)
        if missing_ids:
            # Jobs whose TTL ran out while queued: take them off the intermediate list, count them.
            self._lrem_many(queue, missing_ids)
            self.metrics.frames.labels(outcome="expired").inc(len(missing_ids))
        return jobs

    def _drain_ids(self, queue: Queue, want: int) -> list[str]:
        with self.connection.pipeline(transaction=False) as pipe:
            for _ in range(want):
                pipe.lmove(queue.key, queue.intermediate_queue_key)
            return [as_text(x) for x in pipe.execute() if x is not None]

    def _lrem_many(self, queue: Queue, ids: list[str]) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.lrem(queue.intermediate_queue_key, 1, job_id)
            pipe.execute()

    def _model_ready(self, engine: InferenceEngine) -> None:
        with self._lock:
            stale, self._next_engine = self._next_engine, engine
        if stale is not None:
            stale.close()

    def _swap_if_ready(self) -> None:
        """Between batches: the next batch uses the new engine; batches in hand finish on theirs."""
        with self._lock:
            engine, self._next_engine = self._next_engine, None
        if engine is None:
            return
        old, self.engine = self.engine, engine
        if old is not None:
            old.close(wait=False)
        self.metrics.set_model(engine.version, engine.precision)
        self.metrics.model_swaps.labels(outcome="swapped").inc()
        log.info("model swapped", version=engine.version, previous=old.version if old else None)

    def _claim(self, jobs: list[Job], queue: Queue) -> Batch:
        """Mark every job started in one pipeline and start decoding the acceptable frames."""
        self._swap_if_ready()
        assert self.engine is not None
        batch = Batch(queue=queue, engine=self.engine, claimed_at=time.time())
        with self.connection.pipeline() as pipe:
            for job in jobs:
                execution = Execution.create(job, self.settings.heartbeat_ttl, pipeline=pipe, worker_name=self.name)
                self.executions[execution.id] = execution
                batch.executions[job.id] = execution
                job.prepare_for_execution(self.name, pipe)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                batch.jobs.append(job)
                try:
                    batch.frames[job.id] = self._accept(job, batch.claimed_at)
                except (FrameError, FrameExpired, JobRejected) as exc:
                    batch.errors[job.id] = exc
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(pipeline=pipe)
            pipe.execute()
        with self._lock:
            self._batches[id(batch)] = batch
        if self._overlap:
            self._start_decode(batch)
        return batch

    def _start_decode(self, batch: Batch) -> None:
        batch.decode_started = time.perf_counter()
        ids = [j.id for j in batch.jobs if j.id in batch.frames]
        futures = batch.engine.submit_decode([batch.frames[i]["image"] for i in ids])
        batch.decodes = dict(zip(ids, futures, strict=True))

    def _accept(self, job: Job, wall: float) -> dict[str, Any]:
        """The frame of a job that may run; raises for one that must not."""
        try:
            func_name = job.func_name
        except Exception as exc:  # undecodable job data
            raise FrameError(f"job data is not a msgpack frame job: {exc!r}") from exc
        if func_name != JOB_FUNC:
            raise JobRejected(f"function {func_name!r} is not allowed on this queue (only {JOB_FUNC})")
        if len(job.args) != 1 or job.kwargs:
            raise FrameError("a frame job takes exactly one argument, the frame")
        frame = validate_frame(job.args[0])
        deadline = frame_deadline(frame)
        if deadline is not None and wall > deadline:
            raise FrameExpired(f"frame is {wall - frame['ts']:.2f}s old, past its deadline of "
                               f"{frame['meta']['deadline_s']}s")
        return frame

    # -- inference thread ---------------------------------------------------------------------
    def _inference_loop(self) -> None:
        """Forward passes back to back: recording a batch's outcome happens on the finish thread."""
        while True:
            batch = self._handoff.get()
            if batch is None:
                self._finishing.put(None)
                return
            try:
                outcomes = self._infer(batch)
            except Exception as exc:  # the model itself failed: nothing is wrong with the frames
                log.exception("batch failed", size=len(batch.jobs))
                outcomes = {j.id: exc for j in batch.jobs if j.id not in batch.errors}
            self._finishing.put((batch, outcomes))

    def _finish_loop(self) -> None:
        while True:
            item = self._finishing.get()
            if item is None:
                return
            batch, outcomes = item
            try:
                self._finish(batch, outcomes)
            except Exception:
                # The frames stay claimed; their executions expire and maintenance re-runs them.
                log.exception("could not record batch outcome; frames will be recovered", size=len(batch.jobs))
            finally:
                with self._lock:
                    self._batches.pop(id(batch), None)
                self._slots.release()

    def _infer(self, batch: Batch) -> dict[str, Any]:
        """Result dict or exception per job id."""
        engine = batch.engine
        if not self._overlap:
            self._start_decode(batch)
        outcomes: dict[str, Any] = dict(batch.errors)
        images, ok_ids = [], []
        for job_id, fut in batch.decodes.items():
            try:
                images.append(fut.result())
                ok_ids.append(job_id)
            except FrameError as exc:
                outcomes[job_id] = exc
        decode_s = time.perf_counter() - batch.decode_started
        t0 = time.perf_counter()
        probs = engine.forward(images)
        infer_s = time.perf_counter() - t0
        self.metrics.batch_size.observe(len(images))
        self.metrics.decode.observe(decode_s)
        self.metrics.inference.observe(infer_s)
        by_id = {j.id: j for j in batch.jobs}
        for job_id, image, prediction in zip(ok_ids, images, engine.predictions(probs), strict=True):
            job = by_id[job_id]
            if self.samples is not None:
                self.samples.offer(batch.frames[job_id], prediction, image, engine.version, engine.class_names)
            enqueued = job.enqueued_at.timestamp() if job.enqueued_at else batch.claimed_at
            queue_wait = max(0.0, batch.claimed_at - enqueued)
            self.metrics.queue_wait.observe(queue_wait)
            outcomes[job_id] = build_result(
                batch.frames[job_id], prediction, model_version=engine.version, precision=engine.precision,
                worker=self.name, queue_wait_ms=queue_wait * 1000, decode_ms=decode_s * 1000,
                inference_ms=infer_s * 1000, batch_size=len(images),
            )
        return outcomes

    def _finish(self, batch: Batch, outcomes: dict[str, Any]) -> None:
        """Write every job's result or failure, RQ's registries and the results stream, in one pipeline."""
        ended = now()
        ended_s = utcformat(ended)
        version = batch.engine.version
        counts = {"ok": 0, "failed": 0, "expired": 0, "retried": 0}
        maxlen = self.settings.results_maxlen or None
        with self.connection.pipeline() as pipe:
            for job in batch.jobs:
                execution = batch.executions[job.id]
                outcome = outcomes[job.id]
                job.ended_at = ended
                if isinstance(outcome, dict):
                    self._record_success(job, execution, outcome, ended, ended_s, pipe)
                    pipe.xadd(RESULTS_STREAM, stream_fields(outcome), maxlen=maxlen, approximate=True)
                    self.metrics.end_to_end.observe(outcome["timings"]["end_to_end_ms"] / 1000.0)
                    counts["ok"] += 1
                else:
                    error = error_text(outcome)
                    infra = not isinstance(outcome, FrameError | FrameExpired | JobRejected)
                    if infra and job.should_retry:
                        job.retry(batch.queue, pipe)
                        counts["retried"] += 1
                    else:
                        self._record_failure(job, execution, error, ended, pipe)
                        counts["expired" if isinstance(outcome, FrameExpired) else "failed"] += 1
                    station = batch.frames.get(job.id, {}).get("station", "")
                    pipe.xadd(RESULTS_STREAM, failure_fields(job.id, station, error, version),
                              maxlen=maxlen, approximate=True)
                execution.delete(job=job, pipeline=pipe)
            pipe.hincrby(self.key, "successful_job_count", counts["ok"])
            pipe.hincrby(self.key, "failed_job_count", counts["failed"] + counts["expired"])
            pipe.hincrbyfloat(self.key, "total_working_time", (time.time() - batch.claimed_at) * len(batch.jobs))
            pipe.execute()
        for job in batch.jobs:
            self.executions.pop(batch.executions[job.id].id, None)
        for outcome, n in counts.items():
            if n:
                self.metrics.frames.labels(outcome=outcome).inc(n)
        self.successful_job_count += counts["ok"]
        self.failed_job_count += counts["failed"] + counts["expired"]
        log.debug("batch done", size=len(batch.jobs), version=version, **counts)

    def _record_success(self, job: Job, execution: Execution, result: dict[str, Any], ended: Any,
                        ended_s: str, pipe: Any) -> None:
        # Only the fields that changed: RQ's job.save() would rewrite the whole hash, frame included.
        job._status = JobStatus.FINISHED
        pipe.hset(job.key, mapping={"status": JobStatus.FINISHED.value, "ended_at": ended_s})
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        Result.create(job, Result.Type.SUCCESSFUL, ttl=result_ttl, return_value=result, worker_name=self.name,
                      pipeline=pipe, execution_id=execution.id, execution_started_at=execution.created_at,
                      execution_ended_at=ended)
        if result_ttl != 0:
            job.finished_job_registry.add(job, result_ttl, pipe)
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)

    def _record_failure(self, job: Job, execution: Execution, exc_string: str, ended: Any, pipe: Any) -> None:
        job._status = JobStatus.FAILED
        job._handle_failure(exc_string, pipe, worker_name=self.name, execution_id=execution.id,
                            execution_started_at=execution.created_at, execution_ended_at=ended)

    # -- maintenance --------------------------------------------------------------------------
    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        for queue in self.queues:
            self._rescue_intermediate(queue)

    def _rescue_intermediate(self, queue: Queue) -> None:
        """Put back frames a dead worker moved to the intermediate list but never claimed.

        RQ fails (or retries) those only after a minute; an id that sits there unclaimed for a
        heartbeat TTL belongs to a dead worker (a live one claims within milliseconds), so it goes
        back to the head of the queue, once, atomically, without spending a retry.
        """
        ids = [as_text(x) for x in self.connection.lrange(queue.intermediate_queue_key, 0, -1)]
        seen_now = time.monotonic()
        self._transit_seen = {i: self._transit_seen.get(i, seen_now) for i in ids}
        stale = [i for i, t in self._transit_seen.items() if seen_now - t >= self.settings.heartbeat_ttl]
        if not stale:
            return
        started = set(queue.started_job_registry.get_job_ids())
        for job_id in stale:
            if job_id not in started and _requeue_from_intermediate(
                    keys=[queue.intermediate_queue_key, queue.key], args=[job_id], client=self.connection):
                log.warning("frame rescued from a dead worker's hands", job_id=job_id)
            self._transit_seen.pop(job_id, None)

    # -- heartbeats ---------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Keep claimed frames' executions alive while their batch is in hand."""
        interval = max(1.0, self.settings.heartbeat_ttl / 3.0)
        while not self._stop_threads.wait(interval):
            with self._lock:
                batches = list(self._batches.values())
            if not batches:
                continue
            try:
                with self.connection.pipeline(transaction=False) as pipe:
                    for batch in batches:
                        if time.time() - batch.claimed_at > (batch.jobs[0].timeout or 180):
                            continue  # a batch stuck this long is left to expire and be re-run
                        for job in batch.jobs:
                            batch.executions[job.id].heartbeat(job.started_job_registry,
                                                               self.settings.heartbeat_ttl, pipe)
                    self.heartbeat(pipeline=pipe)
                    pipe.execute()
            except Exception:
                log.exception("heartbeat failed")


_REQUEUE_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def _requeue_from_intermediate(keys: list[str], args: list[str], client: Redis) -> int:
    return client.eval(_REQUEUE_LUA, len(keys), *keys, *args)


def _connection_of(queues: Any) -> Redis:
    from rq.connections import get_connection_from_queues

    return get_connection_from_queues(queues)


__all__ = ["BatchWorker"]
