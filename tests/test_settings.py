"""The one table of settings (worker/settings.py): README, errors, objects, and nobody else reading the environment."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker import settings as S
from worker.sample_feed import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("worker", "producer", "continual", "trainer", "deploy")


def test_readme_tables_are_the_generated_ones() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert S.check_readme(text) == []
    assert set(S.readme_tables(text)) == set(S.SCOPES)


def test_check_readme_notices_an_edited_table(tmp_path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    edited = text.replace("| `VQ_MAX_BATCH` | `32` |", "| `VQ_MAX_BATCH` | `64` |")
    assert edited != text
    assert any("worker table differs" in p for p in S.check_readme(edited))
    assert S.write_readme(edited) == text  # regenerating restores it, and touches nothing else
    readme = tmp_path / "README.md"
    readme.write_text(edited, encoding="utf-8")
    cli = [sys.executable, "-m", "worker.settings"]
    assert subprocess.run([*cli, "--check-readme", str(readme)], cwd=ROOT, capture_output=True).returncode == 1
    assert subprocess.run([*cli, "--write-readme", str(readme)], cwd=ROOT).returncode == 0
    assert readme.read_text(encoding="utf-8") == text
    out = subprocess.run([*cli, "--markdown", "redis"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == S.markdown("redis")


def test_table_is_well_formed() -> None:
    assert len({row.env for row in S.TABLE}) == len(S.TABLE)
    for scope in S.SCOPES:
        names = [row.name for row in S.scope_rows(scope)]
        assert names and len(set(names)) == len(names), scope
    for row in S.TABLE:
        assert row.scope in S.SCOPES and row.kind in S.KINDS and row.meaning, row
        assert "\n" not in row.meaning, row.env  # one line: it is a table cell
        if row.kind in ("int", "float"):
            assert row.lo is not None and row.hi is not None and row.lo <= row.hi, row.env
            if row.default is not None:
                assert row.lo <= row.default <= row.hi, row.env
        if row.kind == "choice":
            assert row.default in row.choices, row.env
        assert (row.flag is not None) == (row.scope == "gateway"), row.env


def test_defaults_read_from_an_empty_environment() -> None:
    for scope in S.SCOPES:
        values = S.read_scope(scope, {})
        for row in S.scope_rows(scope):
            if row.kind not in ("path", "dir"):
                assert values[row.name] == row.default, row.env
    assert S.Settings.from_env({}) == S.Settings()
    assert SamplingConfig.from_env({}) == SamplingConfig()


@pytest.mark.parametrize("scope", [s for s in S.SCOPES if s != "worker"])
def test_each_scope_object_is_exactly_its_rows(scope) -> None:
    cls = SamplingConfig if scope == "samples" else S.SCOPE_OBJECTS[scope]
    internal = {"dedup_window", "queue_size"} if scope == "samples" else set()
    assert {f.name for f in dataclasses.fields(cls)} - internal == {row.name for row in S.scope_rows(scope)}


def test_worker_settings_are_the_worker_rows_plus_named_extras() -> None:
    expected = {row.name for row in S.scope_rows("worker")} | {S.ROWS[v].name for v in S.Settings.EXTRA_ROWS}
    assert {f.name for f in dataclasses.fields(S.Settings)} == expected
    defaults = S.Settings()
    for variable in S.Settings.EXTRA_ROWS:
        row = S.ROWS[variable]
        assert getattr(defaults, row.name) == row.default, variable


def _bad_values(row: S.Row, tmp_path: Path) -> list[str]:
    """Values the row must refuse; every kind has some, so a new kind cannot go untested."""
    missing = str(tmp_path / "missing")
    by_kind: dict[str, list[str]] = {
        "choice": ["bogus"],
        "device": ["tpu", "cuda:x"],
        "path": ["var/a\nb"],
        "dir": [missing],
        "file": [missing],
        "url": ["http://redis:6379/0", "localhost:6379", "redis://redis:99999/0", "redis://redis:6379/zero"],
        "urls": ["redis://a:1/0,http://b:2/0", "redis://a:1/0,redis://b:99999/0"],
        "key": ["two keys"],
        "host": ["two hosts"],
        "pubkeys": ["not-a-key"],
    }
    if row.kind in ("int", "float"):
        assert row.lo is not None and row.hi is not None
        return ["lots", "nan", str(row.lo - 1), str(row.hi * 2 + 1)]
    return by_kind[row.kind]


@pytest.mark.parametrize("row", S.TABLE, ids=lambda row: row.env)
def test_a_bad_value_names_its_variable(row, tmp_path) -> None:
    for bad in _bad_values(row, tmp_path):
        with pytest.raises(S.SettingsError) as exc:
            S.read_scope(row.scope, {row.env: bad})
        message = str(exc.value)
        assert message.startswith(row.env), (bad, message)
        if row.kind in ("int", "float") and "range" in message:
            assert "[" in message and "]" in message  # the bounds are in the message
        if row.kind == "choice":
            assert all(c in message for c in row.choices)
        if row.secret:
            assert bad not in message  # a URL or key may hold a secret: never echoed
        if row.flag and row.kind not in ("key",):
            with pytest.raises(argparse.ArgumentTypeError, match=re.escape(row.flag)):
                S.flag_type(row.env)(bad)


def test_a_good_value_is_read(tmp_path) -> None:
    key = tmp_path / "key"
    key.write_text("k\n")
    env = {"VQ_MAX_BATCH": " 8 ", "VQ_DEVICE": "CUDA:1", "VQ_PRECISION": "INT8", "VQ_MODEL_PATH": str(tmp_path),
           "VQ_SAMPLE_STRATEGY": "margin", "REDIS_URL": "rediss://u@h:6380/1", "VQ_API_KEY_FILE": str(key),
           "CONTINUAL_RUNS": "~/runs", "VQ_GATEWAY_RATE_LIMIT": "0"}
    worker = S.Settings.from_env(env)
    assert (worker.max_batch, worker.device, worker.precision, worker.model_path) == (8, "cuda:1", "int8", tmp_path)
    assert SamplingConfig.from_env(env).strategy == "margin"
    assert S.redis_settings(env).redis_url == "rediss://u@h:6380/1"
    assert S.gateway_settings(env).api_key_file == str(key) and S.gateway_settings(env).rate_limit == 0.0
    assert S.continual_settings(env).runs == Path("~/runs").expanduser()
    assert S.redis_configured(env) and not S.redis_configured({}) and not S.redis_configured({"REDIS_URL": " "})
    with pytest.raises(S.SettingsError, match="REDIS_URL_FILE"):
        S.redis_configured({"REDIS_URL_FILE": str(tmp_path / "missing")})


def test_gateway_flags_take_their_defaults_from_the_table(monkeypatch) -> None:
    from deploy.gateway import __main__ as gateway
    from deploy.gateway.defaults import DEFAULT_MAX_QUEUE, MAX_TIMEOUT

    for row in S.scope_rows("gateway"):
        monkeypatch.delenv(row.env, raising=False)
    args = gateway.parse_args(["--insecure-no-auth"])
    for row in S.scope_rows("gateway"):
        if row.name not in ("api_key", "max_upload_bytes"):
            assert getattr(args, row.name) == row.default, row.env
    assert S.ROWS["VQ_GATEWAY_MAX_QUEUE"].default == DEFAULT_MAX_QUEUE
    assert S.ROWS["VQ_GATEWAY_REQUEST_TIMEOUT"].hi == MAX_TIMEOUT
    shown = S.ROWS["VQ_GATEWAY_LIMIT_CONCURRENCY"].shown or ""
    assert f"{gateway.WAITER_CONNECTIONS} ×" in shown and f"+ {gateway.PROBE_CONNECTIONS}" in shown
    monkeypatch.setenv("VQ_GATEWAY_MAX_QUEUE", "7")
    assert gateway.parse_args(["--insecure-no-auth"]).max_queue == 7
    assert gateway.parse_args(["--insecure-no-auth", "--max-queue", "9"]).max_queue == 9  # the flag wins
    monkeypatch.setenv("VQ_GATEWAY_MAX_QUEUE", "0")
    with pytest.raises(SystemExit):
        gateway.parse_args(["--insecure-no-auth"])


# -- nobody else reads the environment for a setting ---------------------------------------------------

# Files that copy the environment for a child process (`dict(os.environ, …)`): a copy reads no setting.
CHILD_ENV = {"worker/redis_health.py", "deploy/workers.py", "deploy/bench.py", "deploy/demo.py",
             "deploy/update_bench.py", "deploy/gateway_load.py", "deploy/chaos.py", "deploy/plumbing.py",
             "deploy/gpu_check.py", "deploy/shards.py", "deploy/diversity_bench.py",
             "deploy/label_studio_roundtrip.py"}
# Reads in files another change owns; each goes once its line reads the table. A stale entry fails below.
PENDING: set[tuple[str, str]] = set()
_ENV_READ = re.compile(r"os\.environ|getenv|\benv_(?:int|float|choice)\(")
# `x.get("VQ_…")` or `x["VQ_…"]` on any mapping; `env["VQ_…"] = …` (setting one for a child) and
# `ROWS["VQ_…"]` (the table's own row) are no reads of the environment.
_NAMED_READ = re.compile(r"""\.get\(\s*["'](?:VQ|CONTINUAL)_"""
                         r"""|(?<!ROWS)\[\s*["'](?:VQ|CONTINUAL)_[A-Z0-9_]+["']\s*\](?!\s*=[^=])""")
_SETTING_IN_COPY = re.compile(r"""os\.environ(?:\.get\(|\[)\s*["'](?:VQ|CONTINUAL|REDIS)_""")


def _source_lines():
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                yield rel, number, line


def _pending(rel: str, line: str) -> bool:
    return any(rel == p and needle in line for p, needle in PENDING)


def test_only_the_table_reads_the_environment() -> None:
    offenders = []
    for rel, number, line in _source_lines():
        code = line.split("#", 1)[0]
        if rel == "worker/settings.py" or _pending(rel, code):
            continue
        if _ENV_READ.search(code):
            copy = "dict(os.environ" in code and not _SETTING_IN_COPY.search(code)
            if not (rel in CHILD_ENV and copy):
                offenders.append(f"{rel}:{number}: {line.strip()}")
        elif _NAMED_READ.search(code):
            offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == [], "read these through worker.settings (a row of TABLE):\n" + "\n".join(offenders)


def test_pending_allowlist_is_not_stale() -> None:
    lines = list(_source_lines())
    stale = [p for p in PENDING if not any(rel == p[0] and p[1] in line for rel, _, line in lines)]
    assert stale == [], f"these reads are gone: delete them from PENDING: {stale}"


def test_every_variable_the_deployment_sets_is_a_row() -> None:
    named: set[str] = set()
    for path in (ROOT / "deploy").rglob("*"):
        if path.is_file() and path.suffix in ("", ".yaml", ".yml", ".service", ".conf", ".env"):
            named |= set(re.findall(r"\b(?:VQ|CONTINUAL)_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    assert named and named <= set(S.ROWS), named - set(S.ROWS)
