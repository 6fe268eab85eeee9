"""Settings: read once from the environment into one typed object.

No other module reads ``os.environ``. A bad value raises :class:`ConfigError`
whose message is one line naming the variable, which the CLI prints as is.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

from consumer.admin.tokens import parse_tokens
from consumer.delivery.outage import Thresholds
from consumer.errors import ConfigError

T = TypeVar("T")

_PREFIX_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,100}$")

# The largest send request accepted, in bytes: far above any text message
# (Twilio takes 1,600 characters, WhatsApp 4,096) and room for an http
# channel's JSON document; stored whole in PostgreSQL with every message.
DEFAULT_MAX_BODY_BYTES = 256 * 1024
# RabbitMQ 4's default largest message.
MAX_BODY_BYTES_LIMIT = 16 * 1024 * 1024


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {' or '.join(schemes)} URL")
        try:
            _ = parts.port  # raises for a port that is out of range or not a number
        except ValueError:
            raise ValueError("has an invalid port") from None
        return raw.rstrip("/") if parts.scheme in ("http", "https") else raw

    # What the parser accepts, in words: the configuration reference shows it.
    parse.__doc__ = "a URL: " + " or ".join(f"`{scheme}://…`" for scheme in schemes)
    return parse


def _amqp_urls(raw: str) -> str:
    """one `amqp://…` or `amqps://…` URL, or a cluster's node URLs separated by commas"""
    urls = split_urls(raw)
    if not urls:
        raise ValueError("must name at least one amqp:// or amqps:// URL")
    check = _url("amqp", "amqps")
    for number, url in enumerate(urls, 1):
        try:
            check(url)
        except ValueError as exc:
            where = f"URL {number} of {len(urls)} " if len(urls) > 1 else ""
            raise ValueError(f"{where}{exc}") from None
    return raw


