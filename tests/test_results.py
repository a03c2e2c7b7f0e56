"""Typed run results and the error tree: no server, no network.

A folder's outcome is a field (model.Outcome), the run's exit code and its `--json` document are
derived from the results (engine.RunResult), and a refused command (ServerError) is not a lost
connection (ConnectionLost)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailsync import engine, pop3, runner
from mailsync.errors import (
    ConnectionLost,
    MailsyncError,
    PartialFailure,
    SafetyAbort,
    ServerError,
    SessionError,
    StorageError,
)
from mailsync.fetch import ProtocolError
from mailsync.model import FolderResult, Outcome
from mailsync.transfer import CopyResult, TransferReport

ROOT = Path(__file__).resolve().parent.parent
FAILED = [o for o in Outcome if o.failed]


def run_of(*outcomes: Outcome) -> engine.RunResult:
    r = engine.RunResult(account="acc")
    for i, o in enumerate(outcomes):
        f = FolderResult(name=f"F{i}")
        if o.failed:
            f.fail(o, f"{o.value} in F{i}")
        else:
            f.outcome = o
        r.folders.append(f)
    return r


# ----------------------------------------------------------------------------- the error tree

def test_a_refusal_is_not_a_lost_connection():
    assert not issubclass(ServerError, ConnectionLost)
    assert not issubclass(ConnectionLost, ServerError)
    assert issubclass(ProtocolError, ServerError) and not issubclass(ProtocolError, ConnectionLost)
    for cls in (ConnectionLost, ServerError, ProtocolError):
        assert issubclass(cls, SessionError) and issubclass(cls, MailsyncError)
        assert cls.exit_code == 6  # either one stopping the whole run: "connection lost or server error"


def test_except_chains_may_list_lost_and_refused_in_any_order():
    def classify(exc):
        try:
            raise exc
        except ConnectionLost:
            return "lost"
        except ServerError:
            return "refused"
    assert classify(ServerError("NO")) == "refused"
    assert classify(ProtocolError("garbage")) == "refused"
    assert classify(ConnectionLost("EOF")) == "lost"


# ----------------------------------------------------------------------------- outcomes

def test_outcomes_that_are_failures():
    assert {o for o in Outcome if not o.failed} == {Outcome.OK, Outcome.SKIPPED}
    assert set(FAILED) == {Outcome.LOST, Outcome.REFUSED, Outcome.GUARDED, Outcome.FAILED, Outcome.INTERRUPTED}


def test_folder_result_outcome_and_error_go_together():
    assert FolderResult(name="A").outcome is Outcome.OK
    assert FolderResult(name="A", error="two folders map to one directory").outcome is Outcome.FAILED
    f = FolderResult(name="A")
    f.fail(Outcome.LOST, "connection lost")
    assert f.failed and f.error == "connection lost"
    f.succeed()  # a retry went through
    assert f.outcome is Outcome.OK and f.error == "" and not f.failed
    f.skipped = True
    assert f.outcome is Outcome.SKIPPED and f.skipped and not f.failed
    with pytest.raises(AssertionError):
        f.fail(Outcome.OK, "not a failure")


def test_no_private_outcome_attributes_are_left():
    pattern = re.compile(r'getattr\(f, "_|\._lost|\._safety|\._fatal')
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "mailsync").glob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ----------------------------------------------------------------------------- the exit code

@pytest.mark.parametrize("outcomes, code", [
    ((), 0),
    ((Outcome.OK,), 0),
    ((Outcome.OK, Outcome.SKIPPED, Outcome.SKIPPED), 0),
    ((Outcome.LOST,), ConnectionLost.exit_code),
    ((Outcome.OK, Outcome.LOST, Outcome.LOST), 6),
    ((Outcome.GUARDED,), SafetyAbort.exit_code),
    ((Outcome.SKIPPED, Outcome.GUARDED, Outcome.GUARDED), 10),
    ((Outcome.REFUSED,), PartialFailure.exit_code),   # a NO/BAD in a folder: 9, not 6
    ((Outcome.OK, Outcome.REFUSED), 9),
    ((Outcome.FAILED,), 9),
    ((Outcome.INTERRUPTED,), 9),
    ((Outcome.LOST, Outcome.GUARDED), 9),              # a mix: 9
    ((Outcome.LOST, Outcome.REFUSED), 9),
    ((Outcome.GUARDED, Outcome.FAILED), 9),
])
def test_exit_code_rule(outcomes, code):
    r = run_of(*outcomes)
    assert r.exit_code == code
    assert r.to_json()["exit_code"] == code
    assert [f.name for f in r.failed] == [f.name for f in r.folders if f.outcome.failed]


def test_transfer_exit_code_rule():
    ok = CopyResult(name="A", copied=3)
    guarded = CopyResult(name="B", errors=["would delete 10 of 19 messages"], guarded=True)
    refused = CopyResult(name="C", errors=["refused a command"])
    some_failed = CopyResult(name="D", failed=1, errors=["UID 3: refused"])
    assert TransferReport([ok]).exit_code == 0
    assert TransferReport([ok, guarded]).exit_code == 10
    assert TransferReport([guarded, refused]).exit_code == 9
    assert TransferReport([ok, some_failed]).exit_code == 9
    assert TransferReport([CopyResult(name="E", errors=["x", "y"], guarded=True)]).exit_code == 9


# ----------------------------------------------------------------------------- --json

def _old_summary(r, code: int) -> dict:
    """cli._summary as it was before RunResult.to_json: the document must not change."""
    def _gone(f):
        return max(0, f.gone - f.renumbered)
    return {
        "account": r.account,
        "exit_code": code,
        "seconds": round(r.seconds, 3),
        "folders": [
            {"name": f.name, "new": f.new, "restored": f.refetched, "flags_changed": f.flags_changed,
             "gone_from_server": _gone(f), "rematched": f.rebound, "renumbered": f.renumbered, "bytes": f.bytes,
             "seconds": round(f.seconds, 3), "skipped_unchanged": f.skipped, "notices": f.notices,
             "uploaded": f.uploaded, "flags_pushed": f.flags_pushed, "deleted_local": f.deleted_local,
             "deleted_remote": f.deleted_remote, "conflicts": f.conflicts,
             "skipped_too_big": getattr(f, "skipped_too_big", 0),
             "errors": [f.error] if f.error else []}
            for f in r.folders
        ],
        "totals": {
            "new": sum(f.new for f in r.folders),
            "restored": sum(f.refetched for f in r.folders),
            "flags_changed": sum(f.flags_changed for f in r.folders),
            "gone_from_server": sum(_gone(f) for f in r.folders),
            "renumbered": sum(f.renumbered for f in r.folders),
            "bytes": sum(f.bytes for f in r.folders),
            "failed_folders": sum(1 for f in r.folders if f.error),
            "uploaded": sum(f.uploaded for f in r.folders),
            "flags_pushed": sum(f.flags_pushed for f in r.folders),
            "deleted_local": sum(f.deleted_local for f in r.folders),
            "deleted_remote": sum(f.deleted_remote for f in r.folders),
            "conflicts": sum(len(f.conflicts) for f in r.folders),
        },
        "created_on_server": r.created,
    }


def busy_run() -> engine.RunResult:
    r = engine.RunResult(account="work\u00e9", seconds=12.34567, created=["New/Sub"])
    inbox = FolderResult(name="INBOX", new=5, refetched=1, flags_changed=2, gone=4, rebound=3, renumbered=2,
                         bytes=12345, seconds=1.23456, skipped_too_big=2, uploaded=1, flags_pushed=2,
                         deleted_local=1, deleted_remote=1, notices=["the server has no UIDL"],
                         conflicts=["UID 7: flags changed on both sides; the server wins"])
    quiet = FolderResult(name="Archive")
    quiet.skipped = True
    lost = FolderResult(name="Lost", new=1)
    lost.fail(Outcome.LOST, "connection to 127.0.0.1:993 lost: EOF; run again to continue")
    guarded = FolderResult(name="Guarded")
    guarded.fail(Outcome.GUARDED, "would delete 8 of 20 messages (more than 10%)")
    collision = FolderResult(name="a\u0007b", error="two server folders map to one directory")
    r.folders += [inbox, quiet, lost, guarded, collision]
    return r


@pytest.mark.parametrize("make", [busy_run, lambda: run_of(), lambda: run_of(Outcome.GUARDED),
                                  lambda: run_of(Outcome.LOST, Outcome.SKIPPED)])
def test_to_json_is_the_summary_it_replaces(make):
    r = make()
    doc = r.to_json()
    old = _old_summary(r, r.exit_code)
    assert doc == old
    assert json.dumps(doc, indent=2) == json.dumps(old, indent=2)  # same keys in the same order


def test_to_json_round_trips_through_json():
    r = busy_run()
    doc = r.to_json()
    text = json.dumps(doc)
    assert json.loads(text) == doc
    assert doc["exit_code"] == r.exit_code == 9
    assert doc["totals"]["failed_folders"] == 3
    inbox = doc["folders"][0]
    assert inbox["skipped_too_big"] == 2 and inbox["gone_from_server"] == 2 and inbox["errors"] == []
    assert doc["folders"][1]["skipped_unchanged"] is True
    assert doc["folders"][2]["errors"] == ["connection to 127.0.0.1:993 lost: EOF; run again to continue"]
    # a copy: changing the document does not change the result
    inbox["notices"].append("x")
    assert r.folders[0].notices == ["the server has no UIDL"]


# ----------------------------------------------------------------------------- who sets the outcome

class _FakePool:
    def __init__(self, take_raises=None):
        self.take_raises, self.dropped, self.given = take_raises, 0, 0

    def take(self):
        if self.take_raises is not None:
            raise self.take_raises
        return object()

    def give(self, s):
        self.given += 1

    def drop(self, s):
        self.dropped += 1


def _runner(monkeypatch, raises, pool=None, retries=0):
    calls = []

    class FakeJob:
        def __init__(self, *args):
            self.res = args[5]

        def backup(self):
            calls.append(1)
            if raises is not None:
                raise raises

        sync = mirror = backup

    monkeypatch.setattr(engine, "FolderJob", FakeJob)
    runner = engine._FolderRunner(SimpleNamespace(retries=retries), None, pool or _FakePool(),
                                  engine._quiet, "backup", engine.Options())
    res = runner(SimpleNamespace(name="INBOX"), Path("/nonexistent"))
    return runner, res, calls


@pytest.mark.parametrize("exc, outcome", [
    (None, Outcome.OK),
    (ServerError("127.0.0.1:993 refused a command: NO [NONEXISTENT] gone"), Outcome.REFUSED),
    (ProtocolError("127.0.0.1:993 sent a FETCH response with unbalanced parentheses"), Outcome.REFUSED),
    (ConnectionLost("connection to 127.0.0.1:993 lost: EOF"), Outcome.LOST),
    (SafetyAbort("would delete 8 of 20 messages"), Outcome.GUARDED),
    (OSError(36, "File name too long"), Outcome.FAILED),
])
def test_folder_runner_sets_the_outcome(monkeypatch, exc, outcome):
    runner, res, calls = _runner(monkeypatch, exc)
    assert res.outcome is outcome and bool(res.error) == outcome.failed
    assert len(calls) == 1 and runner.fatal is None


def test_folder_runner_keeps_a_storage_error_for_the_run(monkeypatch):
    err = StorageError("disk full", hint="free disk space")
    runner, res, _ = _runner(monkeypatch, err)
    assert res.outcome is Outcome.FAILED and runner.fatal is err and runner.stop.is_set()


@pytest.mark.parametrize("exc, outcome", [(ConnectionLost("lost during login"), Outcome.LOST),
                                          (ServerError("ENABLE refused"), Outcome.REFUSED)])
def test_folder_runner_no_session_at_all(monkeypatch, exc, outcome):
    _, res, calls = _runner(monkeypatch, None, pool=_FakePool(take_raises=exc))
    assert res.outcome is outcome and calls == []


def _pop3_account(tmp_path, retries=0):
    return SimpleNamespace(name="p", maildir=tmp_path / "Mail", retries=retries)


class _Pop3Stub:
    """Stands for a logged-in Pop3Session where _download itself is replaced."""

    broken = False

    def __init__(self, acc, pw) -> None:
        pass

    def close(self, commit: bool = False) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_pop3_server(monkeypatch):
    monkeypatch.setattr(pop3, "Pop3Session", _Pop3Stub)
    monkeypatch.setattr(runner, "backoff", lambda attempt: 0)


def test_pop3_refused_command_is_refused_not_lost(monkeypatch, tmp_path):
    def refuse(*a):
        raise ServerError("127.0.0.1:995 refused a command: -ERR no")
    monkeypatch.setattr(pop3, "_download", refuse)
    r = pop3.download(_pop3_account(tmp_path, retries=2), "pw")
    assert r.folders[0].outcome is Outcome.REFUSED and r.exit_code == 9


def test_pop3_lost_then_ok_is_ok(monkeypatch, tmp_path):
    attempts = []

    def flaky(acc, pw, state, res, progress, stop):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionLost("connection to 127.0.0.1:995 lost: EOF")
        res.skipped_too_big = 3
    monkeypatch.setattr(pop3, "_download", flaky)
    r = pop3.download(_pop3_account(tmp_path, retries=1), "pw", stop=threading.Event())
    f = r.folders[0]
    assert len(attempts) == 2 and f.outcome is Outcome.OK and f.error == "" and r.exit_code == 0
    assert r.to_json()["folders"][0]["skipped_too_big"] == 3


def test_pop3_lost_every_time_is_lost(monkeypatch, tmp_path):
    def cut(*a):
        raise ConnectionLost("connection to 127.0.0.1:995 lost: EOF")
    monkeypatch.setattr(pop3, "_download", cut)
    r = pop3.download(_pop3_account(tmp_path), "pw")
    assert r.folders[0].outcome is Outcome.LOST and r.exit_code == 6
