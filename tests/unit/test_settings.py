"""Settings (consumer/settings.py): defaults, validation, and secrets kept secret."""

from __future__ import annotations

import dataclasses

import pytest

from consumer.errors import ConfigError
from consumer.settings import Settings

SECRET = "s3cr3t-Value-42"


def test_defaults_match_design_section_2() -> None:
    s = Settings.from_env({})
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.database_url == "postgresql://herald:herald@127.0.0.1:5432/herald"
    assert s.prefix == "herald"
    assert s.http_port == 8080
    assert s.public_url == "http://127.0.0.1:8080"
    assert s.prefetch == 256
    assert s.admin_token is None
    assert s.twilio_account_sid is None
    assert s.twilio_auth_token is None
    assert s.twilio_from is None
    assert s.twilio_messaging_service_sid is None
    assert s.twilio_base_url == "https://api.twilio.com"
    assert s.whatsapp_token is None
    assert s.whatsapp_phone_number_id is None
    assert s.messenger_page_token is None
    assert s.meta_base_url == "https://graph.facebook.com"
    assert s.meta_api_version == "v21.0"
    assert s.meta_app_secret is None
    assert s.webhook_verify_token is None


def test_retry_defaults_match_design_section_3() -> None:
    s = Settings.from_env({})
    assert s.max_attempts == 5
    assert s.base_delay_s == 30.0
    assert s.max_delay_s == 3600.0
    assert s.retry_mode == "auto"


def test_from_env_with_a_mapping_ignores_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERALD_PREFETCH", "abc")
    monkeypatch.setenv("HERALD_PREFIX", "from-os")
    assert Settings.from_env({}).prefix == "herald"


def test_from_env_without_a_mapping_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERALD_PREFIX", "from-os")
    monkeypatch.setenv("HERALD_PREFETCH", "17")
    s = Settings.from_env()
    assert (s.prefix, s.prefetch) == ("from-os", 17)


def test_values_are_parsed_to_their_types() -> None:
    s = Settings.from_env({
        "HERALD_HTTP_PORT": "0",
        "HERALD_PREFETCH": "10",
        "HERALD_BASE_DELAY_S": "1.5",
        "HERALD_MAX_DELAY_S": "8",
        "HERALD_RETRY_MODE": " Manual ",
        "HERALD_RETRY_JITTER": "0",
        "HERALD_PREFIX": "t0123abc",
        "HERALD_PUBLIC_URL": "https://herald.example.com/",
        "HERALD_AMQP_URL": "amqps://u:p@broker:5671/vhost",
        "HERALD_DATABASE_URL": "postgres://u:p@db/herald",
    })
    assert s.http_port == 0
    assert s.prefetch == 10
    assert s.base_delay_s == 1.5
    assert s.max_delay_s == 8.0
    assert s.retry_mode == "manual"
    assert s.retry_jitter == 0.0
    assert s.prefix == "t0123abc"
    assert s.public_url == "https://herald.example.com"  # callback URLs are joined to it
    assert s.amqp_url == "amqps://u:p@broker:5671/vhost"
    assert s.database_url == "postgres://u:p@db/herald"


def test_empty_variables_mean_the_default() -> None:
    s = Settings.from_env({"HERALD_PREFETCH": "", "HERALD_ADMIN_TOKEN": ""})
    assert s.prefetch == 256
    assert s.admin_token is None


def test_base_equal_to_max_delay_is_fine() -> None:
    s = Settings.from_env({"HERALD_BASE_DELAY_S": "60", "HERALD_MAX_DELAY_S": "60"})
    assert s.base_delay_s == s.max_delay_s == 60.0


