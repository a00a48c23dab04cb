"""inspector: the visual-inspection worker of a production line."""

__version__ = "0.1.0"
