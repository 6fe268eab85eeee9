"""Dockerfile, deploy/compose.yaml and deploy/rabbitmq.

No Docker engine runs here, so the Compose file is checked, not started: it
validates against the Compose Specification's JSON Schema (vendored by the
check-jsonschema package), names only images with pinned tags, and every file
it mounts exists. Its Prometheus configuration passes `promtool check config`.
The RabbitMQ definitions it loads at boot are Herald's topology exactly (no
drift from `herald topology export`) and import into a real RabbitMQ, after
which Herald's own declarations are accepted as identical.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import jsonschema
import pytest
import yaml

from consumer.topology import Names, Topology
from tests.conftest import AMQP_URL, REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
RABBITMQ_SH = DEPLOY / "local" / "rabbitmq.sh"
# Images from public registries, by repository; each must carry a version tag.
REGISTRY_IMAGES = {"rabbitmq", "postgres", "prom/prometheus", "grafana/grafana"}
VERSION_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?$")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def project_version() -> str:
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


# -- Compose --------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    schema_text = (resources.files("check_jsonschema.builtin_schemas.vendor")
                   .joinpath("compose-spec.json").read_text())
    schema = json.loads(schema_text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_images_are_pinned() -> None:
    for name, service in services().items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and VERSION_TAG.match(tag), f"{name}: {image!r} is not pinned"
        if "build" in service:
            assert image == f"herald:{project_version()}", f"{name}: built image {image!r}"
        else:
            assert repository in REGISTRY_IMAGES, f"{name}: unexpected image {image!r}"
    assert services()["rabbitmq"]["image"].endswith("-management")


def test_dockerfile_base_image_is_pinned_slim() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base, "Dockerfile: no ARG PYTHON_IMAGE"
    repository, _, tag = base.group(1).rpartition(":")
    assert repository == "python" and re.fullmatch(r"3\.1[1-9]\.\d+-slim-[a-z]+", tag)


def test_dockerfile_runs_herald_as_non_root_with_a_health_check() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert re.search(r"^HEALTHCHECK .*/healthz", dockerfile, re.MULTILINE | re.DOTALL)
    assert 'ENTRYPOINT ["herald"]' in dockerfile
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".local", "tests"):
        assert path in ignored, f".dockerignore should exclude {path}"


def test_compose_runs_herald_split_by_role() -> None:
    s = services()
    for role in ("senders", "events", "gateway"):
        assert s[f"herald-{role}"]["command"] == ["run", "--roles", role]
    assert s["herald-senders"]["deploy"]["replicas"] == 2
    assert s["migrate"]["command"] == ["migrate"]
    for role in ("senders", "events", "gateway"):
        depends = s[f"herald-{role}"]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["rabbitmq"]["condition"] == "service_healthy"
    assert s["sandbox"]["command"][0] == "sandbox"
    assert {"rabbitmq", "postgres", "prometheus", "grafana"} <= set(s)


def test_compose_publishes_the_admin_listener_on_the_hosts_loopback_only() -> None:
    env = services()["herald-gateway"]["environment"]
    public, admin = env["HERALD_HTTP_PORT"], env["HERALD_ADMIN_PORT"]
    assert public != admin
    assert env["HERALD_HTTP_HOST"] == env["HERALD_ADMIN_HOST"] == "0.0.0.0"
    ports = services()["herald-gateway"]["ports"]
    assert f"{public}:{public}" in ports
    assert f"127.0.0.1:{admin}:{admin}" in ports
    assert not [p for p in ports if p.endswith(f":{admin}") and not p.startswith("127.0.0.1:")]
    for role in ("senders", "events"):
        assert "ports" not in services()[f"herald-{role}"], role
    # Prometheus scrapes /metrics where it is: the admin port.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    herald = next(job for job in config["scrape_configs"] if job["job_name"] == "herald")
    assert [c["port"] for c in herald["dns_sd_configs"]] == [int(admin)]


def test_dockerfile_exposes_both_listeners() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE)
    assert exposed and set(exposed.group(1).split()) == {"8080", "8081"}
    assert "HERALD_ADMIN_PORT=8081" in dockerfile and "HERALD_HTTP_PORT=8080" in dockerfile


def test_compose_references_exist() -> None:
    data = compose()
    named_volumes = set(data.get("volumes") or {})
    for name, service in data["services"].items():
        depends = service.get("depends_on") or []
        for other in depends:
            assert other in data["services"], f"{name} depends on unknown {other}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file()


def test_grafana_and_prometheus_are_provisioned() -> None:
    grafana = services()["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    prometheus = services()["prometheus"]["volumes"]
    assert "./prometheus/herald-rules.yaml:/etc/prometheus/herald-rules.yaml:ro" in prometheus


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run `deploy/local/prometheus.sh install` "
                    "(make services does)")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/herald-rules.yaml"]
    herald = next(job for job in config["scrape_configs"] if job["job_name"] == "herald")
    names = herald["dns_sd_configs"][0]["names"]
    assert set(names) == {"herald-senders", "herald-events", "herald-gateway"} <= set(services())
    # The rules live at a container path; point at the repository's copy to check.
    config["rule_files"] = [str(DEPLOY / "prometheus" / "herald-rules.yaml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(local)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- RabbitMQ definitions ---------------------------------------------------------------


def test_definitions_are_the_topology_export() -> None:
    """definitions.json carries exactly what `herald topology export` prints for prefix herald."""
    result = subprocess.run(
        [sys.executable, "-m", "consumer", "topology", "export"], cwd=REPO, capture_output=True,
        text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HERALD_PREFIX": "herald"})
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    definitions = json.loads(DEFINITIONS.read_text())
    assert set(exported) == {"exchanges", "queues", "bindings"}
    for key in exported:
        assert definitions[key] == exported[key], (
            f"deploy/rabbitmq/definitions.json {key} differ from `herald topology export`: "
            "run python deploy/rabbitmq/build_definitions.py")
    assert set(definitions) == {"vhosts", "users", "permissions", *exported}


def test_definitions_file_is_the_generated_one() -> None:
    sys.path.insert(0, str(DEPLOY / "rabbitmq"))
    try:
        import build_definitions
    finally:
        sys.path.remove(str(DEPLOY / "rabbitmq"))
    assert DEFINITIONS.read_text() == build_definitions.render(), (
        "run python deploy/rabbitmq/build_definitions.py")


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run([str(RABBITMQ_SH), "ctl", *args], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def imported_vhost(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """definitions.json imported into the local RabbitMQ under a fresh vhost and user name."""
    name = f"t-defs-{uuid.uuid4().hex[:8]}"
    definitions = json.loads(DEFINITIONS.read_text())
    text = json.dumps(definitions)
    text = text.replace('"vhost": "/"', f'"vhost": "{name}"')
    text = text.replace('"name": "herald", "password_hash"', f'"name": "{name}", "password_hash"')
    text = text.replace('"user": "herald"', f'"user": "{name}"')
    copy = json.loads(text)
    copy["vhosts"] = [{"name": name}]
    path = tmp_path / "definitions.json"
    path.write_text(json.dumps(copy))
    rabbitmqctl("import_definitions", str(path))
    try:
        yield name, name
    finally:
        rabbitmqctl("delete_vhost", name)
        rabbitmqctl("delete_user", name)


async def test_definitions_import_into_rabbitmq_and_match_herald(
    imported_vhost: tuple[str, str],
) -> None:
    vhost, user = imported_vhost
    broker = urlsplit(AMQP_URL)
    # The password hash in the file is right: the user logs in with the documented password.
    url = f"amqp://{user}:herald@{broker.hostname}:{broker.port}/{quote(vhost, safe='')}"
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("herald.send.sms", passive=True)
        assert queue.declaration_result.message_count == 0
        # Herald declares its topology at start-up: the broker must find every
        # exchange and queue identical to the imported ones (else PRECONDITION_FAILED,
        # or an outdated parking or events queue).
        assert await Topology(Names("herald")).declare(connection) == []


def test_the_broker_image_is_a_version_the_matrix_tests() -> None:
    """Compose and Kubernetes run a RabbitMQ that `make test` runs the suite on
    (issue #13): its version is a row of deploy/local/BROKERS.md's table and a
    version of the Makefile's MATRIX."""
    tested = set(re.findall(r"^\| (\d+\.\d+\.\d+) \| Debian",
                            (REPO / "deploy" / "local" / "BROKERS.md").read_text(), re.M))
    matrix = re.search(r"^MATRIX \?= (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert matrix is not None
    k8s = yaml.safe_load((REPO / "deploy" / "k8s" / "rabbitmq.yaml").read_text())
    for image in (services()["rabbitmq"]["image"], k8s["spec"]["image"]):
        version = image.split(":")[1].removesuffix("-management")
        assert version in tested, (image, tested)
        assert version.rsplit(".", 1)[0] in matrix.group(1).split(), (image, matrix.group(1))
