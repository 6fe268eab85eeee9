"""deploy/k8s: every manifest validates, and the pieces fit together.

- Core kinds (Deployment, Service, Ingress, PodDisruptionBudget, ConfigMap,
  Secret, Namespace) are validated offline by kubernetes-validate against the
  Kubernetes 1.33 OpenAPI schemas, in strict mode (unknown fields refused).
- KEDA's ScaledObject and TriggerAuthentication are validated against a JSON
  Schema derived from cloudcoil-models-keda (pydantic models generated from
  KEDA's CRDs), with unknown fields refused.
- RabbitmqCluster is validated against deploy/k8s/schemas/rabbitmqcluster.schema.json,
  a minimal schema written from the operator's API reference (the CRD itself is
  not available offline); its core-typed fields (affinity, tolerations,
  resources) are checked by kubernetes-validate inside a synthetic Pod.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

from consumer.delivery.pipeline import LEASE_MARGIN_S
from consumer.settings import Settings
from consumer.topology import Names, Topology
from schemas.send_request import CHANNELS
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"
ROLES = ("senders", "events", "gateway")
# Time Herald needs after the in-flight grace period: a last drain (1 s), then
# closing the HTTP server, the broker connection and the pool (up to 10 s).
CLOSE_MARGIN_S = 15


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in manifest_files():
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def find(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in documents()
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = find(kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def strict(schema: Any) -> Any:
    """Refuse unknown fields: additionalProperties false wherever properties are listed."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


CRD_SCHEMAS: dict[tuple[str, str], Any] = {
    ("keda.sh/v1alpha1", "ScaledObject"):
        strict(keda.ScaledObject.model_json_schema(by_alias=True, mode="validation")),
    ("keda.sh/v1alpha1", "TriggerAuthentication"):
        strict(keda.TriggerAuthentication.model_json_schema(by_alias=True, mode="validation")),
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"):
        json.loads((K8S / "schemas" / "rabbitmqcluster.schema.json").read_text()),
}


def validate(doc: dict[str, Any]) -> None:
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, f"{doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


@pytest.mark.parametrize("doc", documents(), ids=ids(documents()))
def test_manifest_validates(doc: dict[str, Any]) -> None:
    validate(doc)


def test_validation_refuses_unknown_fields() -> None:
    """The validators are strict: a misspelt field fails, in core kinds and CRDs alike."""
    for kind, name, path in (("Deployment", "herald-senders", ("spec",)),
                             ("ScaledObject", "herald-senders", ("spec",)),
                             ("RabbitmqCluster", "herald-rabbitmq", ("spec",))):
        doc = json.loads(json.dumps(one(kind, name)))
        target = doc
        for key in path:
            target = target[key]
        target["replicaz"] = 3
        with pytest.raises((AssertionError, kubernetes_validate.ValidationError)):
            validate(doc)


def test_rabbitmq_core_typed_fields_validate() -> None:
    spec = one("RabbitmqCluster", "herald-rabbitmq")["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rabbitmq-fields"},
           "spec": {"affinity": spec.get("affinity", {}),
                    "tolerations": spec.get("tolerations", []),
                    "containers": [{"name": "rabbitmq", "image": spec["image"],
                                    "resources": spec.get("resources", {})}]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


# -- how the pieces fit ---------------------------------------------------------------------


def deployments() -> Iterator[tuple[str, dict[str, Any]]]:
    for role in ROLES:
        yield role, one("Deployment", f"herald-{role}")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return found


def config() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap", "herald-config")["data"]
    return data


def test_one_deployment_per_role_with_health_probes() -> None:
    for role, deployment in deployments():
        c = container(deployment)
        assert c["args"] == ["run", "--roles", role]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["ports"][0]["containerPort"] == int(config()["HERALD_HTTP_PORT"])
        assert c["image"].split(":")[1] not in ("", "latest")
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
        init = deployment["spec"]["template"]["spec"]["initContainers"][0]
        assert init["args"] == ["migrate"] and init["image"] == c["image"]


def test_termination_grace_outlasts_the_in_flight_grace_period() -> None:
    in_flight_grace = float(config()["HERALD_SEND_TIMEOUT_S"]) + LEASE_MARGIN_S
    for role, deployment in deployments():
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = 5 if role == "gateway" else 0
        assert grace >= in_flight_grace + CLOSE_MARGIN_S + pre_stop, role


def test_every_deployment_has_a_disruption_budget() -> None:
    for role, deployment in deployments():
        budget = one("PodDisruptionBudget", f"herald-{role}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = budget["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), role
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"], (
            f"{role}: a budget equal to the replicas would block every drain")


