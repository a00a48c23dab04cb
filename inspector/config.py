"""The settings tree: one TOML file plus INSPECTOR_* environment variables.

Built once at start (`load`) and passed down; no module reads the environment on
import. Environment variables override the file, nested keys joined by `__`
(`INSPECTOR_STORE__PATH`). Unknown keys, in the file or the environment, and bad
values are errors that name the key; plugin tables are checked by the plugin's own
settings model, so `plugins.dfkde.n_comps = -1` is caught at start, not at fit.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from inspector import secretfiles
from inspector.devices import DEVICE_PATTERN
from inspector.errors import ConfigError, PluginError
from inspector.messages import Verdict
from inspector.topics import check_pattern

ENV_PREFIX = "INSPECTOR_"
ENV_DELIMITER = "__"
DEFAULT_CONFIG = Path("inspector.toml")
CONFIG_ENV = "INSPECTOR_CONFIG"  # names the config file where --config cannot be passed (containers); not a key
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class StoreSettings(_Section):
    path: str = Field("models", min_length=1, description="folder of the model store, or s3://bucket/prefix")
    cache_dir: Path = Field(Path("~/.cache/inspector/models"),
                            description="local copies of versions loaded from an s3:// store")

    @field_validator("path", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        """A folder or an s3:// URL; kept as text, since a Path would fold `s3://` into `s3:/`."""
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and value.startswith("s3:") and not value.startswith("s3://"):
            raise ValueError("an S3 store is written s3://bucket/prefix")
        return value


class ExchangeSettings(_Section):
    captures: str = Field("inspection.captures", description="topic exchange cameras publish frames to")
    results: str = Field("inspection.results", description="topic exchange verdicts are published to")
    control: str = Field("inspection.control", description="model announcements: model.<name>")
    dead: str = Field("inspection.dead", description="dead-letter exchange for frames that could not be scored")


class BrokerSettings(_Section):
    url: str | list[str] = Field("amqp://guest@127.0.0.1:5672/%2F",
                                 description="AMQP URL without the password, or a list: the nodes of a cluster")
    password: SecretStr = Field(SecretStr("guest"), description="from INSPECTOR_BROKER__PASSWORD only")
    connect_timeout_s: float = Field(5.0, gt=0)
    heartbeat_s: int = Field(30, ge=0)
    exchanges: ExchangeSettings = ExchangeSettings()

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, url: str | list[str]) -> str | list[str]:
        urls = [url] if isinstance(url, str) else url
        if not urls:
            raise ValueError("name at least one amqp:// URL")
        for one in urls:
            parts = urlsplit(one)
            if parts.scheme not in ("amqp", "amqps"):
                raise ValueError("must be an amqp:// or amqps:// URL, or a list of them")
            if parts.password is not None:
                raise ValueError("holds a password: remove it from the URL and set INSPECTOR_BROKER__PASSWORD "
                                 "instead (the URL is printed in logs and by `inspector config`; the password "
                                 "never is)")
        return url

    @property
    def urls(self) -> list[str]:
        """Every node, in the order they are tried."""
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def shown(self) -> str:
        """The nodes as they may be printed: without credentials, comma-separated."""
        return ", ".join(redact_url(url) for url in self.urls)


