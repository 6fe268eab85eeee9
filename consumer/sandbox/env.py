"""The sandbox's fake credentials, and the Herald environment that points at it.

The sandbox checks the credentials Herald sends exactly as the providers do,
so Herald and the sandbox must agree on them: :func:`sandbox_env` gives the
``HERALD_*`` variables matching :class:`SandboxCredentials`' defaults, for
``make run``, demos and tests. ``python -m consumer.sandbox [PORT]`` prints
them as shell ``export`` lines.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from consumer.settings import Settings


@dataclass(frozen=True)
class SandboxCredentials:
    """What the fake providers accept, and the ids they answer with."""

    twilio_account_sid: str = "AC" + "5a4db0c5" * 4
    twilio_auth_token: str = "sandbox-twilio-auth-token"
    twilio_from: str = "+15005550006"
    whatsapp_token: str = "sandbox-whatsapp-token"
    whatsapp_phone_number_id: str = "100000000000001"
    messenger_page_token: str = "sandbox-messenger-page-token"
    meta_app_secret: str = "sandbox-meta-app-secret"
    webhook_verify_token: str = "sandbox-verify-token"
    # Ids that appear in Meta's webhooks (the business account, the page, the
    # WhatsApp number as displayed); Herald needs none of them to send.
    waba_id: str = "100000000000002"
    page_id: str = "100000000000003"
    display_phone_number: str = "15550000001"

    @classmethod
    def from_settings(cls, settings: Settings) -> SandboxCredentials:
        """The credentials of ``settings`` where set, the sandbox defaults elsewhere."""
        values = {
            f.name: getattr(settings, f.name)
            for f in fields(cls)
            if getattr(settings, f.name, None)
        }
        return cls(**values)


def sandbox_env(
    port: int = 8090,
    *,
    host: str = "127.0.0.1",
    credentials: SandboxCredentials | None = None,
    public_url: str | None = None,
) -> dict[str, str]:
    """The ``HERALD_*`` variables that make Herald send to a sandbox on ``host:port``.

    Base URLs point at the sandbox and credentials are the sandbox's fakes.
    ``HERALD_PUBLIC_URL`` (where the sandbox's Twilio callbacks go) is only
    included when given.
    """
    creds = credentials or SandboxCredentials()
    base = f"http://{host}:{port}"
    env = {
        "HERALD_SANDBOX_PORT": str(port),
        "HERALD_TWILIO_BASE_URL": base,
        "HERALD_TWILIO_ACCOUNT_SID": creds.twilio_account_sid,
        "HERALD_TWILIO_AUTH_TOKEN": creds.twilio_auth_token,
        "HERALD_TWILIO_FROM": creds.twilio_from,
        "HERALD_META_BASE_URL": base,
        "HERALD_WHATSAPP_TOKEN": creds.whatsapp_token,
        "HERALD_WHATSAPP_PHONE_NUMBER_ID": creds.whatsapp_phone_number_id,
        "HERALD_MESSENGER_PAGE_TOKEN": creds.messenger_page_token,
        "HERALD_META_APP_SECRET": creds.meta_app_secret,
        "HERALD_WEBHOOK_VERIFY_TOKEN": creds.webhook_verify_token,
    }
    if public_url is not None:
        env["HERALD_PUBLIC_URL"] = public_url
    return env