def test_config_from_configmap_and_credentials_from_secrets() -> None:
    known = {f.metadata["env"] for f in fields(Settings)}
    secret = one("Secret", "herald-credentials")["stringData"]
    assert set(config()) <= known, f"unknown settings in the ConfigMap: {set(config()) - known}"
    assert set(secret) <= known, f"unknown settings in the Secret: {set(secret) - known}"
    for key in secret:
        assert key not in config(), f"{key} is a credential: Secret only"
    assert not any(word in key for key in config() for word in ("TOKEN", "SECRET", "PASSWORD"))
    cluster = one("RabbitmqCluster", "herald-rabbitmq")["metadata"]["name"]
    for _, deployment in deployments():
        c = container(deployment)
        refs = {next(iter(r.values()))["name"] for r in c["envFrom"]}
        assert refs == {"herald-config", "herald-credentials"}
        secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
        assert secret_refs == {f"{cluster}-default-user"}
        amqp = next(e["value"] for e in c["env"] if e["name"] == "HERALD_AMQP_URL")
        assert f"@{cluster}." in amqp and "$(RABBITMQ_PASSWORD)" in amqp


def test_rabbitmq_cluster_has_three_nodes_for_quorum_queues() -> None:
    cluster = one("RabbitmqCluster", "herald-rabbitmq")
    assert cluster["spec"]["replicas"] >= 3
    assert cluster["spec"]["image"].endswith("-management")


def test_keda_scales_senders_on_every_send_queue() -> None:
    scaled = one("ScaledObject", "herald-senders")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "herald-senders")
    names = Names(config()["HERALD_PREFIX"])
    send_queues = {q["name"] for q in Topology(names).queues
                   if q["name"].startswith(f"{names.prefix}.send.")}
    assert {names.send_queue(channel) for channel in CHANNELS} <= send_queues
    queues = {t["metadata"]["queueName"] for t in scaled["spec"]["triggers"]}
    assert queues == send_queues, "keda.yaml needs one trigger per queue the senders consume"
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert find("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert scaled["spec"]["minReplicaCount"] >= 1


def test_gateway_services_route_to_gateway_pods() -> None:
    labels = one("Deployment", "herald-gateway")["spec"]["template"]["metadata"]["labels"]
    for name, port in (("herald-gateway", "http"), ("herald-gateway-admin", "admin")):
        service = one("Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        # Each Service exposes one listener only: the public one never carries admin.
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [port], name


def test_every_pod_has_both_listeners_probed_on_http_and_scraped_on_admin() -> None:
    data = config()
    assert data["HERALD_HTTP_HOST"] == data["HERALD_ADMIN_HOST"] == "0.0.0.0"
    ports = {"http": int(data["HERALD_HTTP_PORT"]), "admin": int(data["HERALD_ADMIN_PORT"])}
    assert ports["http"] != ports["admin"]
    for role, deployment in deployments():
        c = container(deployment)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == ports, role
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == "http", (role, probe)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ports["admin"]), role
        assert annotations["prometheus.io/path"] == "/metrics"


def test_the_ingress_publishes_the_webhooks_and_nothing_else() -> None:
    ingresses = find("Ingress")
    assert [i["metadata"]["name"] for i in ingresses] == ["herald-webhooks"]
    public_host = urlsplit(config()["HERALD_PUBLIC_URL"]).hostname
    admin_service = one("Service", "herald-gateway-admin")["metadata"]["name"]
    for ingress in ingresses:
        spec = ingress["spec"]
        assert "defaultBackend" not in spec
        assert [rule["host"] for rule in spec["rules"]] == [public_host]
        paths = [p for rule in spec["rules"] for p in rule["http"]["paths"]]
        assert paths
        for path in paths:
            # Kubernetes' Prefix matches whole path elements: /webhooks/ is /webhooks/*.
            assert path["path"] == "/webhooks/" and path["pathType"] == "Prefix", path
            backend = path["backend"]["service"]
            assert backend["name"] == "herald-gateway" != admin_service
            assert backend["port"] == {"name": "http"}
        assert spec["tls"][0]["hosts"] == [public_host]
