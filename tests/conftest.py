"""Fixtures: one real Dovecot for the whole session, a fresh mail user per test."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.dovecot import Dovecot
from tests.helpers import MailUser

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory):
    if not shutil.which("dovecot") and not Path("/usr/sbin/dovecot").exists():
        pytest.fail("Dovecot is not installed: run `make test` (it installs dovecot-imapd and dovecot-pop3d)")
    # not under pytest's tmp dir: as root that is 0700, and Dovecot's processes run as `dovecot`
    root = Path(tempfile.mkdtemp(prefix="mailsync-dovecot-"))
    # no 2 s pause before each refusal: the tests refuse many logins on purpose (Dovecot's penalty
    # for an address's repeated failures stays; a successful login clears it)
    d = Dovecot(root, extra_conf="auth_failure_delay = 0\n").start()
    yield d
    _stop_now(d)
    shutil.rmtree(root, ignore_errors=True)


def _stop_now(d: Dovecot) -> None:
    """End of the session: SIGTERM to the master, without waiting for its clients to go."""
    pid = d.root / "run" / "master.pid"
    if pid.exists():
        os.kill(int(pid.read_text()), signal.SIGTERM)


@pytest.fixture(scope="session")
def basic_dovecot():
    """A second Dovecot that advertises only IMAP4rev1 basics: no CONDSTORE, QRESYNC, ESEARCH."""
    root = Path(tempfile.mkdtemp(prefix="mailsync-dovecot-basic-"))
    d = Dovecot(root, extra_conf="protocol imap {\n  imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID\n}\n").start()
    yield d
    _stop_now(d)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def basic_user(basic_dovecot, tmp_path) -> MailUser:
    return MailUser.create(basic_dovecot, f"b{os.getpid()}x{next(_ids)}", tmp_path)


@pytest.fixture
def user(dovecot, tmp_path) -> MailUser:
    """A new, empty mail account on the shared Dovecot, and a config file pointing at it."""
    name = f"u{os.getpid()}x{next(_ids)}"
    return MailUser.create(dovecot, name, tmp_path)
