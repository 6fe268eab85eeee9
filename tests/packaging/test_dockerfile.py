"""The Dockerfile installs the built wheel (no Docker engine here: checked by reading)."""

from __future__ import annotations

import re

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]


def test_the_build_stage_builds_and_installs_the_wheel() -> None:
    build, _ = stages()
    assert build.split()[1:3] == ["AS", "build"]
    assert re.search(r"pip wheel --no-deps --wheel-dir /dist \.", build)
    assert re.search(r"/opt/herald/bin/pip install /dist/herald-\*\.whl", build)
    assert "-e" not in re.findall(r"pip install (\S+)", DOCKERFILE)
    # The wheel's migrations are checked outside the source tree.
    assert "cd / && /opt/herald/bin/python -c" in build and "discover()" in build
    for source in ("pyproject.toml", "consumer/", "schemas/", "sql/"):
        assert re.search(rf"^COPY .*\b{re.escape(source)}", build, re.MULTILINE), source


def test_the_image_holds_only_the_installed_environment() -> None:
    _, runtime = stages()
    copies = re.findall(r"^COPY (.+)$", runtime, re.MULTILINE)
    assert copies == ["--from=build /opt/herald /opt/herald"]
    assert "/app" not in runtime and "/src" not in runtime
    assert "ENV PATH=/opt/herald/bin:$PATH" in runtime
