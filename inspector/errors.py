"""The project's exceptions.

Each carries a stable `code` (used in `error` results and the `reason` metric label)
and the exit status the CLI maps it to: 2 for an operator mistake (bad usage or
configuration), 1 for a runtime failure.
"""

from __future__ import annotations


class InspectorError(Exception):
    """Base of every error the project raises on purpose."""

    code = "internal"
    exit_code = 1


class ConfigError(InspectorError):
    """Invalid configuration or usage: the message names the key and the fix."""

    code = "config_invalid"
    exit_code = 2


class WeightsError(ConfigError):
    """Backbone weights that cannot be found, read or matched to the architecture."""

    code = "weights_invalid"


class PluginError(InspectorError):
    """A plugin that is unknown, fails its contract check, or clashes with another."""

    code = "plugin_invalid"
    exit_code = 2


class FitError(InspectorError):
    """A model could not be fitted from the data given (too few or degenerate embeddings)."""

    code = "fit_failed"


class StateError(InspectorError):
    """A saved model state that is missing, corrupt or does not match its plugin."""

    code = "state_invalid"


class VersionIncomplete(StateError):
    """A stored version not whole yet where it is read: a listed file or its manifest missing, or `current`
    naming a version the listing does not show yet (NFS, S3-compatible stores lag). Worth trying again."""


class StoreUnavailable(InspectorError):
    """The model store could not be reached (a remote store away, a network fault): worth trying again."""

    code = "store_unavailable"


class BrokerError(InspectorError):
    """RabbitMQ could not be reached, or refused what was sent."""

    code = "broker_unavailable"


# Why a capture could not be scored: the `error.code` of its result and the `reason`
# label of inspector_errors_total. Stable: downstream systems and dashboards match on them.
FRAME_ERROR_CODES: dict[str, str] = {
    "empty_body": "the capture's body is empty",
    "unsupported_content_type": "a content type the worker does not decode",
    "image_undecodable": "image bytes that do not decode, or are truncated",
    "image_too_large": "a body or image_uri file over worker.max_image_bytes",
    "image_too_many_pixels": "an image over worker.max_image_pixels (refused before decoding)",
    "image_too_complex": "a JPEG of more scans than worker.max_jpeg_scans (refused before decoding)",
    "raw_headers_missing": "image/x-raw without its width, height or pixel_format header",
    "raw_headers_invalid": "image/x-raw with a size that is not a positive integer or an unknown pixel_format",
    "raw_size_mismatch": "image/x-raw whose body length is not width x height x channels",
    "json_malformed": "application/json that is not an object with exactly one of image_uri, image_b64",
    "uri_not_allowed": "an image_uri that is not a file:// path inside worker.allowed_roots",
    "file_not_found": "an image_uri that names no readable file",
    "base64_invalid": "an image_b64 that is not valid base64",
    "model_unknown": "a model header (or route) naming no configured model",
    "model_unavailable": "a configured model with no version loaded (run inspector refit for it)",
    "scoring_failed": "the plugin failed on the frame or gave a score that is not a finite number",
    "headers_undecodable": "AMQP properties or headers the client library cannot decode (nested too deep, a "
                           "time out of range); the body is dead-lettered without them",
    "stale": "captured longer ago than worker.max_frame_age_s: answered without scoring",
    "internal_error": "a fault in the worker itself, outside the plugin; the capture is kept for replay",
}


class FrameError(InspectorError):
    """One capture that cannot be scored; the worker answers it with an error result and a dead letter."""

    def __init__(self, code: str, message: str) -> None:
        if code not in FRAME_ERROR_CODES:
            raise ValueError(f"unknown frame error code {code!r}")
        super().__init__(message)
        self.code = code
