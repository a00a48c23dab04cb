"""The settings tree: one TOML file plus INSPECTOR_* environment variables.

Built once at start (`load`) and passed down; no module reads the environment on
import. Environment variables override the file, nested keys joined by `__`
(`INSPECTOR_STORE__PATH`). Unknown keys, in the file or the environment, and bad
values are errors that name the key; plugin tables are checked by the plugin's own
settings model, so `plugins.dfkde.n_comps = -1` is caught at start, not at fit.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from inspector.devices import DEVICE_PATTERN
from inspector.errors import ConfigError, PluginError

ENV_PREFIX = "INSPECTOR_"
ENV_DELIMITER = "__"
DEFAULT_CONFIG = Path("inspector.toml")
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class StoreSettings(_Section):
    path: Path = Field(Path("models"), description="folder of the model store")


class ModelSettings(_Section):
    plugin: str = Field("dfkde", description="the plugin that scores this model's frames")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="anomaly probability at or over which a frame fails")


class Settings(BaseSettings):
    """The whole configuration. See config.example.toml for every key and its meaning."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    store: StoreSettings = StoreSettings()
    default_model: str = Field("default", pattern=MODEL_NAME_PATTERN)
    models: dict[str, ModelSettings] = Field(default_factory=lambda: {"default": ModelSettings()})
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        for name in models:
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} must be letters, digits, '_', '.', '-' (at most 64)")
        return models

    @model_validator(mode="after")
    def _default_model_exists(self) -> "Settings":
        if self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the models defined: {sorted(self.models)}"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)

    def plugin_settings(self, plugin: str) -> BaseModel:
        """The validated settings of `plugin`: its table in `plugins`, over the plugin's defaults."""
        from inspector.plugin import get_plugin

        cls = get_plugin(plugin)
        try:
            return cls.Settings.model_validate(self.plugins.get(plugin, {}))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, prefix=("plugins", plugin))) from None


def _describe(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """A ValidationError as lines that each name the key, the reason and the value given."""
    lines = []
    for error in exc.errors():
        loc = prefix + tuple(str(part) for part in error["loc"])
        key = ".".join(loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            reason = "unknown key; check its spelling against config.example.toml"
        else:
            reason = error["msg"]
            if "input" in error and not isinstance(error["input"], dict):
                reason += f" (got {error['input']!r})"
        env_name = ENV_PREFIX + ENV_DELIMITER.join(loc).upper()
        source = f" [from {env_name}]" if env_name in os.environ else ""
        lines.append(f"{key}: {reason}{source}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; copy config.example.toml there or pass --config") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _check_environment(environ: Mapping[str, str]) -> None:
    """Unknown INSPECTOR_* variables are errors: a misspelt override must not be silently ignored."""
    known = {name.upper() for name in Settings.model_fields}
    for variable in environ:
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        head = variable[len(ENV_PREFIX) :].split(ENV_DELIMITER)[0].upper()
        if head not in known:
            raise ConfigError(
                f"environment variable {variable}: unknown key {head.lower()!r}; "
                f"known top-level keys: {', '.join(sorted(k.lower() for k in known))}"
            )


def load(path: Path | str | None = None, *, check_plugins: bool = True) -> Settings:
    """Settings from `path` (or ./inspector.toml when present, else defaults) and the environment."""
    if path is None:
        data = _read_toml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else {}
    else:
        data = _read_toml(Path(path).expanduser())
    _check_environment(os.environ)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if check_plugins:
        for name, model in settings.models.items():
            try:
                settings.plugin_settings(model.plugin)
            except PluginError as exc:
                raise ConfigError(f"models.{name}.plugin: {exc}") from None
        for plugin in settings.plugins:
            try:
                settings.plugin_settings(plugin)
            except PluginError as exc:
                raise ConfigError(f"plugins.{plugin}: {exc}") from None
    return settings
