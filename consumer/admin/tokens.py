"""Admin tokens (``HERALD_ADMIN_TOKEN``): labels, roles, and what is too weak to run with.

``HERALD_ADMIN_TOKEN`` holds one token or several separated by commas. Each is

- ``label:role:token``: a label (a letter, then letters, digits, ``_ . -``,
  up to 64), a role, and the token, which may itself contain colons;
- ``label:token``: role ``operator`` (the format before roles existed);
- ``token``: role ``operator``, labelled ``sha256:`` and the first 8 hex
  digits of its SHA-256.

Roles: ``viewer`` reads (recipients masked); ``operator`` also replays,
edits, rejects, purges and reveals recipients. They apply to the JSON admin
API and to the console alike.

An item with two colons or more after a valid label must name a known role:
``ops:veiwer:…`` is refused rather than read as the token ``veiwer:…`` with
the operator role (a typo must never grant more). A token shorter than
:data:`MIN_LENGTH` characters, or an obvious placeholder (``CHANGE-ME``,
``demo-admin-token``, one character repeated…), stops start-up with one line
naming the variable and the token's label, never the token.

The audit log names the label, never the token. Tokens are compared as
SHA-256 digests with :func:`hmac.compare_digest`, each configured token every
time, so the answer's timing says nothing about them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from consumer.errors import ConfigError

VIEWER = "viewer"
OPERATOR = "operator"
ROLES = (VIEWER, OPERATOR)
MIN_LENGTH = 16

_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
# Words that make up the tokens people paste from examples and forget.
_PLACEHOLDER_WORDS = frozenset({
    "admin", "api", "auth", "bearer", "change", "changeme", "default", "demo", "dev",
    "example", "fixme", "herald", "insert", "key", "me", "my", "password", "placeholder",
    "replace", "replaceme", "secret", "test", "todo", "token", "your", "yours", "here",
    "xxx", "xxxx", "sample", "local", "local-only", "prod", "production", "staging",
})
_PLACEHOLDER_MARKS = ("changeme", "replaceme", "replacewith", "placeholder", "yourtoken",
                      "yoursecret", "insertyour", "putyour", "settoken")


@dataclass(frozen=True)
class AdminToken:
    label: str
    role: str
    digest: bytes

    @property
    def can_act(self) -> bool:
        """Whether this token may change things (and reveal recipients)."""
        return self.role == OPERATOR

    @property
    def fingerprint(self) -> bytes:
        """A short, non-reversible tag of the token (console sessions remember it, so
        that changing or removing a token ends the sessions it opened)."""
        return hashlib.sha256(b"herald.console:" + self.digest).digest()[:16]


def weakness(secret: str) -> str | None:
    """Why a token is too weak to run with, or None."""
    if len(secret) < MIN_LENGTH:
        return f"shorter than {MIN_LENGTH} characters"
    lowered = secret.lower()
    compact = re.sub(r"[^a-z0-9]", "", lowered)
    if any(mark in compact for mark in _PLACEHOLDER_MARKS) or "<" in secret or "${" in secret:
        return "a placeholder"
    words = [w for w in re.split(r"[^a-z]+", lowered) if w]
    if words and not re.search(r"[0-9]", lowered) and all(w in _PLACEHOLDER_WORDS
                                                          for w in words):
        return "a placeholder"
    if len(set(lowered)) < 6:
        return "too repetitive (fewer than 6 different characters)"
    return None


def parse_tokens(raw: str) -> list[AdminToken]:
    """The tokens of ``HERALD_ADMIN_TOKEN`` (see the module's docstring); raises
    ConfigError (one line naming the variable) for anything wrong or weak."""
    tokens = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":", 2)
        if len(parts) >= 2 and _LABEL_RE.fullmatch(parts[0]) and parts[1]:
            label = parts[0]
            if len(parts) == 3:
                role, secret = parts[1], parts[2]
                if role not in ROLES:
                    raise ConfigError(
                        f"HERALD_ADMIN_TOKEN: token {label!r} has role {role[:20]!r};"
                        f" roles are {' and '.join(ROLES)} (format label:role:token)")
            else:
                role, secret = OPERATOR, parts[1]
            if not secret:
                raise ConfigError(f"HERALD_ADMIN_TOKEN: token {label!r} is empty")
        else:
            secret, role = item, OPERATOR
            label = "sha256:" + hashlib.sha256(item.encode()).hexdigest()[:8]
        problem = weakness(secret)
        if problem is not None:
            raise ConfigError(f"HERALD_ADMIN_TOKEN: token {label!r} is {problem}; use a random"
                              " one, e.g. `python3 -c 'import secrets;"
                              " print(secrets.token_urlsafe(32))'`")
        tokens.append(AdminToken(label, role, hashlib.sha256(secret.encode()).digest()))
    if not tokens:
        raise ConfigError("HERALD_ADMIN_TOKEN: holds no token")
    if len({t.label for t in tokens}) != len(tokens):
        raise ConfigError("HERALD_ADMIN_TOKEN: two tokens share a label")
    if len({t.digest for t in tokens}) != len(tokens):
        raise ConfigError("HERALD_ADMIN_TOKEN: the same token is given twice")
    return tokens


def find_token(presented: str, tokens: list[AdminToken]) -> AdminToken | None:
    """The configured token equal to ``presented``, or None (constant work)."""
    if not presented:
        return None
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for token in tokens:  # every one, whatever matched: constant work per request
        if hmac.compare_digest(digest, token.digest):
            found = token
    return found


def authenticate(header: str | None, tokens: list[AdminToken]) -> AdminToken | None:
    """The token an ``Authorization: Bearer …`` header presents, or None."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return find_token(presented.strip(), tokens)
