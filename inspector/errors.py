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


class BrokerError(InspectorError):
    """RabbitMQ could not be reached, or refused what was sent."""

    code = "broker_unavailable"