BAD_VALUES = [
    ("HERALD_PREFETCH", "abc"),
    ("HERALD_PREFETCH", "1.5"),
    ("HERALD_PREFETCH", "0"),
    ("HERALD_PREFETCH", "70000"),
    ("HERALD_HTTP_PORT", "65536"),
    ("HERALD_HTTP_PORT", "-1"),
    ("HERALD_HTTP_PORT", "http"),
    ("HERALD_SANDBOX_PORT", "99999"),
    ("HERALD_AMQP_URL", "http://127.0.0.1:5672/"),
    ("HERALD_AMQP_URL", "127.0.0.1:5672"),
    ("HERALD_AMQP_URL", "amqp:///"),
    ("HERALD_AMQP_URL", "amqp://broker:99999/"),
    ("HERALD_AMQP_URL", "amqp://broker:port/"),
    ("HERALD_AMQP_URL", "amqp://[::1/"),
    ("HERALD_DATABASE_URL", "mysql://herald@db/herald"),
    ("HERALD_PUBLIC_URL", "ftp://herald.example.com"),
    ("HERALD_PUBLIC_URL", "herald.example.com"),
    ("HERALD_TWILIO_BASE_URL", "localhost:9000"),
    ("HERALD_META_BASE_URL", "file:///etc/passwd"),
    ("HERALD_PREFIX", "has space"),
    ("HERALD_PREFIX", "-leading-dash"),
    ("HERALD_PREFIX", "a/b"),
    ("HERALD_PREFIX", "topic#"),
    ("HERALD_PREFIX", "x" * 102),
    ("HERALD_PREFIX", "herald\n"),
    ("HERALD_RETRY_MODE", "sometimes"),
    ("HERALD_LOG_LEVEL", "verbose"),
    ("HERALD_RETRY_JITTER", "2"),
    ("HERALD_RETRY_JITTER", "nan"),
    ("HERALD_SEND_TIMEOUT_S", "inf"),
    ("HERALD_MAX_ATTEMPTS", "0"),
    ("HERALD_BASE_DELAY_S", "0.5"),
    ("HERALD_MAX_DELAY_S", "262144"),
    ("HERALD_DELIVERY_LIMIT", "0"),
    ("HERALD_HTTP_HOST", "   "),
    ("HERALD_ADMIN_HOST", " \t"),
    ("HERALD_ADMIN_PORT", "65536"),
    ("HERALD_ADMIN_PORT", "admin"),
    ("HERALD_ADMIN_PORT", "8080"),
    ("HERALD_META_API_VERSION", " "),
]


@pytest.mark.parametrize(("var", "value"), BAD_VALUES, ids=[f"{v}={x!r}" for v, x in BAD_VALUES])
def test_bad_value_raises_one_line_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    message = str(info.value)
    assert message.startswith(f"{var}: "), message
    assert "\n" not in message and "\r" not in message
    assert len(message) < 300


def test_bad_value_message_says_what_is_wrong_and_what_was_given() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_PREFETCH": "abc"})
    assert str(info.value) == "HERALD_PREFETCH: must be a whole number (got 'abc')"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_HTTP_PORT": "70000"})
    assert "between 0 and 65535" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_RETRY_MODE": "sometimes"})
    assert "auto, manual" in str(info.value)


def test_base_delay_above_max_delay_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_BASE_DELAY_S": "120", "HERALD_MAX_DELAY_S": "60"})
    message = str(info.value)
    assert message.startswith("HERALD_BASE_DELAY_S: ")
    assert "HERALD_MAX_DELAY_S" in message
    assert "\n" not in message


def test_base_delay_above_the_default_max_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^HERALD_BASE_DELAY_S: "):
        Settings.from_env({"HERALD_BASE_DELAY_S": "7200"})


def test_a_long_bad_value_is_shortened() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_PUBLIC_URL": "ftp://" + "x" * 500})
    assert len(str(info.value)) < 200


# -- secrets -----------------------------------------------------------------------

URLS_WITH_SECRETS = [
    ("HERALD_AMQP_URL", f"http://user:{SECRET}@broker/"),  # wrong scheme
    ("HERALD_AMQP_URL", f"amqp://user:{SECRET}@/"),  # no host
    ("HERALD_AMQP_URL", f"amqp://user:{SECRET}@broker:99999/"),  # bad port
    ("HERALD_AMQP_URL", f"amqp://user:{SECRET}@[::1/"),  # unparseable
    ("HERALD_AMQP_URL", f"amqp://user:{SECRET}@x@[::1/"),  # '@' in the password, unparseable
    # A cluster's nodes: every password is hidden, the bad URL's and the good ones'.
    ("HERALD_AMQP_URL", f"amqp://u:{SECRET}@n1/,http://u:{SECRET}@n2/"),
    ("HERALD_AMQP_URL", f"amqp://u:{SECRET}@n1:5672/,amqp://u:{SECRET}@n2:99999/"),
    ("HERALD_DATABASE_URL", f"mysql://herald:{SECRET}@db/herald"),
    ("HERALD_DATABASE_URL", f"mysql://db/herald?user=herald&password={SECRET}"),
    ("HERALD_PUBLIC_URL", f"ftp://user:{SECRET}@herald.example.com"),
]


