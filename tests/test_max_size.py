"""max_message_size applies to IMAP accounts too: bigger messages are not downloaded (a notice
each run), the rest is; raise the limit and the next run gets them; nothing is ever lost."""

from __future__ import annotations

import json

import pytest

from tests.helpers import local_files, msg, sha


@pytest.mark.parametrize("mode", ["backup", "sync", "mirror"])
def test_imap_max_message_size_skips_then_fetches_when_raised(user, mode):
    small = [msg(i) for i in range(4)]
    big = msg(99, body="B" * 20_000)
    user.append("INBOX", small[:2] + [big] + small[2:])
    user.write_config(f'mode = "{mode}"\nmax_message_size = 10000')
    for _ in range(2):  # skipped again on the next run, not forgotten
        r = user.run("sync", "test", "--json")
        assert r.returncode == 0, r.stderr
        assert "notice: INBOX: 1 messages larger than max_message_size (10000 bytes) were not downloaded" in r.stderr
        f = next(x for x in json.loads(r.stdout)["folders"] if x["name"] == "INBOX")
        assert f["skipped_too_big"] == 1
        assert sorted(sha(b) for b in local_files(user.maildir).values()) == sorted(sha(m) for m in small)
    assert len(user.server_messages()["INBOX"]) == 5  # the server keeps it (sync never deletes it)
    user.write_config(f'mode = "{mode}"')
    r = user.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["new"] == 1
    assert sorted(sha(b) for b in local_files(user.maildir).values()) == sorted(sha(m) for m in small + [big])
