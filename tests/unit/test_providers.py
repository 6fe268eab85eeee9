"""Provider classification (every row of PROVIDERS.md's tables), request
shapes, secrets kept out of error text, and the sandbox's scripting pieces.
No I/O: the adapters against the sandbox are in tests/integration."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest

from consumer.delivery.backoff import parse_retry_after
from consumer.errors import ConfigError, DeliveryError, ErrorType
from consumer.providers.classify import mask_recipient_in, redact, status_rule
from consumer.providers.messenger import (
    MESSENGER_ERRORS,
    MessengerProvider,
    classify_messenger,
    messenger_payload,
    messenger_rule,
)
from consumer.providers.meta import parse_graph_error
from consumer.providers.twilio import (
    TWILIO_ERRORS,
    TwilioProvider,
    classify_twilio,
    twilio_form,
    twilio_rule,
)
from consumer.providers.whatsapp import (
    WHATSAPP_ERRORS,
    WhatsAppProvider,
    classify_whatsapp,
    whatsapp_payload,
    whatsapp_rule,
)
from consumer.sandbox.callbacks import Callback, CallbackConfig, CallbackSender
from consumer.sandbox.env import SandboxCredentials, sandbox_env
from consumer.sandbox.scripts import ProviderModes, Script, ScriptBook
from consumer.settings import Settings
from schemas import SendRequest
from tests.providers_fixtures import MESSENGER_ROWS, TWILIO_ROWS, WHATSAPP_ROWS, Row


def assert_row(error: DeliveryError, row: Row) -> None:
    assert isinstance(error, DeliveryError)
    assert error.error_type.value == row.error_type
    assert error.retryable is row.retryable
    assert error.provider_wide is row.provider_wide
    assert error.code == str(row.code)


def twilio_error(code: int, status: int) -> dict[str, Any]:
    return {"code": code, "message": f"message of {code}", "status": status,
            "more_info": f"https://www.twilio.com/docs/errors/{code}"}


def graph_error(code: int, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"message": f"(#{code}) message", "type": "OAuthException",
                             "code": code, "fbtrace_id": "AbCdEf"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error | extra}


# -- the tables cover PROVIDERS.md exactly ------------------------------------------------


def test_twilio_table_is_providers_md() -> None:
    assert set(TWILIO_ERRORS) == {row.code for row in TWILIO_ROWS}


def test_whatsapp_table_is_providers_md() -> None:
    assert set(WHATSAPP_ERRORS) == {row.code for row in WHATSAPP_ROWS}


def test_messenger_table_is_providers_md() -> None:
    keys = {row.code if row.subcode is None else (row.code, row.subcode)
            for row in MESSENGER_ROWS}
    assert set(MESSENGER_ERRORS) == keys


# -- every row, whatever HTTP status it comes with ----------------------------------------


@pytest.mark.parametrize("status", [400, 401, 429, 500])
@pytest.mark.parametrize("row", TWILIO_ROWS, ids=Row.id)
def test_twilio_code_decides(row: Row, status: int) -> None:
    assert_row(classify_twilio(status, twilio_error(row.code, status)), row)


@pytest.mark.parametrize("row", TWILIO_ROWS, ids=Row.id)
def test_twilio_rule_by_code_for_callbacks(row: Row) -> None:
    found = twilio_rule(str(row.code))
    assert found is not None
    assert (found.error_type.value, found.retryable, found.provider_wide) == row[2:]


@pytest.mark.parametrize("status", [400, 401, 403, 429, 500])
@pytest.mark.parametrize("row", WHATSAPP_ROWS, ids=Row.id)
def test_whatsapp_code_decides(row: Row, status: int) -> None:
    assert_row(classify_whatsapp(status, graph_error(row.code, 2494055)), row)
    found = whatsapp_rule(row.code)
    assert found is not None and found.error_type.value == row.error_type


@pytest.mark.parametrize("status", [400, 401, 403, 429, 500])
@pytest.mark.parametrize("row", MESSENGER_ROWS, ids=Row.id)
def test_messenger_code_and_subcode_decide(row: Row, status: int) -> None:
    assert_row(classify_messenger(status, graph_error(row.code, row.subcode)), row)
    found = messenger_rule(row.code, row.subcode)
    assert found is not None and found.error_type.value == row.error_type


@pytest.mark.parametrize("code, subcode, expected", [
    (100, 33, "invalid_request"),  # another subcode of 100 is still invalid_request
    (200, 1, "permission"),
    (100, None, "invalid_request"),
])
def test_messenger_other_subcodes_fall_to_the_code(code: int, subcode: int | None,
                                                    expected: str) -> None:
    assert classify_messenger(400, graph_error(code, subcode)).error_type.value == expected


def test_twilio_code_as_text_is_accepted() -> None:
    error = classify_twilio(400, {"code": "21211", "message": "bad To"})
    assert error.error_type.value == "invalid_recipient"
    assert error.code == "21211"


# -- unknown codes fall back on the HTTP status ---------------------------------------------

FALLBACK = [
    (429, "rate_limit", True, False),
    (500, "provider_error", True, False),
    (502, "provider_error", True, False),
    (503, "provider_error", True, False),
    (504, "provider_error", True, False),
    (408, "provider_error", True, False),
    (401, "access_token", False, True),
    (403, "permission", False, False),
    (400, "invalid_request", False, False),
    (404, "invalid_request", False, False),
    (422, "invalid_request", False, False),
    (302, "other", False, False),
]


@pytest.mark.parametrize("status, error_type, retryable, provider_wide", FALLBACK)
@pytest.mark.parametrize("body", ["unknown_code", "no_body", "not_a_dict"])
def test_unknown_codes_fall_back_on_status(status: int, error_type: str, retryable: bool,
                                           provider_wide: bool, body: str) -> None:
    bodies: dict[str, tuple[Any, Any]] = {
        "unknown_code": (twilio_error(29999, status), graph_error(987654)),
        "no_body": (None, None),
        "not_a_dict": (["x"], "text"),
    }
    twilio_body, graph_body = bodies[body]
    for error in (classify_twilio(status, twilio_body), classify_whatsapp(status, graph_body),
                  classify_messenger(status, graph_body)):
        assert (error.error_type.value, error.retryable, error.provider_wide) == (
            error_type, retryable, provider_wide)
    if body == "unknown_code":
        assert classify_twilio(status, twilio_body).code == "29999"
        assert classify_whatsapp(status, graph_body).code == "987654"
    else:
        assert classify_twilio(status, twilio_body).code == f"http_{status}"
        assert classify_messenger(status, graph_body).code == f"http_{status}"


def test_status_rule_matches_the_fallback_table() -> None:
    for status, error_type, retryable, provider_wide in FALLBACK:
        found = status_rule(status)
        assert (found.error_type.value, found.retryable, found.provider_wide) == (
            error_type, retryable, provider_wide)


def test_graph_is_transient_makes_an_unknown_code_retryable() -> None:
    error = classify_whatsapp(400, graph_error(1, is_transient=True))
    assert error.error_type.value == "provider_error" and error.retryable


# -- Retry-After ------------------------------------------------------------------------------


def test_retry_after_is_kept() -> None:
    assert classify_twilio(429, twilio_error(20429, 429), retry_after=7).retry_after == 7
    assert classify_whatsapp(429, graph_error(130429), retry_after=3).retry_after == 3
    assert classify_messenger(503, None, retry_after=9).retry_after == 9
    assert classify_twilio(429, twilio_error(20429, 429)).retry_after is None


def test_retry_after_as_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=42), usegmt=True)
    seconds = parse_retry_after(header, now=now)
    assert classify_twilio(429, twilio_error(20429, 429), retry_after=seconds).retry_after == 42


def test_twilio_14107_waits_at_least_30_seconds() -> None:
    assert classify_twilio(400, twilio_error(14107, 400)).retry_after == 30
    assert classify_twilio(400, twilio_error(14107, 400), retry_after=5).retry_after == 30
    assert classify_twilio(400, twilio_error(14107, 400), retry_after=90).retry_after == 90


# -- error text -------------------------------------------------------------------------------


def test_messages_name_provider_code_and_status() -> None:
    error = classify_twilio(400, twilio_error(21211, 400))
    assert error.message == "Twilio 21211 (HTTP 400): message of 21211"
    error = classify_messenger(400, graph_error(100, 2018001))
    assert error.message == "Messenger 100/2018001 (HTTP 400): (#100) message"
    body = graph_error(131047)
    body["error"]["error_data"] = {"messaging_product": "whatsapp", "details": "24h passed"}
    assert classify_whatsapp(400, body).message == (
        "WhatsApp 131047 (HTTP 400): (#131047) message (24h passed)")


def test_long_messages_are_shortened() -> None:
    error = classify_twilio(400, {"code": 21211, "message": "x" * 5000})
    assert len(error.message) <= 300


def test_redact_removes_secrets_however_they_were_encoded() -> None:
    text = "token a+b/c= and a%2Bb%2Fc%3D and a%2Bb/c%3D and a%2bb%2fc%3d, not a-b/c="
    assert redact(text, ["a+b/c=", None, ""]) == (
        "token *** and *** and *** and ***, not a-b/c=")
    assert redact("k=my+tok%20en", ["my tok en"]) == "k=***"


def test_recipient_is_masked_in_error_text() -> None:
    text = "The 'To' number +15551234567 is not valid; wa 15551234567"
    masked = mask_recipient_in(text, "+15551234567")
    assert "5551234567" not in masked
    assert masked.count("*") > 10


def test_parse_graph_error() -> None:
    body = graph_error(130429, 2494055, error_data={"messaging_product": "whatsapp",
                                                    "details": "slow down"})
    parsed = parse_graph_error(body)
    assert parsed is not None
    assert (parsed.code, parsed.subcode, parsed.details, parsed.fbtrace_id) == (
        130429, 2494055, "slow down", "AbCdEf")
    assert parse_graph_error({"messages": []}) is None
    assert parse_graph_error(None) is None


# -- request shapes ---------------------------------------------------------------------------


def send(channel: str, to: str, body: Any) -> SendRequest:
    return SendRequest(message_id="m-1", channel=channel, to=to, body=body)  # type: ignore[arg-type]


def test_twilio_form() -> None:
    form = twilio_form(send("sms", "+15551234567", "Your code is 1 & 2"),
                       ("From", "+15005550006"), "https://h.example/webhooks/twilio")
    assert form == (b"To=%2B15551234567&From=%2B15005550006&Body=Your+code+is+1+%26+2"
                    b"&StatusCallback=https%3A%2F%2Fh.example%2Fwebhooks%2Ftwilio")
    assert parse_qsl(form.decode()) == [
        ("To", "+15551234567"), ("From", "+15005550006"), ("Body", "Your code is 1 & 2"),
        ("StatusCallback", "https://h.example/webhooks/twilio")]


def test_whatsapp_text_payload() -> None:
    assert whatsapp_payload(send("whatsapp", "+15551234567", "hello")) == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "15551234567",
        "type": "text", "text": {"preview_url": False, "body": "hello"}}


def test_whatsapp_template_payload() -> None:
    template = {"name": "order_update", "language": {"code": "en_US"},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": "7"}]}]}
    assert whatsapp_payload(send("whatsapp", "+15551234567", {"template": template})) == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "15551234567",
        "type": "template", "template": template}


def test_messenger_payload() -> None:
    assert messenger_payload(send("messenger", "1234567890123456", "hello")) == {
        "recipient": {"id": "1234567890123456"}, "messaging_type": "UPDATE",
        "message": {"text": "hello"}}


# -- what an adapter hands on is storable and free of secrets --------------------------------


def test_send_result_ids_are_storable_and_bounded() -> None:
    from consumer.providers.base import MAX_PROVIDER_MESSAGE_ID, SendResult

    assert SendResult("SM123").provider_message_id == "SM123"
    assert SendResult("id\x00with\ud800odd").provider_message_id == "id\ufffdwith\ufffdodd"
    long_id = SendResult("x" * 100_000).provider_message_id
    assert long_id is not None and len(long_id) == MAX_PROVIDER_MESSAGE_ID
    assert SendResult("   ").provider_message_id is None
    assert SendResult(None).provider_message_id is None


def test_delivery_errors_are_storable_whatever_their_text() -> None:
    from consumer.errors import MAX_MESSAGE

    error = DeliveryError(ErrorType.PROVIDER_ERROR, "bad\x00answer\udc80" + "y" * 10_000,
                          code="c\x00" * 100)
    assert "\x00" not in error.message and "\udc80" not in error.message
    error.message.encode("utf-8")
    assert len(error.message) == MAX_MESSAGE
    assert error.code is not None and "\x00" not in error.code and len(error.code) <= 100
    assert "\x00" not in repr(error)


def test_classified_answers_with_nul_and_surrogates_are_storable() -> None:
    body = {"code": 21211, "message": "bad \x00 number \ud800", "status": 400}
    error = classify_twilio(400, body)
    error.message.encode("utf-8")
    assert "\x00" not in error.message
    graph = classify_whatsapp(400, {"error": {"code": 100, "message": "x\x00\udfff" * 500}})
    graph.message.encode("utf-8")
    assert len(graph.message) <= 300


@pytest.mark.parametrize("text,shown", [
    ("GET https://graph.facebook.com/v21.0/me/messages?access_token=EAAG123 failed",
     "GET https://graph.facebook.com/… failed"),
    ("to http://user:pw@hooks.example.com:8443/k/abc?sig=1#x", "to http://hooks.example.com:8443/…"),
    ("host only http://example.com", "host only http://example.com"),
    ("'https://a.example/x?y' and \"http://b.example/z\"",
     "'https://a.example/…' and \"http://b.example/…\""),
    ("no url here", "no url here"),
])
def test_urls_are_cut_to_their_host_in_error_text(text: str, shown: str) -> None:
    from consumer.providers.classify import redact_urls

    assert redact_urls(text) == shown


def test_scrubbed_errors_carry_no_url_path_or_token() -> None:
    from consumer.providers.classify import scrubbed

    token = "EAAGpage-token"
    error = scrubbed(DeliveryError(
        ErrorType.INVALID_REQUEST,
        f"Bad request to https://graph.facebook.com/v21.0/me/messages?access_token={token}"
        f" with Bearer {token}"), "1234567890123456", [token])
    assert token not in error.message and token not in repr(error)
    assert "access_token" not in error.message
    assert "https://graph.facebook.com/…" in error.message


def test_provider_codes_take_ascii_digits_only() -> None:
    from consumer.providers.classify import as_int

    assert as_int("21211") == 21211
    assert as_int(" 190 ") == 190
    assert as_int("٢١٢١١") is None  # Arabic-Indic digits
    assert as_int("２１２１１") is None  # full-width digits


# -- construction -----------------------------------------------------------------------------


async def test_adapters_need_their_credentials() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ConfigError, match="HERALD_TWILIO_ACCOUNT_SID"):
            TwilioProvider(Settings(), session)
        with pytest.raises(ConfigError, match="HERALD_TWILIO_FROM"):
            TwilioProvider(Settings(twilio_account_sid="AC1", twilio_auth_token="t"), session)
        with pytest.raises(ConfigError, match="HERALD_WHATSAPP_TOKEN"):
            WhatsAppProvider(Settings(), session)
        with pytest.raises(ConfigError, match="HERALD_WHATSAPP_PHONE_NUMBER_ID"):
            WhatsAppProvider(Settings(whatsapp_token="t"), session)
        with pytest.raises(ConfigError, match="HERALD_MESSENGER_PAGE_TOKEN"):
            MessengerProvider(Settings(), session)
        settings = Settings.from_env(sandbox_env(8090, public_url="https://herald.example"))
        twilio = TwilioProvider(settings, session)
        assert twilio.url == ("http://127.0.0.1:8090/2010-04-01/Accounts/"
                              f"{SandboxCredentials().twilio_account_sid}/Messages.json")
        assert twilio.status_callback == "https://herald.example/webhooks/twilio"
        assert twilio.sender == ("From", "+15005550006")
        service = TwilioProvider(settings.replace(twilio_messaging_service_sid="MG1"), session)
        assert service.sender == ("MessagingServiceSid", "MG1")
        assert WhatsAppProvider(settings, session).url == (
            "http://127.0.0.1:8090/v21.0/100000000000001/messages")
        assert MessengerProvider(settings, session).url == "http://127.0.0.1:8090/v21.0/me/messages"


def test_sandbox_env_and_credentials_agree() -> None:
    env = sandbox_env(9999, host="localhost")
    settings = Settings.from_env(env)
    assert settings.twilio_base_url == settings.meta_base_url == "http://localhost:9999"
    assert settings.sandbox_port == 9999
    assert SandboxCredentials.from_settings(settings) == SandboxCredentials()
    assert TwilioProvider.missing(settings) == []
    assert WhatsAppProvider.missing(settings) == MessengerProvider.missing(settings) == []
    assert "HERALD_PUBLIC_URL" not in env
    custom = SandboxCredentials.from_settings(settings.replace(twilio_auth_token="other"))
    assert custom.twilio_auth_token == "other"


# -- sandbox scripting ------------------------------------------------------------------------


def test_script_from_json() -> None:
    script = Script.from_json({"fail": 2, "code": "30003", "retry_after": 3,
                               "latency_ms": 250, "always": False})
    assert script == Script(fail=2, code=30003, retry_after="3", latency_ms=250.0)
    assert script.to_json() == {"fail": 2, "code": 30003, "retry_after": "3",
                                "latency_ms": 250.0}


@pytest.mark.parametrize("data", [
    {"fails": 2}, {"fail": -1}, {"fail": "x"}, {"always": "yes"}, {"status": 200},
    {"latency_ms": -5}, {"callback_status": "delivered"}, {"code": True},
])
def test_bad_scripts_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Script.from_json(data)


def test_script_book_counts_failures_per_recipient() -> None:
    book = ScriptBook()
    book.set("twilio", "+15550001111", Script(fail=2, code=30003))
    book.set("whatsapp", "+15550001111", Script(always=True, code=131026))
    outcomes = [book.failure("twilio", "+15550001111") is not None for _ in range(4)]
    assert outcomes == [True, True, False, False]
    # WhatsApp's "to" has no "+": the same recipient either way.
    assert all(book.failure("whatsapp", "15550001111") is not None for _ in range(3))
    assert book.failure("messenger", "15550001111") is None
    book.set("twilio", "+15550001111", Script(fail=1))
    assert book.failure("twilio", "+15550001111") is not None  # count restarted
    book.set("twilio", "+15550001111", None)
    assert book.failure("twilio", "+15550001111") is None
    with pytest.raises(ValueError):
        book.set("sms", "+15550001111", Script())


def test_provider_modes_expire() -> None:
    now = [100.0]
    modes = ProviderModes(clock=lambda: now[0])
    modes.set("whatsapp", "token_expired", 120)
    assert modes.current("whatsapp") == "token_expired"
    assert modes.current("twilio") == "normal"
    assert modes.listing()["whatsapp"] == {"mode": "token_expired", "seconds_left": 120.0}
    now[0] += 119.9
    assert modes.current("whatsapp") == "token_expired"
    now[0] += 0.1
    assert modes.current("whatsapp") == "normal"
    modes.set("twilio", "outage")
    now[0] += 1e6
    assert modes.current("twilio") == "outage"
    modes.set("twilio", "normal")
    assert modes.current("twilio") == "normal"
    for bad in (("sms", "outage", None), ("twilio", "down", None), ("twilio", "outage", 0)):
        with pytest.raises(ValueError):
            modes.set(*bad)


def test_callback_config_update() -> None:
    config = CallbackConfig()
    config.update({"statuses": ["delivered"], "delay_ms": [10, 20], "shuffle": True,
                   "meta_callback_url": "http://127.0.0.1:1/hook"})
    assert config.statuses == ("delivered",)
    assert config.delay_ms == (10.0, 20.0)
    assert config.whatsapp_url == config.messenger_url == "http://127.0.0.1:1/hook"
    config.update({"delay_ms": 5})
    assert config.delay_ms == (5.0, 5.0)
    for bad in ({"statuses": ["queued"]}, {"statuses": "sent"}, {"delay_ms": [20, 10]},
                {"duplicate_probability": 2}, {"whatsapp_url": "ftp://x"}, {"colour": 1},
                {"shuffle": "yes"}, {"attempts": 0}):
        with pytest.raises(ValueError):
            config.update(bad)
    assert config.statuses == ("delivered",)  # a refused update changes nothing


def test_callback_config_for_herald() -> None:
    config = CallbackConfig.for_herald("http://127.0.0.1:8080/", statuses=["delivered"])
    assert config.whatsapp_url == "http://127.0.0.1:8080/webhooks/whatsapp"
    assert config.messenger_url == "http://127.0.0.1:8080/webhooks/messenger"
    assert config.statuses == ("delivered",)


def _callbacks(n: int) -> list[Callback]:
    return [Callback("twilio", "http://x", f"s{i}", "SM1", lambda: (b"", {})) for i in range(n)]


def test_callback_plan_shuffles_and_duplicates_repeatably() -> None:
    plain = CallbackSender(CallbackConfig())
    assert [c.status for c in plain.plan(_callbacks(3))] == ["s0", "s1", "s2"]

    config = CallbackConfig(shuffle=True, duplicate_probability=1.0, seed=7)
    first = [c.status for c in CallbackSender(config).plan(_callbacks(3))]
    again = [c.status for c in CallbackSender(config).plan(_callbacks(3))]
    assert first == again
    assert sorted(first) == ["s0", "s0", "s1", "s1", "s2", "s2"]

    shuffled = {tuple(c.status for c in CallbackSender(
        CallbackConfig(shuffle=True, seed=seed)).plan(_callbacks(3))) for seed in range(30)}
    assert len(shuffled) > 1


def test_duplicates_come_after_their_original() -> None:
    sender = CallbackSender(CallbackConfig(duplicate_probability=0.5))
    sender.rng = random.Random(3)
    for _ in range(20):
        planned = [c.status for c in sender.plan(_callbacks(4))]
        # Without shuffling the first sending of each keeps its place.
        assert [s for i, s in enumerate(planned) if s not in planned[:i]] == [
            "s0", "s1", "s2", "s3"]
