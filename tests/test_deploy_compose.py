"""deploy/compose: the file follows the Compose Specification's JSON schema (check-jsonschema, whose
package ships that schema), every file it mounts is in the repository, the workers scale, and the
Prometheus and Grafana it starts are given the shipped rules and dashboard (promtool checks the former).

No Docker engine runs here, so `docker compose config` cannot; the schema is what it validates against.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inspector import config
from inspector.config import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
PROMTOOL = shutil.which("promtool")


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


CHECK_JSONSCHEMA = _tool("check-jsonschema")
needs_check_jsonschema = pytest.mark.skipif(
    CHECK_JSONSCHEMA is None, reason="check-jsonschema is not installed (pip install check-jsonschema: dev extras)"
)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


@needs_check_jsonschema
def test_the_compose_file_follows_the_compose_specification_schema():
    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_check_jsonschema
@pytest.mark.parametrize(("old", "new"), [
    ("    stop_grace_period: 45s\n", "    stop_grace_period: 45s\n    stop_grace: 45s\n"),  # a key Compose lacks
    ("condition: service_completed_successfully", "condition: service_ready"),  # no such condition
    ("  rabbitmq:\n    image:", "  rabbitmq:\n    restart: 5\n    image:"),  # restart is a word
])
def test_the_schema_catches_a_compose_file_broken_on_purpose(tmp_path, old, new):
    text = COMPOSE.read_text()
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = validate(broken)
    assert result.returncode != 0, f"not caught: {new!r}"


def _interpolated_default(source: str) -> tuple[str, bool]:
    """`${VAR:-default}` -> (default, True); anything else unchanged, False."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", source)
    return (match.group(1), True) if match else (source, False)


