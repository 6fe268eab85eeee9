"""Untrusted text made safe for where it goes: PostgreSQL, and a person's terminal.

Recipients, bodies, provider answers, error texts and headers all come from
outside. Two pure functions cover the two sinks:

- :func:`storable`: PostgreSQL's ``text`` and ``jsonb`` refuse NUL and
  cannot encode lone surrogates (which ``json.loads`` happily produces from
  ``"\\ud800"``); a message the provider accepted must be recorded whatever
  odd text came with the answer, so such characters are replaced and the
  text is capped.
- :func:`printable`: a terminal obeys escape sequences (ESC, CSI), carriage
  returns overwrite what an operator reads, and bidirectional overrides
  reorder it; such characters are shown as visible escapes instead.
"""

from __future__ import annotations

import re

# NUL cannot be stored; a lone surrogate cannot be encoded as UTF-8.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")

# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators,
# and the bidirectional embedding/override/isolate controls ("Trojan Source").
_OTHER_UNPRINTABLE = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE_RE = re.compile(f"[\x00-\x1f{_OTHER_UNPRINTABLE}]")
# Where a value is printed over several lines on purpose, tabs and newlines stay.
_UNPRINTABLE_KEEP_NL_RE = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER_UNPRINTABLE}]")

REPLACEMENT = "\ufffd"


def storable(text: str, limit: int | None = None) -> str:
    """``text`` as PostgreSQL can store it: NUL and lone surrogates replaced by
    U+FFFD, and cut to ``limit`` characters (the last one an ellipsis)."""
    text = _UNSTORABLE_RE.sub(REPLACEMENT, text)
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return text


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\u202e``).

    Newlines and tabs are escaped too unless ``newlines`` is true: one-line
    fields (a recipient, an error text) must not start a line of their own
    that looks like Herald's output; a value printed over several lines on
    purpose (an indented body) keeps them.
    """
    pattern = _UNPRINTABLE_KEEP_NL_RE if newlines else _UNPRINTABLE_RE
    return pattern.sub(_escape, text)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
