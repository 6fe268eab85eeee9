"""``herald sandbox``: local fake providers speaking the real wire formats."""

from consumer.sandbox.app import Received, Sandbox

__all__ = ["Received", "Sandbox"]