def split_urls(raw: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list (a comma inside a password is written %2C)."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    parse.__doc__ = f"a whole number from {lo} to {hi}"
    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return value

    parse.__doc__ = f"a number from {lo:g} to {hi:g}"
    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    parse.__doc__ = f"one of {', '.join(options)}"
    return parse


def _prefix(raw: str) -> str:
    """letters, digits, '.', '_' or '-' (up to 101 characters)"""
    if not _PREFIX_RE.fullmatch(raw):
        raise ValueError("must be letters, digits, '.', '_' or '-' (up to 101 characters)")
    return raw


def _text(raw: str) -> str:
    """any non-blank text"""
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """comma-separated CIDRs, e.g. `127.0.0.0/8,10.1.0.0/16`"""
    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(
                f"{part[:50]!r} is not a network (comma-separated CIDRs like 127.0.0.0/8)"
            ) from None
    return tuple(networks)


def _signing_secrets(raw: str) -> tuple[str, ...]:
    """comma-separated secrets of 16 characters or more, newest first"""
    secrets = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not secrets:
        raise ValueError("must name at least one secret")
    if any(len(s) < 16 for s in secrets):
        raise ValueError("each secret must be at least 16 characters")
    return secrets


def _admin_tokens(raw: str) -> str:
    """comma-separated `label:role:token`, each token 16 characters or more"""
    # Checked at start-up (format, roles, weak tokens); raises ConfigError's one line.
    parse_tokens(_text(raw))
    return raw


def _env(var: str, parse: Callable[[str], Any] = _text, default: Any = None) -> Any:
    """A dataclass field bound to an environment variable."""
    return field(default=default, metadata={"env": var, "parse": parse})


@dataclass(frozen=True)
class Settings:
    # One node, or the nodes of a cluster separated by commas (consumer.broker).
    amqp_url: str = _env("HERALD_AMQP_URL", _amqp_urls, "amqp://guest:guest@127.0.0.1:5672/")
    database_url: str = _env(
        "HERALD_DATABASE_URL",
        _url("postgresql", "postgres"),
        "postgresql://herald:herald@127.0.0.1:5432/herald",
    )
    prefix: str = _env("HERALD_PREFIX", _prefix, "herald")
    # Loopback unless told otherwise: containers and deploy files set 0.0.0.0.
    http_host: str = _env("HERALD_HTTP_HOST", _text, "127.0.0.1")
    http_port: int = _env("HERALD_HTTP_PORT", _int(0, 65535), 8080)
    admin_host: str = _env("HERALD_ADMIN_HOST", _text, "127.0.0.1")
    admin_port: int = _env("HERALD_ADMIN_PORT", _int(0, 65535), 8081)
    public_url: str = _env("HERALD_PUBLIC_URL", _url("http", "https"), "http://127.0.0.1:8080")
    prefetch: int = _env("HERALD_PREFETCH", _int(1, 65535), 256)
    prefetch_max: int = _env("HERALD_PREFETCH_MAX", _int(1, 65535), 2048)
    admin_token: str | None = _env("HERALD_ADMIN_TOKEN", _admin_tokens)
    send_timeout_s: float = _env("HERALD_SEND_TIMEOUT_S", _float(0.1, 300), 10.0)
    max_attempts: int = _env("HERALD_MAX_ATTEMPTS", _int(1, 100), 5)
    base_delay_s: float = _env("HERALD_BASE_DELAY_S", _float(1, 262143), 30.0)
    max_delay_s: float = _env("HERALD_MAX_DELAY_S", _float(1, 262143), 3600.0)
    retry_mode: str = _env("HERALD_RETRY_MODE", _choice("auto", "manual"), "auto")
    retry_jitter: float = _env("HERALD_RETRY_JITTER", _float(0, 1), 0.1)
    retry_rules: str = _env("HERALD_RETRY_RULES", _choice("builtin", "off"), "builtin")
    campaign_quiet_s: float = _env("HERALD_CAMPAIGN_QUIET_S", _float(1, 86400), 300.0)
    delivery_limit: int = _env("HERALD_DELIVERY_LIMIT", _int(1, 1000), 20)
    max_body_bytes: int = _env("HERALD_MAX_BODY_BYTES", _int(1024, MAX_BODY_BYTES_LIMIT),
                               DEFAULT_MAX_BODY_BYTES)
    pause_base_s: float = _env("HERALD_PAUSE_BASE_S", _float(0.1, 3600), 5.0)
    # The http channel: networks it may reach although not public (none by
    # default), and the secrets it signs its POSTs with (newest first).
    http_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _env(
        "HERALD_HTTP_ALLOW_NETWORKS", _networks, ())
    http_signing_secrets: tuple[str, ...] = _env(
        "HERALD_HTTP_SIGNING_SECRETS", _signing_secrets, ())
    http_rate: float = _env("HERALD_HTTP_RATE", _float(0, 100000), 0.0)
    sms_rate: float = _env("HERALD_SMS_RATE", _float(0, 100000), 0.0)
    whatsapp_rate: float = _env("HERALD_WHATSAPP_RATE", _float(0, 100000), 0.0)
    messenger_rate: float = _env("HERALD_MESSENGER_RATE", _float(0, 100000), 0.0)
    outage_consecutive: int = _env("HERALD_OUTAGE_CONSECUTIVE", _int(3, 10000), 17)
    outage_window: int = _env("HERALD_OUTAGE_WINDOW", _int(10, 100000), 60)
    pause_max_s: float = _env("HERALD_PAUSE_MAX_S", _float(0.1, 86400), 300.0)
    log_level: str = _env(
        "HERALD_LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info"
    )
    db_pool_size: int = _env("HERALD_DB_POOL_SIZE", _int(1, 200), 10)
    sandbox_port: int = _env("HERALD_SANDBOX_PORT", _int(0, 65535), 8090)
    twilio_account_sid: str | None = _env("HERALD_TWILIO_ACCOUNT_SID")
    twilio_auth_token: str | None = _env("HERALD_TWILIO_AUTH_TOKEN")
    twilio_from: str | None = _env("HERALD_TWILIO_FROM")
    twilio_messaging_service_sid: str | None = _env("HERALD_TWILIO_MESSAGING_SERVICE_SID")
    twilio_base_url: str = _env(
        "HERALD_TWILIO_BASE_URL", _url("http", "https"), "https://api.twilio.com"
    )
    whatsapp_token: str | None = _env("HERALD_WHATSAPP_TOKEN")
    whatsapp_phone_number_id: str | None = _env("HERALD_WHATSAPP_PHONE_NUMBER_ID")
    messenger_page_token: str | None = _env("HERALD_MESSENGER_PAGE_TOKEN")
    meta_base_url: str = _env(
        "HERALD_META_BASE_URL", _url("http", "https"), "https://graph.facebook.com"
    )
    meta_api_version: str = _env("HERALD_META_API_VERSION", _text, "v21.0")
    meta_app_secret: str | None = _env("HERALD_META_APP_SECRET")
    webhook_verify_token: str | None = _env("HERALD_WEBHOOK_VERIFY_TOKEN")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f.metadata["env"]
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise ConfigError(f"{var}: {exc} (got {_shown(var, raw)})") from None
        settings = cls(**values)
        settings._check_consistency()
        return settings

    def _check_consistency(self) -> None:
        if self.base_delay_s > self.max_delay_s:
            raise ConfigError(
                "HERALD_BASE_DELAY_S: must not exceed HERALD_MAX_DELAY_S "
                f"({self.base_delay_s:g} > {self.max_delay_s:g})"
            )
        if self.admin_port == self.http_port != 0:
            raise ConfigError(
                "HERALD_ADMIN_PORT: must differ from HERALD_HTTP_PORT (the admin API and"
                f" metrics have their own listener; both are {self.http_port})"
            )

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker's node URLs, in the order they are tried."""
        return split_urls(self.amqp_url)

    def outage_thresholds(self) -> Thresholds:
        """When a failure domain opens and how long it stays open (consumer.delivery.outage)."""
        return Thresholds(window_size=self.outage_window, consecutive=self.outage_consecutive,
                          base_cooldown_s=self.pause_base_s,
                          max_cooldown_s=max(self.pause_max_s, self.pause_base_s),
                          probe_timeout_s=self.send_timeout_s + 5.0)

    def rate_for(self, channel: str) -> float | None:
        """The channel's send rate limit (messages/s per process), None when unlimited."""
        rate = float(getattr(self, f"{channel}_rate", 0.0))
        return rate if rate > 0 else None

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return type(self)(**values)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={_shown(f.metadata['env'], str(getattr(self, f.name)))}"
            for f in fields(self)
            if getattr(self, f.name) is not None
        )
        return f"Settings({shown})"


