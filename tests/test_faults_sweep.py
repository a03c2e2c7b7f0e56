"""The connection cut at many byte offsets (a proxy between mailsync and the real Dovecot): each
cut run exits non-zero with a one-line error, and the next clean run ends with every message
exactly once, in every mode (in sync mode on the server too: nothing uploaded twice).

Every offset starts from the same situation: a new account holding the same 16 messages (10 in
INBOX, 6 in Work) and a new Maildir; in sync mode the Maildir also holds 7 messages of its own
(4 in INBOX, 3 in Work, about 3 KB each) still to upload, so every cut meets uploads still to do.
The proxy counts each connection's bytes both ways (mailsync's commands and uploads as well as
the server's answers) and cuts every connection that gets that far; each offset must really cut.

One run's traffic per connection, TLS included (Dovecot 2.3, OpenSSL 3.0): backup INBOX ~33 KB,
Work ~21 KB; pop3 ~30 KB; sync INBOX ~48 KB with its APPENDs from ~34 KB on, Work ~33 KB with its
APPENDs from ~22 KB on. The offsets stay below that, with room to spare.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests import faults
from tests.helpers import MailUser, local_files, msg, sha

# (CutProxy direction, bytes). "both": the bytes of both ways added up; "reply": the server's
# first answer once that many bytes went up is cut, so an APPEND is stored and never confirmed.
DOWNLOAD_CUTS = [("both", n) for n in (150, 400, 900, 1500, 2200, 3000, 4000, 5200, 6500, 8000, 10_000,
                                       12_000, 14_000, 16_000, 18_000, 20_000, 22_000, 24_000, 26_000, 28_000)]
SYNC_CUTS = [("both", n) for n in (150, 400, 900, 1500, 2200, 3000, 4000, 6000, 9000, 13_000, 17_000, 21_000,
                                   24_000, 27_000, 30_000, 38_000, 44_000)] \
    + [("reply", n) for n in (3000, 6000, 9000)]  # inside the 1st, 2nd and 3rd APPEND of each folder
CUTS = {"backup": DOWNLOAD_CUTS, "pop3": DOWNLOAD_CUTS, "sync": SYNC_CUTS}

ON_SERVER = {"INBOX": [msg(i, body="c" * 2500) for i in range(10)],
             "Work": [msg(i, body="c" * 2500) for i in range(10, 16)]}
TO_UPLOAD = {"INBOX": [msg(90 + i, body="u" * 3000) for i in range(4)],
             "Work": [msg(80 + i, body="w" * 3000) for i in range(3)]}


def folder_path(u: MailUser, folder: str):
    return u.maildir if folder == "INBOX" else u.maildir / f".{folder}"  # layout maildir++


def fresh_account(user: MailUser, n: int, mode: str) -> MailUser:
    """A new account and Maildir, the same for every offset."""
    u = MailUser.create(user.server, f"{user.name}o{n}", user.tmp / f"o{n}")
    for folder, msgs in ON_SERVER.items():
        u.server.seed(u.name, folder, msgs)
    if mode == "sync":
        for folder, msgs in TO_UPLOAD.items():
            path = folder_path(u, folder)
            for sub in ("new", "cur", "tmp"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            if folder != "INBOX":
                (path / "maildirfolder").touch()
            for i, m in enumerate(msgs):
                (path / "new" / f"{1700000000 + i}.up{i}.host:2,").write_bytes(m)
    return u


def local_hashes(u: MailUser) -> dict[str, Counter]:
    """folder -> how often each message (by content) is in the Maildir."""
    out: dict[str, Counter] = {}
    for path, data in local_files(u.maildir).items():
        d = path.parent.parent
        out.setdefault("INBOX" if d == u.maildir else d.name.lstrip("."), Counter())[sha(data)] += 1
    return out


def server_hashes(u: MailUser) -> dict[str, Counter]:
    return {f: Counter(sha(b) for b, _ in msgs.values()) for f, msgs in u.server_messages().items() if msgs}


def uploads_cut(local: dict[str, Counter], server: dict[str, Counter]) -> list[str]:
    """Folders where the cut came during the uploads: all of the folder's server mail is in the
    Maildir (downloads come first), not all of its local mail is on the server."""
    return [f for f in ON_SERVER
            if all(local.get(f, {}).get(sha(m)) for m in ON_SERVER[f])
            and not all(server.get(f, {}).get(sha(m)) for m in TO_UPLOAD[f])]


@pytest.mark.parametrize("mode", ["backup", "sync", "pop3"])
def test_connection_cut_at_20_offsets(user, mode):
    extra = {"backup": "", "sync": 'mode = "sync"', "pop3": 'protocol = "pop3"'}[mode]
    port_attr = "pop3s_port" if mode == "pop3" else "imaps_port"
    folders = ["INBOX"] if mode == "pop3" else list(ON_SERVER)
    want = {f: Counter(sha(m) for m in ON_SERVER[f] + (TO_UPLOAD[f] if mode == "sync" else [])) for f in folders}
    assert len(CUTS[mode]) == 20
    during_uploads = []
    for n, (direction, offset) in enumerate(CUTS[mode]):
        where = (mode, direction, offset)
        u = fresh_account(user, n, mode)
        port = getattr(u.server, port_attr)
        with faults.CutProxy(port, cut_after=offset, cut_connections=1000, direction=direction) as proxy:
            u.write_config(f"retries = 0\nbatch_bytes = 65536\n{extra}", port=proxy.port)
            r = u.run("sync", "test", timeout=60)
        assert proxy.cuts >= 1, (where, "no connection was cut; traffic (up, down):", proxy.traffic)
        # every offset falls before the work is done: the run fails, with one line per failure
        assert r.returncode in (5, 6, 9), (where, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, (where, r.stderr)
        assert [line for line in r.stderr.splitlines() if line.startswith("mailsync: error")], (where, r.stderr)
        if mode == "sync":
            on_server = server_hashes(u)
            if uploads_cut(local_hashes(u), on_server):
                during_uploads.append(where)
            if direction == "reply":  # an APPEND was stored and its answer cut
                assert any(on_server.get(f, {}).get(sha(m)) for f in TO_UPLOAD for m in TO_UPLOAD[f]), where
        # the next run, without the proxy, completes: every message exactly once, nothing else
        u.write_config(extra, port=port)
        r = u.run("sync", "test")
        assert r.returncode == 0, (where, r.stderr)
        assert local_hashes(u) == want, where
        if mode == "sync":  # and nothing uploaded twice
            assert server_hashes(u) == want, where
    if mode == "sync":
        assert len(during_uploads) >= 6, during_uploads
