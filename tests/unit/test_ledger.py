"""The ledger on real SQLite files in tmp_path, including killed and concurrent processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from flux2_pipeline.ledger import (
    LOOKUP_CHUNK_SIZE,
    Ledger,
    LedgerConfigError,
    LedgerError,
    LedgerStateError,
    LedgerUnavailableError,
    RowHistory,
    Submission,
    SubmissionState,
    make_row_key,
    parse_ledger_url,
    redact_database_url,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as opened:
        yield opened


def _intent(ledger: Ledger, row_id: str = "r1", partition: str = "p1") -> Submission:
    key = make_row_key(partition, row_id, "hash-" + row_id)
    return ledger.record_intent(key, partition, row_id, "hash-" + row_id)


def _history(ledger: Ledger, key: str) -> RowHistory:
    return ledger.lookup([key])[key]


def _chain_text(exc: BaseException | None) -> str:
    """Every message and repr in an exception's cause/context chain (not source lines)."""
    parts: list[str] = []
    while exc is not None:
        parts += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _run_child(code: str, db: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(db)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- keys and URLs ------------------------------------------------------------------


def test_make_row_key_is_stable_sha256_and_unambiguous() -> None:
    key = make_row_key("p", "1", "abc")
    assert key == make_row_key("p", "1", "abc")
    assert len(key) == 64 and int(key, 16) >= 0
    assert make_row_key("p", "1a", "bc") != key
    assert make_row_key("p1", "", "abc") != make_row_key("p", "1", "abc")


def test_plain_path_and_relative_sqlite_url_become_absolute(tmp_path: Path) -> None:
    assert parse_ledger_url(tmp_path / "a.db").database == str(tmp_path / "a.db")
    parsed = parse_ledger_url("sqlite:///rel/x.db")
    assert parsed.database is not None and Path(parsed.database).is_absolute()
    assert parse_ledger_url("postgres://u@h/db").drivername == "postgresql+psycopg2"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "sqlite://",
        "sqlite:///:memory:",
        "mysql://u:s3cret@h/db",
        "postgresql+asyncpg://u:s3cret@h/db",
        "postgresql://u:s3cret@h:notaport/db",
        "post gres://u:s3cret@h/db",
    ],
)
def test_malformed_urls_raise_one_line_config_error_without_password(url: str) -> None:
    with pytest.raises(LedgerConfigError) as info:
        Ledger.open(url)
    message = str(info.value)
    assert "\n" not in message and message
    assert "s3cret" not in message
    assert "s3cret" not in _chain_text(info.value)


def test_redact_database_url_hides_passwords() -> None:
    assert redact_database_url("postgresql://me:s3cret@db:5432/ledger") == (
        "postgresql://me:***@db:5432/ledger"
    )
    assert "s3cret" not in redact_database_url(parse_ledger_url("postgresql://me:s3cret@db/x"))
    assert "s3cret" not in redact_database_url("postgresql://me:s3cret@db:bad/x")


def test_unreachable_postgres_error_hides_password() -> None:
    # Port 1 on loopback refuses at once; the message and the chain must not leak.
    with pytest.raises(LedgerUnavailableError) as info:
        Ledger.open("postgresql://me:s3cret-pw@127.0.0.1:1/db")
    assert "s3cret-pw" not in _chain_text(info.value)
    assert "Connection refused" in str(info.value) or "connect" in str(info.value)
    assert "me:***@127.0.0.1:1/db" in str(info.value)


def test_repr_hides_password_without_connecting() -> None:
    # A Ledger wraps any engine; repr only renders the URL.
    from sqlalchemy import create_engine

    url = parse_ledger_url("postgresql://me:s3cret@db.example:5432/ledger")
    ledger = Ledger(create_engine(url), url)
    assert "s3cret" not in repr(ledger) and "s3cret" not in str(ledger)
    assert "me:***@db.example:5432/ledger" in repr(ledger)
    assert "s3cret" not in ledger.url


# -- SQLite setup ---------------------------------------------------------------------


