"""The configuration reference: what each ``HERALD_*`` variable means, and
``docs/configuration.md`` rendered from it and from :class:`~consumer.settings.Settings`.

The variable names, defaults and accepted values come from the settings
object itself; only the meanings are written here. Every setting must have
one (a test fails otherwise, and when the committed page differs from
:func:`render`). Regenerate the page with::

    python -m consumer.settings_reference > docs/configuration.md
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, Field, fields
from typing import Any

from consumer.settings import TOOLING_PREFIXES, TOOLING_VARIABLES, Settings

# (section, [(variable, meaning)]), in the order the page shows them.
SECTIONS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Connections", [
        ("HERALD_AMQP_URL", "The RabbitMQ broker (`amqps://` for TLS). For a cluster, its"
         " nodes' URLs separated by commas: Herald connects to the first that answers and,"
         " when a connection is lost, to the next one, round and round. Write a comma in a"
         " password as `%2C`."),
        ("HERALD_DATABASE_URL", "The PostgreSQL database. Query parameters such as "
         "`sslmode` or `search_path` are passed on to the server."),
        ("HERALD_PREFIX", "Prefix of every exchange and queue name. Lets tests, tenants or "
         "environments share one broker."),
        ("HERALD_DB_POOL_SIZE", "Largest number of database connections one process opens."),
    ]),
    ("HTTP listeners", [
        ("HERALD_HTTP_HOST", "Address the public listener binds to (the providers' "
         "webhooks). Containers set `0.0.0.0`."),
        ("HERALD_HTTP_PORT", "Port of the public listener: `/webhooks/*`, `/healthz` and "
         "`/readyz` only. 0 picks a free port."),
        ("HERALD_ADMIN_HOST", "Address the admin listener binds to. Keep it private: it "
         "serves the admin API, the console and the metrics."),
        ("HERALD_ADMIN_PORT", "Port of the admin listener: `/admin/*`, `/console/`, "
         "`/metrics`, `/healthz` and `/readyz`. 0 picks a free port."),
        ("HERALD_PUBLIC_URL", "Herald's base URL as the providers reach it. Twilio is told "
         "to post status callbacks to this URL + `/webhooks/twilio`, and signs that full "
         "URL, so a wrong value makes every Twilio callback fail its signature check."),
        ("HERALD_ADMIN_TOKEN", "Tokens of the admin API and the console, comma-separated, "
         "each `label:role:token` with role `viewer` (reads, recipients masked) or "
         "`operator` (also replays, edits, rejects, reveals); `label:token` and a bare "
         "token are operators. The audit log records the label. A placeholder or a token "
         "under 16 characters stops start-up. Unset: neither is served."),
    ]),
    ("Delivery and retries", [
        ("HERALD_PREFETCH", "Messages a channel's main lane holds unacknowledged at first "
         "(the bulk lane half as many); the least it ever holds. A lane raises it while "
         "more in flight raises its throughput (slow providers), up to HERALD_PREFETCH_MAX; "
         "a channel with a configured rate keeps it."),
        ("HERALD_PREFETCH_MAX", "The most messages a main lane may hold in flight when it "
         "finds that more help (the bulk lane half as many; see "
         "consumer/delivery/inflight.py). Worst-case memory is that many request bodies; "
         "the herald_prefetch gauge shows what each lane runs with."),
        ("HERALD_SEND_TIMEOUT_S", "Deadline of one provider call, in seconds. A consumer "
         "that dies mid-send is presumed gone after this plus 5 s."),
        ("HERALD_MAX_ATTEMPTS", "Default number of attempts, counting the first, before a "
         "message is parked. A send request's `retry` or its campaign can override it."),
        ("HERALD_BASE_DELAY_S", "Default delay after the first failed attempt, in seconds; "
         "it doubles after each further failure."),
        ("HERALD_MAX_DELAY_S", "Default upper bound of the retry delay, in seconds."),
        ("HERALD_RETRY_MODE", "Default retry mode: `auto` retries retryable failures, "
         "`manual` parks on the first failure for a person to replay."),
        ("HERALD_RETRY_JITTER", "Random share of the delay added to each retry delay (0.1: "
         "up to 10 % more). Jitter never shortens a delay."),
        ("HERALD_RETRY_RULES", "`builtin`: the shipped retry rules per error code apply "
         "(docs/retry-rules.md), under the operator's, campaigns' and messages' own; `off`: "
         "only those, and the settings above for everything else."),
        ("HERALD_CAMPAIGN_QUIET_S", "How long, in seconds, a campaign none of whose "
         "messages is queued, sending or retrying must see nothing happen in the pipeline "
         "before it is judged complete (messages published but not yet consumed have no "
         "row; this waits for them)."),
        ("HERALD_DELIVERY_LIMIT", "Deliveries of one message the broker allows before it "
         "dead-letters it to the parking queue: the guard against a message that crashes "
         "every consumer. Part of the queues' arguments: changing it needs the send queues "
         "declared again."),
        ("HERALD_MAX_BODY_BYTES", "Largest send request accepted, in bytes (the message "
         "as published). A larger one is parked as `invalid_payload` without being parsed; "
         "the parking queue keeps all of it, the parking lot's index in PostgreSQL keeps "
         "this many bytes of it. Requests are stored whole with their message, so this "
         "also bounds a row."),
    ]),
    ("Flow control", [
        ("HERALD_HTTP_RATE", "Sends per second allowed on the `http` channel, per process "
         "(0: no limit). With N replicas, set each to the limit divided by N."),
        ("HERALD_SMS_RATE", "The same for `sms` (Twilio)."),
        ("HERALD_WHATSAPP_RATE", "The same for `whatsapp`."),
        ("HERALD_MESSENGER_RATE", "The same for `messenger`."),
        ("HERALD_OUTAGE_WINDOW", "First attempts a failure domain's rate path judges: it "
         "opens when 80 % of the last this-many (made within 30 s) failed like an outage."),
        ("HERALD_OUTAGE_CONSECUTIVE", "First-attempt failures in a row that open a failure "
         "domain while its traffic is too low for the rate path."),
        ("HERALD_PAUSE_BASE_S", "First cool-down of an open failure domain, in seconds, "
         "before it probes with one message; it doubles while probes fail, and starts "
         "again from here after a calm period."),
        ("HERALD_PAUSE_MAX_S", "Longest cool-down of an open failure domain, in seconds."),
    ]),
    ("The `http` channel", [
        ("HERALD_HTTP_ALLOW_NETWORKS", "Comma-separated CIDRs the `http` channel may reach "
         "although they are loopback, private, link-local or otherwise not public (refused "
         "by default, as `destination_not_allowed`)."),
        ("HERALD_HTTP_SIGNING_SECRETS", "Secrets (16 characters or more) the `http` "
         "channel signs its POSTs with (`X-Herald-Signature`), newest first; several at "
         "once while a receiver rotates. Unset: no signature header."),
    ]),
    ("Twilio (channel `sms`)", [
        ("HERALD_TWILIO_ACCOUNT_SID", "Account SID. With the auth token and a sender, "
         "turns the `sms` channel on."),
        ("HERALD_TWILIO_AUTH_TOKEN", "Auth token: authenticates the API calls and verifies "
         "the signatures of Twilio's status callbacks."),
        ("HERALD_TWILIO_FROM", "Sender phone number (E.164)."),
        ("HERALD_TWILIO_MESSAGING_SERVICE_SID", "Messaging service to send through, "
         "instead of a sender number."),
        ("HERALD_TWILIO_BASE_URL", "Twilio's API; changed only to point at the sandbox."),
    ]),
    ("Meta: WhatsApp and Messenger", [
        ("HERALD_WHATSAPP_TOKEN", "WhatsApp Cloud API access token. With the phone number "
         "id, turns the `whatsapp` channel on."),
        ("HERALD_WHATSAPP_PHONE_NUMBER_ID", "The WhatsApp business phone number id that "
         "sends."),
        ("HERALD_MESSENGER_PAGE_TOKEN", "Page access token; turns the `messenger` channel "
         "on."),
        ("HERALD_META_BASE_URL", "The Graph API; changed only to point at the sandbox."),
        ("HERALD_META_API_VERSION", "Graph API version in request paths."),
        ("HERALD_META_APP_SECRET", "App secret that verifies `X-Hub-Signature-256` on "
         "WhatsApp and Messenger webhooks."),
        ("HERALD_WEBHOOK_VERIFY_TOKEN", "Token Meta presents when it verifies the webhook "
         "URL (the GET challenge)."),
    ]),
    ("Operations", [
        ("HERALD_LOG_LEVEL", "Least severe log level written (JSON lines on stderr). A "
         "success is a debug line (delivery.sent); at info, delivery.sent_summary counts "
         "them per channel every 10 s. Failures, retries and parking are info or above."),
        ("HERALD_SANDBOX_PORT", "Port of `herald sandbox` (the fake providers) and where "
         "`herald demo` looks for it."),
    ]),
]


def meanings() -> dict[str, str]:
    """Variable → meaning, over all sections."""
    return {var: text for _, rows in SECTIONS for var, text in rows}


def _default(f: Field[Any]) -> str:
    value = f.default
    if value is MISSING or value is None:
        return "unset"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md."""
    by_var = {f.metadata["env"]: f for f in fields(Settings)}
    described = meanings()
    missing = sorted(set(by_var) - set(described))
    unknown = sorted(set(described) - set(by_var))
    if missing or unknown:
        raise ValueError(f"settings without a meaning: {missing}; meanings of no setting: "
                         f"{unknown} (consumer/settings_reference.py)")
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m consumer.settings_reference > docs/configuration.md`"
        " from consumer/settings.py; edit those, not this page. -->",
        "",
        "Herald reads its configuration once, at start-up, from environment variables.",
        "An empty variable means its default. A value that does not parse stops start-up",
        "with one line naming the variable (secrets are never echoed). A `HERALD_*`",
        "variable that no setting reads is reported at start-up with one warning line",
        "naming the closest setting, so a typo such as `HERALD_PREFECH` does not go",
        "unnoticed.",
        "",
    ]
    for section, rows in SECTIONS:
        lines += [f"## {section}", "", "| variable | default | accepts | meaning |",
                  "| --- | --- | --- | --- |"]
        for var, meaning in rows:
            f = by_var[var]
            accepts = (f.metadata["parse"].__doc__ or "").strip()
            lines.append(f"| `{var}` | {_cell(_default(f))} | {_cell(accepts)} "
                         f"| {_cell(meaning)} |")
        lines.append("")
    prefixes = ", ".join(f"`{p}*`" for p in TOOLING_PREFIXES)
    variables = ", ".join(f"`{v}`" for v in sorted(TOOLING_VARIABLES))
    lines += [
        "## Variables of the development tooling",
        "",
        f"Apart from the settings above, {prefixes} and {variables} belong to the",
        "scripts in `deploy/local/` and to `make run` (ports and timeouts of the local",
        "services, skipping the demo campaign). Herald does not read them and does not",
        "warn about them; each script's header says what it reads.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
