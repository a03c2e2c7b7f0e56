"""The state machines of tests/test_sync_machine.py (the real engine against the in-memory
server, a Maildir changed between runs, every run checked: both sides agree, nothing is lost, a
second run changes nothing) run again with FolderJob.fast_read counted: the flag-change fast path
must be taken in some of those runs (a server-only change after a run that left the Maildir in
step), so the machines' checks cover it too. Derandomized: the same examples every time."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from mailsync.folderjob import FolderJob
from tests.test_sync_machine import PHASES, MirrorMachine, SyncMachine


@pytest.mark.parametrize("machine", [SyncMachine, MirrorMachine], ids=["sync", "mirror"])
def test_the_machines_take_the_fast_path(machine, monkeypatch):
    taken: list[bool] = []
    real = FolderJob.fast_read

    def counted(self, *a, **kw):
        taken.append(real(self, *a, **kw))
        return taken[-1]
    monkeypatch.setattr(FolderJob, "fast_read", counted)
    run_state_machine_as_test(machine, settings=settings(max_examples=60, stateful_step_count=25, deadline=None,
                                                         phases=PHASES, database=None, derandomize=True))
    print(f"fast path taken {sum(taken)} times in {len(taken)} tries")
    assert sum(taken) >= 3, f"the fast path was taken {sum(taken)} times in {len(taken)} tries"
