"""The connection cut at many byte offsets (a proxy between mailsync and the real Dovecot): each
run finishes or exits non-zero with one line, and the next clean run ends with every message
exactly once, in every mode."""

from __future__ import annotations

import pytest

from tests import faults
from tests.helpers import local_files, msg, sha

OFFSETS = [150, 400, 900, 1500, 2200, 3000, 4000, 5200, 6500, 8000, 10_000, 12_500, 15_000, 18_000,
           22_000, 27_000, 33_000, 40_000, 50_000, 65_000]


def corpus():
    return [msg(i, body="c" * 2500) for i in range(16)]


def cut_then_clean(u, port_attr, extra, offset):
    port = getattr(u.server, port_attr)
    with faults.CutProxy(port, cut_after=offset, cut_connections=1000) as proxy:
        u.write_config(f"retries = 0\nbatch_bytes = 65536\n{extra}", port=proxy.port)
        r = u.run("sync", "test", timeout=60)
    assert r.returncode in (0, 5, 6, 9), (offset, r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    if r.returncode:
        assert [line for line in r.stderr.splitlines() if line.startswith("mailsync: error")], r.stderr
    u.write_config(extra, port=port)
    r = u.run("sync", "test")
    assert r.returncode == 0, (offset, r.stderr)


@pytest.mark.parametrize("mode", ["backup", "sync", "pop3"])
def test_connection_cut_at_20_offsets(user, mode):
    msgs = corpus()
    user.server.seed(user.name, "INBOX", msgs[:10])
    user.server.seed(user.name, "Work", msgs[10:])
    extra = {"backup": "", "sync": 'mode = "sync"', "pop3": 'protocol = "pop3"'}[mode]
    port_attr = "pop3s_port" if mode == "pop3" else "imaps_port"
    if mode == "sync":  # something to upload too
        (user.maildir / "new").mkdir(parents=True)
        (user.maildir / "cur").mkdir()
        (user.maildir / "tmp").mkdir()
        (user.maildir / "new" / "1700000000.up.host:2,").write_bytes(msg(99))
    for offset in OFFSETS:
        cut_then_clean(user, port_attr, extra, offset)
        files = local_files(user.maildir)
        hashes = [sha(b) for b in files.values()]
        assert len(hashes) == len(set(hashes)), offset
        want = {sha(m) for m in (msgs[:10] if mode == "pop3" else msgs)} | ({sha(msg(99))} if mode == "sync" else set())
        assert set(hashes) == want, offset
        if mode == "sync":
            srv = user.server_messages()
            srv_hashes = [sha(b) for f in srv.values() for b, _ in f.values()]
            assert sorted(srv_hashes) == sorted(want), offset
        # start again from nothing for the next offset, so each cut meets a first run
        import shutil
        shutil.rmtree(user.maildir)
        if mode == "sync":
            for d in ("new", "cur", "tmp"):
                (user.maildir / d).mkdir(parents=True, exist_ok=True)
            # the uploaded copy is on the server now; a fresh Maildir gets it back by download
