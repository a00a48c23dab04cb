"""The `inspector` command as an operator meets it: exit codes and messages, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "inspector.cli", *args],
        cwd=cwd or ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_and_version():
    assert run("--help").returncode == 0
    result = run("--version")
    assert result.returncode == 0 and "inspector 0.1.0" in result.stdout


def test_bad_usage_exits_2():
    result = run("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[plugins.dfkde]\nn_comps = 0\n", {}, "plugins.dfkde.n_comps"),
        ("devise = 'cpu'\n", {}, "devise: unknown key"),
        ("", {"INSPECTOR_DEVICE": "tpu"}, "device: Value error"),
        ("[store\n", {}, "not valid TOML"),
    ],
)
def test_bad_configuration_exits_2_without_a_traceback(tmp_path, toml, env, message):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = run("config", "--config", str(config), env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = run("config", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_config_prints_the_effective_settings_with_plugin_defaults(tmp_path):
    result = run("config", cwd=tmp_path, env={"INSPECTOR_PLUGINS__DFKDE__N_COMPS": "8"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plugins"]["dfkde"]["n_comps"] == 8
    assert data["plugins"]["dfkde"]["backbone"] == "tf_efficientnet_lite0"


def test_missing_weights_file_is_an_operator_error(tmp_path):
    result = run(
        "demo", "--train", "20", "--test", "5", cwd=tmp_path,
        env={"INSPECTOR_PLUGINS__DFKDE__WEIGHTS": str(tmp_path / "gone.safetensors")},
    )
    assert result.returncode == 2
    assert "gone.safetensors does not exist" in result.stderr and "Traceback" not in result.stderr


def test_demo_fits_the_shipped_offline_model_and_ranks_defects(tmp_path):
    result = run("demo", "--train", "40", "--test", "10", cwd=tmp_path, env={"INSPECTOR_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "fitted on 40 good images" in result.stdout
    line = next(row for row in result.stdout.splitlines() if row.startswith("all defects"))
    assert 0.8 <= float(line.split()[-1]) <= 1.0  # real ImageNet weights, offline
    assert "calibrated on 20 held-out good images" in result.stdout