_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD")
_USERINFO_RE = re.compile(r"(://[^/?#]*?):[^/?#]*@")
_QUERY_PASSWORD_RE = re.compile(r"([?&](?:ssl)?password)=[^&#]*", re.IGNORECASE)


def _shown(var: str, raw: str) -> str:
    """How a value may appear in messages and logs: secrets never, URLs without passwords."""
    if any(word in var for word in _SECRET_WORDS):
        return "'***'"
    # A list of URLs (a cluster's nodes) is masked URL by URL.
    raw = ",".join(_without_password(part) for part in raw.split(","))
    return repr(raw if len(raw) <= 80 else raw[:77] + "...")


def _without_password(raw: str) -> str:
    try:
        parts = urlsplit(raw)
        password = parts.password
    except ValueError:  # unparseable (e.g. a broken IPv6 host): hide any userinfo
        raw = _USERINFO_RE.sub(r"\1:***@", raw)
    else:
        if password:
            netloc = parts.netloc.replace(f":{password}@", ":***@")
            raw = parts._replace(netloc=netloc).geturl()
    # libpq (and asyncpg) also take the password as a query parameter.
    return _QUERY_PASSWORD_RE.sub(r"\1=***", raw)


# HERALD_* variables that belong to the development tooling, not to Herald:
# deploy/local's scripts (ports, start timeouts), `make run` (HERALD_NO_DEMO)
# and the sandbox's helpers. Herald ignores them without a warning.
TOOLING_PREFIXES = ("HERALD_LOCAL_", "HERALD_SANDBOX_")
TOOLING_VARIABLES = frozenset({"HERALD_NO_DEMO"})
# A name shown as it is; anything else (a newline, say) is shown quoted.
_VAR_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,100}")


def known_variables() -> list[str]:
    """Every variable a setting is read from."""
    return [f.metadata["env"] for f in fields(Settings)]


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per ``HERALD_*`` variable that nothing reads (a typo such as
    ``HERALD_PREFECH`` would otherwise be ignored in silence), naming the closest
    setting when one is close. Values are never shown: they may be secrets."""
    environ = os.environ if environ is None else environ
    known = known_variables()
    suffixes = {var.removeprefix("HERALD_"): var for var in known}
    warnings = []
    for name in sorted(environ):
        if (not name.startswith("HERALD_") or name in known or name in TOOLING_VARIABLES
                or name.startswith(TOOLING_PREFIXES)):
            continue
        # Compared without the common prefix, which would make every name look close.
        close = difflib.get_close_matches(name.removeprefix("HERALD_"), suffixes, n=1,
                                          cutoff=0.6)
        hint = f"did you mean {suffixes[close[0]]}?" if close else "no setting has a similar name"
        shown = name if _VAR_NAME_RE.fullmatch(name) else repr(name[:100])
        warnings.append(f"{shown} is not a Herald setting and is ignored; {hint}")
    return warnings