def redact_url(url: str) -> str:
    """The URL with its user and password removed, so it can be printed in messages and logs."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_text(text: str) -> str:
    """`text` with the credentials of any URL in it removed: for values echoed in error messages."""
    return _CREDENTIALS.sub(r"\g<scheme>", text)


class RefitSettings(_Section):
    batch_size: int = Field(32, ge=1, le=4096, description="images per backbone batch")
    decode_workers: int = Field(0, ge=0, description="decoding threads; 0 = one per CPU core")
    held_out_share: float = Field(0.1, ge=0.0, lt=1.0, description="share of images held out for calibration")
    target_false_reject: float = Field(0.005, gt=0.0, lt=1.0, description="false-reject rate calibration aims at")
    seed: int = Field(0, description="seeds the held-out split")
    keep: int = Field(0, ge=0, description="versions kept per model after a refit; 0 keeps all")
    max_image_pixels: int = Field(100_000_000, ge=1, description="larger archive images are skipped")
    fold_order: Literal["random", "time"] = Field("random", description="cross-fit folds seeded, or in capture order")
    group_pattern: str = Field("", description="regex whose named group `part` names an image's part; '' = none")
    group_sidecar: str = Field("", description="CSV (image,part) or JSON naming each image's part; '' = none")
    group_seconds: float = Field(0.0, ge=0, description="images within this many seconds are one part; 0 = off")
    group_twins: bool = Field(True, description="images whose embeddings are near-copies are one part")


def _topic(pattern: str) -> str:
    try:
        return check_pattern(pattern)
    except ValueError as exc:
        raise ValueError(f"{exc} (e.g. 'line2.*' or 'line2.#')") from None


class RouteSettings(_Section):
    match: str = Field(description="topic pattern on the capture's routing key: '*' one word, '#' any words")
    model: str = Field(pattern=MODEL_NAME_PATTERN, description="the model that scores captures it matches")

    @field_validator("match")
    @classmethod
    def _topic_pattern(cls, pattern: str) -> str:
        return _topic(pattern)


class WorkerSettings(_Section):
    queue: str = Field("inspector.captures", min_length=1, description="durable quorum queue the worker consumes")
    binding_keys: list[str] = Field(default_factory=lambda: ["#"], min_length=1,
                                    description="topic patterns binding the queue to the captures exchange")
    prefetch: int = Field(64, ge=1, le=65535, description="unacknowledged captures held at most")
    batch_size: int = Field(4, ge=1, le=4096, description="frames scored together at most")
    max_batch_wait_ms: float = Field(10.0, ge=0, description="longest a frame waits for its batch to fill")
    max_batch_hold_ms: float = Field(200.0, ge=0, description="longer still while frames are being decoded")
    decode_threads: int = Field(0, ge=0, description="threads decoding captures; 0 = one per CPU core")
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1, description="larger bodies or files are refused")
    max_image_pixels: int = Field(50_000_000, ge=1, description="images with more pixels are refused unread")
    max_jpeg_scans: int = Field(100, ge=1, description="JPEGs of more scans are refused unread")
    allowed_roots: list[Path] = Field(default_factory=list, description="folders image_uri may point into")
    routes: list[RouteSettings] = Field(default_factory=list, description="routing-key rules choosing a model")
    shutdown_grace_s: float = Field(25.0, gt=0, description="SIGTERM: time to finish held frames")
    start_timeout_s: float = Field(120.0, gt=0, description="how long the first connection is retried")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest wait between reconnection attempts")
    store_poll_s: float = Field(30.0, ge=0, description="store check for missed announcements; 0 = never")
    delivery_limit: int = Field(10, ge=1, description="deliveries of one capture before the broker dead-letters it")
    dead_letter_queue: str = Field("inspection.dead", min_length=1, description="durable queue keeping dead letters")
    max_inflight_bytes: int = Field(256 * 1024 * 1024, ge=1,
                                    description="capture bytes held in memory at most; past it no more are taken")
    max_frame_age_s: float = Field(0.0, ge=0, description="older captures are answered 'stale' unscored; 0 = off")
    watchdog_s: float = Field(120.0, ge=5, description="a core thread busy this long without progress: unhealthy")

    @field_validator("binding_keys")
    @classmethod
    def _binding_patterns(cls, patterns: list[str]) -> list[str]:
        return [_topic(p) for p in patterns]


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="serve /metrics, /healthz and /readyz")
    host: str = Field("0.0.0.0", description="address the HTTP endpoints listen on")
    port: int = Field(9108, ge=0, le=65535, description="port of the HTTP endpoints; 0 = any free port")
    max_label_values: int = Field(100, ge=1, description="distinct values per message label before 'other'")


class EvidenceSettings(_Section):
    """The reject archive: which frames the worker keeps, with their result and map, and for how long."""

    enabled: bool = Field(False, description="keep the evidence of the frames chosen below")
    path: str = Field("evidence", min_length=1, description="a folder, or s3://bucket/prefix")
    keep: list[Verdict] = Field(
        default_factory=lambda: ["fail", "error"], description="verdicts whose every frame is kept")
    pass_share: float = Field(0.0, ge=0.0, le=1.0, description="share of passes kept besides, sampled by frame id")
    maps: bool = Field(True, description="keep each scored frame's anomaly map (when its plugin draws them)")
    retention_days: int = Field(30, ge=0, description="frames older than this are pruned; 0 = kept for ever")
    max_bytes: int = Field(10 * 1024**3, ge=0, description="oldest frames are pruned past this size; 0 = no cap")
    max_files: int = Field(1_000_000, ge=0, description="oldest frames are pruned past this many files; 0 = no cap")
    queue_size: int = Field(256, ge=1, le=1_000_000, description="frames waiting to be written at most")
    queue_bytes: int = Field(256 * 1024 * 1024, ge=1, description="capture bytes waiting to be written at most")

    @field_validator("path", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        """A folder or s3://bucket/prefix, kept as text (a Path would fold `s3://` into `s3:/`)."""
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str) and value.startswith("s3:"):
            bucket, _, prefix = value[len("s3://"):].partition("/") if value.startswith("s3://") else ("", "", "")
            if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
                raise ValueError("an S3 location is written s3://bucket/prefix, the bucket 3 to 63 lower-case "
                                 "letters, digits, '.' and '-'")
            if prefix.strip("/") and any(p in ("", ".", "..") for p in prefix.strip("/").split("/")):
                raise ValueError("the key prefix of an S3 location must be plain words separated by '/'")
        return value

    @field_validator("keep")
    @classmethod
    def _distinct(cls, keep: list[str]) -> list[str]:
        if len(set(keep)) != len(keep):
            raise ValueError("names a verdict twice; list each of 'fail', 'error', 'pass' at most once")
        return keep

    @model_validator(mode="after")
    def _pass_share_or_pass(self) -> "EvidenceSettings":
        if "pass" in self.keep and self.pass_share > 0:
            raise ValueError(f"evidence.keep has 'pass', which keeps every pass, and evidence.pass_share is "
                             f"{self.pass_share:g}: drop one of them")
        return self


