"""Sample mail for tests, the demo and the benchmark: ordinary, non-ASCII and malformed messages."""

from __future__ import annotations

import random

FOLDERS = ["INBOX", "Sent", "Archive/2024 Q1", "Archive/2024 Q2", "Entwürfe", "Projects/Été 2026/notes"]


def ordinary(n: int, size: int = 2000, tag: str = "m") -> bytes:
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * (size // 57 + 1))[:size]
    return (f"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\nSubject: Message {n}\r\n"
            f"Date: Mon, 2 Nov 2026 10:{n % 60:02d}:00 +0000\r\nMessage-ID: <{tag}{n}@example.com>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n").encode()


def with_attachment(n: int, kb: int) -> bytes:
    rnd = random.Random(n)
    blob = bytes(rnd.getrandbits(8) for _ in range(kb * 1024))
    import base64
    b64 = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: Attachment {n}\r\n"
            f"Message-ID: <att{n}@example.com>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\n"
            f"see attached\r\n--XX\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n").encode() + b64 + b"--XX--\r\n"


# messages older tools mangled or skipped; every one must come back byte for byte
MALFORMED: list[bytes] = [
    b"Subject: no separator, no body\r\nFrom: x@example.com\r\n",
    b"Subject: 8-bit header \xe4\xf6\xfc \xc3\xa9t\xc3\xa9\r\nFrom: x@example.com\r\n\r\nbody \xff\xfe raw bytes\r\n",
    b"Subject: NUL inside\r\n\r\nbefore\x00after\r\n",
    b"Subject: broken MIME\r\nContent-Type: multipart/mixed; boundary=\"never\"\r\n\r\n--other\r\nno end\r\n",
    b"Subject: very long line\r\n\r\n" + b"x" * 5000 + b"\r\n",
    b"From nobody Mon Nov  2 10:00:00 2026\r\nSubject: mbox From line kept\r\n\r\n>From quoted\r\n",
    b"subject: lower-case headers and no Message-ID\r\n\r\nsame body\r\n",
    b"subject: lower-case headers and no Message-ID\r\n\r\nsame body\r\n",  # an exact duplicate
    b"Message-ID: <dup@example.com>\r\nSubject: one\r\n\r\nfirst\r\n",
    b"Message-ID: <dup@example.com>\r\nSubject: two\r\n\r\nsecond, same Message-ID\r\n",
]
