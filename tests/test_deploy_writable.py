"""What each shipped deployment lets the worker write, read as its tool reads it: the evidence archive the
shipped configuration names (and the relative default) lands on a writable path, the model store stays
read-only for the worker, the S3 cache is writable. Every deployment runs on a read-only root (systemd's
ProtectSystem=strict, compose's read_only, Kubernetes' readOnlyRootFilesystem), so a path no rule opens is
a `write_failed` on every frame the moment the archive is turned on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath

import yaml

from inspector.config import EvidenceSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def under(path: PurePosixPath, folders: list[PurePosixPath]) -> bool:
    return any(path == folder or folder in path.parents for folder in folders)


def resolved(location: str, working: str) -> PurePosixPath:
    """A configured folder as the worker's process sees it: relative to its working folder."""
    path = PurePosixPath(location)
    return path if path.is_absolute() else PurePosixPath(working) / path


def shipped(text: str) -> Settings:
    """The shipped configuration as the worker's loader builds it, the archive turned on."""
    data = tomllib.loads(text)
    data.setdefault("evidence", {})["enabled"] = True
    return Settings(**data)


# -- systemd ------------------------------------------------------------------------------------------


def unit_settings(name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith(("#", ";")) and section == "Service":
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_writable(settings: dict[str, list[str]]) -> list[PurePosixPath]:
    """The paths a unit may write under ProtectSystem=strict (systemd.exec(5)): its state, cache, logs and
    runtime directories, ReadWritePaths= (a leading - or + only changes how a missing one is handled), and
    the private /tmp and /var/tmp."""
    assert settings["ProtectSystem"] == ["strict"]
    bases = {"StateDirectory": "/var/lib", "CacheDirectory": "/var/cache", "LogsDirectory": "/var/log",
             "RuntimeDirectory": "/run"}
    writable = [PurePosixPath(base) / word for key, base in bases.items() for value in settings.get(key, [])
                for word in value.split()]
    writable += [PurePosixPath(word.lstrip("-+")) for value in settings.get("ReadWritePaths", [])
                 for word in value.split()]
    if settings.get("PrivateTmp") == ["yes"]:
        writable += [PurePosixPath("/tmp"), PurePosixPath("/var/tmp")]
    return writable


def test_systemd_the_worker_writes_its_evidence_archive_and_not_the_store():
    unit = unit_settings("inspector.service")
    writable = systemd_writable(unit)
    (working,) = unit.get("WorkingDirectory", ["/"])  # systemd's default for a system service is /
    settings = shipped((DEPLOY / "systemd" / "inspector.toml").read_text())
    evidence = resolved(settings.evidence.path, working)
    assert under(evidence, writable), f"evidence.path {evidence} is read-only under the unit ({writable})"
    default = resolved(EvidenceSettings().path, working)
    assert under(default, writable), f"the default evidence.path lands on {default}, read-only"
    store = resolved(settings.store.path, working)
    assert not under(store, writable), f"the worker may write the store {store}"
    assert under(resolved(str(settings.store.cache_dir), working), writable)
    # the working folder exists: StateDirectory creates it as the parent of the archive's folder
    assert under(PurePosixPath(working), [p.parent for p in writable]) or PurePosixPath(working) in writable


def test_systemd_the_refit_writes_the_store():
    unit = unit_settings("inspector-refit@.service")
    settings = shipped((DEPLOY / "systemd" / "inspector.toml").read_text())
    (working,) = unit.get("WorkingDirectory", ["/"])
    assert under(resolved(settings.store.path, working), systemd_writable(unit))


# -- compose -------------------------------------------------------------------------------------------


def dockerfile_folders_owned_by_the_user() -> list[PurePosixPath]:
    """Folders the final stage creates owned by the image's user (`install -d -o inspector ...`): a fresh
    named volume mounted on one takes its owner, else it is root's and the worker cannot write it."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for match in re.finditer(r"install -d -o inspector -g inspector -m \d+ ([^&\n]+)", text):
        found += [PurePosixPath(word) for word in match.group(1).split()]
    return found


def test_compose_the_workers_write_their_evidence_archive_on_a_volume_they_own():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    worker = compose["services"]["worker"]
    assert worker["read_only"] is True
    working = re.search(r"^WORKDIR (\S+)", (DEPLOY / "docker" / "Dockerfile").read_text(), re.MULTILINE).group(1)
    writable = [PurePosixPath(path) for path in worker.get("tmpfs", [])]
    volumes = {}
    for volume in worker["volumes"]:
        source, target, *mode = volume.split(":")
        if "ro" not in mode:
            writable.append(PurePosixPath(target))
            volumes[PurePosixPath(target)] = source
    settings = shipped((DEPLOY / "compose" / "inspector.toml").read_text())
    for location in (settings.evidence.path, EvidenceSettings().path):
        evidence = resolved(location, working)
        assert under(evidence, writable), f"evidence.path {evidence} is on the read-only root ({writable})"
        (mount,) = [target for target in volumes if evidence == target or target in evidence.parents]
        assert volumes[mount] in compose["volumes"], "a named volume, kept across re-creations"
        assert mount in dockerfile_folders_owned_by_the_user(), f"{mount} would be root's in a fresh volume"
    assert under(resolved(str(settings.store.cache_dir), working), writable)


# -- Kubernetes ------------------------------------------------------------------------------------------


def quantity(text: str) -> int:
    """A Kubernetes quantity in bytes: 5Gi, 512Mi, 1G, 1000."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text)).groups()
    return int(number) * units.get(unit, 1)


def test_kubernetes_the_workers_write_their_evidence_archive_on_a_volume_larger_than_its_cap():
    objects = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "base" / "deployment.yaml")
                                                        .read_text()) if d}
    (generator,) = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "kustomization.yaml").read_text())[
        "configMapGenerator"]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {PurePosixPath(m["mountPath"]): volumes[m["name"]] for m in container["volumeMounts"]
                if not m.get("readOnly") and not {"configMap", "secret"} & set(volumes[m["name"]])}
    settings = shipped((DEPLOY / "kubernetes" / "base" / generator["files"][0]).read_text())
    evidence = resolved(settings.evidence.path, container.get("workingDir", "/var/lib/inspector"))
    (mount,) = [target for target in writable if evidence == target or target in evidence.parents] or [None]
    assert mount is not None, f"evidence.path {evidence} is on the read-only root ({sorted(writable)})"
    size_limit = quantity(writable[mount]["emptyDir"]["sizeLimit"])
    assert size_limit > settings.evidence.max_bytes + settings.evidence.queue_bytes, (
        "past its sizeLimit the kubelet evicts the pod: the archive's cap must come first")
    store = PurePosixPath(settings.store.path)
    assert not under(store, list(writable)), "only the refit Job writes the store"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "the user owns the emptyDir"