def test_sqlite_creates_parent_dir_and_uses_wal_full(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "ledger.db"
    with Ledger.open(str(path)) as ledger:
        assert path.exists()
        assert ledger.backend == "sqlite"
        with ledger.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            # FULL: an intent is on disk before its request leaves.
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
    # Reopening an existing ledger is idempotent.
    with Ledger.open(str(path)) as again:
        assert again.submissions() == []


def test_closed_ledger_refuses_calls(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db")
    ledger.close()
    ledger.close()
    assert "closed" in repr(ledger)
    with pytest.raises(LedgerError, match="closed"):
        ledger.stats()


# -- lifecycle and history semantics ----------------------------------------------------


def test_full_lifecycle(ledger: Ledger) -> None:
    intent = _intent(ledger)
    assert intent.state is SubmissionState.INTENT
    assert intent.attempt == 1 and intent.request_id is None
    assert intent.intent_at.tzinfo is UTC and intent.output_urls == ()

    history = _history(ledger, intent.row_key)
    assert history.dangling_intent == intent and history.paid_attempts == 1
    assert history.live is None

    local = timezone(timedelta(hours=2))
    submitted = ledger.record_submitted(intent.id, "req-1", T0.astimezone(local))
    assert submitted.state is SubmissionState.SUBMITTED
    assert submitted.submitted_at == T0 and submitted.submitted_at.tzinfo is UTC
    history = _history(ledger, intent.row_key)
    assert history.live == submitted and history.dangling_intent is None
    assert history.completed is None

    done = ledger.record_finished(
        intent.id,
        "completed",
        T0 + timedelta(seconds=30),
        cost_usd=0.025,
        output_urls=["https://cdn/x.png", "https://cdn/y.png"],
    )
    assert done.state is SubmissionState.COMPLETED and done.is_finished
    assert done.finished_at == T0 + timedelta(seconds=30)
    assert done.cost_usd == pytest.approx(0.025)
    assert done.output_urls == ("https://cdn/x.png", "https://cdn/y.png")
    assert done.updated_at >= done.intent_at

    history = _history(ledger, intent.row_key)
    assert history.latest == done and history.completed == done and history.live == done
    assert ledger.submissions("p1") == [done]
    assert ledger.submissions("other") == []
    assert ledger.stats()["completed"] == 1 and sum(ledger.stats().values()) == 1


def test_attempts_numbering_and_paid_counting(ledger: Ledger) -> None:
    first = _intent(ledger)
    ledger.record_rejected(first.id, "422: prompt too long")
    second = _intent(ledger)
    ledger.record_submitted(second.id, "req-2")
    ledger.record_finished(second.id, SubmissionState.FAILED, error="job failed")
    third = _intent(ledger)
    assert [first.attempt, second.attempt, third.attempt] == [1, 2, 3]
    assert first.row_key == second.row_key == third.row_key
    # A different row starts at 1 again.
    assert _intent(ledger, "r2").attempt == 1

    history = _history(ledger, first.row_key)
    assert [a.attempt for a in history.attempts] == [1, 2, 3]
    assert [a.state for a in history.attempts] == ["rejected", "failed", "intent"]
    # rejected is not paid; the failed job and the (maybe sent) intent are.
    assert history.paid_attempts == 2
    assert history.live is None and history.completed is None
    assert history.dangling_intent is not None and history.dangling_intent.id == third.id


def test_rejected_is_not_paid_and_not_dangling(ledger: Ledger) -> None:
    intent = _intent(ledger)
    rejected = ledger.record_rejected(intent.id, "400 bad request")
    assert rejected.error == "400 bad request" and not rejected.is_paid
    history = _history(ledger, intent.row_key)
    assert history.paid_attempts == 0
    assert history.dangling_intent is None and history.live is None


def test_unknown_is_paid_dangling_and_can_still_learn_its_id(ledger: Ledger) -> None:
    intent = _intent(ledger)
    unknown = ledger.record_unknown(intent.id, "read timeout after submit")
    history = _history(ledger, intent.row_key)
    assert history.paid_attempts == 1 and history.dangling_intent == unknown
    ledger.record_submitted(intent.id, "req-late")
    assert _history(ledger, intent.row_key).dangling_intent is None


def test_live_prefers_the_latest_job_that_may_still_complete(ledger: Ledger) -> None:
    a = _intent(ledger)
    ledger.record_submitted(a.id, "req-a")
    ledger.record_finished(a.id, "cancelled")
    b = _intent(ledger)
    ledger.record_submitted(b.id, "req-b")
    history = _history(ledger, a.row_key)
    assert history.live is not None and history.live.request_id == "req-b"
    ledger.record_finished_by_request_id("req-b", "completed", output_urls=["u"])
    history = _history(ledger, a.row_key)
    assert history.completed is not None and history.completed.request_id == "req-b"
    assert history.live == history.completed


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        ("intent", lambda led, s: led.record_finished(s.id, "completed"), "no request id"),
        ("submitted", lambda led, s: led.record_rejected(s.id, "x"), "state 'submitted'"),
        ("submitted", lambda led, s: led.record_unknown(s.id, "x"), "state 'submitted'"),
        ("submitted", lambda led, s: led.record_submitted(s.id, "other"), "state 'submitted'"),
        ("rejected", lambda led, s: led.record_submitted(s.id, "r"), "state 'rejected'"),
        ("intent", lambda led, s: led.record_finished(999, "failed"), "no such submission"),
        ("intent", lambda led, s: led.record_finished_by_request_id("nope", "failed"), "no such"),
    ],
)
def test_forbidden_transitions_raise_state_error(
    ledger: Ledger, setup: str, action: Any, message: str
) -> None:
    sub = _intent(ledger)
    if setup == "submitted":
        ledger.record_submitted(sub.id, "req-x")
    elif setup == "rejected":
        ledger.record_rejected(sub.id, "no")
    with pytest.raises(LedgerStateError, match=message):
        action(ledger, sub)


