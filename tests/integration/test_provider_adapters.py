"""The Twilio, WhatsApp and Messenger adapters against the sandbox, in process
on loopback ports (no broker or database): request bytes, every code of
PROVIDERS.md's tables, scripted failures and modes, and signed status
callbacks arriving at a stand-in for Herald's webhook receiver."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, quote_plus

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from consumer.errors import DeliveryError
from consumer.providers.messenger import MessengerProvider
from consumer.providers.twilio import TwilioProvider, twilio_rule
from consumer.providers.whatsapp import WhatsAppProvider, whatsapp_rule
from consumer.sandbox import Sandbox
from consumer.sandbox.callbacks import CallbackConfig
from consumer.sandbox.env import SandboxCredentials, sandbox_env
from consumer.settings import Settings
from consumer.status.signatures import verify_meta, verify_twilio
from schemas import SendRequest
from tests.helpers import wait_for
from tests.providers_fixtures import (
    MESSENGER_ROWS,
    TWILIO_ROWS,
    WHATSAPP_ROWS,
    Inbox,
    Row,
    RunningProviders,
    form_fields,
    inbox_app,
    json_body,
    start_app,
)

CREDS = SandboxCredentials()
PHONE = "+15551234567"
PSID = "2401123456789012"


@pytest.fixture
async def inbox() -> AsyncIterator[Inbox]:
    box = Inbox()
    runner, box.base_url = await start_app(inbox_app(box))
    yield box
    await runner.cleanup()


@pytest.fixture
async def providers(inbox: Inbox) -> AsyncIterator[RunningProviders]:
    sandbox = Sandbox(callbacks=CallbackConfig(
        whatsapp_url=inbox.url("/webhooks/whatsapp"),
        messenger_url=inbox.url("/webhooks/messenger"),
    ))
    runner, base_url = await start_app(sandbox.app)
    yield RunningProviders(sandbox, base_url, runner)
    await runner.cleanup()


@pytest.fixture
def provider_settings(providers: RunningProviders, inbox: Inbox) -> Settings:
    return Settings.from_env(sandbox_env(providers.port, public_url=inbox.base_url))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def twilio(provider_settings: Settings, session: aiohttp.ClientSession) -> TwilioProvider:
    return TwilioProvider(provider_settings, session)


@pytest.fixture
def whatsapp(provider_settings: Settings, session: aiohttp.ClientSession) -> WhatsAppProvider:
    return WhatsAppProvider(provider_settings, session)


@pytest.fixture
def messenger(provider_settings: Settings, session: aiohttp.ClientSession) -> MessengerProvider:
    return MessengerProvider(provider_settings, session)


def sms(to: str = PHONE, body: str = "Hello é & bye", message_id: str = "m-1") -> SendRequest:
    return SendRequest(message_id=message_id, channel="sms", to=to, body=body)


def wa(to: str = PHONE, body: Any = "Hello") -> SendRequest:
    return SendRequest(message_id="m-1", channel="whatsapp", to=to, body=body)


def fb(to: str = PSID, body: str = "Hello") -> SendRequest:
    return SendRequest(message_id="m-1", channel="messenger", to=to, body=body)


async def failure(provider: Any, request: SendRequest) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await provider.send(request, 1)
    return caught.value


def assert_row(error: DeliveryError, row: Row) -> None:
    assert (error.error_type.value, error.retryable, error.provider_wide, error.code) == (
        row.error_type, row.retryable, row.provider_wide, str(row.code)), repr(error)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Twilio -------------------------------------------------------------------------------


async def test_twilio_send_is_exactly_the_documented_request(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    result = await twilio.send(sms(), 1)

    assert result.provider_message_id is not None
    assert result.provider_message_id.startswith("SM")
    assert len(result.provider_message_id) == 34
    int(result.provider_message_id[2:], 16)
    [record] = providers.sandbox.received
    assert (record.provider, record.status, record.recipient, record.message_id) == (
        "twilio", 201, PHONE, None)
    assert record.provider_message_id == result.provider_message_id
    assert record.path == f"/2010-04-01/Accounts/{CREDS.twilio_account_sid}/Messages.json"
    basic = base64.b64encode(
        f"{CREDS.twilio_account_sid}:{CREDS.twilio_auth_token}".encode()).decode()
    assert record.headers["Authorization"] == f"Basic {basic}"
    assert record.headers["Content-Type"] == "application/x-www-form-urlencoded"
    callback = quote_plus(f"{inbox.base_url}/webhooks/twilio")
    assert record.raw == (f"To=%2B15551234567&From=%2B15005550006&Body=Hello+%C3%A9+%26+bye"
                          f"&StatusCallback={callback}")
    assert providers.sandbox.providers.accepted_by_recipient("twilio") == {PHONE: 1}


async def test_twilio_messaging_service_replaces_from(
    provider_settings: Settings, session: aiohttp.ClientSession, providers: RunningProviders
) -> None:
    service = "MG" + "0" * 32
    adapter = TwilioProvider(provider_settings.replace(twilio_messaging_service_sid=service),
                             session)
    await adapter.send(sms(), 1)
    [record] = providers.sandbox.received
    assert [name for name, _ in parse_qsl(record.raw or "")] == [
        "To", "MessagingServiceSid", "Body", "StatusCallback"]
    assert record.body["MessagingServiceSid"] == service


@pytest.mark.parametrize("row", TWILIO_ROWS, ids=Row.id)
async def test_twilio_every_code_is_classified(
    row: Row, twilio: TwilioProvider, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("twilio", PHONE, always=True, code=row.code)
    error = await failure(twilio, sms())
    assert_row(error, row)
    if row.code == 14107:
        assert error.retry_after == 30


async def test_twilio_fails_n_times_then_succeeds(
    twilio: TwilioProvider, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("twilio", PHONE, fail=2, code=30001)
    for _ in range(2):
        assert (await failure(twilio, sms())).error_type.value == "rate_limit"
    assert (await twilio.send(sms(), 3)).provider_message_id
    assert [r.status for r in providers.sandbox.received] == [400, 400, 201]


async def test_twilio_429_retry_after_seconds_and_http_date(
    twilio: TwilioProvider, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("twilio", PHONE, always=True, code=20429, retry_after=3)
    error = await failure(twilio, sms())
    assert (error.error_type.value, error.retryable, error.retry_after) == ("rate_limit", True, 3)
    assert providers.sandbox.received[-1].status == 429

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    providers.sandbox.providers.script("twilio", PHONE, always=True, code=20429, retry_after=when)
    error = await failure(twilio, sms())
    assert error.retry_after is not None and 110 < error.retry_after <= 120


async def test_twilio_wrong_credentials_never_leak(
    provider_settings: Settings, session: aiohttp.ClientSession
) -> None:
    secret = "s3cr3t-not-the-token"
    adapter = TwilioProvider(provider_settings.replace(twilio_auth_token=secret), session)
    with capture_logs() as logs:
        error = await failure(adapter, sms())
    assert (error.error_type.value, error.code, error.provider_wide) == (
        "access_token", "20003", True)
    assert secret not in repr(error) and secret not in json.dumps(logs, default=str)
    assert [entry["event"] for entry in logs] == ["twilio.rejected"]
    assert logs[0]["to"] != PHONE


async def test_twilio_invalid_to_is_masked_in_the_error(twilio: TwilioProvider) -> None:
    error = await failure(twilio, sms(to="+15551234567890123"))
    assert (error.error_type.value, error.code) == ("invalid_recipient", "21211")
    assert "5551234567890123" not in error.message
    assert "is not a valid phone number" in error.message


async def test_twilio_signed_status_callbacks(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    sid = (await twilio.send(sms(), 1)).provider_message_id
    await inbox.wait(lambda: len(inbox.at("/webhooks/twilio")) == 2)

    url = inbox.url("/webhooks/twilio")
    statuses = []
    for hook in inbox.at("/webhooks/twilio"):
        params = parse_qsl(hook.raw.decode())
        assert verify_twilio(CREDS.twilio_auth_token, url, params,
                             hook.headers["X-Twilio-Signature"])
        assert not verify_twilio("another-token", url, params,
                                 hook.headers["X-Twilio-Signature"])
        tampered = [(k, "delivered" if k == "MessageStatus" else v) for k, v in params]
        if dict(params)["MessageStatus"] != "delivered":
            assert not verify_twilio(CREDS.twilio_auth_token, url, tampered,
                                     hook.headers["X-Twilio-Signature"])
        fields = dict(params)
        assert hook.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
        assert (fields["MessageSid"], fields["SmsSid"], fields["AccountSid"], fields["To"],
                fields["From"], fields["ApiVersion"]) == (
            sid, sid, CREDS.twilio_account_sid, PHONE, CREDS.twilio_from, "2010-04-01")
        assert "ErrorCode" not in fields
        statuses.append(fields["MessageStatus"])
    assert statuses == ["sent", "delivered"]


async def test_twilio_undelivered_after_acceptance(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    providers.sandbox.providers.script("twilio", PHONE, callback_error=30003)
    assert (await twilio.send(sms(), 1)).provider_message_id
    await inbox.wait(lambda: len(inbox.at("/webhooks/twilio")) == 2)
    fields = [form_fields(h.raw) for h in inbox.at("/webhooks/twilio")]
    assert [f["MessageStatus"] for f in fields] == ["sent", "undelivered"]
    assert fields[1]["ErrorCode"] == "30003"
    assert fields[1]["ErrorMessage"]
    found = twilio_rule(fields[1]["ErrorCode"])
    assert found is not None and found.error_type.value == "provider_error" and found.retryable


async def test_twilio_failed_before_sending(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    providers.sandbox.providers.script("twilio", PHONE, callback_error=30006,
                                       callback_status="failed")
    await twilio.send(sms(), 1)
    await inbox.wait(lambda: len(inbox.at("/webhooks/twilio")) == 1)
    await asyncio.wait_for(providers.sandbox.providers.callbacks.drain(), 5)
    [fields] = [form_fields(h.raw) for h in inbox.at("/webhooks/twilio")]
    assert (fields["MessageStatus"], fields["ErrorCode"]) == ("failed", "30006")


# -- WhatsApp -----------------------------------------------------------------------------


async def test_whatsapp_text_send_is_exactly_the_documented_request(
    whatsapp: WhatsAppProvider, providers: RunningProviders
) -> None:
    result = await whatsapp.send(wa(), 1)
    assert result.provider_message_id is not None
    assert result.provider_message_id.startswith("wamid.")
    [record] = providers.sandbox.received
    assert (record.provider, record.status, record.recipient) == ("whatsapp", 200, "15551234567")
    assert record.path == f"/v21.0/{CREDS.whatsapp_phone_number_id}/messages"
    assert record.headers["Authorization"] == f"Bearer {CREDS.whatsapp_token}"
    assert record.headers["Content-Type"] == "application/json"
    assert record.raw == ('{"messaging_product":"whatsapp","recipient_type":"individual",'
                          '"to":"15551234567","type":"text",'
                          '"text":{"preview_url":false,"body":"Hello"}}')
    assert record.provider_message_id == result.provider_message_id


async def test_whatsapp_template_send(
    whatsapp: WhatsAppProvider, providers: RunningProviders
) -> None:
    template = {"name": "order_update", "language": {"code": "en_US"},
                "components": [{"type": "body",
                                "parameters": [{"type": "text", "text": "A-42"}]}]}
    result = await whatsapp.send(wa(body={"template": template}), 1)
    assert result.provider_message_id
    [record] = providers.sandbox.received
    assert record.body == {"messaging_product": "whatsapp", "recipient_type": "individual",
                           "to": "15551234567", "type": "template", "template": template}


@pytest.mark.parametrize("status", [None, 400])
@pytest.mark.parametrize("row", WHATSAPP_ROWS, ids=Row.id)
async def test_whatsapp_every_code_is_classified(
    row: Row, status: int | None, whatsapp: WhatsAppProvider, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("whatsapp", PHONE, always=True, code=row.code,
                                       status=status)
    assert_row(await failure(whatsapp, wa()), row)
    if status is not None:
        assert providers.sandbox.received[-1].status == status


async def test_whatsapp_wrong_token_and_wrong_number_id(
    provider_settings: Settings, session: aiohttp.ClientSession
) -> None:
    bad_token = WhatsAppProvider(provider_settings.replace(whatsapp_token="not-it-at-all"),
                                 session)
    error = await failure(bad_token, wa())
    assert (error.error_type.value, error.code, error.provider_wide) == (
        "access_token", "190", True)
    assert "not-it-at-all" not in repr(error)
    bad_number = WhatsAppProvider(provider_settings.replace(whatsapp_phone_number_id="999"),
                                  session)
    error = await failure(bad_number, wa())
    assert (error.error_type.value, error.code) == ("invalid_request", "100")


async def test_whatsapp_signed_status_webhooks(
    whatsapp: WhatsAppProvider, inbox: Inbox
) -> None:
    wamid = (await whatsapp.send(wa(), 1)).provider_message_id
    await inbox.wait(lambda: len(inbox.at("/webhooks/whatsapp")) == 3)
    statuses = []
    for hook in inbox.at("/webhooks/whatsapp"):
        header = hook.headers["X-Hub-Signature-256"]
        assert verify_meta(CREDS.meta_app_secret, hook.raw, header)
        assert not verify_meta(CREDS.meta_app_secret, hook.raw + b" ", header)
        body = json_body(hook.raw)
        assert body["object"] == "whatsapp_business_account"
        [entry] = body["entry"]
        [change] = entry["changes"]
        assert change["field"] == "messages"
        value = change["value"]
        assert value["metadata"]["phone_number_id"] == CREDS.whatsapp_phone_number_id
        [status] = value["statuses"]
        assert (status["id"], status["recipient_id"]) == (wamid, "15551234567")
        assert status["timestamp"].isdigit()
        statuses.append(status["status"])
    assert statuses == ["sent", "delivered", "read"]


async def test_whatsapp_failed_after_acceptance(
    whatsapp: WhatsAppProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    providers.sandbox.providers.script("whatsapp", PHONE, callback_error=131026)
    await whatsapp.send(wa(), 1)
    await inbox.wait(lambda: len(inbox.at("/webhooks/whatsapp")) == 2)
    statuses = [json_body(h.raw)["entry"][0]["changes"][0]["value"]["statuses"][0]
                for h in inbox.at("/webhooks/whatsapp")]
    assert [s["status"] for s in statuses] == ["sent", "failed"]
    [error] = statuses[1]["errors"]
    assert error["code"] == 131026 and error["title"]
    found = whatsapp_rule(error["code"])
    assert found is not None and found.error_type.value == "invalid_recipient"


# -- Messenger ----------------------------------------------------------------------------


async def test_messenger_send_is_exactly_the_documented_request(
    messenger: MessengerProvider, providers: RunningProviders
) -> None:
    result = await messenger.send(fb(), 1)
    assert result.provider_message_id is not None
    assert result.provider_message_id.startswith("m_")
    [record] = providers.sandbox.received
    assert (record.provider, record.status, record.recipient) == ("messenger", 200, PSID)
    # The page token travels in a header, never in the URL (access logs keep URLs).
    assert record.path == "/v21.0/me/messages"
    assert record.headers["Authorization"] == f"Bearer {CREDS.messenger_page_token}"
    assert record.raw == (f'{{"recipient":{{"id":"{PSID}"}},"messaging_type":"UPDATE",'
                          f'"message":{{"text":"Hello"}}}}')


@pytest.mark.parametrize("status", [None, 400])
@pytest.mark.parametrize("row", MESSENGER_ROWS, ids=Row.id)
async def test_messenger_every_code_is_classified(
    row: Row, status: int | None, messenger: MessengerProvider, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("messenger", PSID, always=True, code=row.code,
                                       subcode=row.subcode, status=status)
    assert_row(await failure(messenger, fb()), row)


@pytest.mark.parametrize("auth,query,accepted", [
    (f"Bearer {CREDS.messenger_page_token}", "", True),  # Herald's way
    ("", f"?access_token={CREDS.messenger_page_token}", True),  # the way Meta's docs show
    ("Bearer wrong-token", "", False),
    (f"Basic {CREDS.messenger_page_token}", "", False),
    ("", "", False),
])
async def test_sandbox_messenger_takes_the_page_token_in_a_header_or_the_query(
    providers: RunningProviders, session: aiohttp.ClientSession, auth: str, query: str,
    accepted: bool,
) -> None:
    payload = {"recipient": {"id": PSID}, "messaging_type": "UPDATE",
               "message": {"text": "hi"}}
    async with session.post(f"{providers.base_url}/v21.0/me/messages{query}", json=payload,
                            headers={"Authorization": auth} if auth else {}) as response:
        body = await response.json()
    if accepted:
        assert response.status == 200 and body["message_id"].startswith("m_")
    else:
        assert response.status != 200 and body["error"]["code"] == 190


async def test_messenger_token_stays_out_of_errors_and_logs(
    provider_settings: Settings, session: aiohttp.ClientSession
) -> None:
    # An endpoint that quotes the request back, token and all: the Authorization
    # header, and the URL as if the token were in its query string.
    async def echo(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        return web.json_response({"error": {
            "message": f"(#100) Bad request with {request.headers['Authorization']} to"
                       f" {request.url.with_query(access_token=token)}",
            "type": "OAuthException", "code": 100, "fbtrace_id": "x"}}, status=400)

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner, base_url = await start_app(app)
    token = "EAAG+page/token=="
    try:
        adapter = MessengerProvider(provider_settings.replace(meta_base_url=base_url,
                                                              messenger_page_token=token),
                                    session)
        with capture_logs() as logs:
            error = await failure(adapter, fb())
    finally:
        await runner.cleanup()
    assert error.error_type.value == "invalid_request"
    assert "***" in error.message
    for text in (repr(error), json.dumps(logs, default=str)):
        assert token not in text
        assert quote_plus(token) not in text
        assert "EAAG" not in text


async def test_messenger_delivery_and_read_watermarks(
    messenger: MessengerProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    before_ms = int(time.time() * 1000)
    mid = (await messenger.send(fb(), 1)).provider_message_id
    await inbox.wait(lambda: len(inbox.at("/webhooks/messenger")) == 2)
    events = []
    for hook in inbox.at("/webhooks/messenger"):
        assert verify_meta(CREDS.meta_app_secret, hook.raw, hook.headers["X-Hub-Signature-256"])
        body = json_body(hook.raw)
        assert body["object"] == "page"
        [entry] = body["entry"]
        [event] = entry["messaging"]
        assert event["sender"] == {"id": PSID}
        assert event["recipient"] == {"id": CREDS.page_id}
        events.append(event)
    delivery, read = events
    assert delivery["delivery"]["mids"] == [mid]
    assert delivery["delivery"]["watermark"] >= before_ms
    assert read["read"]["watermark"] >= delivery["delivery"]["watermark"]
    assert isinstance(read["timestamp"], int)

    providers.sandbox.providers.configure_callbacks(messenger_mids=False, statuses=["delivered"])
    await messenger.send(fb(), 1)
    await inbox.wait(lambda: len(inbox.at("/webhooks/messenger")) == 3)
    last = json_body(inbox.at("/webhooks/messenger")[-1].raw)["entry"][0]["messaging"][0]
    assert set(last["delivery"]) == {"watermark"}


# -- provider-wide modes, latency, transport ----------------------------------------------


async def test_token_expired_window_over_the_control_endpoint(
    whatsapp: WhatsAppProvider, twilio: TwilioProvider, providers: RunningProviders,
    session: aiohttp.ClientSession,
) -> None:
    async with session.post(f"{providers.base_url}/_sandbox/provider",
                            json={"provider": "whatsapp", "mode": "token_expired",
                                  "seconds": 0.5}) as response:
        assert response.status == 200
        assert (await response.json())["whatsapp"]["mode"] == "token_expired"
    error = await failure(whatsapp, wa())
    assert (error.error_type.value, error.code, error.provider_wide) == (
        "access_token", "190", True)
    assert await twilio.send(sms(), 1)  # other providers are unaffected

    await wait_for(lambda: providers.sandbox.providers.modes.current("whatsapp") == "normal",
                   timeout=5, what="the token_expired window to end")
    assert (await whatsapp.send(wa(), 1)).provider_message_id


@pytest.mark.parametrize("mode, row_type, provider_wide", [
    ("outage", "provider_error", False), ("token_expired", "access_token", True)])
async def test_provider_modes_for_every_provider(
    mode: str, row_type: str, provider_wide: bool, twilio: TwilioProvider,
    whatsapp: WhatsAppProvider, messenger: MessengerProvider, providers: RunningProviders,
) -> None:
    for adapter, request in ((twilio, sms()), (whatsapp, wa()), (messenger, fb())):
        providers.sandbox.providers.set_mode(adapter.name, mode)
        error = await failure(adapter, request)
        assert (error.error_type.value, error.provider_wide) == (row_type, provider_wide)
        assert error.retryable is (mode == "outage")
        providers.sandbox.providers.set_mode(adapter.name, "normal")
        assert (await adapter.send(request, 1)).provider_message_id
    codes = [r.body for r in providers.sandbox.received if not r.accepted]
    assert len(codes) == 3


async def test_slow_answer_is_a_provider_timeout(
    provider_settings: Settings, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("whatsapp", PHONE, latency_ms=2000)
    timeout = aiohttp.ClientTimeout(sock_read=0.2)
    async with aiohttp.ClientSession(timeout=timeout) as slow_session:
        error = await failure(WhatsAppProvider(provider_settings, slow_session), wa())
    assert (error.error_type.value, error.code, error.retryable) == (
        "provider_error", "timeout", True)


async def test_latency_then_success_and_the_pipeline_deadline_passes_through(
    twilio: TwilioProvider, providers: RunningProviders
) -> None:
    providers.sandbox.providers.script("twilio", PHONE, latency_ms=300)
    started = time.monotonic()
    assert (await twilio.send(sms(), 1)).provider_message_id
    assert time.monotonic() - started >= 0.3
    # The pipeline owns the deadline: cancellation is not turned into a DeliveryError.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await twilio.send(sms(), 1)


@pytest.mark.parametrize("adapter_class, request_", [
    (TwilioProvider, sms()), (WhatsAppProvider, wa()), (MessengerProvider, fb())])
async def test_connection_refused_is_network(
    adapter_class: Any, request_: SendRequest, provider_settings: Settings,
    session: aiohttp.ClientSession,
) -> None:
    base = f"http://127.0.0.1:{closed_port()}"
    adapter = adapter_class(
        provider_settings.replace(twilio_base_url=base, meta_base_url=base), session)
    error = await failure(adapter, request_)
    assert (error.error_type.value, error.retryable, error.provider_wide) == (
        "network", True, False)
    for secret in (CREDS.messenger_page_token, CREDS.whatsapp_token, CREDS.twilio_auth_token):
        assert secret not in repr(error)


# -- callbacks: order, duplicates, delays, retries, shutdown --------------------------------


async def test_callbacks_shuffled_and_duplicated(
    whatsapp: WhatsAppProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    providers.sandbox.providers.configure_callbacks(shuffle=True, duplicate_probability=1.0,
                                                    seed=11)
    wamid = (await whatsapp.send(wa(), 1)).provider_message_id
    await inbox.wait(lambda: len(inbox.at("/webhooks/whatsapp")) == 6)
    statuses = [json_body(h.raw)["entry"][0]["changes"][0]["value"]["statuses"][0]
                for h in inbox.at("/webhooks/whatsapp")]
    assert {s["id"] for s in statuses} == {wamid}
    assert Counter(s["status"] for s in statuses) == {"sent": 2, "delivered": 2, "read": 2}


async def test_callback_delay(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    providers.sandbox.providers.configure_callbacks(delay_ms=[150, 200], statuses=["delivered"])
    started = time.monotonic()
    await twilio.send(sms(), 1)
    await inbox.wait(lambda: len(inbox.at("/webhooks/twilio")) == 1)
    assert time.monotonic() - started >= 0.15


async def test_refused_callbacks_are_retried_then_given_up(
    whatsapp: WhatsAppProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    fakes = providers.sandbox.providers
    fakes.configure_callbacks(statuses=["sent"], retry_delay_ms=10, attempts=3)
    inbox.refuse["/webhooks/whatsapp"] = 2
    await whatsapp.send(wa(), 1)
    await inbox.wait(lambda: len(inbox.at("/webhooks/whatsapp")) == 1)
    await asyncio.wait_for(fakes.callbacks.drain(), 5)
    [record] = fakes.callbacks.sent
    assert (record.delivered, record.attempts, record.http_status) == (True, 3, 200)

    inbox.refuse["/webhooks/whatsapp"] = 10
    with capture_logs() as logs:
        await whatsapp.send(wa(), 1)
        await asyncio.wait_for(fakes.callbacks.drain(), 5)
    assert (fakes.callbacks.sent[-1].delivered, fakes.callbacks.sent[-1].attempts) == (False, 3)
    assert [e["event"] for e in logs] == ["sandbox.callback_failed"] * 3 + [
        "sandbox.callback_given_up"]


async def test_cleanup_cancels_pending_callbacks(inbox: Inbox,
                                                 session: aiohttp.ClientSession) -> None:
    sandbox = Sandbox(callbacks=CallbackConfig(delay_ms=(30_000, 30_000)))
    runner, base_url = await start_app(sandbox.app)
    port = int(base_url.rsplit(":", 1)[1])
    settings = Settings.from_env(sandbox_env(port, public_url=inbox.base_url))
    await TwilioProvider(settings, session).send(sms(), 1)
    assert sandbox.providers.callbacks.pending == 1
    await runner.cleanup()
    assert sandbox.providers.callbacks.pending == 0
    assert inbox.hooks == [] and sandbox.providers.callbacks.sent == []


async def test_callbacks_off(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox
) -> None:
    providers.sandbox.providers.configure_callbacks(enabled=False)
    await twilio.send(sms(), 1)
    assert providers.sandbox.providers.callbacks.pending == 0


# -- the control API over HTTP ------------------------------------------------------------


async def test_scripts_over_http(
    messenger: MessengerProvider, providers: RunningProviders, session: aiohttp.ClientSession
) -> None:
    url = f"{providers.base_url}/_sandbox/script"
    async with session.post(url, json={"provider": "messenger", "recipient": PSID,
                                       "script": {"fail": 1, "code": 100,
                                                  "subcode": 2018001}}) as response:
        assert response.status == 200
        assert (await response.json())["script"] == {"fail": 1, "code": 100,
                                                     "subcode": 2018001}
    error = await failure(messenger, fb())
    assert error.error_type.value == "invalid_recipient"
    assert (await messenger.send(fb(), 2)).provider_message_id

    async with session.get(f"{providers.base_url}/_sandbox/scripts") as response:
        [listed] = await response.json()
        assert listed["failures_served"] == 1
    for bad in ({"provider": "sms", "recipient": PSID, "script": {}},
                {"provider": "messenger", "script": {}},
                {"provider": "messenger", "recipient": PSID, "script": {"fial": 1}},
                {"provider": "messenger", "recipient": PSID, "script": []}):
        async with session.post(url, json=bad) as response:
            assert response.status == 400
            assert "error" in await response.json()
    async with session.post(url, data=b"not json") as response:
        assert response.status == 400

    async with session.post(url, json={"provider": "messenger", "recipient": PSID,
                                       "script": {"always": True, "code": 551}}) as response:
        assert response.status == 200
    assert (await failure(messenger, fb())).error_type.value == "invalid_recipient"
    async with session.post(f"{providers.base_url}/_sandbox/reset") as response:
        assert response.status == 200
    assert (await messenger.send(fb(), 1)).provider_message_id


async def test_callback_config_and_records_over_http(
    twilio: TwilioProvider, providers: RunningProviders, inbox: Inbox,
    session: aiohttp.ClientSession,
) -> None:
    url = f"{providers.base_url}/_sandbox/callbacks"
    async with session.post(url, json={"statuses": ["delivered"],
                                       "meta_callback_url": inbox.url("/meta")}) as response:
        assert response.status == 200
        config = await response.json()
    assert config["statuses"] == ["delivered"]
    assert config["whatsapp_url"] == config["messenger_url"] == inbox.url("/meta")
    async with session.post(url, json={"statuses": ["queued"]}) as response:
        assert response.status == 400
    await twilio.send(sms(), 1)
    await asyncio.wait_for(providers.sandbox.providers.callbacks.drain(), 5)
    async with session.get(url) as response:
        shown = await response.json()
    assert [(s["provider"], s["status"], s["delivered"]) for s in shown["sent"]] == [
        ("twilio", "delivered", True)]
    async with session.get(f"{providers.base_url}/_sandbox/requests") as response:
        [row] = await response.json()
    assert (row["provider"], row["recipient"], row["accepted"]) == ("twilio", PHONE, True)


async def test_the_generic_http_endpoint_still_works(
    providers: RunningProviders, session: aiohttp.ClientSession
) -> None:
    url = f"{providers.base_url}/http/a?fail=1&fail_status=503"
    for expected in (503, 200):
        async with session.post(url, json={"x": 1},
                                headers={"Idempotency-Key": "h-1"}) as response:
            assert response.status == expected
    assert providers.sandbox.accepted_counts() == {"h-1": 1}
    assert providers.sandbox.providers.accepted() == []
