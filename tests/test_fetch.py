"""The streaming FETCH reader (mailsync/fetch.py) on byte streams a server could send: bodies come
out byte-exact whatever they contain, and anything malformed is a clean error with every file
that was opened for it discarded."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsync import fetch
from mailsync.errors import ConnectionLost, ServerError
from tests.helpers import ROOT, sha


class FakeImap:
    def __init__(self, data: bytes) -> None:
        self.file = io.BufferedReader(io.BytesIO(data), buffer_size=8192)
        self.tagged_commands = {b"A1": None}


class Recorder(fetch.MemoryBody):
    opened: list[Recorder] = []

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.announced = size
        self.discarded = False
        Recorder.opened.append(self)

    def discard(self) -> None:
        self.discarded = True


def run(data: bytes, max_body: int | None = None, handed: list | None = None) -> list[fetch.Fetched]:
    Recorder.opened = []
    out = handed if handed is not None else []
    for got in fetch.read_fetch(FakeImap(data), b"A1", Recorder, "server:993", max_body):
        out.append(got)
    return out


def literal(body: bytes) -> bytes:
    return b"{%d}\r\n" % len(body) + body


def test_bodies_flags_and_dates_come_out_exact():
    b1 = b"Subject: one\r\n\r\nline ending in a literal marker {12}\r\n) * 3 FETCH (\r\n"
    b2 = b"\x00\x80binary\r\n.\r\n"
    data = (b"* 1 FETCH (UID 10 FLAGS (\\Seen $Label) INTERNALDATE \" 7-Jul-2021 02:44:25 -0700\" BODY[] "
            + literal(b1) + b")\r\n"
            + b"* 4 EXISTS\r\n"
            + b"* 2 FETCH (FLAGS (\\Flagged))\r\n"  # unsolicited: no UID
            + b"* 3 FETCH (BODY[] " + literal(b2) + b" FLAGS () UID 12 INTERNALDATE \"01-Jan-2020 00:00:00 +0000\")\r\n"
            + b"A1 OK done\r\n")
    got = run(data)
    assert [g.uid for g in got] == [10, 12]
    assert got[0].body.value() == b1 and got[1].body.value() == b2
    assert fetch.flag_list(got[0].items[b"FLAGS"]) == (b"\\Seen", b"$Label")
    when = fetch.internaldate(got[0].items[b"INTERNALDATE"])
    assert when.isoformat() == "2021-07-07T02:44:25-07:00"


def test_nil_body_and_header_fields():
    data = (b"* 1 FETCH (UID 5 BODY[] NIL)\r\n"
            b"* 2 FETCH (UID 6 RFC822.SIZE 44 BODY[HEADER.FIELDS (MESSAGE-ID)] "
            + literal(b"Message-ID: <a@b>\r\n\r\n") + b")\r\n"
            b"A1 OK\r\n")
    got = run(data)
    assert got[0].items[b"BODY[]"] is None
    assert got[1].items[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"] == b"Message-ID: <a@b>\r\n\r\n"
    assert fetch.number(got[1].items[b"RFC822.SIZE"]) == 44


def test_a_big_body_is_copied_in_pieces_not_held_whole():
    body = b"x" * (3 * fetch.CHUNK + 5)
    got = run(b"* 1 FETCH (UID 1 BODY[] " + literal(body) + b")\r\nA1 OK\r\n")
    w = got[0].body
    assert w.value() == body
    assert max(len(p) for p in w.parts) <= fetch.CHUNK


@pytest.mark.parametrize("data, error", [
    (b"* 1 FETCH (UID 1 BODY[] {100}\r\nshort", ConnectionLost),               # cut inside a literal
    (b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello)\r\n", ConnectionLost),           # no tagged reply
    (b"* 1 FETCH (FLAGS () BODY[] {5}\r\nhello)\r\nA1 OK\r\n", fetch.ProtocolError),  # no UID
    (b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello))\r\nA1 OK\r\n", fetch.ProtocolError),    # unbalanced
    (b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello\r\nA1 OK\r\n", fetch.ProtocolError),      # unclosed
    (b"* 1 FETCH (UID 1 FLAGS BODY[] {5}\r\nhello)\r\nA1 OK\r\n", fetch.ProtocolError),  # item, no value
    (b"* 1 FETCH (UID 1 \"x\" {5}\r\nhello)\r\nA1 OK\r\n", fetch.ProtocolError),     # garbled name
    (b"* 1 FETCH (UID 1 BODY[] {99999999999}\r\n", fetch.ProtocolError),           # enormous literal
    (b"* 1 FETCH (UID 1 X-JUNK {99999999999}\r\n", fetch.ProtocolError),           # enormous small item
    (b"+ go ahead\r\n", fetch.ProtocolError),                                      # not a response
    (b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello)\r\nA1 NO [SERVERBUG] oops\r\n", ServerError),
])
def test_malformed_replies_are_clean_errors_and_leave_no_file(data, error):
    handed: list[fetch.Fetched] = []
    with pytest.raises(error) as exc:
        run(data, max_body=1000, handed=handed)
    assert "server:993" in str(exc.value)
    # a body already handed on is the caller's to discard; every other one is gone
    mine = {id(g.body) for g in handed}
    assert all(w.discarded for w in Recorder.opened if id(w) not in mine)


def test_a_reply_bigger_than_announced_is_refused_before_storing():
    with pytest.raises(fetch.ProtocolError, match="more than"):
        run(b"* 1 FETCH (UID 1 BODY[] {5000}\r\n" + b"x" * 5000 + b")\r\nA1 OK\r\n", max_body=4000)
    assert Recorder.opened == []


def test_a_body_cut_short_is_discarded():
    with pytest.raises(ConnectionLost):
        run(b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello)\r\n* 2 FETCH (UID 2 BODY[] {50}\r\nabc")
    assert Recorder.opened[-1].discarded


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=300),
                          st.lists(st.sampled_from(["\\Seen", "\\Flagged", "$Label1", "Junk"]), unique=True)),
                min_size=1, max_size=5))
def test_any_bytes_and_flags_round_trip(msgs):
    data = b""
    for i, (body, flags) in enumerate(msgs, 1):
        data += (b"* %d FETCH (UID %d FLAGS (%s) BODY[] " % (i, 100 + i, " ".join(flags).encode())
                 + literal(body) + b")\r\n")
    got = run(data + b"A1 OK\r\n")
    assert [g.body.value() for g in got] == [b for b, _ in msgs]
    assert [fetch.flag_list(g.items[b"FLAGS"]) for g in got] == [tuple(f.encode() for f in fl) for _, fl in msgs]


def _typed(value):
    """A parsed value with its types spelled out (a quoted "5" is not the number 5)."""
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value if isinstance(value, (bytes, type(None))) else id(value))


_atom = st.sampled_from([b"\\Seen", b"\\Flagged", b"$Label1", b"Junk", b"NIL", b"a]b", b"x{1}", b"\\", b"%"])
_value = st.one_of(
    st.integers(0, 10**12).map(lambda n: b"%d" % n),
    st.lists(_atom, max_size=3).map(lambda a: b"(" + b" ".join(a) + b")"),
    st.text(st.sampled_from('ab 0-:+"\\()'), max_size=8).map(lambda t: b'"' + t.encode() + b'"'),
    _atom, st.just(b"((x))"), st.just(b"()"),
)
_key = st.sampled_from([b"UID", b"uid", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"MODSEQ", b"RFC822",
                        b"BODY[]", b"X-GM-LABELS", b"BODY[HEADER]"])
_gap = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t", b""])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_key, _gap, _value), max_size=4), st.lists(st.tuples(_key, _gap, _value), max_size=3),
       st.booleans(), st.sampled_from([b"", b" ", b"  ", b"x", b")"]))
def test_the_fast_reading_of_common_responses_agrees_with_the_tokenizer(before, after, body, tail):
    """fetch._simple (the fast path for the usual shape) reads a response exactly as the general
    tokenizer does (values, their types, the BODY[] literal), or leaves it to the tokenizer."""
    def items(pairs):
        return b" ".join(k + g + v for k, g, v in pairs)
    if body:
        head = b"(" + items(before) + (b" " if before else b"") + b"BODY[] "
        parts = [head, fetch._Lit(fetch.MemoryBody(0)), (b" " + items(after) if after else b"") + b")" + tail]
    else:
        parts = [b"(" + items(before) + b")" + tail]
    fast = fetch._simple(parts[0], parts)
    try:
        slow = fetch._parsed(parts, "server:993")
    except fetch.ProtocolError:
        assert fast is None
        return
    if fast is not None:
        assert {k: _typed(v) for k, v in fast.items()} == {k: _typed(v) for k, v in slow.items()}
        assert list(fast) == list(slow)


def test_a_download_and_a_listing_take_the_fast_reading():
    """The responses Dovecot sends for a listing and for a download are read by the fast path."""
    listing = [b"(UID 7 RFC822.SIZE 1234 FLAGS (\\Seen $Forwarded) MODSEQ (99))"]
    body = fetch.MemoryBody(0)
    download = [b'(UID 7 FLAGS () INTERNALDATE "17-Jul-1996 02:44:25 -0700" BODY[] ', fetch._Lit(body), b")"]
    assert fetch._simple(listing[0], listing) == {b"UID": b"7", b"RFC822.SIZE": b"1234",
                                                   b"FLAGS": [b"\\Seen", b"$Forwarded"], b"MODSEQ": [b"99"]}
    got = fetch._simple(download[0], download)
    assert got[b"BODY[]"] is body and isinstance(got[b"INTERNALDATE"], fetch._Quoted) and got[b"FLAGS"] == []


def test_a_50_mb_message_is_backed_up_byte_exact_with_bounded_memory(user):
    """The body is streamed into tmp/: peak memory stays far below the message size."""
    body = b"".join(b"%07d " % i + b"y" * 70 + b"\r\n" for i in range(50 * 1024 * 1024 // 80))
    raw = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: big\r\nMessage-ID: <big@x>\r\n\r\n" + body
    user.server.seed(user.name, "INBOX", [raw])
    want = sha(raw)
    del body, raw
    p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(user.config), "sync", "test",
                          "--quiet"], cwd=ROOT, env=user.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_kb = 0
    while p.poll() is None:  # VmHWM is the child's own peak (ru_maxrss would count this process too)
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.01)
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.returncode == 0, err
    files = list((user.maildir / "new").iterdir()) + list((user.maildir / "cur").iterdir())
    assert len(files) == 1 and sha(files[0].read_bytes()) == want
    assert 0 < peak_kb < 100 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB for a 50 MB message"