class OpcuaSourceSettings(_Section):
    line: str = Field(min_length=1, max_length=124, pattern=r"^[\w:@+=~-][\w.:@+=~-]*$",
                      description="a line id as results carry it")
    camera: str = Field(min_length=1, max_length=124, pattern=r"^[\w:@+=~-][\w.:@+=~-]*$",
                        description="a camera id as results carry it")


class OpcuaSettings(_Section):
    """`inspector opcua`: the bridge that serves each line and camera's latest verdict to OPC UA clients."""

    endpoint: str = Field("opc.tcp://0.0.0.0:4840/inspector", pattern=r"^opc\.tcp://[^/\s]+:\d+(/\S*)?$",
                          description="opc.tcp://HOST:PORT/PATH the server listens on")
    namespace: str = Field("urn:inspector:results", min_length=1, description="the namespace URI of the nodes")
    binding_keys: list[str] = Field(default_factory=lambda: ["#"], min_length=1,
                                    description="topic patterns on <verdict>.<line>.<camera> the bridge takes")
    queue_max_length: int = Field(10000, ge=1, description="results held for the bridge at most; oldest dropped")
    reject_pulse_s: float = Field(0.5, gt=0, le=3600, description="seconds Reject stays true after a fail")
    max_sources: int = Field(100, ge=1, le=10000, description="line/camera pairs served; later ones count as other")
    sources: list[OpcuaSourceSettings] = Field(default_factory=list,
                                               description="pairs served from the start, outside the cap")
    security: list[Literal["none", "sign", "sign_and_encrypt"]] = Field(
        default_factory=lambda: ["none"], min_length=1, description="security modes offered (Basic256Sha256)")
    certificate: str = Field("", description="the server's certificate, DER (PEM if named .pem); for sign modes")
    private_key: str = Field("", description="its private key, DER (PEM if named .pem)")
    username: str = Field("", description="the one user allowed in; '' = anonymous clients")
    password: SecretStr = Field(SecretStr(""), description="from INSPECTOR_OPCUA__PASSWORD only")

    @field_validator("binding_keys")
    @classmethod
    def _binding_patterns(cls, patterns: list[str]) -> list[str]:
        return [_topic(p) for p in patterns]

    @model_validator(mode="after")
    def _security_needs_keys(self) -> "OpcuaSettings":
        signed = any(mode != "none" for mode in self.security)
        if signed and not (self.certificate and self.private_key):
            raise ValueError("opcua.security offers a signed mode: set opcua.certificate and opcua.private_key "
                             "(paths), or offer only 'none'")
        if bool(self.certificate) != bool(self.private_key):
            raise ValueError("opcua.certificate and opcua.private_key go together: set both or neither")
        if self.username and not self.password.get_secret_value():
            raise ValueError("opcua.username is set: set its password in INSPECTOR_OPCUA__PASSWORD")
        return self


