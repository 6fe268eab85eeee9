"""``herald sandbox``: local fake providers speaking the real wire formats."""

from consumer.sandbox.app import Sandbox
from consumer.sandbox.callbacks import CallbackConfig
from consumer.sandbox.env import SandboxCredentials, sandbox_env
from consumer.sandbox.providers import ProviderSandbox
from consumer.sandbox.record import Received
from consumer.sandbox.scripts import Script

__all__ = [
    "CallbackConfig",
    "ProviderSandbox",
    "Received",
    "Sandbox",
    "SandboxCredentials",
    "Script",
    "sandbox_env",
]
