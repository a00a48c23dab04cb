"""deploy/kubernetes: every manifest validates, strictly, against the Kubernetes schemas that
kubernetes-validate carries (an unknown field is an error), KEDA's kinds against the hand-written
schemas in deploy/kubernetes/schemas (no package ships KEDA's), the kustomizations build with
`kubectl kustomize` where it is installed and their output validates the same way, and the worker's
pods keep the promises the worker's own settings ask of them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate: dev extras)")

from inspector.config import WorkerSettings
from inspector.worker.loop import EXIT_MARGIN_S

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
SCHEMAS = KUBERNETES / "schemas"
# The oldest Kubernetes still in wide use and the newest kubernetes-validate knows.
VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
          ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.schema.json",
          ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-podmonitor.schema.json"}


def _kustomize() -> list[str] | None:
    """`kubectl kustomize` or `kustomize build`, whichever runs here; None when neither does."""
    for command in (["kubectl", "kustomize"], ["kustomize", "build"]):
        if shutil.which(command[0]) is None:
            continue
        try:
            probe = subprocess.run([*command, "--help"], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return command
    return None


KUSTOMIZE = _kustomize()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None, reason="neither `kubectl kustomize` nor `kustomize` runs here: the kustomizations are not "
    "built (their resources are validated one by one all the same)")


def patches() -> set[Path]:
    """Files a kustomization uses as patches: partial objects, validated only once merged."""
    found = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            found.add((kustomization.parent / patch["path"]).resolve())
    return found


def manifests() -> list[tuple[str, dict]]:
    """(file, object) of every Kubernetes object under deploy/kubernetes, as written (not kustomized)."""
    found = []
    skip = patches()
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in skip:
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((str(path.relative_to(ROOT)), document))
    return found


def problems(document: dict) -> list[str]:
    """Why `document` is not a valid object: against Kubernetes' schemas (strict) for every version in
    VERSIONS, or KEDA's hand-written one; an object of any other kind is a problem in itself."""
    key = (document.get("apiVersion"), document.get("kind"))
    if key in CUSTOM:
        schema = json.loads((SCHEMAS / CUSTOM[key]).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in validator.iter_errors(document)]
    found = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            found.append(f"Kubernetes {version}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            found.append(f"no schema for {key}: add one to tests/test_deploy_kubernetes.py's CUSTOM")
    return found


def by_kind(documents: list[dict], kind: str, component: str | None = None) -> dict:
    """The one object of `kind`: of the OPC UA bridge with component "opcua", else of the rest."""
    def mine(document: dict) -> bool:
        label = document["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        return label == component if component else label != "opcua"

    (only,) = [d for d in documents if d["kind"] == kind and mine(d)]
    return only


def all_objects() -> list[dict]:
    return [document for _, document in manifests()]


BASE = KUBERNETES / "base"


def kustomization(folder: Path = BASE) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def worker_config() -> dict:
    """The workers' configuration: the file the base kustomization's configMapGenerator makes its ConfigMap of."""
    (generator,) = kustomization()["configMapGenerator"]
    (name,) = generator["files"]
    return tomllib.loads((BASE / name).read_text())


def pod_spec(document: dict) -> dict:
    """The pod template's spec of a Deployment, a Job or a CronJob."""
    spec = document["spec"]["jobTemplate"]["spec"] if document["kind"] == "CronJob" else document["spec"]
    return spec["template"]["spec"]


def container(document: dict) -> dict:
    (only,) = pod_spec(document)["containers"]
    return only


def env(spec: dict) -> dict[str, dict]:
    return {item["name"]: item for item in spec.get("env", [])}


# -- validation -------------------------------------------------------------------------------------


def test_every_manifest_validates_against_its_schema():
    found = manifests()
    kinds = {document["kind"] for _, document in found}
    assert {"Deployment", "Secret", "PodDisruptionBudget", "CronJob", "ScaledObject",
            "TriggerAuthentication", "PersistentVolumeClaim"} <= kinds
    failures = [f"{path} {document['kind']}: {problem}" for path, document in found for problem in problems(document)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("kind", "breaks", "expected"), [
    ("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSecond=45),
     "'terminationGracePeriodSecond' was unexpected"),
    ("Deployment", lambda d: container(d)["livenessProbe"]["httpGet"].update(port=[9108]), "is not valid"),
    ("PodDisruptionBudget", lambda d: d["spec"].update(maxUnavailable=[1]), "is not valid"),
    ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(value=150), "is not of type 'string'"),
    ("ScaledObject", lambda d: d["spec"].update(minReplicas=2), "'minReplicas' was unexpected"),
    ("ScaledObject", lambda d: d["spec"]["scaleTargetRef"].pop("name"), "'name' is a required property"),
    ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(mode="Length"), "is not one of"),
    ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key"), "'key' is a required property"),
    ("PodMonitor", lambda d: d["spec"].update(podMetricEndpoints=[]), "'podMetricEndpoints' was unexpected"),
])
def test_the_schemas_catch_manifests_broken_on_purpose(kind, breaks, expected):
    document = json.loads(json.dumps(by_kind(all_objects(), kind)))
    assert not problems(document)
    breaks(document)
    found = problems(document)
    assert found and any(expected in problem for problem in found), found