REGIONS_CHOICES = "false, true (the same as \"fail\"), \"fail\" or \"all\""
_REGIONS_WORDS = {"true": "fail", "false": False, "fail": "fail", "all": "all"}


class ModelSettings(_Section):
    plugin: str = Field("dfkde", description="the plugin that scores this model's frames")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="anomaly probability at or over which a frame fails")
    regions: Literal[False, "fail", "all"] = Field(
        False, description="publish where the defect is (its map's regions): false, 'fail' (or true) in fail "
                           "results, 'all' in every scored result (a map per frame; a pass then waits for it)")

    @field_validator("regions", mode="before")
    @classmethod
    def _regions(cls, value: Any) -> Any:
        """true was the only way on before 'all' existed, and means 'fail'; an env var's word is taken too."""
        if value is True:
            return "fail"
        if isinstance(value, str) and value.strip().lower() in _REGIONS_WORDS:
            return _REGIONS_WORDS[value.strip().lower()]
        if value is False:
            return False
        raise ValueError(f"must be {REGIONS_CHOICES}")


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
    log_format: Literal["text", "json"] = Field(
        "text", description="'text' for people, 'json' for a log pipeline: one JSON object per line"
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    store: StoreSettings = StoreSettings()
    broker: BrokerSettings = BrokerSettings()
    refit: RefitSettings = RefitSettings()
    worker: WorkerSettings = WorkerSettings()
    metrics: MetricsSettings = MetricsSettings()
    evidence: EvidenceSettings = EvidenceSettings()
    opcua: OpcuaSettings = OpcuaSettings()
    default_model: str = Field("default", pattern=MODEL_NAME_PATTERN)
    models: dict[str, ModelSettings] = Field(default_factory=lambda: {"default": ModelSettings()})
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

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
        problems = []  # every one, not only the first
        defined = ", ".join(sorted(self.models))
        if self.default_model not in self.models:
            problems.append(f"default_model {self.default_model!r} is not one of the models defined: {defined}")
        for index, route in enumerate(self.worker.routes):
            if route.model not in self.models:
                problems.append(f"worker.routes[{index}] names model {route.model!r}, which is not one of the "
                                f"models defined: {defined}")
        if self.evidence.enabled and _overlap(self.evidence.path, self.store.path):
            problems.append(
                f"evidence.path {self.evidence.path!r} and store.path {self.store.path!r} overlap (one holds the "
                "other), so pruning the archive could delete model versions; give the evidence archive a folder "
                "or S3 prefix of its own"
            )
        if problems:
            raise ValueError("; ".join(problems))
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
        # The file's values arrive as init arguments; the environment overrides them. The file forms of
        # secrets (INSPECTOR_BROKER__PASSWORD_FILE) are read by `load` and arrive with the file's values.
        if hasattr(env_settings, "env_vars"):
            env_settings.env_vars = {name: value for name, value in env_settings.env_vars.items()
                                     if not secretfiles.is_secret_file_variable(name, ENV_PREFIX, ENV_DELIMITER)}
        return (env_settings, init_settings)

    def plugin_settings(self, plugin: str) -> BaseModel:
        """The validated settings of `plugin`: its table in `plugins`, over the plugin's defaults."""
        from inspector.plugin import get_plugin

        cls = get_plugin(plugin)
        table = _complex_values_from_json(cls.Settings, self.plugins.get(plugin, {}), ("plugins", plugin))
        try:
            return cls.Settings.model_validate(table)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, prefix=("plugins", plugin))) from None