# -- the exported backbone's cache (plugins/dfkde/graphcache.py) -------------------------------------------


def _dockerfile_home() -> str:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    return re.search(r"--home-dir (\S+)", text).group(1)


def test_every_deployment_keeps_the_exported_graph_where_it_may_write():
    """A graph cache on a read-only path would only cost the export at every start (it is said once and
    skipped), but then the shipped setting would be a lie: each deployment's lands on a writable folder."""
    from inspector_dfkde.graphcache import folder_for

    for name in ("inspector.service", "inspector-refit@.service"):
        unit = unit_settings(name)
        environ = dict(word.split("=", 1) for value in unit.get("Environment", []) for word in value.split())
        settings = shipped((DEPLOY / "systemd" / "inspector.toml").read_text())
        folder = folder_for(settings.plugins.get("dfkde", {}).get("graph_cache", "auto"), environ, "/nonexistent")
        assert under(PurePosixPath(folder), systemd_writable(unit)), (name, folder)

    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    settings = shipped((DEPLOY / "compose" / "inspector.toml").read_text())
    for service in ("worker", "refit"):
        spec = compose["services"][service]
        writable = [PurePosixPath(p) for p in spec.get("tmpfs", [])]
        writable += [PurePosixPath(v.split(":")[1]) for v in spec["volumes"] if not v.endswith(":ro")]
        folder = folder_for(settings.plugins["dfkde"]["graph_cache"], spec["environment"], _dockerfile_home())
        assert under(PurePosixPath(folder), writable), (service, folder, writable)
        assert not str(folder).startswith("/tmp"), "kept on a volume: a re-created container skips the export too"

    (generator,) = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "kustomization.yaml").read_text())[
        "configMapGenerator"]
    settings = shipped((DEPLOY / "kubernetes" / "base" / generator["files"][0]).read_text())
    checked = 0
    for manifest in ("deployment.yaml", "refit.yaml"):
        for document in yaml.safe_load_all((DEPLOY / "kubernetes" / "base" / manifest).read_text()):
            pods = [document["spec"]["template"]["spec"]] if document and document["kind"] == "Deployment" else []
            if document and document["kind"] == "CronJob":
                pods = [document["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
            for pod in pods:
                (container,) = pod["containers"]
                environ = {e["name"]: e.get("value", "") for e in container.get("env", [])}
                folder = folder_for(settings.plugins.get("dfkde", {}).get("graph_cache", "auto"), environ,
                                    _dockerfile_home())
                writable = [PurePosixPath(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
                assert under(PurePosixPath(folder), writable), (manifest, folder, writable)
                checked += 1
    assert checked == 2, "the worker's Deployment and the refit's CronJob"
