"""No pickle anywhere in the shipped stack.

RQ's default serializer is pickle, and RQ unpickles a job's `meta` whenever it fetches the job: whoever
can write a job hash (every capture station can) runs code in any process that reads it with pickle.
So every `rq` command the manifests and docs tell an operator to run names the msgpack serializer
(`-S worker.serializer.MsgpackSerializer`). The exception is `rq worker --worker-class worker.BatchWorker`:
the BatchWorker uses msgpack and FrameJob whatever `-S`/`-j` say (checked below), so its command lines
need no `-S`. `rq suspend` / `rq resume` read no job and are exempt. rq-dashboard (pickle, no auth) is not
in the default stack.
"""

from __future__ import annotations

import re

import yaml
from helpers import ROOT

from worker.serializer import MsgpackSerializer

DEPLOY = ROOT / "deploy"
MANIFEST_SUFFIXES = {".yml", ".yaml", ".service", ".timer", ".conf", ".acl", ".sh", ".md", ".toml", ".env"}
JOB_READING = ("info", "requeue", "empty", "enqueue", "worker", "worker-pool", "cron")
# `rq info`, `exec rq worker …`, and the list form of compose/k8s: "rq", "worker", …
COMMAND = re.compile(r"""(?:^|[\s"'`\[;&|(])rq(?:["']?\s*,\s*["']|\s+)(?P<sub>[a-z][a-z-]*)\b(?P<rest>.*)""")
MSGPACK = re.compile(r"""(?:-S|--serializer)[\s"',=]+worker\.serializer\.MsgpackSerializer\b""")
BATCH_WORKER = re.compile(r"""(?:-w|--worker-class)[\s"',=]+worker\.BatchWorker\b""")


def shipped_texts() -> dict[str, list[str]]:
    """Logical lines (backslash continuations joined) of every manifest and doc a user copies commands from.

    Markdown: fenced code blocks, and inline code spans that carry arguments (a bare `rq info` in a
    sentence names the tool; a command with flags is meant to be pasted).
    """
    texts: dict[str, list[str]] = {}
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and (p.suffix in MANIFEST_SUFFIXES or p.name == "Dockerfile")]
    files += [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for path in files:
        text = re.sub(r"\\\n\s*", " ", path.read_text(errors="replace"))
        if path.suffix == ".md":
            blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
            spans = [s for s in re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
                     if len(s.split()) > 2]
            lines = [line for block in blocks for line in block.splitlines()] + spans
        else:
            # A YAML flow list may wrap: `["rq", "worker",` and `"--worker-class", …]` are one command.
            text = re.sub(r",\s*\n\s*", ", ", text)
            lines = [_drop_named_tools(line) if line.lstrip().startswith("#") else line for line in text.splitlines()]
        texts[str(path.relative_to(ROOT))] = lines
    return texts


def _drop_named_tools(comment: str) -> str:
    """A comment's `rq worker` (a backquoted name of two words or fewer) names the tool; it is no command."""
    return re.sub(r"`([^`]+)`", lambda m: m[0] if len(m[1].split()) > 2 else "", comment)


def unsafe_rq_commands(lines: list[str]) -> list[str]:
    found = []
    for line in lines:
        for match in COMMAND.finditer(line):
            sub, rest = match["sub"], match["rest"]
            if sub not in JOB_READING:
                continue
            if sub == "worker" and BATCH_WORKER.search(rest):
                continue
            if not MSGPACK.search(rest):
                found.append(line.strip())
    return found


def test_every_shipped_rq_command_names_the_msgpack_serializer():
    texts = shipped_texts()
    assert "README.md" in texts and any(k.startswith("deploy/k8s/") for k in texts)
    offenders = {path: bad for path, lines in texts.items() if (bad := unsafe_rq_commands(lines))}
    assert offenders == {}, "rq commands without -S worker.serializer.MsgpackSerializer (pickle): " + repr(offenders)


def test_the_scan_catches_what_it_should():
    assert unsafe_rq_commands(["rq requeue --queue inference --all"])
    assert unsafe_rq_commands(['command: ["rq", "info", "-u", "redis://r/0"]'])
    assert unsafe_rq_commands(["exec rq worker inference"])  # a plain RQ worker: pickle
    assert unsafe_rq_commands(["rq worker -S worker.serializer.MsgpackSerializer --worker-class rq.Worker x"]) == []
    assert unsafe_rq_commands(["python -m worker.redis_health exec rq requeue -S json -a"])
    assert not unsafe_rq_commands(["python -m worker.redis_health exec rq requeue "
                                   "-S worker.serializer.MsgpackSerializer -j worker.jobs.FrameJob -q inference -a"])
    assert not unsafe_rq_commands(['["rq", "worker", "--worker-class", "worker.BatchWorker", "inference"]'])
    assert not unsafe_rq_commands(["rq suspend", "the rq-dashboard image", "pip install rq>=3"])


def test_the_batch_worker_forces_msgpack_whatever_the_command_line_says(redis_conn):
    """Why `rq worker --worker-class worker.BatchWorker` needs no -S: pickle given, msgpack used."""
    from rq.job import Job
    from rq.serializers import DefaultSerializer

    from worker.batch_worker import BatchWorker
    from worker.jobs import FrameJob

    worker = BatchWorker(["inference"], connection=redis_conn, serializer=DefaultSerializer, job_class=Job)
    assert worker.serializer is MsgpackSerializer and worker.job_class is FrameJob
    assert all(q.serializer is MsgpackSerializer for q in worker.queues)


def test_no_dashboard_and_no_published_redis_in_the_default_stack():
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert not [name for name, svc in services.items() if "rq-dashboard" in str(svc.get("image", ""))]
    assert "ports" not in services["redis"]