def test_every_file_the_compose_file_mounts_or_builds_is_in_the_repository():
    document = compose()
    named_volumes = set(document["volumes"])
    checked = []
    for name, spec in document["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if isinstance(volume, str) and volume.startswith("${"):
                source = volume[: volume.index("}") + 1]
            if source in named_volumes:
                continue
            path, operators = _interpolated_default(source)
            if operators:  # the operator's archive; its default is the sample line `inspector samples` writes
                assert path == "../../sample-line/train/good", f"{name}: {source}"
                assert re.search(r"^SAMPLE := sample-line$", (ROOT / "Makefile").read_text(), re.MULTILINE)
                continue
            assert (COMPOSE_DIR / path).exists(), f"service {name} mounts {path}, which is not in the repository"
            checked.append(path)
        build = spec.get("build")
        if build:
            context = COMPOSE_DIR / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"service {name} builds from a missing Dockerfile"
            assert build["args"]["TORCH_VARIANT"] == "cpu"
    for name, spec in document["configs"].items():
        assert (COMPOSE_DIR / spec["file"]).is_file(), f"config {name}: {spec['file']} is not in the repository"
        checked.append(spec["file"])
    assert "../prometheus/inspector-rules.yml" in checked and "../grafana/inspector.json" in checked


def test_the_workers_scale_and_stop_within_their_grace_period():
    worker = service("worker")
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=3` needs neither"
    assert worker["stop_signal"] == "SIGTERM" and worker["init"] is True
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace and int(grace.group(1)) > WorkerSettings().shutdown_grace_s + 5
    assert worker["read_only"] is True and "ALL" in worker["cap_drop"]
    assert worker["depends_on"]["rabbitmq-policy"]["condition"] == "service_completed_successfully"


def test_the_store_is_s3_on_seaweedfs_shared_by_the_workers_and_the_refit():
    store = config.load(COMPOSE_DIR / "inspector.toml").store
    assert store.path.startswith("s3://inspector-models/")
    for name in ("worker", "refit"):
        spec = service(name)
        assert spec["environment"]["AWS_ENDPOINT_URL_S3"] == "http://seaweedfs:8333"
        assert f"model-cache:{Path(str(store.cache_dir)).parent}" in spec["volumes"]
        assert spec["depends_on"]["store-bucket"]["condition"] == "service_completed_successfully"
    assert "s3 mb s3://inspector-models" in " ".join(service("store-bucket")["command"])
    assert "-s3" in service("seaweedfs")["command"]
    refit = service("refit")
    assert refit["profiles"] == ["refit"] and refit["command"][:2] == ["refit", "--data"]


def test_the_password_comes_from_the_environment_never_from_the_file():
    for name in ("worker", "refit", "opcua"):
        environment = service(name)["environment"]
        assert environment["INSPECTOR_BROKER__PASSWORD"].startswith("${RABBITMQ_PASSWORD:?")
        assert environment["INSPECTOR_CONFIG"] == "/etc/inspector/inspector.toml"
    assert service("rabbitmq")["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_PASSWORD:?")


def test_rabbitmq_runs_the_management_prometheus_and_mqtt_plugins_and_gets_the_policy():
    plugins = (COMPOSE_DIR / "rabbitmq" / "enabled_plugins").read_text()
    assert re.fullmatch(r"\[rabbitmq_management,rabbitmq_prometheus,rabbitmq_mqtt\]\.\s*", plugins)
    assert "1883:1883" in service("rabbitmq")["ports"]
    policy = service("rabbitmq-policy")
    assert "/api/definitions" in policy["command"][0] and "--fail-with-body" in policy["command"][0]
    assert compose()["configs"]["rabbitmq-definitions"]["file"] == "../rabbitmq/definitions.json"


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard():
    grafana = service("grafana")
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    datasources = yaml.safe_load((COMPOSE_DIR / "grafana" / "datasources.yaml").read_text())
    (source,) = datasources["datasources"]
    assert datasources["apiVersion"] == 1 and source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    providers = yaml.safe_load((COMPOSE_DIR / "grafana" / "dashboards.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert Path(mounts["../grafana/inspector.json"]).parent == Path(provider["options"]["path"])
    assert mounts["./grafana/datasources.yaml"].startswith("/etc/grafana/provisioning/datasources/")
    assert mounts["./grafana/dashboards.yaml"].startswith("/etc/grafana/provisioning/dashboards/")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus; .ci/run does)")
def test_promtool_accepts_the_prometheus_configuration_with_the_rules_where_compose_mounts_them(tmp_path):
    """The layout the container sees: the config and the shipped rules side by side in /etc/prometheus."""
    prometheus = service("prometheus")
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            assert target.startswith("/etc/prometheus/")
            shutil.copy(COMPOSE_DIR / source, tmp_path / Path(target).relative_to("/etc/prometheus"))
    result = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr and "rules found" in result.stdout + result.stderr
    scrape = yaml.safe_load((tmp_path / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    assert jobs["inspector"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]


def test_the_opcua_bridge_serves_on_the_port_compose_publishes_once_the_broker_is_set_up():
    bridge = service("opcua")
    assert bridge["command"] == ["opcua"] and bridge["image"] == service("worker")["image"]
    endpoint = config.load(COMPOSE_DIR / "inspector.toml").opcua.endpoint
    port = endpoint.rsplit(":", 1)[1].split("/")[0]
    assert f"{port}:{port}" in bridge["ports"] and endpoint.startswith("opc.tcp://0.0.0.0:")
    assert bridge["depends_on"]["rabbitmq-policy"]["condition"] == "service_completed_successfully"
    assert bridge["stop_signal"] == "SIGTERM" and bridge["init"] is True and bridge["read_only"] is True


# -- the admin surfaces ----------------------------------------------------------------------------------

LINE_PORTS = {5672, 1883, 4840}  # cameras (AMQP) and the line's controllers (MQTT, OPC UA): open on every interface


def published(spec: dict) -> list[tuple[str, int]]:
    """(host address, container port) of each published port, `${VAR:-default}` read at its default;
    a port without an address is published on every interface, 0.0.0.0."""
    found = []
    for entry in spec.get("ports", []):
        text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(entry))
        parts = text.split(":")
        address = ":".join(parts[:-2]) if len(parts) > 2 else "0.0.0.0"
        found.append((address, int(parts[-1].split("/")[0])))
    return found


def test_only_the_line_facing_ports_are_published_beyond_this_host():
    every = [(name, address, port) for name, spec in compose()["services"].items()
             for address, port in published(spec)]
    assert {port for _, _, port in every} >= {5672, 15672, 9090, 3000}
    for name, address, port in every:
        if port in LINE_PORTS:
            continue
        assert address == "127.0.0.1", f"{name} publishes its admin port {port} on {address}"


def test_prometheus_cannot_be_stopped_or_changed_over_http():
    assert not [flag for flag in service("prometheus")["command"]
                if flag.startswith(("--web.enable-lifecycle", "--web.enable-admin-api"))]


def test_grafana_has_no_anonymous_access_and_no_default_admin_password():
    environment = service("grafana")["environment"]
    assert str(environment.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "false"
    password = environment.get("GF_SECURITY_ADMIN_PASSWORD", "")
    from_file = environment.get("GF_SECURITY_ADMIN_PASSWORD__FILE", "")
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?") or from_file.startswith("/run/secrets/"), (
        "without it Grafana's admin password is admin")
    assert str(environment.get("GF_USERS_ALLOW_SIGN_UP", "false")).lower() == "false"


# -- the GPU override ----------------------------------------------------------------------------------

GPU_OVERRIDE = COMPOSE_DIR / "compose.gpu.yaml"


def merged(base: dict, override: dict) -> dict:
    """Compose's merge of an override file for what the override uses: mappings merge key by key, a
    scalar replaces (the Compose Specification, "Merge and override")."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@needs_check_jsonschema
def test_the_gpu_override_follows_the_compose_specification_schema():
    result = validate(GPU_OVERRIDE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gpu_override_gives_each_worker_a_gpu_the_cuda_image_and_keeps_the_rest():
    base, override = compose(), yaml.safe_load(GPU_OVERRIDE.read_text())
    assert set(override["services"]) == {"worker"}
    worker = merged(base["services"]["worker"], override["services"]["worker"])
    assert worker["image"].endswith("-cuda") and worker["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert worker["build"]["dockerfile"] == base["services"]["worker"]["build"]["dockerfile"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert worker["environment"]["INSPECTOR_DEVICE"] == "cuda"
    assert worker["environment"]["INSPECTOR_BROKER__PASSWORD"].startswith("${RABBITMQ_PASSWORD:?")
    assert worker["read_only"] is True and worker["volumes"] == base["services"]["worker"]["volumes"]
    gpu_args = re.search(r"--build-arg TORCH_VARIANT=(\S+)", (ROOT / "deploy/docker/Dockerfile").read_text())
    assert worker["build"]["args"]["TORCH_VARIANT"] == gpu_args.group(1), "the CUDA build the Dockerfile names"
