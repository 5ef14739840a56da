"""Prometheus metrics for a BatchWorker (served on VQ_METRICS_PORT when it is set)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# worker/outcomes.py explains each; "rescued" counts frames taken back from dead workers.
FRAME_OUTCOMES = ("ok", "failed", "expired", "rejected", "poison", "error", "retried", "duplicate", "rescued")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)


class WorkerMetrics:
    """One registry per worker, so several workers (or tests) in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("vq_frames_total", "Frames handled, by outcome", ["outcome"], registry=r)
        for outcome in FRAME_OUTCOMES:  # present from the start: absent and zero read differently
            self.frames.labels(outcome=outcome)
        self.batch_size = Histogram("vq_batch_size", "Frames per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128), registry=r)
        self.queue_wait = Histogram("vq_queue_wait_seconds", "Enqueue to dequeue", buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self.decode = Histogram("vq_decode_seconds", "Decode time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("vq_inference_seconds", "Forward pass per batch", buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.end_to_end = Histogram("vq_end_to_end_seconds", "Capture to result", buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self.model_info = Gauge("vq_model_info", "The model version served (value 1)", ["version", "precision"],
                                registry=r)
        self.model_swaps = Counter("vq_model_swaps_total", "Model changes, by outcome", ["outcome"], registry=r)
        self.results_trimmed = Counter("vq_results_trimmed_total",
                                       "Entries trimmed off the bounded inference:results stream", registry=r)
        self.redis_up = Gauge("vq_redis_up", "1 while Redis answers, 0 during an outage", registry=r)
        self.redis_up.set(1)
        self.samples = Counter("vq_samples_total", "Frames offered to the learning loop, by outcome", ["outcome"],
                               registry=r)

        # CPU, not wall time: what each stage of the batch loop costs, on whichever thread it runs.
        self.stage_cpu = Counter("vq_stage_cpu_seconds_total", "Worker CPU time by stage of the batch loop",
                                 ["stage"], registry=r)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.stage_cpu.labels(stage=name).inc(time.thread_time() - t0)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def set_model(self, version: str, precision: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version, precision=precision).set(1)