@pytest.mark.parametrize(("var", "value"), URLS_WITH_SECRETS)
def test_passwords_in_urls_never_appear_in_errors(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    message = str(info.value)
    assert message.startswith(f"{var}: ")
    assert SECRET not in message
    assert SECRET not in repr(info.value)
    assert "***" in message  # the rest of the value is still shown to help


def test_amqp_url_takes_a_cluster_s_nodes_separated_by_commas() -> None:
    s = Settings.from_env({"HERALD_AMQP_URL": " amqp://u:p@n1:5672/, amqps://u:p@n2/vh ,,"})
    assert s.amqp_urls == ("amqp://u:p@n1:5672/", "amqps://u:p@n2/vh")
    assert Settings().amqp_urls == ("amqp://guest:guest@127.0.0.1:5672/",)


@pytest.mark.parametrize(("value", "said"), [
    ("amqp://n1/,http://n2/", "URL 2 of 2 must be a amqp or amqps URL"),
    ("amqp://n1:70000/,amqp://n2/", "URL 1 of 2 has an invalid port"),
    (" , ,", "must name at least one amqp:// or amqps:// URL"),
])
def test_a_bad_node_url_is_named_in_one_line(value: str, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_AMQP_URL": value})
    message = str(info.value)
    assert message.startswith(f"HERALD_AMQP_URL: {said}")
    assert "\n" not in message


def test_repr_masks_every_node_s_password() -> None:
    s = Settings.from_env({"HERALD_AMQP_URL": f"amqp://a:{SECRET}@n1/,amqp://b:{SECRET}x@n2/"})
    assert SECRET not in repr(s)
    assert "amqp://a:***@n1/,amqp://b:***@n2/" in repr(s)


def test_password_of_a_valid_url_stays_usable() -> None:
    s = Settings.from_env({"HERALD_AMQP_URL": f"amqp://user:{SECRET}@broker/"})
    assert s.amqp_url == f"amqp://user:{SECRET}@broker/"


ALL_SECRETS = {
    "HERALD_ADMIN_TOKEN": "admin-" + SECRET,
    "HERALD_TWILIO_AUTH_TOKEN": "twilio-" + SECRET,
    "HERALD_WHATSAPP_TOKEN": "wa-" + SECRET,
    "HERALD_MESSENGER_PAGE_TOKEN": "page-" + SECRET,
    "HERALD_META_APP_SECRET": "app-" + SECRET,
    "HERALD_WEBHOOK_VERIFY_TOKEN": "verify-" + SECRET,
    "HERALD_AMQP_URL": f"amqp://herald:amqp-{SECRET}@broker:5672/",
    "HERALD_DATABASE_URL": f"postgresql://herald:pg-{SECRET}@db:5432/herald",
}


def test_repr_of_settings_never_shows_secrets() -> None:
    s = Settings.from_env({**ALL_SECRETS, "HERALD_TWILIO_ACCOUNT_SID": "AC123"})
    text = repr(s)
    assert SECRET not in text
    assert SECRET not in str(s)
    assert SECRET not in f"{s!r} {s}"
    # Not secret, and useful when debugging configuration:
    assert "broker:5672" in text
    assert "db:5432" in text
    assert "AC123" in text
    assert "admin_token='***'" in text


def test_repr_hides_a_password_given_as_a_query_parameter() -> None:
    url = f"postgresql://herald@db/herald?sslmode=require&password={SECRET}"
    s = Settings.from_env({"HERALD_DATABASE_URL": url})
    assert s.database_url == url
    assert SECRET not in repr(s)
    assert "sslmode=require" in repr(s)


def test_repr_after_replace_still_hides_secrets() -> None:
    s = Settings.from_env({}).replace(admin_token=SECRET, prefix="other")
    assert s.prefix == "other"
    assert s.admin_token == SECRET
    assert SECRET not in repr(s)


def test_every_setting_is_bound_to_a_herald_variable() -> None:
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"].startswith("HERALD_"), f.name
        assert callable(f.metadata["parse"]), f.name


@pytest.mark.parametrize(
    "var",
    sorted({f.metadata["env"] for f in dataclasses.fields(Settings)
            if any(w in f.metadata["env"] for w in ("TOKEN", "SECRET", "PASSWORD"))}),
)
def test_blank_secret_error_does_not_echo_the_value(var: str) -> None:
    # Whitespace is the only thing a free-text secret can be rejected for; even
    # then the message shows a placeholder, never the value.
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: " \t "})
    assert str(info.value).startswith(f"{var}: ")
    assert "'***'" in str(info.value)


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prefix = "other"  # type: ignore[misc]


def test_both_listeners_bind_loopback_by_default() -> None:
    s = Settings.from_env({})
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert (s.admin_host, s.admin_port) == ("127.0.0.1", 8081)
    s = Settings.from_env({"HERALD_HTTP_HOST": "0.0.0.0", "HERALD_ADMIN_HOST": "::",
                           "HERALD_ADMIN_PORT": "9100"})
    assert (s.http_host, s.admin_host, s.admin_port) == ("0.0.0.0", "::", 9100)


def test_the_admin_listener_needs_its_own_port() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"HERALD_HTTP_PORT": "9000", "HERALD_ADMIN_PORT": "9000"})
    assert str(info.value).startswith("HERALD_ADMIN_PORT: must differ from HERALD_HTTP_PORT")
    # Both chosen by the system (tests): two different ports.
    assert Settings.from_env({"HERALD_HTTP_PORT": "0", "HERALD_ADMIN_PORT": "0"}).admin_port == 0
