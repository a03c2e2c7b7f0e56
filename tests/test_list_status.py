"""Every folder's counters in one round trip: LIST ... RETURN (STATUS ...) (RFC 5819) where the
server offers LIST-STATUS, a STATUS per folder where it does not; a change is still seen."""

from __future__ import annotations

import json

import pytest

from tests.helpers import local_files, msg

FOLDERS = ("INBOX", "Work", "Lists", "Archive")


def sent(stderr: str) -> list[str]:
    """The IMAP commands a --debug run sent, without their tags."""
    out = []
    for line in stderr.splitlines():
        if " imapclient.imaplib > b'" in line:
            out.append(line.split(" imapclient.imaplib > b'", 1)[1].split(" ", 1)[1])
    return out


@pytest.mark.parametrize("server", ["full", "imap4rev1-only"])
def test_a_no_change_run_reads_every_folder_in_one_list(request, server, tmp_path):
    u = request.getfixturevalue("user" if server == "full" else "basic_user")
    for i, folder in enumerate(FOLDERS):
        u.server.seed(u.name, folder, [msg(10 * i + j, f"{folder} {j}") for j in range(3)])
    u.write_config("connections = 1")
    first = u.run("sync", "test")
    assert first.returncode == 0, first.stderr
    assert len(local_files(u.maildir)) == 12

    again = u.run("--debug", "sync", "test", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    commands = sent(again.stderr)
    status = [c for c in commands if c.startswith("STATUS")]
    if server == "full":
        assert any(c.startswith('LIST "" "*" RETURN (STATUS (') for c in commands), commands
        assert status == [], status  # the LIST said it all
    else:
        assert len(status) >= len(FOLDERS), commands  # one STATUS per folder
    assert json.loads(again.stdout)["totals"]["new"] == 0

    u.server.seed(u.name, "Lists", [msg(99, "new on the server")])
    third = u.run("--debug", "sync", "test", "--json")
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads(third.stdout)["totals"]["new"] == 1  # the change is seen through the LIST too
    assert len(local_files(u.maildir)) == 13
    if server == "full":
        assert not [c for c in sent(third.stderr) if c.startswith("STATUS")]
