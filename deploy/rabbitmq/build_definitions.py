"""Write deploy/rabbitmq/definitions.json: Herald's topology for prefix ``herald``
(exactly what ``HERALD_PREFIX=herald herald topology export`` prints) plus the
virtual host, user and permissions that deploy/compose.yaml's RabbitMQ needs.

RabbitMQ creates neither its default user nor its default virtual host when a
blank node imports definitions at boot, so the file must bring its own: user
``herald``, password ``herald`` (a local demo credential; in Kubernetes the
RabbitMQ Cluster Operator makes the credentials and Herald declares its
topology at start-up). tests/deploy/test_compose.py fails when the file and
the topology drift apart.

    python deploy/rabbitmq/build_definitions.py          # rewrite the file
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from consumer.topology import Names, Topology  # noqa: E402

PATH = Path(__file__).with_name("definitions.json")
PREFIX = "herald"
USER, PASSWORD = "herald", "herald"
# A fixed salt keeps the file reproducible; RabbitMQ accepts any 4 bytes.
SALT = b"hrld"


def password_hash(password: str, salt: bytes = SALT) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def build() -> dict[str, Any]:
    definitions = Topology(Names(PREFIX)).definitions()
    access = {
        "vhosts": [{"name": "/"}],
        "users": [{"name": USER, "password_hash": password_hash(PASSWORD),
                   "hashing_algorithm": "rabbit_password_hashing_sha256",
                   "tags": ["administrator"]}],
        "permissions": [{"user": USER, "vhost": "/", "configure": ".*", "write": ".*",
                         "read": ".*"}],
    }
    return {**access, **definitions}


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH.relative_to(REPO)}")
