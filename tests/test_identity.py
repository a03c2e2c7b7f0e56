"""One message identity (mailsync/identity.py): the forms another tool may have left a message
in are the same message; anything else is not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailsync.identity import Identity, Match, Matcher, canonical, crlf, same

HEADER_NAMES = st.sampled_from([b"From", b"To", b"Subject", b"Date", b"Received", b"X-Mailer", b"Content-Type"])
VALUE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b"")
                                  .strip() or b"v")
ADDED = st.sampled_from([b"X-TUID: 3x9Kq0aLm2Zp", b"X-OfflineIMAP: 1234567-89", b"Status: RO",
                         b"X-Status: AF", b"X-Keywords: $Work", b"X-UID: 42", b"x-tuid: lower"])


@st.composite
def messages(draw):
    """(headers, body) of a CRLF message with a Message-ID."""
    heads = [h + b": " + v for h, v in draw(st.lists(st.tuples(HEADER_NAMES, VALUE), min_size=1, max_size=6))]
    heads.append(b"Message-ID: <" + str(draw(st.integers(0, 10**6))).encode() + b"@example.com>")
    body = draw(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                         max_size=6))
    return heads, body


def render(heads, body, eol=b"\r\n"):
    return eol.join(heads) + eol + eol + eol.join(body) + (eol if body else b"")


@given(messages(), st.lists(st.tuples(st.integers(0, 8), ADDED), max_size=3), st.booleans())
def test_lf_and_added_headers_are_the_same_message(msg, added, lf):
    heads, body = msg
    server = render(heads, body)
    local_heads = list(heads)
    for pos, h in added:
        local_heads.insert(min(pos, len(local_heads)), h)
    local = render(local_heads, body, b"\n" if lf else b"\r\n")
    a, b = Identity.of(server), Identity.of(local)
    assert same(a, b) in (Match.EXACT, Match.SAME_CONTENT)
    assert canonical(local) == canonical(server) == canonical(canonical(server))
    # what a server reports as the size of its copy fits one of the forms of the local file
    assert len(server) in b.sizes
    assert a.message_id == b.message_id


@given(messages(), st.binary(min_size=1, max_size=20).filter(lambda b: b.strip(b"\r\n")))
def test_a_changed_body_or_header_is_another_message(msg, extra):
    heads, body = msg
    a = Identity.of(render(heads, body))
    b = Identity.of(render(heads, body + [extra.replace(b"\r", b"").replace(b"\n", b"") + b"!"]))
    c = Identity.of(render(heads + [b"Subject: changed"], body))
    assert same(a, b) is None and same(a, c) is None


def test_added_headers_only_count_in_the_header():
    head = b"From: a\r\nSubject: s\r\n\r\n"
    one = head + b"Status: RO\r\nbody\r\n"
    two = head + b"body\r\n"
    assert same(Identity.of(one), Identity.of(two)) is None


def test_folded_added_header_goes_with_its_continuation():
    server = b"From: a\r\nSubject: s\r\n\r\nbody\r\n"
    local = b"From: a\nX-Keywords: one,\n two\nSubject: s\n\nbody\n"
    assert canonical(local) == server


def test_no_header_body_separator_and_empty():
    assert canonical(b"") == b""
    assert canonical(b"Status: RO\nX: y") == b"X: y"
    assert crlf(b"a\nb\r\nc") == b"a\r\nb\r\nc"


def test_matcher_content_first_then_unambiguous_hints_each_used_once():
    m = Matcher()
    f1 = b"Message-ID: <1@x>\nSubject: one\n\nbody\n"
    f2 = b"Message-ID: <2@x>\nX-TUID: abc\nSubject: two\n\nbody\n"
    dup_a = b"Message-ID: <3@x>\nSubject: three a\n\nbody\n"
    dup_b = b"Message-ID: <3@x>\nSubject: three b\n\nbody\n"
    for key, data in (("k1", f1), ("k2", f2), ("k3a", dup_a), ("k3b", dup_b)):
        m.add(key, Identity.of(data))
    srv1, srv2 = crlf(f1), b"Message-ID: <2@x>\r\nSubject: two\r\n\r\nbody\r\n"
    # hints: <1@x> and <2@x> are unique; <3@x> is on two local files, so never paired by hint
    pairs = m.pair_by_hint({10: (len(srv1), "<1@x>"), 20: (len(srv2), "<2@x>"),
                            30: (len(crlf(dup_a)), "<3@x>"), 40: (999, "<9@x>")})
    assert pairs == {10: "k1", 20: "k2"}
    # content: the two <3@x> copies are told apart by their bytes; each file is used once
    assert m.by_content(Identity.of(crlf(dup_b))) == ("k3b", Match.SAME_CONTENT)
    assert m.by_content(Identity.of(dup_a)) == ("k3a", Match.EXACT)
    assert m.by_content(Identity.of(dup_a)) is None
    assert m.by_content(Identity.of(srv1)) is None  # k1 was taken by its hint
    assert len(m) == 0


def test_a_hint_with_the_wrong_size_pairs_nothing():
    m = Matcher()
    m.add("k", Identity.of(b"Message-ID: <1@x>\n\nbody\n"))
    assert m.pair_by_hint({1: (5, "<1@x>")}) == {}
    assert len(m) == 1


@given(messages(), st.lists(st.tuples(st.integers(0, 8), ADDED), max_size=2), st.booleans())
def test_may_differ_is_never_wrong_when_it_says_no(msg, added, lf):
    from mailsync.identity import content_sha256, may_differ
    heads, body = msg
    for pos, h in added:
        heads = heads[:pos] + [h] + heads[pos:]
    data = render(heads, body, b"\n" if lf else b"\r\n")
    if not may_differ(data[:65536]):
        assert canonical(data) == data
        assert content_sha256(data) == Identity.of(data).sha256
