"""Modified UTF-7 (RFC 3501 section 5.1.3): IMAP mailbox names and Maildir++ folder names."""

from __future__ import annotations

import base64


def _b64(s: str) -> str:
    raw = s.encode("utf-16-be")
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode(name: str) -> str:
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            out.append("&" + _b64("".join(pending)) + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode(name: str) -> str:
    """Decode modified UTF-7; raises ValueError on anything that is not valid."""
    out: list[str] = []
    i = 0
    n = len(name)
    while i < n:
        ch = name[i]
        if not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError(f"invalid character {ch!r} in modified UTF-7 name")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated '&' sequence in modified UTF-7 name")
        chunk = name[i + 1:end]
        if chunk == "":
            out.append("&")
        else:
            if any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+," for c in chunk):
                raise ValueError(f"invalid base64 in modified UTF-7 name: {chunk!r}")
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                raw = base64.b64decode(b64, validate=True)
                text = raw.decode("utf-16-be")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"invalid modified UTF-7 sequence {chunk!r}") from exc
            if encode(text) != f"&{chunk}-":
                raise ValueError(f"non-canonical modified UTF-7 sequence {chunk!r}")
            out.append(text)
        i = end + 1
    return "".join(out)
