"""Retry rules: how many attempts, and how far apart, per kind of failure. Pure.

A failure is of a *kind*: its channel, ``error_type`` and provider code. A
:class:`RetryRule` gives one kind (or a family of kinds) its own budget of
attempts and, optionally, its own delays: an unreachable handset (Twilio
30003) deserves two more tries an hour apart, a 429 many quick ones within
``Retry-After``.

Where the numbers come from, most specific first (:meth:`RetryPlan.candidates`):

1. the send request's own ``retry.rules`` (code rules before error-type rules),
   then its flat ``retry`` fields (``max_attempts``, ``base_delay_s``,
   ``max_delay_s``);
2. the campaign's rules (``herald retry-rules set --campaign``), then the
   campaign's flat fields (``herald campaign create``);
3. the operator's rules and the shipped ones (:data:`BUILTIN_RULES`), code
   rules before error-type rules before channel defaults; at the same
   specificity the operator's rule wins over the shipped one;
4. the settings (``HERALD_MAX_ATTEMPTS``, ``HERALD_BASE_DELAY_S``,
   ``HERALD_MAX_DELAY_S``).

Each of the three numbers is taken from the first entry that sets it, so a
campaign that sets only ``max_attempts`` keeps the shipped delays of each
kind. Flat fields match every kind: a message or campaign that sets
``max_attempts`` decides the budget of every failure that none of *its own*
rules matches, exactly as before rules existed.

**Budgets.** Every failed attempt is charged to exactly one budget: that of
the entry that supplied its ``max_attempts``. The entry whose budget a
failure is charged to is found again for each earlier failure, so a budget
counts, since the attempt base (the last replay with a fresh budget), the
failed attempts (``delivery_attempts`` with outcome ``retrying`` or
``failed``) of the kinds it decides, plus the one in hand. The flat fields'
budget (the *catch-all*) is charged with every attempt since the base that
no rule's budget was charged with, so it also counts attempts a dying
consumer abandoned, and without rules it is exactly ``attempt - base``, the
count of old. A failure is retried while its budget's count is below that
budget's ``max_attempts``, whatever the other budgets say; a 429 storm uses
the rate-limit budget and leaves the catch-all untouched. Attempts since the
base never exceed :data:`CEILING` in all. A rule never makes a permanent
error retryable (an opted-out recipient is never tried again), and
provider-wide errors and open failure domains are paused, never charged.

The delay before the next attempt is ``min(max, base * 2**(n-1))`` where
``n`` is the count of the budget charged (its first failure waits ``base``),
never less than the provider's ``Retry-After``.

``python -m consumer.delivery.rules`` prints docs/retry-rules.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from consumer.delivery.backoff import RetryPolicy
from consumer.text import printable, storable
from schemas import RetryMode

# The error types a rule may name: the others are never retried (or are
# paused, never charged), so a rule for them would have no effect.
RETRYABLE_TYPES = ("rate_limit", "network", "provider_error")
# Attempts since the attempt base, all budgets together, never exceed this.
CEILING = 100
SOURCES = ("message", "campaign", "operator", "builtin", "settings")

# (error_type, code) of a failed attempt -> how many attempts since the base failed so.
History = Mapping[tuple[str, str | None], int]


@dataclass(frozen=True)
class RetryRule:
    """The budget (and optionally the delays) of one kind of failure.

    ``channel``, ``error_type`` and ``code`` select the failures it is for
    (None: any); ``max_attempts`` is how many attempts may end in such a
    failure: the one that reaches it is parked (3 means two retries).
    """

    max_attempts: int
    base_delay_s: float | None = None
    max_delay_s: float | None = None
    channel: str | None = None
    error_type: str | None = None
    code: str | None = None
    source: str = "builtin"
    note: str = field(default="", compare=False)
    rule_id: int | None = None

    def matches(self, channel: str, error_type: str, code: str | None) -> bool:
        return ((self.channel is None or self.channel == channel)
                and (self.error_type is None or self.error_type == error_type)
                and (self.code is None or self.code == code))

    @property
    def specificity(self) -> tuple[bool, bool, bool]:
        """A code before an error type before a channel alone."""
        return (self.code is not None, self.error_type is not None, self.channel is not None)

    @property
    def selector(self) -> str:
        """What the rule is for, in words: ``sms code 30003``, ``rate_limit``."""
        parts = [self.channel or "", self.error_type or "",
                 f"code {self.code}" if self.code is not None else ""]
        return " ".join(p for p in parts if p) or "every failure"

    @property
    def name(self) -> str:
        ref = f" #{self.rule_id}" if self.rule_id is not None else ""
        return f"{self.source} rule{ref} {self.selector}"


@dataclass(frozen=True)
class RetryFields:
    """The flat retry fields of a message, a campaign or the settings (None: not set)."""

    source: str
    max_attempts: int | None = None
    base_delay_s: float | None = None
    max_delay_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.source} retry fields"


Entry = RetryRule | RetryFields


@dataclass(frozen=True)
class Budget:
    """What applies to one kind of failure: the policy in force and the entry its
    attempts are charged to."""

    policy: RetryPolicy
    charged_to: Entry

    @property
    def label(self) -> str:
        """The rule as recorded with each attempt it decided and shown by ``herald stats``
        (one line PostgreSQL can store: a message's rule names a code of its choosing)."""
        p = self.policy
        return storable(printable(f"{self.charged_to.name}: {p.max_attempts} attempts, delay"
                                  f" {p.base_delay_s:g}-{p.max_delay_s:g} s"), 300)


@dataclass(frozen=True)
class RetryPlan:
    """Everything that decides one message's retries (see the module's docstring)."""

    channel: str
    settings: RetryFields
    mode: RetryMode = "auto"
    jitter: float = 0.1
    message: RetryFields = RetryFields("message")
    message_rules: tuple[RetryRule, ...] = ()
    campaign: RetryFields = RetryFields("campaign")
    campaign_rules: tuple[RetryRule, ...] = ()
    general_rules: tuple[RetryRule, ...] = ()

    @classmethod
    def of(cls, policy: RetryPolicy, channel: str = "") -> RetryPlan:
        """A plan without rules: ``policy`` for every failure."""
        return cls(channel, RetryFields("settings", policy.max_attempts, policy.base_delay_s,
                                        policy.max_delay_s), policy.mode, policy.jitter)

    @property
    def has_rules(self) -> bool:
        return bool(self.message_rules or self.campaign_rules or self.general_rules)

    def candidates(self, error_type: str, code: str | None) -> list[Entry]:
        """The entries that apply to a failure, most specific first."""

        def ranked(rules: Iterable[RetryRule]) -> list[RetryRule]:
            found = [r for r in rules if r.matches(self.channel, error_type, code)]
            # Stable: among equals, the order given (operator rules come first).
            return sorted(found, key=lambda r: r.specificity, reverse=True)

        return [*ranked(self.message_rules), self.message, *ranked(self.campaign_rules),
                self.campaign, *ranked(self.general_rules), self.settings]

    def resolve(self, error_type: str, code: str | None) -> Budget:
        """The policy for a failure of this kind, and the budget it is charged to."""
        entries = self.candidates(error_type, code)
        charged_to = next(e for e in entries if e.max_attempts is not None)
        base = next(e.base_delay_s for e in entries if e.base_delay_s is not None)
        cap = next(e.max_delay_s for e in entries if e.max_delay_s is not None)
        assert charged_to.max_attempts is not None
        return Budget(RetryPolicy(max_attempts=charged_to.max_attempts, base_delay_s=base,
                                  max_delay_s=max(cap, base), mode=self.mode,
                                  jitter=self.jitter), charged_to)

    @property
    def catch_all(self) -> RetryFields:
        """The flat fields that decide the budget of failures no rule takes."""
        return next(f for f in (self.message, self.campaign, self.settings)
                    if f.max_attempts is not None)

    def charge(self, error_type: str, code: str | None, *, attempt: int, base: int,
               history: History | None = None) -> tuple[Budget, int]:
        """The budget a failure of attempt ``attempt`` is charged to, and its count
        with this failure (at least 1). ``history``: the earlier failed attempts since
        the base, by kind (not this one)."""
        budget = self.resolve(error_type, code)
        past = history or {}
        catch_all = self.catch_all
        if budget.charged_to == catch_all:
            elsewhere = sum(n for (t, c), n in past.items()
                            if self.resolve(t, c).charged_to != catch_all)
            used = attempt - base - elsewhere
        else:
            used = 1 + sum(n for (t, c), n in past.items()
                           if self.resolve(t, c).charged_to == budget.charged_to)
        return budget, max(1, used)

    def needs_history(self, *, attempt: int, base: int) -> bool:
        """Whether :meth:`charge` needs the earlier failures: not for the first
        attempt since the base (there are none), not without rules (the catch-all
        counts ``attempt - base``)."""
        return self.has_rules and attempt - base > 1 and self.mode == "auto"


@dataclass(frozen=True)
class RuleBook:
    """The rules kept in the database: the operator's (for every message) and each
    campaign's."""

    general: tuple[RetryRule, ...] = ()
    campaigns: Mapping[str, tuple[RetryRule, ...]] = field(default_factory=dict)

    def for_campaign(self, campaign_id: str | None) -> tuple[RetryRule, ...]:
        return self.campaigns.get(campaign_id, ()) if campaign_id is not None else ()


def _twilio(code: str, max_attempts: int, base: float, cap: float, note: str) -> RetryRule:
    return RetryRule(max_attempts, base, cap, channel="sms", code=code, note=note)


def _meta(channel: str, code: str, max_attempts: int, base: float, cap: float,
          note: str) -> RetryRule:
    return RetryRule(max_attempts, base, cap, channel=channel, code=code, note=note)


# The shipped rules (HERALD_RETRY_RULES=builtin). Codes the table does not
# name follow their error type's rule, else the settings. docs/retry-rules.md
# says where these differ from the table of the SMS system Herald replaces.
BUILTIN_RULES: tuple[RetryRule, ...] = (
    _twilio("20429", 10, 1, 60, "Too many concurrent requests: never processed, always "
            "safe to repeat; many quick tries, never sooner than Retry-After."),
    _twilio("14107", 4, 30, 120, "Loop protection on one number pair: 30 s at least "
            "between tries."),
    _twilio("30001", 4, 60, 900, "Queue overflow: the account sent faster than its numbers "
            "drain; back off for minutes."),
    _twilio("30003", 3, 3600, 3600, "Handset unreachable (off, out of coverage): two more "
            "tries an hour apart."),
    _twilio("30008", 2, 300, 300, "Unknown error: one more try after 5 minutes, no more."),
    _meta("whatsapp", "130429", 10, 2, 60, "Throughput limit: many quick tries."),
    _meta("whatsapp", "131056", 5, 10, 120, "Pair rate limit (one recipient too fast): "
          "tries spread over minutes."),
    _meta("whatsapp", "131048", 3, 600, 3600, "Spam rate limit (quality): slowly, twice "
          "more."),
    _meta("whatsapp", "4", 6, 60, 3600, "App call rate limit: it resets within the hour."),
    _meta("whatsapp", "80007", 6, 60, 3600, "Account call rate limit: it resets within the "
          "hour."),
    _meta("whatsapp", "131000", 2, 60, 60, "Unknown error: one more try."),
    _meta("messenger", "4", 6, 60, 3600, "App call rate limit: it resets within the hour."),
    _meta("messenger", "613", 6, 60, 3600, "Call rate limit: it resets within the hour."),
    RetryRule(8, 5, 600, channel="http", error_type="network", note="Connection refused, "
              "reset or cut: a webhook receiver being restarted is back within minutes; "
              "quick tries first, up to 10 minutes apart."),
    RetryRule(10, 1, 60, error_type="rate_limit", note="Any other rate limit (an HTTP 429): "
              "many quick tries, never sooner than Retry-After."),
)


def render_table(rules: Iterable[RetryRule] = BUILTIN_RULES) -> str:
    """The Markdown table of ``rules`` (README and docs/retry-rules.md)."""
    lines = ["| channel | error type | code | attempts | first delay | longest delay | why |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rules:
        lines.append(
            f"| {r.channel or 'any'} | {r.error_type or '-'} | {r.code or '-'} |"
            f" {r.max_attempts} | {_seconds(r.base_delay_s)} | {_seconds(r.max_delay_s)} |"
            f" {r.note} |")
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    if value is None:
        return "settings"
    if value >= 3600 and value % 3600 == 0:
        return f"{value / 3600:g} h"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


# Where Herald differs from the per-code table of the SMS system it replaces
# (code, legacy, Herald, why), each code checked against Twilio's error
# reference; docs/retry-rules.md shows it, and tests/unit/test_retry_rules.py
# checks the Herald column against what the code does.
LEGACY: tuple[tuple[str, str, str, str], ...] = (
    ("30001 queue overflow", "3 retries from 60 s", "3 retries from 60 s, up to 15 min",
     "Agrees on the count. Twilio queues up to 10 hours of a sender's traffic at its "
     "rate (one segment a second for a US long code) and fails the overflow, so the "
     "delay grows: the queue takes minutes to drain."),
    ("30002 account suspended", "3 retries from 120 s",
     "paused, never charged; the channel waits and alerts",
     "Twilio suspended the account (funds, policy) after queueing: true of every "
     "message, so retries would burn every message's budget while a person fixes the "
     "account."),
    ("30003 handset unreachable", "2 retries from 300 s", "2 retries an hour apart",
     "Twilio: the handset is off, out of coverage or roaming, which is temporary but "
     "lasts hours more often than minutes; two tries five minutes apart usually both "
     "fail."),
    ("30004 message blocked", "2 retries from 180 s", "never",
     "Twilio: the destination is blocked from receiving it (a blocklist, a STOP, a "
     "do-not-disturb registry, carrier filtering); the same answer comes back, each try "
     "is billed, and an opted-out person must not be messaged again."),
    ("30005 unknown handset", "2 retries from 120 s (everything else)", "never",
     "The number is unknown or no longer in service at the carrier."),
    ("30006 landline or unreachable carrier", "never", "never",
     "Agrees: Twilio says not to retry an SMS to a landline."),
    ("30007 carrier filtering", "never", "never",
     "Agrees: filtered as spam or against policy; the content needs review, not another "
     "try."),
    ("30008 unknown error", "never", "1 retry after 5 min",
     "Twilio gives no cause and suggests trying again; one capped retry recovers the "
     "transient ones at the cost of one message."),
    ("21211 invalid To", "never", "never",
     "Agrees: the number is malformed (not E.164) and stays so."),
    ("21214 To cannot be reached", "never", "never (as any unknown code)",
     "Agrees. Twilio documents 21214 for outbound calls, not messages, so Herald has no "
     "entry for it: at send time it is an unknown 4xx (invalid_request), reported after "
     "acceptance an unknown code (other), both parked at once."),
    ("21610 opted out (STOP)", "never", "never",
     "Agrees; no rule can make it retryable."),
    ("21614 To not SMS-capable", "2 retries from 120 s (everything else)", "never",
     "A landline stays a landline."),
    ("20429 too many requests", "2 retries from 120 s (everything else)",
     "9 retries from 1 s, up to 1 min, never before Retry-After",
     "The request was not processed; waiting two minutes wastes throughput."),
    ("any other code", "2 retries from 120 s",
     "by HTTP status: 5xx and 429 retried under the settings, other 4xx never; reported "
     "after acceptance: never",
     "An unknown 4xx is a request the provider refuses, and retrying it only costs."),
)


def render_page() -> str:
    """docs/retry-rules.md."""
    legacy = ["| code | the old system | Herald | why |", "| --- | --- | --- | --- |"]
    legacy += [f"| {code} | {old} | {new} | {why} |" for code, old, new, why in LEGACY]
    return f"""# Retry rules

<!-- Generated by `python -m consumer.delivery.rules > docs/retry-rules.md`; do not edit. -->

A retry rule gives one kind of failure (a channel, an `error_type`, a
provider code) its own budget of attempts and its own delays. Herald ships
the rules below (`HERALD_RETRY_RULES=builtin`, the default); operators add
their own and override these with `herald retry-rules set`, per campaign with
`--campaign`, and a send request with its `retry.rules`.

## Which rule applies

Most specific first; each number (attempts, first delay, longest delay) is
taken from the first entry that sets it:

1. the send request's `retry.rules` (a code before an error type), then its
   `retry` fields (`max_attempts`, `base_delay_s`, `max_delay_s`);
2. the campaign's rules, then the campaign's fields (`herald campaign create`);
3. the operator's rules and the shipped ones: a code before an error type before
   a channel default; the operator's rule before the shipped one;
4. the settings: `HERALD_MAX_ATTEMPTS`, `HERALD_BASE_DELAY_S`, `HERALD_MAX_DELAY_S`.

A message or campaign that sets `max_attempts` therefore decides the budget
of every failure that none of *its own* rules matches, as before rules
existed.

## Budgets

Every failed attempt is charged to one budget: that of the rule (or the
fields) that supplied its `max_attempts`. A budget counts the attempts since
the last replay with a fresh budget that failed with a kind it decides, plus
the one in hand; the fields' budget counts every attempt since then that no
rule's budget counted. A failure is retried while its budget's count is below
its `max_attempts` (3 attempts: two retries), whatever the other budgets
say, so a storm of 429s spends the rate-limit budget and leaves the others
whole. All budgets together never exceed {CEILING} attempts since the replay.
The delay doubles from the first delay with each failure of the same budget,
up to the longest delay, and is never shorter than the provider's
`Retry-After`. No rule makes a permanent error retryable, and errors about
the whole channel (an expired token, a suspended account) pause the channel
without charging anything.

`herald stats` shows, per rule, how many attempts it retried and parked;
`herald status ID` names the rule on each failed attempt.

## The shipped rules

{render_table()}
## Where Herald differs from the system it replaces

{chr(10).join(legacy)}
"""


if __name__ == "__main__":
    sys.stdout.write(render_page())
