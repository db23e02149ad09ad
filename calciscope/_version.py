"""The package version, in a module of its own so library code never imports the public API module."""

__version__ = "0.1.0"