def build(folder: Path) -> list[dict]:
    result = subprocess.run([*KUSTOMIZE, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(KUSTOMIZE)} {folder}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@needs_kustomize
@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_each_kustomization_builds_and_its_output_validates(overlay):
    built = build(KUBERNETES / overlay)
    failures = [f"{d['kind']} {d['metadata']['name']}: {p}" for d in built for p in problems(d)]
    assert not failures, "\n".join(failures)
    assert {d["kind"] for d in built} == {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment",
                                          "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication", "Service",
                                          "CronJob"}
    for document in built:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "inspector", document["kind"]
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "inspector", document["kind"]
    assert "Secret" not in {d["kind"] for d in built}, "apply -k must never overwrite the real Secret"


@needs_kustomize
def test_the_gpu_overlay_asks_for_a_gpu_and_the_cuda_image_and_the_base_does_not():
    base = container(by_kind(build(KUBERNETES / "base"), "Deployment"))
    gpu_deployment = by_kind(build(KUBERNETES / "overlays" / "gpu"), "Deployment")
    gpu = container(gpu_deployment)
    assert "nvidia.com/gpu" not in json.dumps(base) and base["image"] == "inspector:0.1.0"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"] == "inspector:0.1.0-cuda"
    assert env(gpu)["INSPECTOR_DEVICE"]["value"] == "cuda"
    assert env(gpu)["INSPECTOR_BROKER__PASSWORD"] == env(base)["INSPECTOR_BROKER__PASSWORD"], "the patch merges env"
    assert gpu_deployment["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    tolerations = gpu_deployment["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


# -- what the worker asks of its pods ------------------------------------------------------------------


def test_the_worker_pods_probe_health_readiness_and_the_start_and_outlast_the_grace_period():
    worker = WorkerSettings()
    deployment = by_kind(all_objects(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = main["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] > worker.start_timeout_s
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > worker.shutdown_grace_s + 5 and grace > min(worker.shutdown_grace_s, 10.0) + EXIT_MARGIN_S
    assert main["args"] == ["run"]
    assert main["resources"]["requests"]["cpu"] and main["resources"]["limits"]["memory"]
    assert "replicas" not in deployment["spec"], "the ScaledObject owns the number of workers"


def test_the_worker_pods_run_unprivileged_on_a_read_only_root_with_the_writable_paths_as_volumes():
    dockerfile_user = re.search(r"^USER (\d+)", (ROOT / "deploy/docker/Dockerfile").read_text(), re.MULTILINE)
    for document in all_objects():
        if document["kind"] not in ("Deployment", "CronJob"):
            continue
        pod = pod_spec(document)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(dockerfile_user.group(1)), "the image's own user"
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        main = container(document)
        security = main["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        for writable in ("/tmp", "/home/inspector/.cache"):
            assert "emptyDir" in volumes[mounts[writable]["name"]], (document["kind"], writable)


def test_the_worker_and_the_refit_share_the_configuration_the_store_and_the_secret():
    objects = all_objects()
    config = worker_config()
    (generator,) = kustomization()["configMapGenerator"]
    secret = by_kind(objects, "Secret")
    store = config["store"]["path"]
    for kind, writes in (("Deployment", False), ("CronJob", True)):
        document = by_kind(objects, kind)
        pod, main = pod_spec(document), container(document)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        named = Path(env(main)["INSPECTOR_CONFIG"]["value"])
        assert volumes[mounts[str(named.parent)]["name"]]["configMap"]["name"] == generator["name"]
        assert named.name in generator["files"]
        claim = volumes[mounts[store]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == by_kind(objects, "PersistentVolumeClaim")["metadata"]["name"]
        assert mounts[store].get("readOnly", False) is not writes, f"{kind}: only the refit writes the store"
        password = env(main)["INSPECTOR_BROKER__PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password["name"] == secret["metadata"]["name"] and password["key"] in secret["stringData"]
    assert "ReadWriteMany" in by_kind(objects, "PersistentVolumeClaim")["spec"]["accessModes"]
    refit = by_kind(objects, "CronJob")
    assert refit["spec"]["suspend"] is True, \
        "a template for `kubectl create job --from=cronjob/...`, never run by itself"
    assert container(refit)["args"][:3] == ["refit", "--data", "/archive"]


def test_the_secret_is_a_placeholder_kept_out_of_the_kustomization():
    secret = by_kind(all_objects(), "Secret")
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = kustomization.parent / resource
            if path.is_file():
                kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text()) if d}
                assert "Secret" not in kinds, f"{kustomization}: {resource} would overwrite the real Secret"


def test_the_disruption_budget_covers_the_worker_pods():
    objects = all_objects()
    pdb = by_kind(objects, "PodDisruptionBudget")
    labels = by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    # unready workers hold no captures: a broker outage (every pod unready) must not block a node drain
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_keda_scales_the_worker_deployment_on_the_capture_queue_it_consumes():
    objects = all_objects()
    scaled = by_kind(objects, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == by_kind(objects, "Deployment")["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["queueName"] == worker_config()["worker"]["queue"]
    assert float(trigger["metadata"]["value"]) > WorkerSettings().prefetch, "one worker's prefetch alone"
    assert spec["minReplicaCount"] >= 2 > by_kind(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    assert "cooldownPeriod" not in spec, "KEDA applies it only when scaling to zero, ruled out by minReplicaCount"
    auth = by_kind(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = by_kind(objects, "Secret")
    assert ref["parameter"] == "host" and ref["name"] == secret["metadata"]["name"]
    assert secret["stringData"][ref["key"]].startswith("http://")


def test_the_opcua_bridge_is_one_pod_on_the_shared_configuration_behind_a_service_on_its_port():
    from inspector.config import OpcuaSettings

    objects = all_objects()
    bridge = by_kind(objects, "Deployment", "opcua")
    service = by_kind(objects, "Service", "opcua")
    main = container(bridge)
    assert main["args"] == ["opcua"] and bridge["spec"]["replicas"] == 1
    (port,) = main["ports"]
    endpoint = worker_config().get("opcua", {}).get("endpoint", OpcuaSettings().endpoint)
    assert int(endpoint.rsplit(":", 1)[1].split("/")[0]) == port["containerPort"]
    assert main["livenessProbe"]["tcpSocket"]["port"] == port["name"]
    (exposed,) = service["spec"]["ports"]
    assert exposed["targetPort"] == port["name"]
    assert service["spec"]["selector"].items() <= bridge["spec"]["template"]["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= by_kind(objects, "Deployment")["spec"]["template"][
        "metadata"]["labels"].items(), "the Service must not pick the workers"
    named = Path(env(main)["INSPECTOR_CONFIG"]["value"])
    volumes = {v["name"]: v for v in bridge["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    (generator,) = kustomization()["configMapGenerator"]
    assert volumes[mounts[str(named.parent)]["name"]]["configMap"]["name"] == generator["name"]
    assert "opcua.yaml" in yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())["resources"]


def test_no_shipped_file_promises_a_later_issue():
    """A comment that something "is a later issue" goes stale when the issue is done (the S3 store was)."""
    stale = [str(path.relative_to(ROOT)) for path in (ROOT / "deploy").rglob("*")
             if path.is_file() and path.suffix in {".yaml", ".yml", ".toml", ".service", ".md", ""}
             and "later issue" in path.read_text(errors="replace")]
    assert not stale, stale


@needs_kustomize
def test_a_configuration_change_rolls_the_workers_and_the_refit_takes_the_same_image(tmp_path):
    """The ConfigMap's name carries a hash of its content and the pods name it, so a changed configuration
    is a changed pod template (a rollout); the refit CronJob is in the kustomization, so `images:` and the
    generated name reach it as they reach the workers."""
    copy = tmp_path / "base"
    shutil.copytree(BASE, copy)

    def names_and_images() -> tuple[str, set[str], set[str]]:
        built = build(copy)
        configmap = by_kind(built, "ConfigMap")["metadata"]["name"]
        used = {v["configMap"]["name"] for kind in ("Deployment", "CronJob")
                for v in pod_spec(by_kind(built, kind))["volumes"] if "configMap" in v}
        images = {container(by_kind(built, kind))["image"] for kind in ("Deployment", "CronJob")}
        return configmap, used, images

    before, used, images = names_and_images()
    assert used == {before} and before.startswith("inspector-config-")
    assert len(images) == 1, f"the workers and the refit run different images: {images}"
    toml = (copy / "inspector.toml").read_text()
    assert "[worker]\n" in toml
    (copy / "inspector.toml").write_text(toml.replace("[worker]\n", "[worker]\nprefetch = 32\n"))
    text = (copy / "kustomization.yaml").read_text()
    changed = text.replace("newName: inspector ", "newName: registry.example.com/inspector ")
    (copy / "kustomization.yaml").write_text(changed)
    after, used, images = names_and_images()
    assert after != before and used == {after}, "the pods name the new ConfigMap: a rollout"
    assert images == {"registry.example.com/inspector:0.1.0"}


def test_the_pod_monitor_scrapes_the_workers_metrics_port_into_the_job_the_rules_select():
    objects = all_objects()
    monitor = by_kind(objects, "PodMonitor")
    deployment = by_kind(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "inspector"} in endpoint["relabelings"]
    rules = (ROOT / "deploy" / "prometheus" / "inspector-rules.yml").read_text()
    assert 'job="inspector"' in rules, "the job the rules select is the one the PodMonitor sets"
    for kustomization_file in KUBERNETES.rglob("kustomization.yaml"):
        assert "podmonitor" not in kustomization_file.read_text().lower(), "a cluster without the CRD fails apply -k"