def test_idempotent_rewrites_are_allowed(ledger: Ledger) -> None:
    sub = _intent(ledger)
    ledger.record_submitted(sub.id, "req-1")
    ledger.record_submitted(sub.id, "req-1")
    ledger.record_finished(sub.id, "completed", output_urls=["u"])
    again = ledger.record_finished(sub.id, "completed", output_urls=["u", "v"])
    assert again.output_urls == ("u", "v")


def test_request_id_is_unique_across_submissions(ledger: Ledger) -> None:
    a, b = _intent(ledger, "a"), _intent(ledger, "b")
    ledger.record_submitted(a.id, "req-same")
    with pytest.raises(LedgerStateError, match="already recorded"):
        ledger.record_submitted(b.id, "req-same")
    assert _history(ledger, b.row_key).latest.state is SubmissionState.INTENT


def test_argument_validation(ledger: Ledger) -> None:
    sub = _intent(ledger)
    with pytest.raises(ValueError, match="timezone-aware"):
        ledger.record_submitted(sub.id, "req", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="finished state"):
        ledger.record_finished(sub.id, "submitted")
    with pytest.raises(ValueError, match="non-empty"):
        ledger.record_intent("", "p", "r", "h")


def test_lookup_5000_keys_in_chunks(ledger: Ledger) -> None:
    keys = [make_row_key("p", str(i), "h") for i in range(5000)]
    with ledger.engine.begin() as conn:
        # Bulk-seed through the same table for speed; every 3rd key has two attempts.
        from flux2_pipeline.ledger.schema import submissions

        rows: list[dict[str, Any]] = []
        for i, key in enumerate(keys):
            for attempt in range(1, 3 if i % 3 == 0 else 2):
                rows.append(
                    {
                        "row_key": key,
                        "partition": "p",
                        "row_id": str(i),
                        "request_hash": "h",
                        "attempt": attempt,
                        "state": "failed" if attempt == 1 and i % 3 == 0 else "submitted",
                        "request_id": f"req-{i}-{attempt}",
                        "intent_at": T0,
                        "output_urls": "[]",
                        "updated_at": T0,
                    }
                )
        conn.execute(submissions.insert(), rows)

    selects: list[str] = []

    def count(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("SELECT"):
            selects.append(args[2])

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        found = ledger.lookup([*keys, *keys[:10], "never-seen"])
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)

    assert len(selects) == -(-5001 // LOOKUP_CHUNK_SIZE)
    assert len(found) == 5000 and "never-seen" not in found
    assert [a.attempt for a in found[keys[0]].attempts] == [1, 2]
    live = found[keys[0]].live
    assert live is not None and live.request_id == "req-0-2"
    assert len(found[keys[1]].attempts) == 1
    assert ledger.lookup([]) == {}


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    key = make_row_key("p", "shared", "h")

    def work(i: int) -> int:
        sub = ledger.record_intent(key, "p", "shared", "h")
        ledger.record_submitted(sub.id, f"req-t{i}")
        return sub.attempt

    with ThreadPoolExecutor(8) as pool:
        attempts = sorted(pool.map(work, range(40)))
    assert attempts == list(range(1, 41))


# -- processes --------------------------------------------------------------------------

_KILLED_WRITER = """
    import sys, time
    from flux2_pipeline.ledger import Ledger, make_row_key
    ledger = Ledger.open(sys.argv[1])
    key = make_row_key("p", "killed", "h")
    sub = ledger.record_intent(key, "p", "killed", "h")
    ledger.record_submitted(sub.id, "req-survives-sigkill")
    print(sub.id, flush=True)
    time.sleep(60)
"""


def test_request_id_survives_sigkill_right_after_record_submitted(tmp_path: Path) -> None:
    db = tmp_path / "killed.db"
    child = _run_child(_KILLED_WRITER, db)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip(), child.stderr.read() if child.stderr else ""
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    with Ledger.open(db) as ledger:
        history = ledger.lookup([make_row_key("p", "killed", "h")])
        (only,) = history.values()
        assert only.latest.id == int(line)
        assert only.live is not None and only.live.request_id == "req-survives-sigkill"


_BUSY_WRITER = """
    import sys
    from flux2_pipeline.ledger import Ledger, make_row_key
    ledger = Ledger.open(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else ""
    import os
    tag = str(os.getpid())
    for i in range(150):
        # Half the rows are shared by both writers: they race for attempt numbers.
        row = f"shared-{i % 25}" if i % 2 else f"{tag}-{i}"
        key = make_row_key("p", row, "h")
        sub = ledger.record_intent(key, "p", row, "h")
        ledger.record_submitted(sub.id, f"req-{tag}-{i}")
        ledger.record_finished(sub.id, "failed", error="x")
        ledger.lookup([key])
    print("ok", flush=True)
"""


def test_two_processes_write_at_once_without_lock_errors(tmp_path: Path) -> None:
    # Both also race to create the (missing) database file and table.
    db = tmp_path / "race" / "ledger.db"
    children = [_run_child(_BUSY_WRITER, db) for _ in range(2)]
    results = [child.communicate(timeout=60) for child in children]
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert out.strip() == "ok"
        assert "locked" not in err
    with Ledger.open(db) as ledger:
        everything = ledger.submissions()
        assert len(everything) == 300
        assert ledger.stats()["failed"] == 300
        pairs = {(s.row_key, s.attempt) for s in everything}
        assert len(pairs) == 300
        shared = ledger.lookup([make_row_key("p", "shared-1", "h")])
        (history,) = shared.values()
        assert [a.attempt for a in history.attempts] == list(range(1, 7))


def test_concurrent_first_open_from_threads(tmp_path: Path) -> None:
    db = tmp_path / "first.db"
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def opener() -> None:
        barrier.wait()
        try:
            with Ledger.open(db) as opened:
                _intent(opened)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Ledger.open(db) as ledger:
        assert len(ledger.submissions()) == 6


def test_spilled_request_ids_are_recorded_by_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    now = datetime.now(UTC)
    with Ledger.open(path) as ledger:
        first = ledger.record_intent(make_row_key("p", "a", "h"), "p", "a", "h")
        second = ledger.record_intent(make_row_key("p", "b", "h"), "p", "b", "h")
        ledger.record_submitted(second.id, "job-b", now)
        assert ledger.spill_path == Path(f"{path}.unrecorded.jsonl")
        assert ledger.spill_submitted(first.id, "job-a", now)
        assert ledger.spill_submitted(second.id, "job-b", now)  # it landed after all
        with ledger.spill_path.open("a") as spill:
            spill.write('{"submission_id": 1, "requ')  # a line a crash cut short
    with Ledger.open(path) as ledger:
        recorded = {a.row_id: (a.state, a.request_id) for a in ledger.submissions("p")}
        assert recorded == {
            "a": (SubmissionState.SUBMITTED, "job-a"),
            "b": (SubmissionState.SUBMITTED, "job-b"),
        }
        assert not Path(f"{path}.unrecorded.jsonl").exists()
