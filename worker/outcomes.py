"""What happens to each frame of a batch: one typed record per frame and its typed outcome.

A frame ends in one of a few ways, and each way has one meaning everywhere (RQ's failed registry,
the results stream, `vq_frames_total{outcome}`):

| outcome | why | retried |
| --- | --- | --- |
| ok | classified | - |
| failed | bad input: the message, the job hash or the image is wrong | never |
| expired | it waited past its deadline | never |
| rejected | the job asks for something not allowed here (another function, callbacks, webhooks…) | never |
| poison | its workers died each time they held it | never |
| error | the model or the worker failed; nothing is known to be wrong with the frame | while retries last |
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from .frames import FrameError, frame_deadline, validate_frame
from .jobs import JOB_FUNC, FrameJob


class FailureKind(Enum):
    BAD_INPUT = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"
    POISON = "poison"
    ERROR = "error"


# The name that leads the reason, so a failure's kind reads the same in `rq info` and the stream.
_PREFIX = {FailureKind.BAD_INPUT: "FrameError", FailureKind.EXPIRED: "FrameExpired",
           FailureKind.REJECTED: "JobRejected", FailureKind.POISON: "PoisonFrame"}


@dataclass(frozen=True)
class Success:
    result: dict[str, Any]


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    reason: str

    @property
    def text(self) -> str:
        return f"{_PREFIX.get(self.kind, 'WorkerError')}: {self.reason}"

    @classmethod
    def error(cls, exc: BaseException) -> Failure:
        return cls(FailureKind.ERROR, f"{type(exc).__name__}: {exc}")


Outcome = Success | Failure


class Decoding(Protocol):
    """A frame's decode under way (a Future, or a runtime.DecodeSlot): the image, or its decode's error."""

    def result(self, timeout: float | None = None) -> Any: ...


@dataclass
class FrameTask:
    """One frame of a batch, from claim to record."""

    job: FrameJob
    execution_id: str = ""  # the RQ execution that holds its lease
    frame: dict[str, Any] | None = None  # set when the frame may run
    outcome: Outcome | None = None
    decode: Decoding | None = None


def judge(job: FrameJob, wall: float) -> dict[str, Any] | Failure:
    """The frame of a job that may run, or why it must not. Never raises: anything in a job is data."""
    try:
        return _judge(job, wall)
    except Exception as exc:  # a defect this function did not foresee still fails only its own job
        return Failure(FailureKind.BAD_INPUT, f"job cannot be read: {type(exc).__name__}: {str(exc)[:200]}")


def _judge(job: FrameJob, wall: float) -> dict[str, Any] | Failure:
    if job.forbidden:
        return Failure(FailureKind.REJECTED, f"job carries {', '.join(job.forbidden)}, which frames may not "
                                             "(nothing of it is imported, called, sent or enqueued)")
    if job.defects:
        return Failure(FailureKind.BAD_INPUT, "; ".join(job.defects))
    try:
        func_name = job.func_name
        args, kwargs = job.args, job.kwargs
    except Exception as exc:
        cause = exc.__cause__ or exc  # RQ's DeserializationError carries no text of its own
        return Failure(FailureKind.BAD_INPUT, f"job data is not a msgpack frame job within the size limits: "
                                              f"{type(cause).__name__}: {str(cause)[:200]}")
    if func_name != JOB_FUNC:
        return Failure(FailureKind.REJECTED, f"function {str(func_name)[:100]!r} is not allowed on this queue "
                                             f"(only {JOB_FUNC})")
    if not isinstance(args, list | tuple) or len(args) != 1 or kwargs:
        return Failure(FailureKind.BAD_INPUT, "a frame job takes exactly one argument, the frame, and no keywords")
    try:
        frame = validate_frame(args[0])
    except FrameError as exc:
        return Failure(FailureKind.BAD_INPUT, str(exc))
    deadline = frame_deadline(frame)
    if deadline is not None and wall > deadline:
        return Failure(FailureKind.EXPIRED, f"frame is {wall - frame['ts']:.2f}s old, past its deadline of "
                                            f"{frame['meta']['deadline_s']}s")
    return frame