def _complex_values_from_json(model: type[BaseModel], table: Mapping[str, Any], prefix: tuple[str, ...]) -> dict:
    """A plugin table with its list, tuple, set and mapping values decoded from JSON where they arrived as
    text. The plugin tables are untyped at the top level, so `INSPECTOR_PLUGINS__DFKDE__LAYERS='["a","b"]'`
    reaches them as a string; pydantic-settings decodes typed complex fields the same way."""
    decoded = dict(table)
    for key, value in table.items():
        field = model.model_fields.get(key)
        if field is None or not isinstance(value, str) or not _is_complex(field.annotation):
            continue
        try:
            decoded[key] = json.loads(value)
        except ValueError:
            env_name = ENV_PREFIX + ENV_DELIMITER.join((*prefix, key)).upper()
            source = f" [from {env_name}]" if env_name in os.environ else ""
            raise ConfigError(
                f"invalid configuration:\n  {'.'.join((*prefix, key))}: expected a JSON list or table "
                f"(e.g. '[\"blocks.4\", \"blocks.6\"]'), got {value!r}{source}"
            ) from None
    return decoded


def _is_complex(annotation: Any) -> bool:
    """Whether a field's type is a list, tuple, set, mapping or model (or an optional one of those)."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return any(_is_complex(arg) for arg in get_args(annotation) if arg is not type(None))
    if origin is Annotated:
        return _is_complex(get_args(annotation)[0])
    kind = origin or annotation
    return isinstance(kind, type) and (issubclass(kind, (list, tuple, set, frozenset, dict, Mapping, BaseModel)))


def _overlap(one: str, other: str) -> bool:
    """Whether two locations (folders, or s3://bucket/prefix) are the same or one holds the other."""
    def parts(location: str) -> tuple[str, ...]:
        if location.startswith("s3://"):
            return ("s3://", *filter(None, location[len("s3://"):].split("/")))
        return tuple(Path(os.path.realpath(Path(location).expanduser())).parts)

    a, b = parts(one), parts(other)
    return a[:len(b)] == b or b[:len(a)] == a


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
            if "input" in error and not isinstance(error["input"], dict) and "password" not in loc:
                reason += f" (got {redact_text(repr(error['input']))})"
        env_name = ENV_PREFIX + ENV_DELIMITER.join(loc).upper()
        source = f" [from {env_name}]" if env_name in os.environ else ""
        lines.append(f"{key}: {reason}{source}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; copy config.example.toml there or pass --config") \
            from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _environment_problems(environ: Mapping[str, str]) -> list[str]:
    """Unknown INSPECTOR_* variables (a misspelt override must not be silently ignored), and list or table
    settings not written as JSON (pydantic-settings would stop on them with a traceback): one line each."""
    known = {name.upper() for name in Settings.model_fields}
    problems = []
    for variable, value in sorted(environ.items()):
        if not variable.upper().startswith(ENV_PREFIX) or variable.upper() == CONFIG_ENV:
            continue
        path = variable[len(ENV_PREFIX) :].split(ENV_DELIMITER)
        if path[0].upper() not in known:
            problems.append(
                f"environment variable {variable}: unknown key {path[0].lower()!r}; "
                f"known top-level keys: {', '.join(sorted(k.lower() for k in known))}"
            )
            continue
        annotation = _annotation(Settings, [part.lower() for part in path])
        if annotation is not None and _must_be_json(annotation):
            try:
                json.loads(value)
            except ValueError:
                problems.append(f"environment variable {variable}: {redact_text(value)!r} is not JSON; a list or "
                                f"table setting is written as JSON, e.g. {variable}='{_as_json(value)}'")
    return problems


def _annotation(model: Any, path: list[str]) -> Any:
    """The type of the setting at `path` under a settings model; None where the path leaves the typed tree
    (a key of `models` or `plugins`, an unknown key: the validation names those)."""
    annotation: Any = model
    for part in path:
        fields = getattr(annotation, "model_fields", None) if isinstance(annotation, type) else None
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
    return annotation


def _must_be_json(annotation: Any) -> bool:
    """Whether pydantic-settings reads the setting from the environment as JSON only: a list, tuple, set,
    mapping or model, or an optional one (`str | list[str]` takes a plain string as well)."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(members) and all(_must_be_json(arg) for arg in members)
    return _is_complex(annotation)


def _as_json(value: str) -> str:
    """A plain value as the JSON list it most likely meant: comma-separated words as a list of strings."""
    return json.dumps([word.strip() for word in value.split(",") if word.strip()])


def _secrets_problems(data: Mapping[str, Any]) -> list[str]:
    """The broker and OPC UA passwords come from the environment only, never from a file that gets copied
    around."""
    problems = []
    opcua = data.get("opcua")
    if isinstance(opcua, Mapping) and "password" in opcua:
        problems.append("OPC UA password in the config file: remove opcua.password and set "
                        "INSPECTOR_OPCUA__PASSWORD in the environment instead")
    broker = data.get("broker")
    if not isinstance(broker, Mapping):
        return problems
    url = broker.get("url")
    urls = [url] if isinstance(url, str) else url if isinstance(url, list) else []
    if "password" in broker or any(isinstance(one, str) and urlsplit(one).password for one in urls):
        problems.append("broker password in the config file: remove it (from broker.password or broker.url) "
                        "and set INSPECTOR_BROKER__PASSWORD in the environment instead")
    return problems


def _report(problems: list[str]) -> ConfigError:
    """Every problem found, in one error: a single one as its own line, several under one heading."""
    lines = [line for problem in problems for line in problem.removeprefix(_HEADING).split("\n  ")]
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(_HEADING + "\n  ".join(lines))


_HEADING = "invalid configuration:\n  "


def load(path: Path | str | None = None, *, check_plugins: bool = True) -> Settings:
    """Settings from `path` (or ./inspector.toml when present, else defaults) and the environment. Every
    problem found is reported at once, not only the first."""
    if path is None:
        data = _read_toml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else {}
    else:
        data = _read_toml(Path(path).expanduser())
    problems = _environment_problems(os.environ) + _secrets_problems(data)
    for (section, key), secret in secretfiles.setting_secret_files(os.environ, ENV_PREFIX, ENV_DELIMITER).items():
        table = data.get(section, {})
        data = {**data, section: {**table, key: secret} if isinstance(table, Mapping) else table}
    settings = None
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems.append(_describe(exc))
    except SettingsError as exc:  # a value the environment source cannot parse: named above, or else here
        if not problems:
            problems.append(f"{exc}; check the INSPECTOR_* variables")
    if problems or settings is None:
        raise _report(problems)
    if check_plugins:
        check_plugin_settings(settings)
    return settings


def check_plugin_settings(settings: Settings) -> None:
    """Every model's plugin can be loaded and every plugin table is valid; all problems in one ConfigError.
    Loads the plugins (and so torch): commands check their arguments first."""
    problems = []
    for name, model in settings.models.items():
        try:
            settings.plugin_settings(model.plugin)
        except PluginError as exc:
            problems.append(f"models.{name}.plugin: {exc}")
        except ConfigError as exc:
            problems.append(str(exc))
    for plugin in settings.plugins:
        if plugin in {model.plugin for model in settings.models.values()}:
            continue  # checked above
        try:
            settings.plugin_settings(plugin)
        except PluginError as exc:
            problems.append(f"plugins.{plugin}: {exc}")
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise _report(list(dict.fromkeys(problems)))
