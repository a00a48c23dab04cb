"""Built-in scoring plugins, registered through the `inspector.plugins` entry points."""
