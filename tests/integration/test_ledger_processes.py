"""One SQLite ledger file shared by processes: one killed mid-write, two writing at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from flux2_pipeline.ledger import Ledger, make_row_key


def _run_child(code: str, db: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(db)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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
