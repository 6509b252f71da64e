"""deploy/kubernetes: valid without a cluster, and consistent with what the worker needs.

Core kinds are checked by ``kubernetes-validate`` (the Kubernetes OpenAPI schemas ship in
the package: offline) in strict mode, so unknown fields fail. KEDA's kinds are CRDs the
package cannot know: they are checked against tests/unit/schemas/keda-v1alpha1.json (the
fields we use, unknown ones rejected) and their HPA ``behavior`` block against Kubernetes'
own HorizontalPodAutoscaler schema. The rest pins what no schema can know: the
ScaledObject scales our Deployment on our queue, the worker gets Docker the way the code
needs it, and every NANOGRID_* key is a real setting whose values pass the worker's own
startup checks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nanogrid_celery.config import PREFIX, Limits, Settings
from nanogrid_celery.delivery.visibility import check_visibility_timeout, longest_run_seconds

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
KEDA_SCHEMA = Path(__file__).with_name("schemas") / "keda-v1alpha1.json"
K8S_VERSION = "1.30.0"  # the oldest minor we claim (KEDA 2.14+ supports 1.28+)
SETTING_VARS = {PREFIX + f.name.upper() for f in (*fields(Settings), *fields(Limits))}


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in documents() if d["kind"] == kind]
    return doc


def worker_container() -> dict[str, Any]:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def settings_from_configmap() -> Settings:
    """What the worker would read from the ConfigMap (NANOGRID_<FIELD> -> field)."""
    data = one("ConfigMap")["data"]
    defaults = Settings()
    values: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for key, raw in data.items():
        name = key.removeprefix(PREFIX).lower()
        target = limits if hasattr(defaults.limits, name) else values
        default = getattr(defaults.limits if target is limits else defaults, name)
        if isinstance(default, bool):
            target[name] = raw.lower() in {"1", "true", "yes", "on"}
        else:
            target[name] = type(default)(raw)
    return dataclasses.replace(
        defaults, limits=dataclasses.replace(defaults.limits, **limits), **values
    )


CORE = [(name, doc) for name, doc in documents() if not doc["apiVersion"].startswith("keda.sh/")]
KEDA = [(name, doc) for name, doc in documents() if doc["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize(("name", "doc"), CORE, ids=[f"{n}:{d['kind']}" for n, d in CORE])
def test_core_manifests_validate_against_the_kubernetes_schemas(name, doc):
    for version in (K8S_VERSION, kubernetes_validate.latest_version()):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) against {version}: {exc.message} at {exc.path}")


@pytest.mark.parametrize(("name", "doc"), KEDA, ids=[f"{n}:{d['kind']}" for n, d in KEDA])
def test_keda_manifests_validate_against_the_crd_schema(name, doc):
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    kind_schema = {**schema, "$ref": f"#/$defs/{doc['kind']}"}
    errors = list(jsonschema.Draft202012Validator(kind_schema).iter_errors(doc))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_the_keda_schema_catches_the_usual_mistakes():
    """The vendored schema is only worth something if it rejects what it should."""
    schema = json.loads(KEDA_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/ScaledObject"})
    good = one("ScaledObject")
    trigger = good["spec"]["triggers"][0]

    def with_spec(**changes: Any) -> dict[str, Any]:
        return {**good, "spec": {**good["spec"], **changes}}

    def with_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
        return with_spec(triggers=[{**trigger, "metadata": metadata}])

    bad_docs = [
        with_spec(maxReplicas=3),  # the HPA's field name, not KEDA's maxReplicaCount
        with_metadata({"queueURL": "q"}),  # no awsRegion
        with_metadata({**trigger["metadata"], "queueLength": 40}),  # a number, not a string
        with_metadata({**trigger["metadata"], "queueLenght": "40"}),  # a typo
    ]
    for bad in bad_docs:
        assert not validator.is_valid(bad), bad["spec"]


def test_scaled_object_hpa_behavior_is_valid_for_kubernetes():
    behavior = one("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-nanogrid-worker"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 2,
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_scaled_object_scales_the_worker_on_our_queue():
    scaled, deployment = one("ScaledObject"), one("Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    meta = trigger["metadata"]
    config = one("ConfigMap")["data"]
    assert meta["queueURL"].rsplit("/", 1)[1] == config["NANOGRID_QUEUE"]
    assert meta["awsRegion"] == config["NANOGRID_SQS_REGION"]
    assert meta["scaleOnInFlight"] == "true"  # a held message is load: running or prefetched
    assert int(meta["queueLength"]) >= 1
    assert scaled["spec"]["minReplicaCount"] >= 1  # one warm host: a new pod is slow to serve
    auth = one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = one("Secret")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {
        "awsAccessKeyID",
        "awsSecretAccessKey",
    }


def test_queue_length_is_the_one_derived_in_the_doc():
    """deploy/README.md derives queueLength from the measured runs/s; both must agree."""
    (trigger,) = one("ScaledObject")["spec"]["triggers"]
    doc = (REPO / "deploy" / "README.md").read_text()
    derived = re.search(r"queueLength = [^\n]* = \*\*(\d+)\*\*", doc)
    assert derived, "deploy/README.md must state `queueLength = ... = **N**`"
    assert trigger["metadata"]["queueLength"] == derived.group(1)


def test_every_configmap_key_is_a_setting_and_passes_the_startup_checks():
    unknown = set(one("ConfigMap")["data"]) - SETTING_VARS
    assert not unknown, f"{sorted(unknown)} are not fields of Settings/Limits"
    settings = settings_from_configmap()
    check_visibility_timeout(settings)  # the worker refuses to start otherwise
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= longest_run_seconds(settings), "SIGKILL must not cut the longest run"


def test_worker_gets_docker_the_way_the_code_needs_it():
    spec = one("Deployment")["spec"]["template"]["spec"]
    container = worker_container()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/var/run/docker.sock"]]["hostPath"]["path"] == "/var/run/docker.sock"
    # sandboxes' cgroup files and /proc/<pid>/root are read directly: node's view of both
    assert spec["hostPID"] is True
    assert volumes[mounts["/sys/fs/cgroup"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    # lease dirs are bind-mounted by the node's dockerd: same path on both sides
    work_root = one("ConfigMap")["data"]["NANOGRID_WORK_ROOT"]
    assert volumes[mounts[work_root]]["hostPath"]["path"] == work_root


def test_each_pod_is_its_own_host():
    """Own label scope and node name per pod, so replicas never reap each other's containers."""
    container = worker_container()
    env = {e["name"]: e for e in container["env"]}
    assert env["NANOGRID_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "NANOGRID_INSTANCE" not in one("ConfigMap")["data"]
    args = container["args"]
    assert args[args.index("-n") + 1] == "nanogrid@$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "--autoscale" not in " ".join(container["command"] + args)  # see deploy/README.md


def test_metrics_port_matches_the_setting():
    port = int(one("ConfigMap")["data"]["NANOGRID_METRICS_PORT"])
    (declared,) = worker_container()["ports"]
    assert declared["containerPort"] == port
    template = one("Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
