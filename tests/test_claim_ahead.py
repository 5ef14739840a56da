"""How a worker whose forward pass is busy takes its next batch (VQ_CLAIM_AHEAD).

A real BatchWorker object (not started: the methods under test are its main thread's), a real
redis-server, real frames, a real tiny model for the decodes.
"""

from __future__ import annotations

import threading

import pytest
from conftest import wait_for
from helpers import jpeg, tiny_artifact

from worker.batch_worker import BatchWorker
from worker.frames import make_frame
from worker.jobs import FrameQueue, enqueue_frames
from worker.model_source import load_engine
from worker.runtime import resolve_claim_ahead
from worker.settings import Settings


def _worker(redis_conn, monkeypatch, claim_ahead: str, **env: str) -> BatchWorker:
    monkeypatch.setenv("VQ_CLAIM_AHEAD", claim_ahead)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return BatchWorker(["inference"], connection=redis_conn, name=f"ahead-{claim_ahead}")


def _send(queue: FrameQueue, n: int, first: int = 0) -> None:
    enqueue_frames(queue, [make_frame(jpeg(seed=first + i), station="s", seq=first + i) for i in range(n)])


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, out


def _busy_and_waiting(worker: BatchWorker, why: str) -> tuple[threading.Thread, dict]:
    """With a batch in the forward pass, `_wait_for_turn` in a thread, checked to be still waiting."""
    worker._forward_free.clear()
    thread, out = _in_thread(lambda: worker._wait_for_turn(worker.queues[0]))
    thread.join(timeout=0.3)
    assert thread.is_alive(), why
    return thread, out


def test_a_busy_worker_leaves_new_frames_to_idle_ones_and_takes_only_queued_frames(redis_conn, monkeypatch):
    worker = _worker(redis_conn, monkeypatch, "backlog")
    queue = worker.queues[0]
    assert worker._wait_for_turn(queue) is False  # forward pass free: block on the queue as usual

    thread, out = _busy_and_waiting(worker, "a busy worker must not go for the queue while it is empty")
    _send(queue, 1)  # nobody is blocked on the queue, so the frame stays there
    wait_for(lambda: not thread.is_alive(), timeout=10, what="the busy worker to see the queued frame")
    assert out["value"] is True  # claim ahead, without blocking

    redis_conn.delete(queue.key)
    thread, out = _in_thread(lambda: worker._wait_for_turn(queue))
    worker._forward_free.set()  # the forward pass ended: back to blocking on the queue
    wait_for(lambda: not thread.is_alive(), timeout=10, what="the worker to see its forward pass end")
    assert out["value"] is False

    worker._forward_free.clear()
    always = _worker(redis_conn, monkeypatch, "always")
    always._forward_free.clear()
    assert always._wait_for_turn(queue) is False  # the old way: straight to the queue


def test_with_claim_ahead_off_a_busy_worker_leaves_even_queued_frames_to_whoever_is_free_first(redis_conn,
                                                                                               monkeypatch):
    worker = _worker(redis_conn, monkeypatch, "off")
    queue = worker.queues[0]
    _send(queue, 2)
    thread, out = _busy_and_waiting(worker, "a busy worker must not claim ahead with VQ_CLAIM_AHEAD=off")
    assert redis_conn.llen(queue.key) == 2
    worker._forward_free.set()
    wait_for(lambda: not thread.is_alive(), timeout=10, what="the worker to see its forward pass end")
    assert out["value"] is False  # now it blocks on the queue as an idle worker does


def test_with_claim_ahead_full_a_busy_worker_claims_ahead_only_a_full_batch(redis_conn, monkeypatch):
    worker = _worker(redis_conn, monkeypatch, "full", VQ_MAX_BATCH="3")
    queue = worker.queues[0]
    _send(queue, 2)
    thread, out = _busy_and_waiting(worker, "fewer frames than a batch are left to whichever worker is free first")
    _send(queue, 1, first=2)
    wait_for(lambda: not thread.is_alive(), timeout=10, what="the busy worker to see a full batch queued")
    assert out["value"] is True
    worker._forward_free.set()


def test_auto_claims_ahead_what_is_queued_on_cuda_and_only_a_full_batch_on_the_cpu(redis_conn, monkeypatch):
    assert resolve_claim_ahead("auto", "cuda:0") == "backlog"
    assert resolve_claim_ahead("auto", "cpu") == "full"
    policies = ("off", "full", "backlog", "always")
    assert [resolve_claim_ahead(p, "cuda") for p in policies] == list(policies)
    monkeypatch.delenv("VQ_CLAIM_AHEAD", raising=False)
    assert Settings.from_env().claim_ahead == "auto"
    assert BatchWorker(["inference"], connection=redis_conn, name="ahead-auto")._claim_ahead == "full"


@pytest.mark.parametrize("claim_ahead", ["backlog", "full", "always", "off"])
def test_a_batch_gathers_frames_while_the_forward_pass_is_busy(tmp_path, redis_conn, monkeypatch, claim_ahead):
    worker = _worker(redis_conn, monkeypatch, claim_ahead, VQ_MAX_WAIT_MS="0")
    worker._overlap = True  # as bootstrap sets it with VQ_OVERLAP_DECODE=on
    worker.engine = load_engine(Settings(model_path=tiny_artifact(tmp_path / "m"), device="cpu", decode_threads=1),
                                None)
    queue = worker.queues[0]
    try:
        _send(queue, 2)
        worker._forward_free.clear()
        batch = worker._first_claims(queue, None)
        assert batch is not None and len(batch.tasks) == 2
        thread, _ = _in_thread(lambda: worker._collect(batch))
        if claim_ahead in ("always", "off"):  # VQ_MAX_WAIT_MS=0: the batch goes as it is
            wait_for(lambda: not thread.is_alive(), timeout=10, what="the batch to be handed on")
            assert len(batch.tasks) == 2
            return
        _send(queue, 3, first=2)
        # each frame sent meanwhile joins the batch and starts decoding as it comes
        wait_for(lambda: len(batch.tasks) == 5 and all(t.decode is not None for t in batch.tasks), timeout=10,
                 what="frames sent meanwhile to join the batch")
        assert thread.is_alive(), "the batch must keep gathering while it could not run anyway"
        worker._forward_free.set()
        wait_for(lambda: not thread.is_alive(), timeout=10, what="the batch to be handed on")
        assert [t.job.id for t in batch.tasks] == [t.job.id for t in batch.tasks if t.frame is not None]
        assert {t.decode.result().shape for t in batch.tasks} == {(32, 32, 3)}
    finally:
        worker._forward_free.set()
        worker.engine.close()
