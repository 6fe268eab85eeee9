"""Operator output of hostile data: `herald parked list|show`, `herald status`
and `herald stats` print control characters from publishers and providers
escaped, and the parking lot shows credential-like headers masked."""

from __future__ import annotations

import json
import uuid

import asyncpg

from tests.conftest import herald_env
from tests.integration.operator_tools import herald_cli

ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"
CONTROL = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))} | {"\u202e", "\u2028"}


def raw_controls(text: str) -> set[str]:
    return {c for c in text if c in CONTROL and c not in "\n"}


async def test_cli_output_escapes_hostile_text_and_masks_credential_headers(
    prefix: str, db_url: str, db: asyncpg.Connection,
) -> None:
    parked_id = uuid.uuid4()
    mid = f"m{ESC}\r1"
    request = {"message_id": mid, "channel": "http", "to": f"https://h.example/{ESC}",
               "body": {"text": f"hi{ESC}\u202eevil\x9b"}}
    await db.execute(
        """INSERT INTO messages (message_id, status, channel, recipient, campaign_id, payload,
                                 attempts, last_error_type, last_error_code, last_error,
                                 queued_at, failed_at)
           VALUES ($1, 'failed', 'http', $2, $3, '{}', 1, 'invalid_request', $4, $5,
                   now(), now())""",
        mid, request["to"], f"camp{ESC}", f"4{ESC}", f"HTTP 400: {ESC}\nstatus    delivered")
    await db.execute(
        """INSERT INTO delivery_attempts (message_id, attempt, started_at, finished_at, outcome,
                                          error_type, error_code, error_text)
           VALUES ($1, 1, now(), now(), 'failed', 'invalid_request', $2, $3)""",
        mid, f"4{ESC}", f"HTTP 400: {ESC}")
    await db.execute(
        """INSERT INTO parked_messages (parked_id, message_id, channel, recipient, campaign_id,
                                        attempts, error_type, error_code, last_error, body,
                                        headers)
           VALUES ($1, $2, 'http', $3, $4, 1, $5, $6, $7, $8, $9)""",
        parked_id, mid, request["to"], f"camp{ESC}", f"other{ESC}", f"4{ESC}",
        f"HTTP 400: {ESC}", json.dumps(request).encode(),
        json.dumps({"Authorization": "Bearer publisher-secret-value", f"x-{ESC}": f"v{ESC}",
                    "x-herald-error-type": "other"}))
    env = herald_env(prefix, db_url)

    code, out, err = await herald_cli(env, "parked", "show", str(parked_id))
    assert code == 0, err
    assert raw_controls(out) == set(), sorted(raw_controls(out))
    assert "\\x1b[2J" in out and "publisher-secret-value" not in out
    assert "Authorization: ***" in out
    code, out, err = await herald_cli(env, "parked", "show", str(parked_id), "--json")
    assert code == 0, err
    assert raw_controls(out) == set()
    assert json.loads(out)["headers"]["Authorization"] == "***"

    code, out, err = await herald_cli(env, "parked", "list")
    assert code == 0, err
    assert raw_controls(out) == set() and "\\x1b" in out

    code, out, err = await herald_cli(env, "status", mid, "--reveal")
    assert code == 0, err
    assert raw_controls(out) == set() and "\\x1b" in out
    assert not any(line.startswith("status    delivered") for line in out.splitlines())

    code, out, err = await herald_cli(env, "stats")
    assert code == 0, err
    assert raw_controls(out) == set()

    code, out, err = await herald_cli(env, "status", f"nope{ESC}")
    assert code == 1 and raw_controls(err) == set()
