"""INSPECTOR_CONFIG names the configuration file where `--config` cannot be passed (a container's
command, a unit's environment); an explicit `--config` wins, and a name that leads nowhere is an error
that says so. Every configuration file shipped under deploy/ loads with the worker's own loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from inspector import cli, config
from inspector.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def inspector(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("INSPECTOR_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd or ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


def _toml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_inspector_config_names_the_file(tmp_path):
    named = _toml(tmp_path, "named.toml", 'device = "cpu"\n[worker]\nprefetch = 7\n')
    _toml(tmp_path, "inspector.toml", "[worker]\nprefetch = 9\n")  # the working folder's file is not read
    result = inspector("config", env={"INSPECTOR_CONFIG": str(named)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["worker"]["prefetch"] == 7


def test_an_explicit_config_option_wins_over_inspector_config(tmp_path):
    named = _toml(tmp_path, "named.toml", "[worker]\nprefetch = 7\n")
    given = _toml(tmp_path, "given.toml", "[worker]\nprefetch = 11\n")
    result = inspector("config", "--config", str(given), env={"INSPECTOR_CONFIG": str(named)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["worker"]["prefetch"] == 11


def test_environment_variables_still_override_the_named_file(tmp_path):
    named = _toml(tmp_path, "named.toml", "[worker]\nprefetch = 7\n")
    result = inspector("config", env={"INSPECTOR_CONFIG": str(named), "INSPECTOR_WORKER__PREFETCH": "3"})
    assert json.loads(result.stdout)["worker"]["prefetch"] == 3


def test_inspector_config_naming_no_file_is_an_error_that_names_the_variable(tmp_path):
    result = inspector("config", env={"INSPECTOR_CONFIG": str(tmp_path / "absent.toml")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"INSPECTOR_CONFIG={tmp_path / 'absent.toml'}: no such file" in result.stderr
    result = inspector("config", env={"INSPECTOR_CONFIG": str(tmp_path)})  # a folder is no file either
    assert result.returncode == 2 and "no such file" in result.stderr


def test_an_empty_inspector_config_means_unset(tmp_path):
    _toml(tmp_path, "inspector.toml", "[worker]\nprefetch = 9\n")
    result = inspector("config", env={"INSPECTOR_CONFIG": ""}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["worker"]["prefetch"] == 9


def test_config_path_in_process(tmp_path):
    named = _toml(tmp_path, "named.toml", "")
    assert cli.config_path(None, {}) is None
    assert cli.config_path(None, {"INSPECTOR_CONFIG": str(named)}) == named
    assert cli.config_path(Path("x.toml"), {"INSPECTOR_CONFIG": str(named)}) == Path("x.toml")
    with pytest.raises(ConfigError, match="INSPECTOR_CONFIG"):
        cli.config_path(None, {"INSPECTOR_CONFIG": str(tmp_path / "absent.toml")})


def test_inspector_config_is_not_taken_for_an_unknown_key(tmp_path, monkeypatch):
    """The loader refuses unknown INSPECTOR_* variables; the one that names the file is known."""
    for name in list(os.environ):
        if name.upper().startswith("INSPECTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INSPECTOR_CONFIG", str(_toml(tmp_path, "named.toml", "")))
    config.load(None, check_plugins=False)
    monkeypatch.setenv("INSPECTOR_CONFIGG", "x")
    with pytest.raises(ConfigError, match="INSPECTOR_CONFIGG"):
        config.load(None, check_plugins=False)


def shipped_configurations() -> list[tuple[str, str]]:
    """(where, TOML text) of every worker configuration under deploy/: files (the Kubernetes one is made a
    ConfigMap by its kustomization), and any ConfigMap written out in YAML."""
    found = [(str(path.relative_to(ROOT)), path.read_text()) for path in sorted(DEPLOY.rglob("*.toml"))]
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "ConfigMap":
                for key, text in document.get("data", {}).items():
                    if key.endswith(".toml"):
                        found.append((f"{path.relative_to(ROOT)}: {key}", text))
    return found


def test_every_shipped_configuration_loads_with_the_workers_loader(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("INSPECTOR_"):
            monkeypatch.delenv(name)
    shipped = shipped_configurations()
    assert {"systemd", "compose", "kubernetes"} <= {where.split("/")[1] for where, _ in shipped}
    for where, text in shipped:
        path = _toml(tmp_path, "shipped.toml", text)
        try:
            settings = config.load(path)
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")
        assert "password" not in tomllib.loads(text).get("broker", {}), where
        assert settings.broker.password.get_secret_value() == "guest", f"{where}: the password is not in the file"
