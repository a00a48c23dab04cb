"""The settings tree: TOML file, INSPECTOR_* environment, errors that name the key."""

import json
from pathlib import Path

import pytest

from inspector import config
from inspector.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("INSPECTOR_"):
            monkeypatch.delenv(name)


def _write(tmp_path, text):
    path = tmp_path / "inspector.toml"
    path.write_text(text)
    return path


def test_example_file_loads_and_equals_the_defaults():
    from_example = config.load(EXAMPLE)
    defaults = config.Settings()
    assert from_example.model_dump() == defaults.model_dump() | {"plugins": from_example.plugins}
    dfkde_defaults = from_example.plugin_settings("dfkde").__class__()
    assert from_example.plugin_settings("dfkde") == dfkde_defaults


def _leaf_keys(model_cls, prefix=()):
    from pydantic import BaseModel

    for name, field in model_cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_keys(annotation, prefix + (name,))
        else:
            yield prefix, name


def test_example_documents_every_key():
    import tomllib

    example = tomllib.loads(EXAMPLE.read_text())
    settings = config.load(EXAMPLE)
    for section, key in _leaf_keys(config.Settings):
        if key in ("models", "plugins", "password"):
            continue
        table = example
        for part in section:
            table = table[part]
        assert key in table, ".".join(section + (key,))
    assert "INSPECTOR_BROKER__PASSWORD" in EXAMPLE.read_text()
    assert set(example["models"]["default"]) == set(config.ModelSettings.model_fields)
    assert set(example["plugins"]["dfkde"]) == set(type(settings.plugin_settings("dfkde")).model_fields)


def test_broker_password_comes_from_the_environment_only(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="INSPECTOR_BROKER__PASSWORD"):
        config.load(_write(tmp_path, "[broker]\npassword = 'hunter2'\n"))
    with pytest.raises(ConfigError, match="INSPECTOR_BROKER__PASSWORD"):
        config.load(_write(tmp_path, "[broker]\nurl = 'amqp://user:hunter2@host/'\n"))
    monkeypatch.setenv("INSPECTOR_BROKER__PASSWORD", "hunter2")
    settings = config.load(_write(tmp_path, "[broker]\nurl = 'amqp://user@host/'\n"))
    assert settings.broker.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


def test_environment_overrides_file_with_nested_keys(tmp_path, monkeypatch):
    path = _write(tmp_path, 'device = "cpu"\n[plugins.dfkde]\nn_comps = 8\n[models.default]\nthreshold = 0.3\n')
    monkeypatch.setenv("INSPECTOR_MODELS__DEFAULT__THRESHOLD", "0.7")
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__N_COMPS", "12")
    monkeypatch.setenv("INSPECTOR_STORE__PATH", "/srv/models")
    settings = config.load(path)
    assert settings.device == "cpu"
    assert settings.models["default"].threshold == 0.7
    assert settings.plugin_settings("dfkde").n_comps == 12
    assert settings.store.path == "/srv/models"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("devise = 'cpu'\n", "devise: unknown key"),
        ("[store]\npaht = 'x'\n", "store.paht: unknown key"),
        ("[models.default]\nthreshold = 1.5\n", "models.default.threshold: Input should be less than or equal to 1"),
        ("device = 'gpu'\n", "device: Value error, must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("[plugins.dfkde]\nn_comps = -1\n", "plugins.dfkde.n_comps: Input should be greater than or equal to 1"),
        ("[plugins.dfkde]\nbackbon = 'resnet18'\n", "plugins.dfkde.backbon: unknown key"),
        ("[plugins.dfkde]\npre_processing = 'whiten'\n", "plugins.dfkde.pre_processing"),
        ("[models.default]\nplugin = 'patchcore'\n", "models.default.plugin: unknown plugin 'patchcore'"),
        ("default_model = 'nope'\n", "default_model 'nope' is not one of the models defined"),
        ("[models.'bad name']\n", "model name 'bad name'"),
        ("[models.default]\nregions = 'sometimes'\n",
         'models.default.regions: Value error, must be false, true (the same as "fail"), "fail" or "all"'),
        ("[models.default]\nregions = 1\n", "models.default.regions: Value error, must be false, true"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text))
    assert named in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("value", "means"), [("true", "fail"), ("false", False), ("'fail'", "fail"),
                                             ("'all'", "all"), ("'All'", "all")])
