"""Retry rules per error code (consumer.delivery.rules): which rule applies, which
budget a failure is charged to, and the decision they give."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.delivery.backoff import RetryPolicy
from consumer.delivery.decision import Park, Pause, Retry, decide
from consumer.delivery.rules import (
    BUILTIN_RULES,
    CEILING,
    RetryFields,
    RetryPlan,
    RetryRule,
    RuleBook,
    render_page,
    render_table,
)
from consumer.errors import DeliveryError, ErrorType
from consumer.settings import Settings
from consumer.status.events import reported_error
from consumer.store import Campaign, retry_plan
from schemas import RetrySpec

REPO = Path(__file__).resolve().parents[2]
SETTINGS = RetryFields("settings", 5, 30, 3600)


def plan(**layers: object) -> RetryPlan:
    values: dict[str, object] = {"channel": "sms", "settings": SETTINGS, "jitter": 0.0}
    values.update(layers)
    return RetryPlan(**values)  # type: ignore[arg-type]


def error(error_type: ErrorType = ErrorType.PROVIDER_ERROR, code: str | None = None,
          **kw: object) -> DeliveryError:
    return DeliveryError(error_type, "boom", code=code, **kw)  # type: ignore[arg-type]


def source_of(p: RetryPlan, error_type: str, code: str | None) -> str:
    return p.resolve(error_type, code).charged_to.name


# -- which rule applies -------------------------------------------------------------------

def test_most_specific_wins_message_campaign_code_error_type_channel_default() -> None:
    channel_default = RetryRule(2, channel="sms", source="operator", rule_id=1)
    by_type = RetryRule(3, error_type="provider_error", source="operator", rule_id=2)
    by_code = RetryRule(4, channel="sms", code="30003", source="operator", rule_id=3)
    campaign_rule = RetryRule(6, code="30003", source="campaign", rule_id=4)
    message_rule = RetryRule(7, code="30003", source="message")
    full = plan(general_rules=(channel_default, by_type, by_code),
                campaign_rules=(campaign_rule,), message_rules=(message_rule,),
                campaign=RetryFields("campaign", 8), message=RetryFields("message", 9))
    assert source_of(full, "provider_error", "30003") == "message rule code 30003"
    # Without the message's rule its fields come next, then the campaign's rule ...
    assert source_of(plan(general_rules=(channel_default, by_type, by_code),
                          campaign_rules=(campaign_rule,), campaign=RetryFields("campaign", 8),
                          message=RetryFields("message", 9)),
                     "provider_error", "30003") == "message retry fields"
    assert source_of(plan(general_rules=(channel_default, by_type, by_code),
                          campaign_rules=(campaign_rule,), campaign=RetryFields("campaign", 8)),
                     "provider_error", "30003") == "campaign rule #4 code 30003"
    assert source_of(plan(general_rules=(channel_default, by_type, by_code),
                          campaign=RetryFields("campaign", 8)),
                     "provider_error", "30003") == "campaign retry fields"
    rest = plan(general_rules=(channel_default, by_type, by_code))
    assert source_of(rest, "provider_error", "30003") == "operator rule #3 sms code 30003"
    assert source_of(rest, "provider_error", "30008") == "operator rule #2 provider_error"
    assert source_of(rest, "network", None) == "operator rule #1 sms"
    # A rule of another channel does not apply; then the settings do.
    other = plan(channel="whatsapp", general_rules=(channel_default, by_code))
    assert source_of(other, "network", None) == "settings retry fields"


def test_the_operators_rule_wins_over_the_shipped_one_for_the_same_failure() -> None:
    mine = RetryRule(2, 5, 5, channel="sms", code="30003", source="operator", rule_id=9)
    p = plan(general_rules=(mine, *BUILTIN_RULES))
    budget = p.resolve("provider_error", "30003")
    assert budget.charged_to == mine
    assert (budget.policy.max_attempts, budget.policy.base_delay_s) == (2, 5)
    # A shipped code rule is more specific than an operator's error-type rule.
    by_type = RetryRule(7, error_type="provider_error", source="operator", rule_id=10)
    shipped = plan(general_rules=(by_type, *BUILTIN_RULES)).resolve("provider_error", "30003")
    assert shipped.charged_to.name == "builtin rule sms code 30003"


def test_each_number_comes_from_the_first_entry_that_sets_it() -> None:
    p = plan(general_rules=BUILTIN_RULES, campaign=RetryFields("campaign", max_attempts=4))
    budget = p.resolve("provider_error", "30003")
    # The campaign's budget, the shipped rule's delays.
    assert budget.charged_to == RetryFields("campaign", 4)
    assert (budget.policy.max_attempts, budget.policy.base_delay_s,
            budget.policy.max_delay_s) == (4, 3600, 3600)
    assert budget.label == "campaign retry fields: 4 attempts, delay 3600-3600 s"
    # A first delay above the longest one lifts the longest.
    low_cap = plan(settings=RetryFields("settings", 5, 30, 8),
                   general_rules=(RetryRule(3, 100, channel="sms"),))
    assert low_cap.resolve("network", None).policy.max_delay_s == 100


def test_retry_plan_builds_the_layers_from_message_campaign_database_and_settings() -> None:
    settings = Settings(retry_jitter=0.0)
    spec = RetrySpec.model_validate({"max_attempts": 4, "rules": [
        {"error_type": "rate_limit", "max_attempts": 20, "base_delay_s": 2}]})
    campaign = Campaign("spring", 3, None, None, "auto")
    book = RuleBook(general=(RetryRule(2, channel="sms", source="operator", rule_id=1),),
                    campaigns={"spring": (RetryRule(6, code="30003", source="campaign",
                                                    rule_id=2),)})
    p = retry_plan(settings, channel="sms", spec=spec, campaign_id="spring",
                   campaign=campaign, book=book)
    assert source_of(p, "rate_limit", "20429") == "message rule rate_limit"
    assert source_of(p, "provider_error", "30003") == "message retry fields"
    assert p.general_rules[:1] == book.general and BUILTIN_RULES[0] in p.general_rules
    # Campaign rules apply by the message's campaign id, with or without a campaign row.
    bare = retry_plan(settings, channel="sms", spec=None, campaign_id="spring", campaign=None,
                      book=book)
    assert source_of(bare, "provider_error", "30003") == "campaign rule #2 code 30003"
    off = retry_plan(settings.replace(retry_rules="off"), channel="sms", spec=None,
                     campaign_id=None, campaign=None, book=RuleBook())
    assert not off.has_rules
    assert off.resolve("rate_limit", "20429").policy == RetryPolicy(5, 30, 3600, jitter=0.0)
    manual = retry_plan(settings, channel="sms", spec=None, campaign_id="spring",
                        campaign=Campaign("spring", None, None, None, "manual"), book=book)
    assert manual.mode == "manual"


# -- budgets ------------------------------------------------------------------------------

RATE = RetryRule(10, 1, 60, error_type="rate_limit")


def test_a_storm_of_429s_spends_its_own_budget_and_leaves_the_catch_all_whole() -> None:
    p = plan(settings=RetryFields("settings", 3, 30, 3600), general_rules=(RATE,))
    four_429s = {("rate_limit", "429"): 4}
    # Attempt 5 fails with a 503: the catch-all's first failure (the 429s are not its).
    budget, used = p.charge("provider_error", "503", attempt=5, base=0, history=four_429s)
    assert (budget.charged_to, used) == (p.settings, 1)
    both = {("rate_limit", "429"): 4, ("provider_error", "503"): 1}
    assert p.charge("provider_error", "503", attempt=6, base=0, history=both)[1] == 2
    assert p.charge("rate_limit", "429", attempt=7, base=0, history=both)[1] == 5
    # The decision follows: the third 503 parks (3 attempts), the 429s go on.
    assert decide(error(code="503"), attempt=7, base=0, plan=p,
                  history=both | {("provider_error", "503"): 2}) == Park()
    retry = decide(error(ErrorType.RATE_LIMIT, "429"), attempt=7, base=0, plan=p, history=both)
    assert retry == Retry(16, 8) and retry.used == 5
    assert retry.rule == "builtin rule rate_limit: 10 attempts, delay 1-60 s"


def test_the_catch_all_also_counts_attempts_no_rule_took() -> None:
    """An abandoned attempt (its consumer died) has no error: the catch-all counts it,
    as the attempt number did before rules."""
    p = plan(settings=RetryFields("settings", 3, 30, 3600), general_rules=(RATE,))
    # Attempts 1 (abandoned) and 2 (a 503) before this one, attempt 3.
    assert p.charge("provider_error", "503", attempt=3, base=0,
                    history={("provider_error", "503"): 1})[1] == 3
    assert isinstance(decide(error(code="503"), attempt=3, base=0, plan=p,
                             history={("provider_error", "503"): 1}), Park)


def test_budgets_count_from_the_attempt_base() -> None:
    """After a replay with a fresh budget (base 3) the history holds what failed since."""
    p = plan(general_rules=BUILTIN_RULES)
    first = decide(reported_error("twilio", "30003", None), attempt=4, base=3, plan=p,
                   history={})
    assert first == Retry(3600, 5) and first.used == 1
    second = decide(reported_error("twilio", "30003", None), attempt=5, base=3, plan=p,
                    history={("provider_error", "30003"): 1})
    assert second == Retry(3600, 6)
    third = decide(reported_error("twilio", "30003", None), attempt=6, base=3, plan=p,
                   history={("provider_error", "30003"): 2})
    assert third == Park() and third.reason == "budget"
    assert third.rule == "builtin rule sms code 30003: 3 attempts, delay 3600-3600 s"


def test_a_rule_never_makes_a_permanent_error_retryable() -> None:
    opted_out = reported_error("twilio", "21610", None)
    p = plan(message_rules=(RetryRule(5, code="21610", source="message"),))
    decision = decide(opted_out, attempt=1, base=0, plan=p)
    assert decision == Park() and decision.reason == "permanent" and decision.rule is None


def test_provider_wide_errors_and_open_domains_pause_whatever_the_rules() -> None:
    p = plan(general_rules=BUILTIN_RULES)
    suspended = reported_error("twilio", "30002", None)
    assert decide(suspended, attempt=2, base=0, plan=p, pause_s=5) == Pause(5, 2)
    assert decide(error(code="30003"), attempt=2, base=0, plan=p, pause_s=7) == Pause(7, 2)


def test_manual_mode_parks_and_the_ceiling_holds_across_budgets() -> None:
    assert decide(error(), attempt=1, base=0, plan=plan(mode="manual")).reason == "manual"
    generous = plan(settings=RetryFields("settings", 100, 1, 1),
                    general_rules=(RetryRule(100, 1, 1, error_type="rate_limit"),))
    history = {("rate_limit", "429"): 60, ("provider_error", "503"): CEILING - 61}
    decision = decide(error(ErrorType.RATE_LIMIT, "429"), attempt=CEILING, base=0,
                      plan=generous, history=history)
    assert decision == Park() and decision.reason == "ceiling"


def test_without_rules_the_decision_is_the_one_of_old() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=60, jitter=0.0)
    for attempt, base in ((1, 0), (2, 0), (3, 0), (4, 3), (6, 3)):
        assert decide(error(), attempt=attempt, base=base, policy=policy) == decide(
            error(), attempt=attempt, base=base, plan=RetryPlan.of(policy))
    assert not RetryPlan.of(policy).needs_history(attempt=5, base=0)


def test_history_is_only_needed_after_a_failure_since_the_base() -> None:
    p = plan(general_rules=BUILTIN_RULES)
    assert not p.needs_history(attempt=1, base=0)
    assert not p.needs_history(attempt=4, base=3)
    assert p.needs_history(attempt=2, base=0)
    assert not plan(general_rules=BUILTIN_RULES, mode="manual").needs_history(attempt=2,
                                                                             base=0)


@pytest.mark.parametrize(("channel", "code", "error_type", "attempts", "base"), [
    ("sms", "30003", "provider_error", 3, 3600),
    ("sms", "30008", "provider_error", 2, 300),
    ("sms", "20429", "rate_limit", 10, 1),
    ("sms", "30001", "rate_limit", 4, 60),
    ("whatsapp", "131000", "provider_error", 2, 60),
    ("whatsapp", "130429", "rate_limit", 10, 2),
    ("messenger", "613", "rate_limit", 6, 60),
    ("http", "429", "rate_limit", 10, 1),
    ("http", None, "network", 8, 5),
])
def test_the_shipped_rules(channel: str, code: str | None, error_type: str, attempts: int,
                           base: float) -> None:
    policy = plan(channel=channel, general_rules=BUILTIN_RULES).resolve(error_type, code).policy
    assert (policy.max_attempts, policy.base_delay_s) == (attempts, base)


def test_codes_without_a_rule_follow_the_settings() -> None:
    p = plan(channel="http", general_rules=BUILTIN_RULES)
    assert p.resolve("provider_error", "503").charged_to == p.settings
    assert plan(channel="messenger", general_rules=BUILTIN_RULES).resolve(
        "provider_error", "2").charged_to == SETTINGS


def test_retry_after_is_still_a_floor() -> None:
    p = plan(channel="http", general_rules=BUILTIN_RULES)
    decision = decide(error(ErrorType.RATE_LIMIT, "429", retry_after=7.5), attempt=1, base=0,
                      plan=p)
    assert decision == Retry(8, 2)


# -- the documented table -------------------------------------------------------------------

def test_docs_page_is_the_generated_one() -> None:
    assert (REPO / "docs" / "retry-rules.md").read_text() == render_page(), (
        "docs/retry-rules.md is stale: python -m consumer.delivery.rules > docs/retry-rules.md")


def test_the_readme_shows_the_shipped_table() -> None:
    assert render_table() in (REPO / "README.md").read_text()


def test_every_shipped_rule_names_a_retryable_failure_and_says_why() -> None:
    from consumer.providers.messenger import messenger_rule
    from consumer.providers.twilio import twilio_rule
    from consumer.providers.whatsapp import whatsapp_rule

    lookups = {"sms": twilio_rule, "whatsapp": lambda c: whatsapp_rule(int(c)),
               "messenger": lambda c: messenger_rule(int(c))}
    for rule in BUILTIN_RULES:
        assert rule.note and 1 <= rule.max_attempts <= 100
        if rule.code is not None:
            assert rule.channel is not None
            classified = lookups[rule.channel](rule.code)
            assert classified is not None and classified.retryable, rule
            assert not classified.provider_wide, rule


def test_a_messages_rule_with_an_odd_code_gives_a_storable_one_line_label() -> None:
    odd = plan(message_rules=(RetryRule(3, code="x\x00\ny", source="message"),))
    label = odd.resolve("provider_error", "x\x00\ny").label
    assert "\x00" not in label and "\n" not in label
    assert label.startswith("message rule code x")


def _legacy_behaviour(code: str) -> tuple[int | str, int | None]:
    """What Herald does, with the shipped rules and default settings, for a Twilio code
    of the old SMS table: (retries before it parks, or "paused"; the first delay)."""
    from consumer.providers.twilio import classify_twilio

    p = retry_plan(Settings(retry_jitter=0.0, max_attempts=5), channel="sms", spec=None,
                   campaign_id=None, campaign=None, book=RuleBook())
    if code.startswith("2"):  # an answer to the send itself
        failure = classify_twilio(429 if code == "20429" else 400, {"code": int(code)})
    else:  # 300xx come in status callbacks, after Twilio accepted the message
        failure = reported_error("twilio", code, None)
    history: dict[tuple[str, str | None], int] = {}
    first: int | None = None
    for attempt in range(1, CEILING + 1):
        decision = decide(failure, attempt=attempt, base=0, plan=p, history=history,
                          pause_s=1.0 if failure.provider_wide else None)
        if isinstance(decision, Pause):
            return "paused", None
        if isinstance(decision, Park):
            return attempt - 1, first
        assert isinstance(decision, Retry)
        first = decision.delay_s if first is None else first
        key = (failure.error_type.value, failure.code)
        history[key] = history.get(key, 0) + 1
    raise AssertionError("never parked")


# The old table: every code it names, and what Herald does instead.
@pytest.mark.parametrize(("code", "retries", "first_delay_s", "herald_says"), [
    ("30001", 3, 60, "3 retries from 60 s"),
    ("30002", "paused", None, "paused, never charged"),
    ("30003", 2, 3600, "2 retries an hour apart"),
    ("30004", 0, None, "never"),
    ("30006", 0, None, "never"),
    ("30007", 0, None, "never"),
    ("30008", 1, 300, "1 retry after 5 min"),
    ("21211", 0, None, "never"),
    ("21214", 0, None, "never"),
    ("21610", 0, None, "never"),
    # Not named by the old table ("everything else"), but in Herald's.
    ("30005", 0, None, "never"),
    ("21614", 0, None, "never"),
    ("20429", 9, 1, "9 retries from 1 s"),
])
def test_the_legacy_table_says_what_herald_does(code: str, retries: int | str,
                                                first_delay_s: int | None,
                                                herald_says: str) -> None:
    from consumer.delivery.rules import LEGACY

    assert _legacy_behaviour(code) == (retries, first_delay_s)
    (row,) = [r for r in LEGACY if r[0].split()[0] == code]
    assert row[2].startswith(herald_says), row
    line = next(li for li in (REPO / "docs" / "retry-rules.md").read_text().splitlines()
                if li.startswith(f"| {code} "))
    assert f"| {row[2]} |" in line
