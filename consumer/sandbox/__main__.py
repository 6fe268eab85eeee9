"""``python -m consumer.sandbox [PORT]``: the sandbox's HERALD_* variables as ``export`` lines.

For shells and Makefiles: ``eval "$(python -m consumer.sandbox 8090)"``.
"""

from __future__ import annotations

import shlex
import sys

from consumer.sandbox.env import sandbox_env


def main(argv: list[str]) -> int:
    port = int(argv[0]) if argv else 8090
    for name, value in sandbox_env(port).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