def test_regions_takes_a_bool_or_which_verdicts_and_true_means_fail(tmp_path, value, means):
    assert config.load(_write(tmp_path, f"[models.default]\nregions = {value}\n")).models["default"].regions == means


def test_regions_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_MODELS__DEFAULT__REGIONS", "all")
    assert config.load(_write(tmp_path, "")).models["default"].regions == "all"
    monkeypatch.setenv("INSPECTOR_MODELS__DEFAULT__REGIONS", "true")
    assert config.load(_write(tmp_path, "")).models["default"].regions == "fail"


def test_bad_environment_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_MODELS__DEFAULT__THRESHOLD", "high")
    with pytest.raises(ConfigError, match=r"models.default.threshold: .*\[from INSPECTOR_MODELS__DEFAULT__THRESHOLD\]"):
        config.load(_write(tmp_path, ""))


def test_unknown_environment_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_DEVCE", "cpu")
    with pytest.raises(ConfigError, match="INSPECTOR_DEVCE: unknown key 'devce'"):
        config.load(_write(tmp_path, ""))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "device = \n"))


def test_default_file_is_read_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.load().device == "auto"
    _write(tmp_path, 'device = "cpu"\n')
    assert config.load().device == "cpu"


def test_plugin_settings_from_the_environment_take_lists_numbers_and_bools(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__LAYERS", '["blocks.4","blocks.6"]')
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__N_COMPS", "8")
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__THRESHOLD_STEEPNESS", "0.25")
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__JPEG_REDUCED_DECODE", "false")
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__WEIGHTS", "none")  # a plain string stays a string
    dfkde = config.load(_write(tmp_path, "[plugins.dfkde]\njpeg_reduced_decode = true\n")).plugin_settings("dfkde")
    assert dfkde.layers == ["blocks.4", "blocks.6"]
    assert dfkde.n_comps == 8 and dfkde.threshold_steepness == 0.25
    assert dfkde.jpeg_reduced_decode is False and dfkde.weights == "none"


def test_a_plugin_list_from_the_environment_that_is_not_json_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__LAYERS", "blocks.4,blocks.6")
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, ""))
    assert "plugins.dfkde.layers: expected a JSON list" in str(info.value)
    assert "[from INSPECTOR_PLUGINS__DFKDE__LAYERS]" in str(info.value)
    monkeypatch.setenv("INSPECTOR_PLUGINS__DFKDE__LAYERS", '["blocks.4","blocks.4"]')
    with pytest.raises(ConfigError, match="layers must not repeat"):
        config.load(_write(tmp_path, ""))


def test_a_password_in_the_broker_url_is_refused_from_anywhere_and_never_echoed(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECTOR_BROKER__URL", "amqp://plant:hunter2@rabbit.local:5672/%2F")
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, ""))
    assert "broker.url" in str(info.value) and "INSPECTOR_BROKER__PASSWORD" in str(info.value)
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("INSPECTOR_BROKER__URL", "http://plant:hunter2@rabbit.local/")
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, ""))
    assert "hunter2" not in str(info.value) and "http://rabbit.local/" in str(info.value)


def test_inspector_config_prints_no_secret(tmp_path, monkeypatch, capsys):
    from inspector.cli import main

    monkeypatch.setenv("INSPECTOR_BROKER__PASSWORD", "hunter2")
    monkeypatch.setenv("INSPECTOR_BROKER__URL", "amqp://plant@rabbit.local:5672/%2F")
    assert main(["config", "--config", str(_write(tmp_path, ""))]) == 0
    printed = capsys.readouterr()
    assert "hunter2" not in printed.out + printed.err
    assert json.loads(printed.out)["broker"]["url"] == "amqp://plant@rabbit.local:5672/%2F"
